//! Recovery after the agent stopped while tasks ran (a crash, `kill -9`, a reboot). A
//! task directory exists only while its task runs, so at start every directory under
//! `WORK_DIR/tasks/` is a task the previous run did not finish. For each:
//!
//! - any process still working in it (Terraform, its providers: orphans of the old
//!   agent) is killed with its whole process group;
//! - if the task had finished (its `task_finished` was about to be owed), that report is
//!   owed again as it was;
//! - otherwise a line saying why goes at the end of the phase's log, the partial log is
//!   uploaded, and the task is reported `failed`.
//!
//! All of it goes through the outbox, so it reaches the server whenever it is back.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::process::{getpgid, kill_process_group, Pid, Signal};

use super::outbox::Entry;
use super::runner::{append_line, log_path, FINISHED_MARKER};
use super::Ctx;
use crate::protocol::{valid_task_id, AgentMsg, FinalStatus, Phase};

/// The line an interrupted task's log ends with.
pub(crate) const INTERRUPTED: &str =
    "--- the agent stopped while this task ran (crash or restart): the task failed ---";

/// Recovers every task the previous run left; returns how many.
pub(crate) fn recover(ctx: &Ctx) -> io::Result<usize> {
    let tasks = ctx.config.work_dir.join("tasks");
    let entries = match fs::read_dir(&tasks) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut n = 0;
    for entry in entries {
        let dir = entry?.path();
        let Some(id) = dir.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
            continue;
        };
        if !valid_task_id(&id) || !dir.is_dir() {
            continue;
        }
        let killed = stop_leftovers(&dir);
        if killed > 0 {
            log::warn!("{id}: stopped {killed} process(es) left running by the previous agent");
        }
        recover_task(ctx, &id, &dir);
        if let Err(e) = fs::remove_dir_all(&dir) {
            log::warn!("{id}: cannot remove {}: {e}", dir.display());
        }
        n += 1;
    }
    Ok(n)
}

fn recover_task(ctx: &Ctx, id: &str, dir: &Path) {
    let finished = fs::read(dir.join(FINISHED_MARKER))
        .ok()
        .and_then(|b| serde_json::from_slice::<AgentMsg>(&b).ok());
    if let Some(event) = finished {
        log::info!("{id}: finished before the restart; its report is owed again");
        ctx.owe(Entry::Event { event });
        return;
    }
    let work = &ctx.config.work_dir;
    let phase = if log_path(work, id, Phase::Apply).exists() {
        Phase::Apply
    } else {
        Phase::Plan
    };
    let path = log_path(work, id, phase);
    if path.exists() {
        append_line(&path, INTERRUPTED);
        ctx.owe(Entry::Upload {
            task_id: id.to_string(),
            phase,
        });
    }
    log::warn!("{id}: interrupted by the agent's restart: reported failed");
    ctx.owe(Entry::Event {
        event: AgentMsg::TaskFinished {
            task_id: id.to_string(),
            status: FinalStatus::Failed,
            exit_code: None,
        },
    });
}

/// Processes whose working directory is in `dir`.
fn processes_in(dir: &Path) -> Vec<i32> {
    let Ok(procs) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::read_link(format!("/proc/{pid}/cwd"))
                .map(|cwd: PathBuf| cwd.starts_with(dir))
                .unwrap_or(false)
        })
        .collect()
}

/// Kills (SIGKILL) the process group of every process working in `dir`, and waits
/// (at most 10 s) until they are gone. Returns how many there were.
fn stop_leftovers(dir: &Path) -> usize {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let found = processes_in(&dir);
    for pid in &found {
        let Some(p) = Pid::from_raw(*pid) else {
            continue;
        };
        let group = getpgid(Some(p)).unwrap_or(p);
        if let Err(e) = kill_process_group(group, Signal::KILL) {
            log::debug!("kill process group {}: {e}", group.as_raw_nonzero());
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !processes_in(&dir).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    found.len()
}
