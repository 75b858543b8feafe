//! The Agent C&C hub, server side of WS 1: one thread per connected agent runs the
//! [`wsloop`](crate::wsloop) over its socket. Agent events update the store (through the
//! task lifecycle) and the registry; commands reach the agent through its mailbox.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tungstenite::protocol::Role;
use tungstenite::WebSocket;

use super::lifecycle::{Change, Refusal};
use super::store::AgentRow;
use super::Shared;
use crate::protocol::{valid_task_id, AgentMsg, ServerMsg, TaskStatus};
use crate::util::now_rfc3339;
use crate::wsloop::{self, Flow, Outgoing, Peer, Transport};

/// Close code when an agent has been silent for too long.
pub(crate) const CLOSE_SILENT: u16 = 4000;
/// Close code when a newer connection of the same agent replaced this one.
pub(crate) const CLOSE_REPLACED: u16 = 4001;

/// Serves WS 1 for `agent` until it ends. The 101 answer has been sent.
pub(crate) fn serve<S: Transport>(
    shared: Arc<Shared>,
    agent: AgentRow,
    stream: S,
    leftover: Vec<u8>,
) {
    let mut ws = WebSocket::from_partially_read(
        stream,
        leftover,
        Role::Server,
        Some(shared.agent_ws_config()),
    );
    let (mailbox, inbox) = match wsloop::mailbox() {
        Ok(m) => m,
        Err(e) => {
            log::error!("cannot serve agent {}: {e}", agent.agent_id);
            return;
        }
    };
    let (conn_id, old) = shared.registry().connect(
        &agent.agent_id,
        agent.labels.clone(),
        agent.plan_limit,
        mailbox,
        &now_rfc3339(),
    );
    if let Some(old) = old {
        old.send(Outgoing::Close(
            CLOSE_REPLACED,
            "replaced by a newer connection".into(),
        ));
    }
    log::info!("agent {} ({}) connected", agent.agent_id, agent.name);
    let heartbeat = shared.config.heartbeat_interval;
    let mut peer = AgentPeer {
        shared: shared.clone(),
        agent_id: agent.agent_id.clone(),
        conn_id,
        last_rx: Instant::now(),
        silence_limit: heartbeat * 3,
    };
    let end = wsloop::run(
        &mut ws,
        &inbox,
        heartbeat,
        Some(shared.keepalive()),
        &mut peer,
    );
    let released = shared
        .registry()
        .disconnect(&agent.agent_id, conn_id, Instant::now());
    if let Err(e) = shared.store.set_last_seen(&agent.agent_id, &now_rfc3339()) {
        log::error!("store: {e}");
    }
    match end {
        Ok(end) => log::info!("agent {} disconnected ({end:?})", agent.agent_id),
        Err(e) => log::warn!("agent {} connection broke: {e}", agent.agent_id),
    }
    if let Some(tasks) = released.filter(|t| !t.is_empty()) {
        log::info!(
            "tasks {tasks:?} sent to {} but never accepted go back to the queue",
            agent.agent_id
        );
    }
    shared.kick();
}

struct AgentPeer {
    shared: Arc<Shared>,
    agent_id: String,
    conn_id: u64,
    last_rx: Instant,
    silence_limit: Duration,
}

fn command(msg: &ServerMsg) -> String {
    serde_json::to_string(msg).expect("a command always serializes")
}

impl AgentPeer {
    fn cancel(&self, task_id: &str, out: &mut Vec<String>) {
        out.push(command(&ServerMsg::CancelTask {
            task_id: task_id.to_string(),
        }));
    }

    /// The agent says it runs `running`. A task the store still has queued for it was
    /// accepted (the message was lost with a connection); one that ended, was lost, or
    /// belongs to no one or to another agent must stop there.
    fn reconcile(&self, running: &[String], now: &str, out: &mut Vec<String>) {
        let agent = self.agent_id.as_str();
        for task_id in running {
            if !valid_task_id(task_id) {
                continue;
            }
            let rec = match self.shared.store.task(task_id) {
                Ok(rec) => rec,
                Err(e) => {
                    log::error!("store: {e}");
                    continue;
                }
            };
            match rec {
                Some(r)
                    if r.status == TaskStatus::Running && r.agent_id.as_deref() == Some(agent) => {}
                Some(r) if r.status == TaskStatus::Queued => {
                    let accepted = self
                        .shared
                        .store
                        .update_task(task_id, |t| t.accept(agent, now));
                    if let Ok(Some((Ok(Change::Changed), rec))) = accepted {
                        log::info!("task {task_id} running on {agent} (reconciled)");
                        super::client_hub::kick_stream(&self.shared, &rec);
                    }
                }
                other => {
                    let why = other.map_or("unknown".to_string(), |r| r.status.to_string());
                    log::warn!(
                        "agent {agent} runs {task_id}, which is {why} here: canceling it there"
                    );
                    self.cancel(task_id, out);
                }
            }
        }
    }

    /// Handles one event. `false` when the store failed: the event is not kept, so it
    /// must not be acknowledged (the agent sends it again).
    fn on_msg(&mut self, msg: AgentMsg, out: &mut Vec<String>) -> bool {
        let shared = &self.shared;
        let agent = self.agent_id.as_str();
        let now = now_rfc3339();
        match &msg {
            AgentMsg::State { .. } => {}
            AgentMsg::TaskAccepted { task_id }
            | AgentMsg::TaskRejected { task_id, .. }
            | AgentMsg::PhaseFinished { task_id, .. }
            | AgentMsg::TaskFinished { task_id, .. } => {
                if !valid_task_id(task_id) {
                    log::warn!("agent {agent} sent an invalid task id {task_id:?}");
                    return true;
                }
            }
        }
        let result = match msg {
            AgentMsg::State { state, running } => {
                self.reconcile(&running, &now, out);
                if shared
                    .registry()
                    .report(agent, self.conn_id, state, running, &now)
                {
                    shared.kick();
                }
                return true;
            }
            AgentMsg::TaskRejected { task_id, reason } => {
                log::info!("agent {agent} rejected {task_id}: {reason}");
                shared.registry().release(agent, &task_id);
                shared.kick();
                return true;
            }
            AgentMsg::TaskAccepted { task_id } => {
                let r = shared
                    .store
                    .update_task(&task_id, |t| t.accept(agent, &now));
                match &r {
                    Ok(Some((Ok(Change::Changed), rec))) => {
                        log::info!("task {task_id} running on {agent}");
                        // Somebody may be waiting for it on WS 2 already.
                        super::client_hub::kick_stream(shared, rec);
                    }
                    Ok(Some((Ok(Change::Unchanged), _))) => {}
                    Ok(Some((Err(refusal), _))) => {
                        log::info!("agent {agent} accepted {task_id}, which it may not run ({refusal:?}): canceling it there");
                        shared.registry().release(agent, &task_id);
                        self.cancel(&task_id, out);
                    }
                    Ok(None) => {
                        log::warn!(
                            "agent {agent} accepted unknown task {task_id}: canceling it there"
                        );
                        self.cancel(&task_id, out);
                    }
                    Err(_) => {}
                }
                r.map(|_| ())
            }
            AgentMsg::PhaseFinished {
                task_id,
                phase,
                exit_code,
            } => shared
                .store
                .update_task(&task_id, |t| t.finish_phase(agent, phase, exit_code, &now))
                .map(|r| log_refusal(agent, &task_id, r)),
            AgentMsg::TaskFinished {
                task_id,
                status,
                exit_code,
            } => {
                let r = shared
                    .store
                    .update_task(&task_id, |t| t.finish(agent, status, exit_code, &now));
                if let Ok(Some((Ok(Change::Changed), _))) = &r {
                    log::info!("task {task_id} {status} on {agent}");
                    shared.hub().nudge(&task_id);
                }
                shared.registry().release(agent, &task_id);
                shared.kick();
                r.map(|r| log_refusal(agent, &task_id, r))
            }
        };
        if let Err(e) = result {
            log::error!("store: {e} (event from agent {agent}; it will be sent again)");
            return false;
        }
        true
    }
}

fn log_refusal(
    agent: &str,
    task_id: &str,
    r: Option<(super::lifecycle::Outcome, super::lifecycle::TaskRecord)>,
) {
    match r {
        None => log::warn!("agent {agent} reported on unknown task {task_id}"),
        Some((Err(Refusal::NotYours), _)) => {
            log::warn!("agent {agent} reported on {task_id}, which is not its task")
        }
        Some((Err(e), _)) => log::warn!("agent {agent} reported on {task_id}: {e:?}"),
        Some((Ok(_), _)) => {}
    }
}

/// Decodes an agent's WS 1 text: its outbox number, if any, and the message. No I/O:
/// the fuzz target `ws1_message` drives this directly.
pub(crate) fn decode(text: &str) -> (Option<u64>, Result<AgentMsg, serde_json::Error>) {
    let value = serde_json::from_str::<serde_json::Value>(text);
    let seq = value.as_ref().ok().and_then(|v| v.get("seq")?.as_u64());
    (seq, value.and_then(serde_json::from_value::<AgentMsg>))
}

impl Peer for AgentPeer {
    fn on_text(&mut self, text: &str, out: &mut Vec<String>) -> Flow {
        self.last_rx = Instant::now();
        let (seq, msg) = decode(text);
        let stored = match msg {
            Ok(msg) => self.on_msg(msg, out),
            // An agent newer than this server may send messages it does not know yet:
            // acknowledged all the same, or it would block the agent's outbox forever.
            Err(e) => {
                log::warn!(
                    "agent {} sent a message this server cannot read: {e}",
                    self.agent_id
                );
                true
            }
        };
        // The event is stored (or could never be): the agent may forget it.
        if let (Some(seq), true) = (seq, stored) {
            out.push(command(&ServerMsg::Ack { seq }));
        }
        Flow::Continue
    }

    fn on_tick(&mut self, _out: &mut Vec<String>) -> Flow {
        let silent = self.last_rx.elapsed();
        if silent > self.silence_limit {
            return Flow::Abort(
                CLOSE_SILENT,
                format!("no heartbeat for {} s", silent.as_secs()),
            );
        }
        Flow::Continue
    }
}
