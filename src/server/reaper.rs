//! The reaper: a thread that once a second looks for running tasks whose agent has been
//! offline longer than the grace period (`--lost-grace-s`), and marks them `lost`. It
//! never re-runs anything: a lost `apply` might have changed real infrastructure, so a
//! person decides. An agent that comes back still running a lost task is told to stop
//! it (see `control`'s reconcile).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::lifecycle::Change;
use super::Shared;
use crate::protocol::TaskStatus;
use crate::util::now_rfc3339;

/// Runs until the process ends.
pub(crate) fn run(shared: Arc<Shared>, started: Instant) {
    loop {
        std::thread::sleep(Duration::from_secs(1)); // a period, not a synchronisation
        if let Err(e) = reap(&shared, started, Instant::now()) {
            log::error!("reaper: {e}");
        }
    }
}

/// Marks `lost` every running task whose agent is offline for longer than the grace.
pub(crate) fn reap(
    shared: &Shared,
    started: Instant,
    now: Instant,
) -> Result<(), super::store::StoreError> {
    let grace = shared.config.lost_grace;
    for task in shared.store.tasks(Some(TaskStatus::Running), 10_000)? {
        let Some(agent) = task.agent_id.as_deref() else {
            continue;
        };
        let offline = shared.registry().offline_for(agent, started, now);
        if offline.is_some_and(|d| d > grace) {
            let r = shared
                .store
                .update_task(&task.task_id, |t| t.lose(&now_rfc3339()))?;
            if let Some((Ok(Change::Changed), _)) = r {
                log::warn!(
                    "task {} lost: agent {agent} has been offline for more than {} s",
                    task.task_id,
                    grace.as_secs()
                );
                shared.hub().nudge(&task.task_id);
            }
        }
    }
    Ok(())
}
