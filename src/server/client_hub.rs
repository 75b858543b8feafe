//! The Client Log Hub: WS 2 (`GET /api/tasks/{id}/logs/live`) viewers of a task's live
//! log, and the per-task fan-out that relays what the agent sends on WS 3.
//!
//! A task has a live log only while somebody watches it: the first viewer of a running
//! task makes the server send `start_realtime_stream` over the agent's WS 1; every line
//! that arrives on WS 3 goes to each viewer's bounded queue (and to a bounded in-memory
//! backlog for viewers who join later); when the last viewer leaves, the server sends
//! `stop_realtime_stream` and forgets the lines. Nothing here is ever written to disk.
//!
//! The lines of the stream are exactly [`log_lines`] of the plan log, then
//! [`APPLY_MARKER`], then the apply log's lines; so a viewer who missed the end of a
//! stream (it broke, or the task ended before the stream opened) is completed from the
//! archived logs, skipping the lines it already has.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tungstenite::protocol::Role;
use tungstenite::WebSocket;

use super::lifecycle::TaskRecord;
use super::Shared;
use crate::protocol::{log_lines, Phase, ServerMsg, TaskStatus, APPLY_MARKER};
use crate::wsloop::{self, Delivery, Flow, Mailbox, Outgoing, Peer, Transport};

/// Bytes queued for one viewer before it counts as too slow and is dropped.
pub(crate) const MAX_VIEWER_PENDING: usize = 4 << 20;
/// Bytes of a stream kept in memory for viewers who join later.
pub(crate) const MAX_BACKLOG: usize = 16 << 20;
/// Close code for a viewer that did not keep up.
pub(crate) const CLOSE_TOO_SLOW: u16 = 4008;
/// A `start_realtime_stream` not answered by a WS 3 within this time is sent again.
const START_RETRY: Duration = Duration::from_secs(2);
/// How long a viewer of an ended task waits for the stream to deliver its last lines
/// before it is completed from the archive instead.
const END_GRACE: Duration = Duration::from_secs(10);

struct Viewer {
    id: u64,
    mailbox: Mailbox,
    /// Lines of the stream this viewer has been given (queued counts).
    sent: Arc<AtomicU64>,
}

#[derive(Clone)]
enum Stream {
    Idle,
    Requested(Instant),
    Open { session: u64, ws3: Mailbox },
}

struct TaskLog {
    viewers: Vec<Viewer>,
    backlog: VecDeque<String>,
    backlog_bytes: usize,
    /// Stream index of `backlog[0]`.
    first: u64,
    /// Stream index of the next new line.
    next: u64,
    stream: Stream,
    /// The agent sent the whole log (it closed WS 3 with [`END_OF_TASK`]).
    complete: bool,
}

impl TaskLog {
    fn new() -> TaskLog {
        TaskLog {
            viewers: Vec::new(),
            backlog: VecDeque::new(),
            backlog_bytes: 0,
            first: 0,
            next: 0,
            stream: Stream::Idle,
            complete: false,
        }
    }
}

/// Every watched task's viewers and live stream. Plain data behind one `Mutex`.
#[derive(Default)]
pub(crate) struct Hub {
    tasks: HashMap<String, TaskLog>,
    next_id: u64,
}

/// What to do after the last viewer of a task left.
pub(crate) struct Unwatched {
    /// WS 3 of the stream, if one is open.
    pub ws3: Option<Mailbox>,
}

impl Hub {
    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Adds a viewer. It is given the backlog first, so it sees the stream from its start.
    pub fn subscribe(&mut self, task_id: &str, mailbox: Mailbox, sent: Arc<AtomicU64>) -> u64 {
        let id = self.new_id();
        let log = self
            .tasks
            .entry(task_id.to_string())
            .or_insert_with(TaskLog::new);
        if log.first > 0 {
            mailbox.send_text(format!(
                "--- {} earlier lines are no longer in memory: the archived log has them ---",
                log.first
            ));
        }
        for line in &log.backlog {
            mailbox.send_text(line.clone());
        }
        sent.store(log.next, Ordering::SeqCst);
        log.viewers.push(Viewer { id, mailbox, sent });
        id
    }

    /// Removes a viewer; `Some` when it was the last one and a stream must stop.
    pub fn unsubscribe(&mut self, task_id: &str, viewer: u64) -> Option<Unwatched> {
        let log = self.tasks.get_mut(task_id)?;
        log.viewers.retain(|v| v.id != viewer);
        if !log.viewers.is_empty() {
            return None;
        }
        let log = self.tasks.remove(task_id)?;
        match log.stream {
            Stream::Idle => None,
            Stream::Requested(_) => Some(Unwatched { ws3: None }),
            Stream::Open { ws3, .. } => Some(Unwatched { ws3: Some(ws3) }),
        }
    }

    /// Whether `start_realtime_stream` should be sent now (and records that it was).
    pub fn want_stream(&mut self, task_id: &str, now: Instant) -> bool {
        let Some(log) = self.tasks.get_mut(task_id) else {
            return false;
        };
        if log.complete {
            return false;
        }
        let due = match log.stream {
            Stream::Idle => true,
            Stream::Requested(at) => now.duration_since(at) >= START_RETRY,
            Stream::Open { .. } => false,
        };
        if due && !log.viewers.is_empty() {
            log.stream = Stream::Requested(now);
            return true;
        }
        false
    }

    /// A WS 3 opened for the task. `None` when nobody watches it (close it).
    pub fn stream_opened(&mut self, task_id: &str, ws3: Mailbox) -> Option<u64> {
        let session = self.new_id();
        let log = self.tasks.get_mut(task_id)?;
        if log.viewers.is_empty() {
            return None;
        }
        if let Stream::Open { ws3: old, .. } = &log.stream {
            old.send(Outgoing::Close(1000, "replaced by a newer stream".into()));
        }
        log.stream = Stream::Open { session, ws3 };
        Some(session)
    }

    /// Line `index` (counted from the start of the task's log) of stream `session`.
    /// A re-established stream starts again at 0: lines already relayed are skipped.
    pub fn publish(&mut self, task_id: &str, session: u64, index: u64, line: String) {
        let Some(log) = self.tasks.get_mut(task_id) else {
            return;
        };
        if !matches!(log.stream, Stream::Open { session: s, .. } if s == session)
            || index < log.next
        {
            return;
        }
        log.next = index + 1;
        log.viewers.retain(
            |v| match v.mailbox.send_bounded(line.clone(), MAX_VIEWER_PENDING) {
                Delivery::Sent => {
                    v.sent.fetch_add(1, Ordering::SeqCst);
                    true
                }
                Delivery::Full => {
                    log::info!("a viewer of {task_id} did not keep up: dropped");
                    v.mailbox.abort(CLOSE_TOO_SLOW, "viewer too slow: dropped");
                    false
                }
                Delivery::Gone => false,
            },
        );
        log.backlog_bytes += line.len();
        log.backlog.push_back(line);
        while log.backlog_bytes > MAX_BACKLOG {
            let Some(old) = log.backlog.pop_front() else {
                break;
            };
            log.backlog_bytes -= old.len();
            log.first += 1;
        }
    }

    /// Stream `session` ended. At the end of the task its viewers have every line, and
    /// are woken to close once the store shows the task ended (so that a client reading
    /// the task after the close sees its final status). Otherwise the viewers' ticks ask
    /// for a new stream.
    pub fn stream_closed(&mut self, task_id: &str, session: u64, end_of_task: bool) {
        let Some(log) = self.tasks.get_mut(task_id) else {
            return;
        };
        if !matches!(log.stream, Stream::Open { session: s, .. } if s == session) {
            return;
        }
        log.stream = Stream::Idle;
        log.complete |= end_of_task;
        self.nudge(task_id);
    }

    pub fn is_streaming(&self, task_id: &str) -> bool {
        self.tasks
            .get(task_id)
            .is_some_and(|l| matches!(l.stream, Stream::Open { .. }))
    }

    #[cfg(test)]
    pub fn has_viewers(&self, task_id: &str) -> bool {
        self.tasks
            .get(task_id)
            .is_some_and(|l| !l.viewers.is_empty())
    }

    /// Closes every viewer and stream (server shutdown).
    pub fn close_all(&self, code: u16, reason: &str) {
        for log in self.tasks.values() {
            for v in &log.viewers {
                v.mailbox.send(Outgoing::Close(code, reason.to_string()));
            }
            if let Stream::Open { ws3, .. } = &log.stream {
                ws3.send(Outgoing::Close(code, reason.to_string()));
            }
        }
    }

    /// Wakes every viewer of the task (e.g. it ended) to look at it again.
    pub fn nudge(&self, task_id: &str) {
        if let Some(log) = self.tasks.get(task_id) {
            for v in &log.viewers {
                v.mailbox.send(Outgoing::Nudge);
            }
        }
    }
}

fn command(msg: &ServerMsg) -> String {
    serde_json::to_string(msg).expect("a command always serializes")
}

/// Asks the task's agent to stream, if somebody watches and no stream is open or asked for.
pub(crate) fn kick_stream(shared: &Shared, rec: &TaskRecord) {
    if rec.status != TaskStatus::Running {
        return;
    }
    let Some(agent) = rec.agent_id.as_deref() else {
        return;
    };
    let Some(mailbox) = shared.registry().mailbox(agent) else {
        return; // WS 1 is down: a viewer's tick asks again when it is back
    };
    if shared.hub().want_stream(&rec.task_id, Instant::now()) {
        log::debug!("asking {agent} to stream {}", rec.task_id);
        mailbox.send_text(command(&ServerMsg::StartRealtimeStream {
            task_id: rec.task_id.clone(),
        }));
    }
}

/// The lines a complete stream of this task would have carried, from its archived logs.
pub(crate) fn archived_lines(shared: &Shared, task_id: &str) -> Vec<String> {
    let mut lines = Vec::new();
    for phase in [Phase::Plan, Phase::Apply] {
        let log = match shared.store.read_log(task_id, phase) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => continue,
            Err(e) => {
                log::error!("store: {e}");
                continue;
            }
        };
        if phase == Phase::Apply {
            lines.push(APPLY_MARKER.to_string());
        }
        lines.extend(log_lines(&log));
    }
    lines
}

/// Serves one viewer on WS 2 until it leaves or the task's log ends. The 101 is sent.
pub(crate) fn serve<S: Transport>(
    shared: Arc<Shared>,
    task_id: String,
    stream: S,
    leftover: Vec<u8>,
) {
    let config = wsloop::control_config().max_message_size(Some(64 << 10));
    let mut ws = WebSocket::from_partially_read(stream, leftover, Role::Server, Some(config));
    let (mailbox, inbox) = match wsloop::mailbox() {
        Ok(m) => m,
        Err(e) => {
            log::error!("cannot serve a viewer of {task_id}: {e}");
            return;
        }
    };
    let sent = Arc::new(AtomicU64::new(0));
    let viewer = shared
        .hub()
        .subscribe(&task_id, mailbox.clone(), sent.clone());
    let mut peer = ViewerPeer {
        shared: shared.clone(),
        task_id: task_id.clone(),
        mailbox,
        sent,
        done: false,
        ended_at: None,
    };
    peer.check();
    let end = wsloop::run(
        &mut ws,
        &inbox,
        Duration::from_secs(1),
        Some(shared.keepalive()),
        &mut peer,
    );
    log::debug!("viewer of {task_id} left: {end:?}");
    let unwatched = shared.hub().unsubscribe(&task_id, viewer);
    if let Some(u) = unwatched {
        stop_stream(&shared, &task_id, u);
    }
}

fn stop_stream(shared: &Shared, task_id: &str, u: Unwatched) {
    if let Some(ws3) = u.ws3 {
        ws3.send(Outgoing::Close(1000, "nobody is watching".into()));
    }
    let agent = match shared.store.task(task_id) {
        Ok(Some(rec)) => rec.agent_id,
        _ => None,
    };
    if let Some(mailbox) = agent.and_then(|a| shared.registry().mailbox(&a)) {
        mailbox.send_text(command(&ServerMsg::StopRealtimeStream {
            task_id: task_id.to_string(),
        }));
    }
}

struct ViewerPeer {
    shared: Arc<Shared>,
    task_id: String,
    mailbox: Mailbox,
    sent: Arc<AtomicU64>,
    /// The end of the log has been queued.
    done: bool,
    ended_at: Option<Instant>,
}

impl ViewerPeer {
    /// Looks at the task: asks for a stream while it runs; once it ended and no stream
    /// is delivering, completes the viewer from the archive and closes normally.
    fn check(&mut self) -> Flow {
        if self.done {
            return Flow::Continue;
        }
        let rec = match self.shared.store.task(&self.task_id) {
            Ok(Some(rec)) => rec,
            Ok(None) => return Flow::Close(1000, "no such task".into()),
            Err(e) => {
                log::error!("store: {e}");
                return Flow::Continue;
            }
        };
        if !rec.status.is_terminal() {
            kick_stream(&self.shared, &rec);
            return Flow::Continue;
        }
        let ended = *self.ended_at.get_or_insert_with(Instant::now);
        if self.shared.hub().is_streaming(&self.task_id) && ended.elapsed() < END_GRACE {
            return Flow::Continue; // the stream's last lines are on their way
        }
        let skip = self.sent.load(Ordering::SeqCst) as usize;
        for line in archived_lines(&self.shared, &self.task_id)
            .into_iter()
            .skip(skip)
        {
            self.mailbox.send_text(line);
        }
        self.mailbox
            .send(Outgoing::Close(1000, "task ended".into()));
        self.done = true;
        Flow::Continue
    }
}

impl Peer for ViewerPeer {
    fn on_text(&mut self, _text: &str, _out: &mut Vec<String>) -> Flow {
        Flow::Continue // viewers have nothing to say
    }

    fn on_tick(&mut self, _out: &mut Vec<String>) -> Flow {
        self.check()
    }

    fn on_nudge(&mut self, _out: &mut Vec<String>) -> Flow {
        self.check()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wsloop::mailbox;

    fn viewer(hub: &mut Hub, task: &str) -> (u64, Arc<AtomicU64>, crate::wsloop::Inbox) {
        let (mb, inbox) = mailbox().unwrap();
        let sent = Arc::new(AtomicU64::new(0));
        (hub.subscribe(task, mb, sent.clone()), sent, inbox)
    }

    #[test]
    fn a_stream_is_wanted_once_per_retry_period_while_watched() {
        let mut hub = Hub::default();
        let t0 = Instant::now();
        assert!(!hub.want_stream("T-1", t0), "nobody watches");
        let (v, _, _i) = viewer(&mut hub, "T-1");
        assert!(hub.want_stream("T-1", t0));
        assert!(!hub.want_stream("T-1", t0 + Duration::from_millis(100)));
        assert!(hub.want_stream("T-1", t0 + START_RETRY));
        let (ws3, _i3) = mailbox().unwrap();
        let s = hub.stream_opened("T-1", ws3).unwrap();
        assert!(hub.is_streaming("T-1"));
        assert!(!hub.want_stream("T-1", t0 + START_RETRY * 2));
        hub.stream_closed("T-1", s, false);
        assert!(
            hub.want_stream("T-1", t0 + START_RETRY * 3),
            "a broken stream is asked for again"
        );
        let u = hub
            .unsubscribe("T-1", v)
            .expect("the last viewer stops the stream");
        assert!(u.ws3.is_none());
        assert!(!hub.has_viewers("T-1"));
    }

    #[test]
    fn lines_fan_out_late_viewers_get_the_backlog_and_duplicates_are_skipped() {
        let mut hub = Hub::default();
        let (_a, sent_a, _ia) = viewer(&mut hub, "T-1");
        let (ws3, _i3) = mailbox().unwrap();
        let s1 = hub.stream_opened("T-1", ws3).unwrap();
        hub.publish("T-1", s1, 0, "one".into());
        hub.publish("T-1", s1, 1, "two".into());
        let (_b, sent_b, _ib) = viewer(&mut hub, "T-1");
        assert_eq!(sent_b.load(Ordering::SeqCst), 2, "the backlog");
        // The stream breaks and comes back from line 0: only line 2 is new.
        hub.stream_closed("T-1", s1, false);
        let (ws3, _i3) = mailbox().unwrap();
        let s2 = hub.stream_opened("T-1", ws3).unwrap();
        hub.publish("T-1", s1, 2, "stale session".into());
        for (i, l) in ["one", "two", "three"].iter().enumerate() {
            hub.publish("T-1", s2, i as u64, l.to_string());
        }
        assert_eq!(sent_a.load(Ordering::SeqCst), 3);
        assert_eq!(sent_b.load(Ordering::SeqCst), 3);
        let log = &hub.tasks["T-1"];
        assert_eq!(log.backlog, ["one", "two", "three"]);
        hub.stream_closed("T-1", s2, true);
        assert!(!hub.is_streaming("T-1"));
        assert!(
            !hub.want_stream("T-1", Instant::now() + START_RETRY * 9),
            "a complete log is not asked for again"
        );
    }

    #[test]
    fn a_viewer_that_does_not_keep_up_is_dropped() {
        let mut hub = Hub::default();
        let (_slow, _sent, _inbox_never_read) = viewer(&mut hub, "T-1");
        let (ws3, _i3) = mailbox().unwrap();
        let s = hub.stream_opened("T-1", ws3).unwrap();
        let line = "x".repeat(64 * 1024);
        let mut i = 0;
        while hub.has_viewers("T-1") {
            hub.publish("T-1", s, i, line.clone());
            i += 1;
            assert!(i < 1000, "never dropped");
        }
        assert!(i as usize * line.len() > MAX_VIEWER_PENDING);
    }

    #[test]
    fn the_backlog_is_bounded() {
        let mut hub = Hub::default();
        let (_v, _s, _i) = viewer(&mut hub, "T-1");
        let (ws3, _i3) = mailbox().unwrap();
        let s = hub.stream_opened("T-1", ws3).unwrap();
        let line = "y".repeat(1 << 20);
        // Keep the viewer drained so that it is not dropped.
        for i in 0..20 {
            hub.publish("T-1", s, i, line.clone());
            while _i.try_recv().is_ok() {}
        }
        let log = &hub.tasks["T-1"];
        assert!(log.backlog_bytes <= MAX_BACKLOG);
        assert_eq!(log.first + log.backlog.len() as u64, 20);
    }
}
