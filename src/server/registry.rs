//! The agents that are online right now: one entry per open WS 1, with the agent's last
//! reported state and the tasks dispatched to it that its state does not show yet
//! (reservations). Plain data behind the server's one `Mutex`; no I/O here.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use super::dispatch::Candidate;
use crate::protocol::{Action, AgentState, AgentView, Labels};
use crate::wsloop::Mailbox;

pub(crate) struct Online {
    pub conn_id: u64,
    pub mailbox: Mailbox,
    pub labels: Labels,
    pub state: AgentState,
    pub running: Vec<String>,
    /// Sent `run_task`, not yet in a reported `running` list.
    pub reserved: BTreeMap<String, Action>,
    pub last_seen: Instant,
    pub last_seen_at: String,
}

#[derive(Default)]
pub(crate) struct Registry {
    agents: HashMap<String, Online>,
    next_conn: u64,
    /// When each agent that was online since this server started went away.
    offline_since: HashMap<String, Instant>,
}

impl Online {
    /// The reported state plus what was dispatched since: what dispatch must assume.
    pub fn effective_state(&self) -> AgentState {
        self.reserved
            .iter()
            .filter(|(task, _)| !self.running.contains(task))
            .fold(self.state, |st, (_, action)| st.with_started(*action))
    }
}

impl Registry {
    /// A new WS 1 for `agent_id`. An older connection of the same agent is replaced (its
    /// mailbox is returned so the caller can close it).
    pub fn connect(
        &mut self,
        agent_id: &str,
        labels: Labels,
        plan_limit: u32,
        mailbox: Mailbox,
        now: &str,
    ) -> (u64, Option<Mailbox>) {
        self.next_conn += 1;
        let conn_id = self.next_conn;
        let online = Online {
            conn_id,
            mailbox,
            labels,
            state: AgentState {
                plan_running_count: 0,
                plan_limit,
                // Until the first report, assume the agent is busy: dispatch waits for it.
                apply_running: true,
                draining: false,
                spool_full: false,
            },
            running: Vec::new(),
            reserved: BTreeMap::new(),
            last_seen: Instant::now(),
            last_seen_at: now.to_string(),
        };
        self.offline_since.remove(agent_id);
        let old = self.agents.insert(agent_id.to_string(), online);
        (conn_id, old.map(|o| o.mailbox))
    }

    /// WS 1 `conn_id` ended. Returns the tasks reserved on it that were never accepted
    /// (they are still queued in the store, so dispatch will place them again).
    pub fn disconnect(
        &mut self,
        agent_id: &str,
        conn_id: u64,
        now: Instant,
    ) -> Option<Vec<String>> {
        match self.agents.get(agent_id) {
            Some(o) if o.conn_id == conn_id => {
                let o = self.agents.remove(agent_id)?;
                self.offline_since.insert(agent_id.to_string(), now);
                Some(o.reserved.into_keys().collect())
            }
            _ => None,
        }
    }

    fn current(&mut self, agent_id: &str, conn_id: u64) -> Option<&mut Online> {
        self.agents
            .get_mut(agent_id)
            .filter(|o| o.conn_id == conn_id)
    }

    /// A state report. Returns true when the agent may now have room it did not have.
    pub fn report(
        &mut self,
        agent_id: &str,
        conn_id: u64,
        state: AgentState,
        running: Vec<String>,
        now: &str,
    ) -> bool {
        let Some(o) = self.current(agent_id, conn_id) else {
            return false;
        };
        let before = o.effective_state();
        o.reserved.retain(|task, _| !running.contains(task));
        o.state = state;
        o.running = running;
        o.last_seen = Instant::now();
        o.last_seen_at = now.to_string();
        o.effective_state() != before
    }

    pub fn reserve(&mut self, agent_id: &str, task_id: &str, action: Action) -> Option<Mailbox> {
        let o = self.agents.get_mut(agent_id)?;
        o.reserved.insert(task_id.to_string(), action);
        Some(o.mailbox.clone())
    }

    /// The agent rejected or finished a task: it no longer holds a place.
    pub fn release(&mut self, agent_id: &str, task_id: &str) {
        if let Some(o) = self.agents.get_mut(agent_id) {
            o.reserved.remove(task_id);
        }
    }

    pub fn reserved_tasks(&self) -> HashSet<String> {
        self.agents
            .values()
            .flat_map(|o| o.reserved.keys().cloned())
            .collect()
    }

    pub fn candidates(&self) -> Vec<Candidate> {
        let mut c: Vec<Candidate> = self
            .agents
            .iter()
            .map(|(id, o)| Candidate {
                agent_id: id.clone(),
                labels: o.labels.clone(),
                state: o.effective_state(),
            })
            .collect();
        c.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        c
    }

    /// How long the agent has been offline, counting from `start` (the server's start)
    /// for one not seen since; `None` while it is online.
    pub fn offline_for(&self, agent_id: &str, start: Instant, now: Instant) -> Option<Duration> {
        if self.agents.contains_key(agent_id) {
            return None;
        }
        let since = self.offline_since.get(agent_id).copied().unwrap_or(start);
        Some(now.saturating_duration_since(since))
    }

    /// Whether an online agent has the task: in its last report, or sent to it since.
    pub fn holds(&self, agent_id: &str, task_id: &str) -> bool {
        self.agents.get(agent_id).is_some_and(|o| {
            o.running.iter().any(|t| t == task_id) || o.reserved.contains_key(task_id)
        })
    }

    /// Closes every agent's WS 1 (server shutdown).
    pub fn close_all(&self, code: u16, reason: &str) {
        for o in self.agents.values() {
            o.mailbox
                .send(crate::wsloop::Outgoing::Close(code, reason.to_string()));
        }
    }

    pub fn mailbox(&self, agent_id: &str) -> Option<Mailbox> {
        self.agents.get(agent_id).map(|o| o.mailbox.clone())
    }

    /// Fills in the live part of an agent's API view.
    pub fn fill_view(&self, view: &mut AgentView) {
        if let Some(o) = self.agents.get(&view.agent_id) {
            view.online = true;
            view.state = o.state;
            view.running = o.running.clone();
            view.labels = o.labels.clone();
            view.last_seen = Some(o.last_seen_at.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wsloop::mailbox;

    fn state(count: u32, limit: u32, apply: bool) -> AgentState {
        AgentState {
            plan_running_count: count,
            plan_limit: limit,
            apply_running: apply,
            draining: false,
            spool_full: false,
        }
    }

    #[test]
    fn reservations_count_until_reported() {
        let mut r = Registry::default();
        let (mb, _inbox) = mailbox().unwrap();
        let (conn, old) = r.connect("A-1", Labels::new(), 2, mb, "t");
        assert!(old.is_none());
        // Busy until the first report.
        assert!(r.candidates()[0].state.apply_running);
        assert!(r.report("A-1", conn, state(0, 2, false), vec![], "t"));
        r.reserve("A-1", "T-1", Action::Plan).unwrap();
        assert_eq!(r.candidates()[0].state, state(1, 2, false));
        // The report that shows T-1 running clears the reservation: counted once.
        r.report("A-1", conn, state(1, 2, false), vec!["T-1".into()], "t");
        assert_eq!(r.candidates()[0].state, state(1, 2, false));
        assert!(r.reserved_tasks().is_empty());
        r.reserve("A-1", "T-2", Action::Plan).unwrap();
        r.release("A-1", "T-2");
        assert_eq!(r.candidates()[0].state, state(1, 2, false));
    }

    #[test]
    fn a_stale_connection_cannot_remove_the_new_one() {
        let mut r = Registry::default();
        let (mb1, _i1) = mailbox().unwrap();
        let (mb2, _i2) = mailbox().unwrap();
        let (c1, _) = r.connect("A-1", Labels::new(), 1, mb1, "t");
        let (c2, old) = r.connect("A-1", Labels::new(), 1, mb2, "t");
        assert!(old.is_some());
        assert!(r.disconnect("A-1", c1, Instant::now()).is_none());
        assert!(!r.report("A-1", c1, state(0, 1, false), vec![], "t"));
        r.reserve("A-1", "T-9", Action::Apply);
        let start = Instant::now();
        assert_eq!(r.offline_for("A-1", start, start), None);
        assert_eq!(
            r.disconnect("A-1", c2, start + Duration::from_secs(5)),
            Some(vec!["T-9".to_string()])
        );
        assert!(r.candidates().is_empty());
        assert_eq!(
            r.offline_for("A-1", start, start + Duration::from_secs(7)),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            r.offline_for("A-never", start, start + Duration::from_secs(7)),
            Some(Duration::from_secs(7))
        );
    }
}
