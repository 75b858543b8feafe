//! A task's state machine: every transition of a task and its phases, as plain functions
//! over a [`TaskRecord`]. The store loads a record, applies one of these, and writes it
//! back in the same transaction; nothing here touches a socket or a file.
//!
//! Every agent event is idempotent: a duplicate (the same event again) is `Ok(Unchanged)`
//! and changes nothing, so an agent may resend after a reconnect without harm.

use std::collections::BTreeMap;

use crate::protocol::{
    Action, FinalStatus, Labels, Phase, PhaseStatus, PhaseView, TaskStatus, TaskView,
};

/// A task as the store keeps it is exactly what the API shows (its configuration and
/// variables are kept apart, in the store only).
pub(crate) type TaskRecord = TaskView;

/// Whether a transition changed the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    Changed,
    Unchanged,
}

/// Why an event was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The task was canceled before the agent accepted it: tell the agent to stop.
    Canceled,
    /// The task belongs to another agent (or to none).
    NotYours,
    /// The event does not fit the task's state; the text says why.
    Conflict(String),
}

pub(crate) type Outcome = Result<Change, Refusal>;

fn pending() -> PhaseView {
    PhaseView {
        status: PhaseStatus::Pending,
        exit_code: None,
        log_bytes: None,
        started_at: None,
        finished_at: None,
    }
}

impl TaskRecord {
    /// A new queued task: a `plan` has one phase, an `apply` two.
    pub(crate) fn new(id: String, action: Action, labels: Labels, now: &str) -> TaskRecord {
        let mut phases = BTreeMap::new();
        phases.insert("plan".to_string(), pending());
        if action == Action::Apply {
            phases.insert("apply".to_string(), pending());
        }
        TaskRecord {
            task_id: id,
            action,
            status: TaskStatus::Queued,
            agent_id: None,
            labels,
            created_at: now.to_string(),
            started_at: None,
            finished_at: None,
            exit_code: None,
            phases,
            timeout_s: None,
            sensitive_variables: Vec::new(),
        }
    }

    fn phase_mut(&mut self, phase: Phase) -> Option<&mut PhaseView> {
        self.phases.get_mut(phase.as_str())
    }

    fn owned_by(&self, agent: &str) -> bool {
        self.agent_id.as_deref() == Some(agent)
    }

    /// The agent accepted the task: queued → running, the plan phase starts.
    pub(crate) fn accept(&mut self, agent: &str, now: &str) -> Outcome {
        match self.status {
            TaskStatus::Queued => {
                self.status = TaskStatus::Running;
                self.agent_id = Some(agent.to_string());
                self.started_at = Some(now.to_string());
                if let Some(p) = self.phase_mut(Phase::Plan) {
                    p.status = PhaseStatus::Running;
                    p.started_at = Some(now.to_string());
                }
                Ok(Change::Changed)
            }
            TaskStatus::Running if self.owned_by(agent) => Ok(Change::Unchanged),
            TaskStatus::Canceled => Err(Refusal::Canceled),
            _ => Err(Refusal::NotYours),
        }
    }

    /// A phase ended with `exit_code`. After a failed plan, an apply phase is skipped;
    /// after a good one it starts.
    pub(crate) fn finish_phase(
        &mut self,
        agent: &str,
        phase: Phase,
        exit_code: i32,
        now: &str,
    ) -> Outcome {
        if !self.owned_by(agent) {
            return Err(Refusal::NotYours);
        }
        if self.status != TaskStatus::Running {
            // A late or repeated report for a task that has ended changes nothing.
            return Ok(Change::Unchanged);
        }
        let action = self.action;
        let Some(p) = self.phase_mut(phase) else {
            return Err(Refusal::Conflict(format!(
                "a {} task has no {} phase",
                action.as_str(),
                phase.as_str()
            )));
        };
        if !matches!(p.status, PhaseStatus::Running | PhaseStatus::Pending) {
            return Ok(Change::Unchanged);
        }
        p.status = if exit_code == 0 {
            PhaseStatus::Succeeded
        } else {
            PhaseStatus::Failed
        };
        p.exit_code = Some(exit_code);
        p.started_at.get_or_insert_with(|| now.to_string());
        p.finished_at = Some(now.to_string());
        if phase == Phase::Plan {
            if let Some(apply) = self.phase_mut(Phase::Apply) {
                if exit_code == 0 {
                    apply.status = PhaseStatus::Running;
                    apply.started_at = Some(now.to_string());
                } else {
                    apply.status = PhaseStatus::Skipped;
                }
            }
        }
        Ok(Change::Changed)
    }

    /// The task ended on the agent. Phases still pending are skipped; one still running
    /// takes the task's end.
    pub(crate) fn finish(
        &mut self,
        agent: &str,
        status: FinalStatus,
        exit_code: Option<i32>,
        now: &str,
    ) -> Outcome {
        if !self.owned_by(agent) {
            return Err(Refusal::NotYours);
        }
        match self.status {
            TaskStatus::Running => {}
            s if s.is_terminal() => return Ok(Change::Unchanged),
            s => return Err(Refusal::Conflict(format!("the task is {s}, not running"))),
        }
        let (task, phase) = match status {
            FinalStatus::Succeeded => (TaskStatus::Succeeded, PhaseStatus::Succeeded),
            FinalStatus::Failed => (TaskStatus::Failed, PhaseStatus::Failed),
            FinalStatus::Canceled => (TaskStatus::Canceled, PhaseStatus::Canceled),
        };
        self.exit_code = exit_code;
        self.end(task, phase, now);
        Ok(Change::Changed)
    }

    /// Ends the task with `status`: pending phases are skipped, a running one becomes
    /// `running_phase`.
    fn end(&mut self, status: TaskStatus, running_phase: PhaseStatus, now: &str) {
        self.status = status;
        self.finished_at = Some(now.to_string());
        for p in self.phases.values_mut() {
            match p.status {
                PhaseStatus::Pending => p.status = PhaseStatus::Skipped,
                PhaseStatus::Running => {
                    p.status = running_phase;
                    p.finished_at = Some(now.to_string());
                }
                _ => {}
            }
        }
    }

    /// The agent vanished with the task and did not come back within the grace period.
    /// Nothing is re-run: the task ends `lost`.
    pub(crate) fn lose(&mut self, now: &str) -> Outcome {
        if self.status != TaskStatus::Running {
            return Ok(Change::Unchanged);
        }
        self.end(TaskStatus::Lost, PhaseStatus::Failed, now);
        Ok(Change::Changed)
    }

    /// The server ends a running task itself (its agent was revoked): `canceled`.
    pub(crate) fn cancel_by_server(&mut self, now: &str) -> Outcome {
        if self.status != TaskStatus::Running {
            return Ok(Change::Unchanged);
        }
        self.end(TaskStatus::Canceled, PhaseStatus::Canceled, now);
        Ok(Change::Changed)
    }

    /// A client asked to cancel. A queued task ends here; a running one needs its agent
    /// (`Ok(Unchanged)`: send `cancel_task`, the agent reports `canceled`).
    pub(crate) fn cancel(&mut self, now: &str) -> Outcome {
        match self.status {
            TaskStatus::Queued => {
                self.status = TaskStatus::Canceled;
                self.finished_at = Some(now.to_string());
                for p in self.phases.values_mut() {
                    p.status = PhaseStatus::Canceled;
                }
                Ok(Change::Changed)
            }
            TaskStatus::Running => Ok(Change::Unchanged),
            s => Err(Refusal::Conflict(format!(
                "task {} has already ended ({s})",
                self.task_id
            ))),
        }
    }

    /// Whether `agent` may upload the log of `phase`.
    pub(crate) fn may_upload(&self, agent: &str, phase: Phase) -> Result<(), Refusal> {
        if !self.owned_by(agent) {
            return Err(Refusal::NotYours);
        }
        if !self.phases.contains_key(phase.as_str()) {
            return Err(Refusal::Conflict(format!(
                "a {} task has no {} phase",
                self.action.as_str(),
                phase.as_str()
            )));
        }
        Ok(())
    }

    pub(crate) fn set_log_bytes(&mut self, phase: Phase, bytes: u64) {
        if let Some(p) = self.phase_mut(phase) {
            p.log_bytes = Some(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply_task() -> TaskRecord {
        TaskRecord::new("T-1".into(), Action::Apply, Labels::new(), "t0")
    }

    fn status(r: &TaskRecord, phase: &str) -> PhaseStatus {
        r.phases[phase].status
    }

    #[test]
    fn plan_task_has_one_phase() {
        let r = TaskRecord::new("T-1".into(), Action::Plan, Labels::new(), "t0");
        assert_eq!(r.phases.len(), 1);
        assert_eq!(r.status, TaskStatus::Queued);
    }

    #[test]
    fn apply_task_happy_path_with_timestamps() {
        let mut r = apply_task();
        assert_eq!(r.accept("A-1", "t1"), Ok(Change::Changed));
        assert_eq!(r.status, TaskStatus::Running);
        assert_eq!(r.started_at.as_deref(), Some("t1"));
        assert_eq!(status(&r, "plan"), PhaseStatus::Running);
        assert_eq!(status(&r, "apply"), PhaseStatus::Pending);
        assert_eq!(
            r.finish_phase("A-1", Phase::Plan, 0, "t2"),
            Ok(Change::Changed)
        );
        assert_eq!(status(&r, "plan"), PhaseStatus::Succeeded);
        assert_eq!(status(&r, "apply"), PhaseStatus::Running);
        assert_eq!(r.phases["apply"].started_at.as_deref(), Some("t2"));
        assert_eq!(
            r.finish_phase("A-1", Phase::Apply, 0, "t3"),
            Ok(Change::Changed)
        );
        assert_eq!(
            r.finish("A-1", FinalStatus::Succeeded, Some(0), "t4"),
            Ok(Change::Changed)
        );
        assert_eq!(r.status, TaskStatus::Succeeded);
        assert_eq!(r.finished_at.as_deref(), Some("t4"));
        assert_eq!(r.phases["apply"].finished_at.as_deref(), Some("t3"));
    }

    #[test]
    fn failed_plan_skips_apply() {
        let mut r = apply_task();
        r.accept("A-1", "t1").unwrap();
        r.finish_phase("A-1", Phase::Plan, 1, "t2").unwrap();
        assert_eq!(status(&r, "plan"), PhaseStatus::Failed);
        assert_eq!(status(&r, "apply"), PhaseStatus::Skipped);
        r.finish("A-1", FinalStatus::Failed, Some(1), "t3").unwrap();
        assert_eq!(r.status, TaskStatus::Failed);
        assert_eq!(status(&r, "apply"), PhaseStatus::Skipped);
        assert_eq!(r.exit_code, Some(1));
    }

    #[test]
    fn duplicates_change_nothing() {
        let mut r = apply_task();
        r.accept("A-1", "t1").unwrap();
        assert_eq!(r.accept("A-1", "t9"), Ok(Change::Unchanged));
        r.finish_phase("A-1", Phase::Plan, 0, "t2").unwrap();
        assert_eq!(
            r.finish_phase("A-1", Phase::Plan, 0, "t9"),
            Ok(Change::Unchanged)
        );
        r.finish("A-1", FinalStatus::Succeeded, Some(0), "t3")
            .unwrap();
        let before = r.clone();
        assert_eq!(
            r.finish("A-1", FinalStatus::Failed, Some(1), "t9"),
            Ok(Change::Unchanged)
        );
        assert_eq!(
            r.finish_phase("A-1", Phase::Apply, 1, "t9"),
            Ok(Change::Unchanged)
        );
        assert_eq!(r, before);
    }

    #[test]
    fn other_agents_are_refused() {
        let mut r = apply_task();
        assert_eq!(
            r.finish("A-2", FinalStatus::Succeeded, Some(0), "t"),
            Err(Refusal::NotYours)
        );
        r.accept("A-1", "t1").unwrap();
        assert_eq!(r.accept("A-2", "t"), Err(Refusal::NotYours));
        assert_eq!(
            r.finish_phase("A-2", Phase::Plan, 0, "t"),
            Err(Refusal::NotYours)
        );
        assert_eq!(r.may_upload("A-2", Phase::Plan), Err(Refusal::NotYours));
        assert_eq!(r.may_upload("A-1", Phase::Apply), Ok(()));
        let mut p = TaskRecord::new("T-2".into(), Action::Plan, Labels::new(), "t0");
        p.accept("A-1", "t1").unwrap();
        assert!(matches!(
            p.may_upload("A-1", Phase::Apply),
            Err(Refusal::Conflict(_))
        ));
        assert!(matches!(
            p.finish_phase("A-1", Phase::Apply, 0, "t"),
            Err(Refusal::Conflict(_))
        ));
    }

    #[test]
    fn a_lost_task_stays_lost() {
        let mut r = apply_task();
        assert_eq!(
            r.lose("t"),
            Ok(Change::Unchanged),
            "a queued task cannot be lost"
        );
        r.accept("A-1", "t1").unwrap();
        assert_eq!(r.lose("t2"), Ok(Change::Changed));
        assert_eq!(r.status, TaskStatus::Lost);
        assert_eq!(status(&r, "plan"), PhaseStatus::Failed);
        assert_eq!(status(&r, "apply"), PhaseStatus::Skipped);
        // The agent coming back late with a result changes nothing.
        assert_eq!(
            r.finish("A-1", FinalStatus::Succeeded, Some(0), "t3"),
            Ok(Change::Unchanged)
        );
        assert_eq!(r.status, TaskStatus::Lost);
    }

    #[test]
    fn cancel_rules() {
        let mut r = apply_task();
        assert_eq!(r.cancel("t1"), Ok(Change::Changed));
        assert_eq!(r.status, TaskStatus::Canceled);
        assert_eq!(status(&r, "plan"), PhaseStatus::Canceled);
        // An agent that accepts it afterwards is told to stop.
        assert_eq!(r.accept("A-1", "t2"), Err(Refusal::Canceled));
        assert!(matches!(r.cancel("t3"), Err(Refusal::Conflict(_))));
        let mut running = apply_task();
        running.accept("A-1", "t1").unwrap();
        assert_eq!(running.cancel("t2"), Ok(Change::Unchanged));
        running
            .finish("A-1", FinalStatus::Canceled, None, "t3")
            .unwrap();
        assert_eq!(running.status, TaskStatus::Canceled);
        assert_eq!(status(&running, "plan"), PhaseStatus::Canceled);
        assert_eq!(status(&running, "apply"), PhaseStatus::Skipped);
    }
}
