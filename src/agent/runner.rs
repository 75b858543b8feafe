//! The worker: runs one task's Terraform in its own directory, phase by phase, with
//! each phase's stdout and stderr in that phase's log file; uploads each log when its
//! phase ends and reports `phase_finished`, then `task_finished`.
//!
//! Layout under the work dir: `tasks/<id>/` holds `main.tf.json`, the 0600
//! `terraform.tfvars.json` and Terraform's own files, and is removed when the task ends;
//! `logs/<id>/<phase>.log` stays (it is what was uploaded).

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use rustix::process::{kill_process_group, Pid, Signal};

use super::outbox::Entry;
use super::Ctx;
use crate::protocol::{Action, AgentMsg, FinalStatus, Phase, TaskData};
use crate::wsloop::Outgoing;

/// A running task as the other threads see it: its cancel switch (set once; signals
/// whatever child runs at the time) and its progress (for the live-log streamer).
pub(crate) struct TaskHandle {
    pub action: Action,
    canceled: AtomicBool,
    timed_out: AtomicBool,
    /// The process group of the running child, if any.
    child: Mutex<Option<i32>>,
    progress: Mutex<Progress>,
}

#[derive(Default)]
struct Progress {
    started: Vec<Phase>,
    done: Vec<Phase>,
    finished: bool,
}

impl TaskHandle {
    pub fn new(action: Action) -> TaskHandle {
        TaskHandle {
            action,
            canceled: AtomicBool::new(false),
            timed_out: AtomicBool::new(false),
            child: Mutex::new(None),
            progress: Mutex::new(Progress::default()),
        }
    }

    pub fn is_canceled(&self) -> bool {
        self.canceled.load(Ordering::SeqCst)
    }

    /// SIGINT (Terraform's graceful stop) now, SIGKILL after `grace` if still running.
    pub fn cancel(self: &std::sync::Arc<Self>, grace: Duration) {
        self.canceled.store(true, Ordering::SeqCst);
        let Some(pgid) = *self.child() else { return };
        signal_group(pgid, Signal::INT);
        let me = self.clone();
        let _ = thread::Builder::new()
            .name("cancel timer".into())
            .spawn(move || {
                thread::sleep(grace);
                if *me.child() == Some(pgid) {
                    log::warn!(
                        "process group {pgid} still running {} s after SIGINT: SIGKILL",
                        grace.as_secs()
                    );
                    signal_group(pgid, Signal::KILL);
                }
            });
    }

    /// The task ran over its timeout: stopped as a cancel is, but it ends `failed`.
    pub fn time_out(self: &std::sync::Arc<Self>, grace: Duration) {
        self.timed_out.store(true, Ordering::SeqCst);
        self.cancel(grace);
    }

    pub fn is_timed_out(&self) -> bool {
        self.timed_out.load(Ordering::SeqCst)
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Option<i32>> {
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_child(&self, pgid: Option<i32>) {
        *self.child() = pgid;
        if pgid.is_some() && self.is_canceled() {
            // Canceled between the check and the spawn: stop it now.
            if let Some(p) = pgid {
                signal_group(p, Signal::INT);
            }
        }
    }

    fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the phase's log file exists (it is created before this is set).
    pub fn phase_started(&self, phase: Phase) -> bool {
        self.progress().started.contains(&phase)
    }

    /// Whether the phase's log is complete.
    pub fn phase_done(&self, phase: Phase) -> bool {
        let p = self.progress();
        p.done.contains(&phase) || p.finished
    }

    pub fn is_finished(&self) -> bool {
        self.progress().finished
    }
}

fn signal_group(pgid: i32, sig: Signal) {
    if let Some(pid) = Pid::from_raw(pgid) {
        if let Err(e) = kill_process_group(pid, sig) {
            log::debug!("signal to process group {pgid}: {e}");
        }
    }
}

/// The child's environment: the agent's own, minus its secrets and settings (`IAC_*`),
/// plus Terraform's automation switches.
pub(crate) fn child_env(
    parent: impl Iterator<Item = (OsString, OsString)>,
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = parent
        .filter(|(k, _)| {
            let k = k.to_string_lossy();
            !k.starts_with("IAC_") && k != "TF_IN_AUTOMATION" && k != "TF_INPUT"
        })
        .collect();
    env.push(("TF_IN_AUTOMATION".into(), "1".into()));
    env.push(("TF_INPUT".into(), "0".into()));
    env
}

/// The Terraform commands of a phase, in order.
pub(crate) fn phase_steps(phase: Phase) -> Vec<Vec<&'static str>> {
    match phase {
        Phase::Plan => vec![
            vec!["init", "-input=false"],
            vec!["plan", "-input=false", "-out=tfplan"],
        ],
        Phase::Apply => vec![vec!["apply", "-input=false", "-auto-approve", "tfplan"]],
    }
}

/// The exit code a shell would show: the code, or 128 + the signal.
pub(crate) fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

pub(crate) fn task_dir(work_dir: &Path, task_id: &str) -> PathBuf {
    work_dir.join("tasks").join(task_id)
}

pub(crate) fn log_path(work_dir: &Path, task_id: &str, phase: Phase) -> PathBuf {
    work_dir
        .join("logs")
        .join(task_id)
        .join(format!("{}.log", phase.as_str()))
}

/// Writes the task's configuration into a fresh directory under the work dir.
pub(crate) fn prepare(work_dir: &Path, task: &TaskData) -> io::Result<()> {
    let dir = &task_dir(work_dir, &task.task_id);
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    fs::create_dir_all(dir)?;
    fs::write(dir.join("main.tf.json"), &task.tf_json)?;
    let mut vars = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dir.join("terraform.tfvars.json"))?;
    vars.write_all(task.variables.as_bytes())?;
    Ok(())
}

/// Runs one phase's steps with output into `log`. Returns the phase's exit code.
fn run_phase(
    ctx: &Ctx,
    dir: &Path,
    log: &mut File,
    phase: Phase,
    handle: &TaskHandle,
    secrets: &[Vec<u8>],
) -> io::Result<i32> {
    for args in phase_steps(phase) {
        if handle.is_canceled() {
            writeln!(log, "--- canceled before terraform {} ---", args[0])?;
            return Ok(130);
        }
        writeln!(log, "$ terraform {}", args.join(" "))?;
        // stdout and stderr share one pipe (so their order is kept) to the copier,
        // which masks secrets on the way to the log file.
        let (reader, writer) = io::pipe()?;
        let mut cmd = Command::new(&ctx.config.terraform);
        cmd.args(&args)
            .current_dir(dir)
            .env_clear()
            .envs(child_env(std::env::vars_os()))
            .stdin(Stdio::null())
            .stdout(writer.try_clone()?)
            .stderr(writer)
            // Its own process group: a cancel signals Terraform and its providers.
            .process_group(0);
        let spawned = cmd.spawn();
        // Our copies of the pipe's write end go now, so the copier sees the end of it.
        drop(cmd);
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                writeln!(
                    log,
                    "cannot start {}: {e} (set --terraform or put terraform on PATH)",
                    ctx.config.terraform.display()
                )?;
                return Ok(127);
            }
        };
        let mut sink = log.try_clone()?;
        let secrets = secrets.to_vec();
        let copier = thread::Builder::new()
            .name("log copier".into())
            .spawn(move || super::masker::copy(reader, &mut sink, secrets))?;
        handle.set_child(Some(child.id() as i32));
        let status = child.wait();
        handle.set_child(None);
        match copier.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => writeln!(
                log,
                "--- the agent could not write all of the output: {e} ---"
            )?,
            Err(_) => writeln!(log, "--- the agent's log copier failed ---")?,
        }
        let code = exit_code(status?);
        if code != 0 {
            writeln!(log, "--- terraform {} exited with code {code} ---", args[0])?;
            return Ok(code);
        }
    }
    Ok(0)
}

/// The whole task, on its worker thread. Always ends with `task_finished`.
pub(crate) fn run_task(
    ctx: &Ctx,
    task: TaskData,
    mut prepared: io::Result<()>,
    handle: &Arc<TaskHandle>,
) {
    let id = task.task_id.clone();
    // The timer ends when `_running` is dropped with this function.
    let (_running, timer_rx) = crossbeam_channel::bounded::<()>(0);
    if let Some(secs) = task.timeout_s {
        let handle = handle.clone();
        let grace = ctx.config.cancel_grace;
        let id = id.clone();
        let _ = thread::Builder::new()
            .name("timeout".into())
            .spawn(move || {
                if timer_rx.recv_timeout(Duration::from_secs(secs))
                    == Err(crossbeam_channel::RecvTimeoutError::Timeout)
                {
                    log::warn!("{id} ran over its timeout of {secs} s: stopping it");
                    handle.time_out(grace);
                }
            });
    }
    let work = &ctx.config.work_dir;
    let dir = task_dir(work, &id);
    let phases: &[Phase] = match task.action {
        Action::Plan => &[Phase::Plan],
        Action::Apply => &[Phase::Plan, Phase::Apply],
    };
    let mut last_code = 0;
    let secrets = super::masker::secrets(&task.variables, &task.sensitive_variables);
    for (i, phase) in phases.iter().copied().enumerate() {
        let path = log_path(work, &id, phase);
        let opened = open_log(&path);
        handle.progress().started.push(phase);
        let code = match opened {
            Ok(mut log) => match prepared {
                Err(ref e) => {
                    let _ = writeln!(
                        log,
                        "cannot prepare the task directory {}: {e}",
                        dir.display()
                    );
                    -1
                }
                Ok(()) => {
                    run_phase(ctx, &dir, &mut log, phase, handle, &secrets).unwrap_or_else(|e| {
                        let _ = writeln!(log, "the agent could not run this phase: {e}");
                        -1
                    })
                }
            },
            Err(e) => {
                log::error!("{id}: cannot write {}: {e}", path.display());
                prepared = Err(e);
                -1
            }
        };
        last_code = code;
        if handle.is_timed_out() {
            let secs = task.timeout_s.unwrap_or_default();
            append_line(
                &path,
                &format!("--- the task ran over its timeout of {secs} s and was stopped ---"),
            );
        }
        handle.progress().done.push(phase);
        log::info!("{id}: {} phase ended with code {code}", phase.as_str());
        ctx.owe(Entry::Upload {
            task_id: id.clone(),
            phase,
        });
        if handle.is_canceled() {
            // No `phase_finished`: `task_finished(canceled)` marks the interrupted phase
            // `canceled` rather than `failed`.
            break;
        }
        ctx.owe(Entry::Event {
            event: AgentMsg::PhaseFinished {
                task_id: id.clone(),
                phase,
                exit_code: code,
            },
        });
        if code != 0 && i + 1 < phases.len() {
            break;
        }
    }
    let status = if handle.is_timed_out() {
        FinalStatus::Failed
    } else if handle.is_canceled() {
        FinalStatus::Canceled
    } else if last_code == 0 {
        FinalStatus::Succeeded
    } else {
        FinalStatus::Failed
    };
    log::info!("{id}: {status}");
    let finished = AgentMsg::TaskFinished {
        task_id: id.clone(),
        status,
        exit_code: Some(last_code),
    };
    // The marker says "the final report is owed": a restart after this point reports it
    // as it is, rather than as an interrupted task.
    if let Ok(text) = serde_json::to_vec(&finished) {
        let _ = fs::write(dir.join(FINISHED_MARKER), text);
    }
    ctx.owe(Entry::Event { event: finished });
    if let Err(e) = fs::remove_dir_all(&dir) {
        if e.kind() != io::ErrorKind::NotFound {
            log::warn!("{id}: cannot remove {}: {e}", dir.display());
        }
    }
    handle.progress().finished = true;
    ctx.tasks().remove(&id);
    ctx.scheduler.finish(&id);
    ctx.mailbox.send(Outgoing::Nudge);
}

/// The file in a task directory that holds its `task_finished`, written just before it
/// is put in the outbox.
pub(crate) const FINISHED_MARKER: &str = ".iac-finished.json";

/// Appends one line to a log (best effort: the log is what the user reads, not state).
pub(crate) fn append_line(path: &Path, line: &str) {
    let appended = OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| writeln!(f, "{line}"));
    if let Err(e) = appended {
        log::warn!("cannot append to {}: {e}", path.display());
    }
}

fn open_log(path: &Path) -> io::Result<File> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_env_drops_agent_secrets() {
        let parent = [
            ("PATH", "/bin"),
            ("IAC_REGISTRATION_TOKEN", "secret"),
            ("IAC_SERVER", "http://x"),
            ("AWS_REGION", "eu-west-1"),
            ("TF_INPUT", "1"),
        ]
        .into_iter()
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let env = child_env(parent);
        let get = |k: &str| {
            env.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.to_str().unwrap())
        };
        assert_eq!(get("PATH"), Some("/bin"));
        assert_eq!(get("AWS_REGION"), Some("eu-west-1"));
        assert_eq!(get("IAC_REGISTRATION_TOKEN"), None);
        assert_eq!(get("IAC_SERVER"), None);
        assert_eq!(get("TF_INPUT"), Some("0"));
        assert_eq!(get("TF_IN_AUTOMATION"), Some("1"));
        assert_eq!(env.iter().filter(|(k, _)| k == "TF_INPUT").count(), 1);
    }

    #[test]
    fn steps_of_each_phase() {
        assert_eq!(phase_steps(Phase::Plan)[0], ["init", "-input=false"]);
        assert!(phase_steps(Phase::Plan)[1].contains(&"-out=tfplan"));
        assert!(phase_steps(Phase::Apply)[0].ends_with(&["tfplan"]));
    }

    #[test]
    fn task_files_are_written_with_private_variables() {
        use std::os::unix::fs::PermissionsExt;
        let work = std::env::temp_dir().join(format!(
            "iac-runner-{}",
            crate::util::hex(&crate::util::random_bytes(6).unwrap())
        ));
        let dir = task_dir(&work, "T-1");
        let task = TaskData {
            task_id: "T-1".into(),
            action: Action::Plan,
            tf_json: "{\"output\":{}}".into(),
            variables: "{\"a\":1}".into(),
            timeout_s: None,
            sensitive_variables: Vec::new(),
        };
        prepare(&work, &task).unwrap();
        fs::write(dir.join("stale"), "x").unwrap();
        prepare(&work, &task).unwrap();
        assert!(!dir.join("stale").exists(), "a fresh directory every time");
        assert_eq!(
            fs::read_to_string(dir.join("main.tf.json")).unwrap(),
            task.tf_json
        );
        let mode = fs::metadata(dir.join("terraform.tfvars.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::remove_dir_all(work).unwrap();
    }

    #[test]
    fn exit_codes_of_signals() {
        let st = Command::new("sh")
            .args(["-c", "kill -INT $$"])
            .status()
            .unwrap();
        assert_eq!(exit_code(st), 130);
        let st = Command::new("sh").args(["-c", "exit 3"]).status().unwrap();
        assert_eq!(exit_code(st), 3);
    }
}
