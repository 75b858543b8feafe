//! The TaskScheduler: the agent's one `Mutex`-guarded [`AgentState`] and the only place
//! that decides whether a task is accepted or rejected (by the rules of
//! [`AgentState::admits`]). Workers report back here when their task ends.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::protocol::{Action, AgentState};

/// What the scheduler decided for a `run_task`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Start a worker for it.
    Start,
    /// It already runs here (a repeated `run_task`): accept again, start nothing.
    AlreadyRunning,
}

#[derive(Debug, Clone, Default)]
struct Inner {
    state: AgentState,
    running: BTreeMap<String, Action>,
}

pub(crate) struct Scheduler {
    inner: Mutex<Inner>,
}

/// The decision, as a plain function: `Err` carries the reason sent in `task_rejected`.
fn decide(
    state: &AgentState,
    running: &BTreeMap<String, Action>,
    task_id: &str,
    action: Action,
) -> Result<Admission, &'static str> {
    if running.contains_key(task_id) {
        return Ok(Admission::AlreadyRunning);
    }
    state.admits(action).map(|()| Admission::Start)
}

impl Scheduler {
    pub fn new(plan_limit: u32) -> Scheduler {
        Scheduler {
            inner: Mutex::new(Inner {
                state: AgentState {
                    plan_running_count: 0,
                    plan_limit,
                    apply_running: false,
                    draining: false,
                    spool_full: false,
                },
                running: BTreeMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Updates are single assignments; a poisoned lock holds consistent data.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Accepts (and counts) the task, or says why not.
    pub fn try_start(&self, task_id: &str, action: Action) -> Result<Admission, &'static str> {
        let mut inner = self.lock();
        let decision = decide(&inner.state, &inner.running, task_id, action)?;
        if decision == Admission::Start {
            inner.state = inner.state.with_started(action);
            inner.running.insert(task_id.to_string(), action);
        }
        Ok(decision)
    }

    /// From now on, accept nothing (the agent is shutting down).
    pub fn drain(&self) {
        self.lock().state.draining = true;
    }

    /// How many tasks run.
    pub fn running(&self) -> usize {
        self.lock().running.len()
    }

    /// The task's worker is done: free its place.
    pub fn finish(&self, task_id: &str) {
        let mut inner = self.lock();
        match inner.running.remove(task_id) {
            Some(Action::Plan) => inner.state.plan_running_count -= 1,
            Some(Action::Apply) => inner.state.apply_running = false,
            None => {}
        }
    }

    /// The heartbeat: state and running task ids.
    pub fn snapshot(&self) -> (AgentState, Vec<String>) {
        let inner = self.lock();
        (inner.state, inner.running.keys().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cell_of_the_rule_table() {
        // apply running: a plan and an apply are both rejected
        let s = Scheduler::new(2);
        assert_eq!(s.try_start("A", Action::Apply), Ok(Admission::Start));
        assert_eq!(s.try_start("P", Action::Plan), Err("apply running"));
        assert_eq!(s.try_start("A2", Action::Apply), Err("apply running"));
        s.finish("A");
        // plans below the limit are accepted, at the limit rejected
        assert_eq!(s.try_start("P1", Action::Plan), Ok(Admission::Start));
        // apply with >0 plans running: rejected
        assert_eq!(s.try_start("A3", Action::Apply), Err("plans running"));
        assert_eq!(s.try_start("P2", Action::Plan), Ok(Admission::Start));
        assert_eq!(s.try_start("P3", Action::Plan), Err("plan limit reached"));
        assert_eq!(s.try_start("A3", Action::Apply), Err("plans running"));
        let (state, running) = s.snapshot();
        assert_eq!(
            state,
            AgentState {
                plan_running_count: 2,
                plan_limit: 2,
                apply_running: false,
                draining: false,
                spool_full: false,
            }
        );
        assert_eq!(running, ["P1", "P2"]);
        s.finish("P1");
        s.finish("P2");
        // apply with 0 plans: accepted
        assert_eq!(s.try_start("A3", Action::Apply), Ok(Admission::Start));
        assert!(s.snapshot().0.apply_running);
    }

    #[test]
    fn a_draining_agent_accepts_nothing() {
        let s = Scheduler::new(4);
        s.drain();
        assert_eq!(s.try_start("P", Action::Plan), Err("agent shutting down"));
        assert!(s.snapshot().0.draining);
    }

    #[test]
    fn a_repeated_run_task_is_accepted_once() {
        let s = Scheduler::new(1);
        assert_eq!(s.try_start("P1", Action::Plan), Ok(Admission::Start));
        assert_eq!(
            s.try_start("P1", Action::Plan),
            Ok(Admission::AlreadyRunning)
        );
        assert_eq!(s.snapshot().0.plan_running_count, 1);
        s.finish("P1");
        s.finish("P1");
        assert_eq!(s.snapshot().0.plan_running_count, 0);
    }
}
