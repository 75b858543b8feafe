//! The reaper: a thread that once a second looks for running tasks whose agent has been
//! offline — or online without the task, as after an agent restart that never heard of
//! it — for longer than the grace period (`--lost-grace-s`), and marks them `lost`. It
//! never re-runs anything: a lost `apply` might have changed real infrastructure, so a
//! person decides. An agent that comes back still running a lost task is told to stop
//! it (see `control`'s reconcile).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::lifecycle::Change;
use super::store::StoreError;
use super::Shared;
use crate::protocol::TaskStatus;
use crate::util::now_rfc3339;

/// Runs until the process ends.
pub(crate) fn run(shared: Arc<Shared>, started: Instant) {
    let mut missing = HashMap::new();
    loop {
        std::thread::sleep(Duration::from_secs(1)); // a period, not a synchronisation
        if let Err(e) = reap(&shared, started, Instant::now(), &mut missing) {
            log::error!("reaper: {e}");
        }
    }
}

/// One pass. `missing` remembers since when an online agent has not shown a task.
pub(crate) fn reap(
    shared: &Shared,
    started: Instant,
    now: Instant,
    missing: &mut HashMap<String, Instant>,
) -> Result<(), StoreError> {
    let grace = shared.config.lost_grace;
    let running = shared.store.tasks(Some(TaskStatus::Running), 10_000)?;
    missing.retain(|id, _| running.iter().any(|t| &t.task_id == id));
    for task in running {
        let Some(agent) = task.agent_id.as_deref() else {
            continue;
        };
        let gone_for = {
            let registry = shared.registry();
            match registry.offline_for(agent, started, now) {
                Some(offline) => Some(offline),
                None if registry.holds(agent, &task.task_id) => {
                    missing.remove(&task.task_id);
                    None
                }
                None => {
                    let since = *missing.entry(task.task_id.clone()).or_insert(now);
                    Some(now.saturating_duration_since(since))
                }
            }
        };
        if gone_for.is_none_or(|d| d <= grace) {
            continue;
        }
        let r = shared
            .store
            .update_task(&task.task_id, |t| t.lose(&now_rfc3339()))?;
        if let Some((Ok(Change::Changed), _)) = r {
            log::warn!(
                "task {} lost: agent {agent} has been offline, or without it, for more than {} s",
                task.task_id,
                grace.as_secs()
            );
            shared.hub().nudge(&task.task_id);
        }
    }
    Ok(())
}
