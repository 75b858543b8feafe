//! The dispatcher: matches queued tasks to online agents and pushes `run_task` over WS 1.
//!
//! It wakes on a kick (a task was created, an agent connected, reported room, rejected
//! or finished a task) rather than on a timer, so a task reaches a free agent within
//! milliseconds. The decision is [`assign`], a plain function over data.

use std::sync::Arc;

use crossbeam_channel::Receiver;

use super::Shared;
use crate::protocol::{Action, AgentState, Labels, ServerMsg};
use crate::wsloop::Outgoing;

/// An online agent as dispatch sees it: its labels and its state including tasks
/// already sent to it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Candidate {
    pub agent_id: String,
    pub labels: Labels,
    pub state: AgentState,
}

/// A task waiting for an agent.
pub(crate) use super::store::Queued;

fn has_labels(agent: &Labels, wanted: &Labels) -> bool {
    wanted.iter().all(|(k, v)| agent.get(k) == Some(v))
}

/// `a` is less loaded than `b`: a lower share of its plan slots in use, then fewer plans,
/// then the agent id (so the choice is stable).
fn less_loaded(a: &Candidate, b: &Candidate) -> bool {
    let (ac, al) = (
        u64::from(a.state.plan_running_count),
        u64::from(a.state.plan_limit.max(1)),
    );
    let (bc, bl) = (
        u64::from(b.state.plan_running_count),
        u64::from(b.state.plan_limit.max(1)),
    );
    (ac * bl, ac, &a.agent_id) < (bc * al, bc, &b.agent_id)
}

/// Decides which queued tasks go to which agents now, oldest task first.
///
/// A task goes to the least loaded agent that has all its labels and whose state admits
/// it (the concurrency rules of [`AgentState::admits`]). An `apply` that finds no room
/// holds back the eligible agent closest to idle, so that later plans do not keep that
/// agent busy forever: it drains and the apply runs next.
pub(crate) fn assign(queued: &[Queued], agents: &[Candidate]) -> Vec<(String, String)> {
    let mut agents: Vec<Candidate> = agents.to_vec();
    let mut held = vec![false; agents.len()];
    let mut out = Vec::new();
    for task in queued {
        let eligible = |i: &usize| !held[*i] && has_labels(&agents[*i].labels, &task.labels);
        let best = (0..agents.len())
            .filter(eligible)
            .filter(|i| agents[*i].state.admits(task.action).is_ok())
            .reduce(|a, b| {
                if less_loaded(&agents[b], &agents[a]) {
                    b
                } else {
                    a
                }
            });
        match best {
            Some(i) => {
                agents[i].state = agents[i].state.with_started(task.action);
                out.push((task.task_id.clone(), agents[i].agent_id.clone()));
            }
            None if task.action == Action::Apply => {
                let drain = (0..agents.len())
                    .filter(eligible)
                    .filter(|i| !agents[*i].state.apply_running)
                    .min_by_key(|i| (agents[*i].state.plan_running_count, *i));
                if let Some(i) = drain {
                    held[i] = true;
                }
            }
            None => {}
        }
    }
    out
}

/// The dispatcher thread: runs until every kick sender is gone.
pub(crate) fn run(shared: Arc<Shared>, kicks: Receiver<()>) {
    while kicks.recv().is_ok() {
        while kicks.try_recv().is_ok() {}
        if let Err(e) = dispatch_once(&shared) {
            log::error!("dispatch failed: {e}");
        }
    }
}

fn dispatch_once(shared: &Shared) -> Result<(), super::store::StoreError> {
    let queued = shared.store.queued()?;
    if queued.is_empty() {
        return Ok(());
    }
    let mut registry = shared.registry();
    let reserved = registry.reserved_tasks();
    let waiting: Vec<Queued> = queued
        .into_iter()
        .filter(|q| !reserved.contains(&q.task_id))
        .collect();
    for (task_id, agent_id) in assign(&waiting, &registry.candidates()) {
        let Some(task_data) = shared.store.task_data(&task_id)? else {
            continue;
        };
        let Some(mailbox) = registry.reserve(&agent_id, &task_id, task_data.action) else {
            continue;
        };
        let msg = serde_json::to_string(&ServerMsg::RunTask { task_data })
            .expect("a command always serializes");
        if mailbox.send(Outgoing::Text(msg)) {
            log::info!("dispatched {task_id} to {agent_id}");
        } else {
            registry.release(&agent_id, &task_id);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(id: &str, count: u32, limit: u32, apply: bool, labels: &[(&str, &str)]) -> Candidate {
        Candidate {
            agent_id: id.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            state: AgentState {
                plan_running_count: count,
                plan_limit: limit,
                apply_running: apply,
                draining: false,
                spool_full: false,
            },
        }
    }

    fn task(id: &str, action: Action, labels: &[(&str, &str)]) -> Queued {
        Queued {
            task_id: id.into(),
            action,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn plans_fill_up_to_the_limit_least_loaded_first() {
        let agents = [agent("A", 1, 2, false, &[]), agent("B", 0, 2, false, &[])];
        let queued: Vec<_> = (1..=5)
            .map(|i| task(&format!("T{i}"), Action::Plan, &[]))
            .collect();
        assert_eq!(
            assign(&queued, &agents),
            pairs(&[("T1", "B"), ("T2", "A"), ("T3", "B")])
        );
    }

    #[test]
    fn least_loaded_is_by_share_of_slots() {
        // A uses 2 of 8 (25 %), B 1 of 2 (50 %): A is less loaded.
        let agents = [agent("A", 2, 8, false, &[]), agent("B", 1, 2, false, &[])];
        assert_eq!(
            assign(&[task("T1", Action::Plan, &[])], &agents),
            pairs(&[("T1", "A")])
        );
    }

    #[test]
    fn an_apply_running_agent_gets_nothing() {
        let agents = [agent("A", 0, 4, true, &[])];
        let queued = [
            task("T1", Action::Plan, &[]),
            task("T2", Action::Apply, &[]),
        ];
        assert!(assign(&queued, &agents).is_empty());
    }

    #[test]
    fn an_apply_takes_an_idle_agent_whole() {
        let agents = [agent("A", 0, 4, false, &[])];
        let queued = [
            task("T1", Action::Apply, &[]),
            task("T2", Action::Plan, &[]),
        ];
        assert_eq!(assign(&queued, &agents), pairs(&[("T1", "A")]));
    }

    #[test]
    fn a_waiting_apply_holds_its_agent_against_later_plans() {
        let agents = [agent("A", 1, 4, false, &[])];
        let queued = [
            task("T1", Action::Apply, &[]),
            task("T2", Action::Plan, &[]),
        ];
        assert!(assign(&queued, &agents).is_empty());
        // Plans queued *before* the apply still run.
        let queued = [
            task("T0", Action::Plan, &[]),
            task("T1", Action::Apply, &[]),
        ];
        assert_eq!(assign(&queued, &agents), pairs(&[("T0", "A")]));
    }

    #[test]
    fn labels_must_all_match() {
        let agents = [
            agent("A", 0, 2, false, &[("zone", "lan")]),
            agent("B", 0, 2, false, &[("zone", "dmz"), ("os", "linux")]),
        ];
        let queued = [
            task("T1", Action::Plan, &[("zone", "dmz")]),
            task("T2", Action::Plan, &[("zone", "dmz"), ("os", "bsd")]),
            task("T3", Action::Plan, &[]),
        ];
        assert_eq!(assign(&queued, &agents), pairs(&[("T1", "B"), ("T3", "A")]));
    }
}
