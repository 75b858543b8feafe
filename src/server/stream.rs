//! The Agent Stream Hub: WS 3 (`GET /agent/stream/{task_id}`), opened by an agent after
//! `start_realtime_stream`. One thread per stream reads the agent's lines and hands each
//! to the [client hub](super::client_hub); nothing is stored.

use std::sync::Arc;
use std::time::Duration;

use tungstenite::protocol::Role;
use tungstenite::WebSocket;

use super::Shared;
use crate::protocol::END_OF_TASK;
use crate::wsloop::{self, End, Flow, Peer, Transport};

/// Serves WS 3 of `task_id` for its agent. The 101 answer has been sent.
pub(crate) fn serve<S: Transport>(
    shared: Arc<Shared>,
    task_id: String,
    stream: S,
    leftover: Vec<u8>,
) {
    let config = shared.agent_ws_config();
    let mut ws = WebSocket::from_partially_read(stream, leftover, Role::Server, Some(config));
    let (mailbox, inbox) = match wsloop::mailbox() {
        Ok(m) => m,
        Err(e) => {
            log::error!("cannot serve the stream of {task_id}: {e}");
            return;
        }
    };
    let session = shared.hub().stream_opened(&task_id, mailbox.clone());
    let Some(session) = session else {
        // Nobody watches (any more): end it at once; the agent's streamer stops.
        mailbox.send(wsloop::Outgoing::Close(1000, "nobody is watching".into()));
        let _ = wsloop::run(
            &mut ws,
            &inbox,
            Duration::from_secs(3600),
            None,
            &mut Relay::idle(),
        );
        return;
    };
    log::debug!("live stream of {task_id} open");
    let mut relay = Relay {
        shared: Some(shared.clone()),
        task_id: task_id.clone(),
        session,
        index: 0,
    };
    let end = wsloop::run(
        &mut ws,
        &inbox,
        Duration::from_secs(3600),
        Some(shared.keepalive()),
        &mut relay,
    );
    let end_of_task =
        matches!(&end, Ok(End::Closed(Some((1000, reason)))) if reason == END_OF_TASK);
    log::debug!("live stream of {task_id} ended: {end:?}");
    shared.hub().stream_closed(&task_id, session, end_of_task);
}

struct Relay {
    shared: Option<Arc<Shared>>,
    task_id: String,
    session: u64,
    index: u64,
}

impl Relay {
    fn idle() -> Relay {
        Relay {
            shared: None,
            task_id: String::new(),
            session: 0,
            index: 0,
        }
    }
}

impl Peer for Relay {
    fn on_text(&mut self, text: &str, _out: &mut Vec<String>) -> Flow {
        if let Some(shared) = &self.shared {
            shared
                .hub()
                .publish(&self.task_id, self.session, self.index, text.to_string());
            self.index += 1;
        }
        Flow::Continue
    }

    fn on_tick(&mut self, _out: &mut Vec<String>) -> Flow {
        Flow::Continue
    }
}
