//! The outbox: what the agent owes the server, on disk, in order. A worker never talks
//! to the server itself: it puts "upload this log" and "report this event" entries here
//! and goes on. The deliverer thread ([`run`]) hands them over one at a time, oldest
//! first, and removes an entry only once the server confirmed it (a 2xx for an upload,
//! an `ack` on WS 1 for an event). So a server that is down, a network that is cut, or an
//! agent restart loses nothing: delivery resumes where it stopped. The server treats
//! every entry idempotently, so one delivered twice (sent, then the ack lost) is harmless.
//!
//! Layout: `WORK_DIR/outbox/<seq>.json`, each written to a temporary name, fsynced and
//! renamed, so an entry is either whole or absent.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{uploader, Ctx};
use crate::protocol::{AgentMsg, Phase};

/// One thing owed to the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Entry {
    /// Upload the complete log of a phase.
    Upload { task_id: String, phase: Phase },
    /// Send an event on WS 1 and wait for its `ack`.
    Event { event: AgentMsg },
}

pub(crate) struct Outbox {
    dir: PathBuf,
    next: Mutex<u64>,
    added: Condvar,
    /// [`Outbox::spool_bytes`] as last counted; dropped whenever an entry comes or goes
    /// (a log is complete before its upload is queued, so nothing else changes it).
    spool: Mutex<Option<u64>>,
}

fn seq_of(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_suffix(".json")?
        .parse()
        .ok()
}

impl Outbox {
    /// Opens the outbox in `dir`, keeping what an earlier run left there.
    pub fn open(dir: &Path) -> io::Result<Outbox> {
        fs::create_dir_all(dir)?;
        let mut last = 0;
        for e in fs::read_dir(dir)? {
            let path = e?.path();
            match seq_of(&path) {
                Some(seq) => last = last.max(seq),
                // A temporary file from a write that never finished: not an entry.
                None => {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        Ok(Outbox {
            dir: dir.to_path_buf(),
            next: Mutex::new(last + 1),
            added: Condvar::new(),
            spool: Mutex::new(None),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        self.next.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds an entry durably; returns its sequence number.
    pub fn push(&self, entry: &Entry) -> io::Result<u64> {
        let mut next = self.lock();
        let seq = *next;
        let tmp = self.dir.join(format!(".{seq}.tmp"));
        let mut f = File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(entry).map_err(io::Error::other)?)?;
        f.sync_all()?;
        fs::rename(&tmp, self.dir.join(format!("{seq:020}.json")))?;
        File::open(&self.dir)?.sync_all()?;
        *next += 1;
        self.forget_spool();
        self.added.notify_all();
        Ok(seq)
    }

    /// The oldest entry, waiting up to `timeout` for one.
    pub fn first(&self, timeout: Duration) -> io::Result<Option<(u64, Entry)>> {
        let deadline = Instant::now() + timeout;
        let mut guard = self.lock();
        loop {
            if let Some(found) = self.oldest()? {
                return Ok(Some(found));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            guard = self
                .added
                .wait_timeout(guard, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn oldest(&self) -> io::Result<Option<(u64, Entry)>> {
        let mut seqs: Vec<u64> = fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok().and_then(|e| seq_of(&e.path())))
            .collect();
        seqs.sort_unstable();
        for seq in seqs {
            let path = self.path(seq);
            match fs::read(&path).map(|b| serde_json::from_slice::<Entry>(&b)) {
                Ok(Ok(entry)) => return Ok(Some((seq, entry))),
                Ok(Err(e)) => {
                    // Not ours to guess at: set it aside and say so.
                    log::error!(
                        "outbox entry {} is unreadable ({e}): moved aside",
                        path.display()
                    );
                    let _ = fs::rename(&path, path.with_extension("bad"));
                    self.forget_spool();
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.json"))
    }

    /// Called after every change to the entries: a count that ran meanwhile holds the
    /// lock until it has stored its result, which this then drops.
    fn forget_spool(&self) {
        *self.spool.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The server has it: forget the entry.
    pub fn remove(&self, seq: u64) -> io::Result<()> {
        let removed = fs::remove_file(self.path(seq));
        // After the change, so that a count running meanwhile is not kept.
        self.forget_spool();
        match removed {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Bytes of logs waiting to be uploaded (the spool), under `work_dir`: counted once
    /// and then remembered until the outbox changes.
    pub fn spool_bytes(&self, work_dir: &Path) -> u64 {
        let mut cached = self.spool.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = *cached {
            return n;
        }
        let n = self.count_spool(work_dir);
        *cached = Some(n);
        n
    }

    fn count_spool(&self, work_dir: &Path) -> u64 {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return 0;
        };
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice::<Entry>(&b).ok())
            .filter_map(|entry| match entry {
                Entry::Upload { task_id, phase } => {
                    fs::metadata(super::runner::log_path(work_dir, &task_id, phase)).ok()
                }
                Entry::Event { .. } => None,
            })
            .map(|m| m.len())
            .sum()
    }

    /// How many entries wait.
    pub fn len(&self) -> usize {
        fs::read_dir(&self.dir)
            .map(|d| {
                d.filter_map(|e| e.ok().and_then(|e| seq_of(&e.path())))
                    .count()
            })
            .unwrap_or(0)
    }
}

/// Removes the local logs of tasks older than `keep` whose uploads are not waiting in
/// the outbox (the server has them). Returns how many tasks' logs went.
pub(crate) fn prune_logs(work_dir: &Path, outbox: &Outbox, keep: Duration) -> usize {
    let pending: std::collections::HashSet<String> = fs::read_dir(&outbox.dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| fs::read(e.path()).ok())
                .filter_map(|b| serde_json::from_slice::<Entry>(&b).ok())
                .filter_map(|e| match e {
                    Entry::Upload { task_id, .. } => Some(task_id),
                    Entry::Event { .. } => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let Ok(dirs) = fs::read_dir(work_dir.join("logs")) else {
        return 0;
    };
    let mut removed = 0;
    for dir in dirs.filter_map(|e| e.ok()) {
        let name = dir.file_name().to_string_lossy().into_owned();
        let old = dir
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > keep);
        // A task still running here has its directory under tasks/: leave it alone.
        let running = work_dir.join("tasks").join(&name).exists();
        if old && !running && !pending.contains(&name) && fs::remove_dir_all(dir.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// How long to wait for an `ack` before sending an event again.
const ACK_WAIT: Duration = Duration::from_secs(5);

/// The deliverer thread: hands entries to the server in order, forever.
pub(crate) fn run(ctx: Arc<Ctx>) {
    let mut next_prune = Instant::now();
    loop {
        if Instant::now() >= next_prune {
            next_prune = Instant::now() + Duration::from_secs(3600);
            let removed = prune_logs(&ctx.config.work_dir, &ctx.outbox, ctx.config.keep_logs);
            if removed > 0 {
                log::info!(
                    "removed the local logs of {removed} task(s) older than {} days",
                    ctx.config.keep_logs.as_secs() / 86_400
                );
            }
        }
        let (seq, entry) = match ctx.outbox.first(Duration::from_secs(60)) {
            Ok(Some(found)) => found,
            Ok(None) => continue,
            Err(e) => {
                log::error!("cannot read the outbox: {e}");
                std::thread::sleep(Duration::from_secs(5));
                continue;
            }
        };
        let delivered = match &entry {
            Entry::Upload { task_id, phase } => {
                let path = super::runner::log_path(&ctx.config.work_dir, task_id, *phase);
                match uploader::upload(&ctx, task_id, *phase, &path) {
                    Ok(()) => true,
                    Err(e) => {
                        // Refused for good (the task is gone, or not ours): nothing to retry.
                        log::error!(
                            "{task_id}: the {} log was not archived: {e}",
                            phase.as_str()
                        );
                        true
                    }
                }
            }
            Entry::Event { event } => send_event(&ctx, seq, event),
        };
        if delivered {
            if let Err(e) = ctx.outbox.remove(seq) {
                log::error!("cannot remove outbox entry {seq}: {e}");
            }
        }
    }
}

/// Sends an event on WS 1 (once per connection, again if no `ack` comes) until the
/// server acknowledges `seq`.
fn send_event(ctx: &Ctx, seq: u64, event: &AgentMsg) -> bool {
    let mut text = serde_json::to_value(event).expect("an event always serializes");
    text["seq"] = seq.into();
    let text = text.to_string();
    let mut sent_on: Option<u64> = None;
    let mut sent_at = Instant::now();
    loop {
        if ctx.acked.load(Ordering::SeqCst) >= seq {
            return true;
        }
        let conn = ctx.connection.load(Ordering::SeqCst);
        let connected = conn % 2 == 1; // odd: a WS 1 is up
        if connected && (sent_on != Some(conn) || sent_at.elapsed() >= ACK_WAIT) {
            ctx.mailbox.send_text(text.clone());
            sent_on = Some(conn);
            sent_at = Instant::now();
        }
        ctx.wait_ack(seq, Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp() -> PathBuf {
        std::env::temp_dir().join(format!(
            "iac-outbox-{}",
            crate::util::hex(&crate::util::random_bytes(6).unwrap())
        ))
    }

    #[test]
    fn entries_come_back_in_order_and_survive_a_reopen() {
        let dir = temp();
        let ob = Outbox::open(&dir).unwrap();
        let up = Entry::Upload {
            task_id: "T-1".into(),
            phase: Phase::Plan,
        };
        let ev = Entry::Event {
            event: AgentMsg::TaskFinished {
                task_id: "T-1".into(),
                status: crate::protocol::FinalStatus::Succeeded,
                exit_code: Some(0),
            },
        };
        let s1 = ob.push(&up).unwrap();
        let s2 = ob.push(&ev).unwrap();
        assert!(s2 > s1);
        assert_eq!(ob.first(Duration::ZERO).unwrap(), Some((s1, up.clone())));
        ob.remove(s1).unwrap();
        drop(ob);
        // A half-written entry from a crash is not an entry.
        fs::write(dir.join(".99.tmp"), "{").unwrap();
        let ob = Outbox::open(&dir).unwrap();
        assert_eq!(ob.len(), 1);
        assert_eq!(ob.first(Duration::ZERO).unwrap(), Some((s2, ev)));
        ob.remove(s2).unwrap();
        assert_eq!(ob.first(Duration::from_millis(10)).unwrap(), None);
        assert!(ob.push(&up).unwrap() > s2, "numbers are never reused");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_spool_counts_the_logs_still_to_upload() {
        let work = temp();
        let ob = Outbox::open(&work.join("outbox")).unwrap();
        let log = super::super::runner::log_path(&work, "T-1", Phase::Plan);
        fs::create_dir_all(log.parent().unwrap()).unwrap();
        fs::write(&log, vec![b'x'; 1000]).unwrap();
        assert_eq!(ob.spool_bytes(&work), 0);
        let seq = ob
            .push(&Entry::Upload {
                task_id: "T-1".into(),
                phase: Phase::Plan,
            })
            .unwrap();
        assert_eq!(ob.spool_bytes(&work), 1000);
        // Remembered: a state message every few seconds does not read the outbox again.
        fs::write(&log, vec![b'x'; 10]).unwrap();
        assert_eq!(ob.spool_bytes(&work), 1000);
        ob.remove(seq).unwrap();
        assert_eq!(ob.spool_bytes(&work), 0);
        fs::remove_dir_all(work).unwrap();
    }

    #[test]
    fn old_logs_go_unless_they_still_wait_for_the_server() {
        let work = temp();
        let ob = Outbox::open(&work.join("outbox")).unwrap();
        for id in ["T-1", "T-2"] {
            let log = super::super::runner::log_path(&work, id, Phase::Plan);
            fs::create_dir_all(log.parent().unwrap()).unwrap();
            fs::write(&log, "x").unwrap();
        }
        ob.push(&Entry::Upload {
            task_id: "T-2".into(),
            phase: Phase::Plan,
        })
        .unwrap();
        assert_eq!(
            prune_logs(&work, &ob, Duration::from_secs(3600)),
            0,
            "nothing is old yet"
        );
        assert_eq!(prune_logs(&work, &ob, Duration::ZERO), 1);
        assert!(!work.join("logs/T-1").exists());
        assert!(work.join("logs/T-2").exists(), "its upload still waits");
        fs::remove_dir_all(work).unwrap();
    }

    #[test]
    fn an_unreadable_entry_is_set_aside() {
        let dir = temp();
        let ob = Outbox::open(&dir).unwrap();
        fs::write(dir.join(format!("{:020}.json", 5)), "garbage").unwrap();
        assert_eq!(ob.first(Duration::ZERO).unwrap(), None);
        assert!(dir.join(format!("{:020}.bad", 5)).exists());
        fs::remove_dir_all(dir).unwrap();
    }
}
