//! The I/O loop of a WebSocket that must wait for frames *and* send at any moment: WS 1
//! on both ends. One thread owns the socket and runs [`run`]; everyone else holds a
//! [`Mailbox`] and drops text into it.
//!
//! The socket is non-blocking and the thread sleeps in `poll(2)` on two descriptors: the
//! socket, and the read end of a Unix socket pair that [`Mailbox::send`] writes one byte
//! to after queuing a message. So an idle connection costs no CPU between ticks, and a
//! message reaches the wire as soon as it is queued, with no polling interval.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tungstenite::{Error as WsError, Message, WebSocket};

/// A byte stream under a WebSocket or an HTTP exchange: plain TCP today; a TLS stream
/// will implement it too, by handing out the TCP socket under it (for timeouts and poll).
pub trait Transport: Read + Write + Send + 'static {
    fn tcp(&self) -> &TcpStream;
}

impl Transport for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

/// The WebSocket settings for WS 1: small read buffers (an idle connection should cost
/// a few KiB, not 128), bounded messages and a bounded write queue (a peer that stops
/// reading is dropped, it does not grow our memory without end).
pub fn control_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(8 << 20)
        .max_message_size(Some(16 << 20))
        .max_frame_size(Some(16 << 20))
}

/// What a mailbox carries to the socket's owner.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    Text(String),
    /// Close the connection with this code and reason.
    Close(u16, String),
    /// Nothing to send as such: call [`Peer::on_nudge`] (e.g. "state changed, report it").
    Nudge,
}

/// The sending side: cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct Mailbox {
    tx: Sender<Outgoing>,
    shared: Arc<MailShared>,
}

struct MailShared {
    wake: UnixStream,
    /// Bytes of text queued and not yet taken by the owner.
    pending: AtomicUsize,
    /// A close that jumps the queue: see [`Mailbox::abort`].
    abort: Mutex<Option<(u16, String)>>,
}

/// The receiving side, owned by the thread that owns the socket.
pub struct Inbox {
    rx: Receiver<Outgoing>,
    shared: Arc<MailShared>,
    wake: UnixStream,
}

/// What became of a bounded send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Sent,
    /// More than the bound is already waiting: the message was not queued.
    Full,
    /// The owner is gone.
    Gone,
}

/// A new mailbox and its inbox.
pub fn mailbox() -> io::Result<(Mailbox, Inbox)> {
    let (a, b) = UnixStream::pair()?;
    a.set_nonblocking(true)?;
    b.set_nonblocking(true)?;
    let (tx, rx) = crossbeam_channel::unbounded();
    let shared = Arc::new(MailShared {
        wake: a,
        pending: AtomicUsize::new(0),
        abort: Mutex::new(None),
    });
    Ok((
        Mailbox {
            tx,
            shared: shared.clone(),
        },
        Inbox {
            rx,
            shared,
            wake: b,
        },
    ))
}

impl Mailbox {
    /// Queues a message and wakes the owner. False when the owner is gone.
    pub fn send(&self, msg: Outgoing) -> bool {
        let len = match &msg {
            Outgoing::Text(t) => t.len(),
            _ => 0,
        };
        self.shared.pending.fetch_add(len, Ordering::SeqCst);
        if self.tx.send(msg).is_err() {
            self.shared.pending.fetch_sub(len, Ordering::SeqCst);
            return false;
        }
        self.wake();
        true
    }

    pub fn send_text(&self, text: String) -> bool {
        self.send(Outgoing::Text(text))
    }

    /// Queues a text unless more than `max_pending` bytes already wait: a reader that
    /// does not keep up is refused rather than allowed to grow our memory.
    pub fn send_bounded(&self, text: String, max_pending: usize) -> Delivery {
        if self.shared.pending.load(Ordering::SeqCst) > max_pending {
            return Delivery::Full;
        }
        if self.send(Outgoing::Text(text)) {
            Delivery::Sent
        } else {
            Delivery::Gone
        }
    }

    /// Ends the connection now with this close code, ahead of anything still queued.
    pub fn abort(&self, code: u16, reason: impl Into<String>) {
        *self.shared.abort.lock().unwrap_or_else(|p| p.into_inner()) = Some((code, reason.into()));
        self.wake();
    }

    fn wake(&self) {
        // A full pipe (WouldBlock) means a wake-up is already pending: nothing to do.
        let _ = (&self.shared.wake).write(&[1]);
    }
}

impl Inbox {
    fn drain_wake(&self) {
        let mut buf = [0u8; 64];
        while let Ok(n) = (&self.wake).read(&mut buf) {
            if n == 0 {
                break;
            }
        }
    }

    fn take_abort(&self) -> Option<(u16, String)> {
        self.shared
            .abort
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Takes the next message without waiting (for owners outside [`run`]).
    pub fn try_recv(&self) -> Result<Outgoing, TryRecvError> {
        let msg = self.rx.try_recv()?;
        if let Outgoing::Text(t) = &msg {
            self.shared.pending.fetch_sub(t.len(), Ordering::SeqCst);
        }
        Ok(msg)
    }
}

/// What a handler tells the loop after each event.
#[derive(Debug, Clone, PartialEq)]
pub enum Flow {
    Continue,
    /// Close with a handshake: wait (a few seconds at most) for the peer's close.
    Close(u16, String),
    /// The peer is gone or broken: send a close frame if the socket takes it, and end
    /// now, without waiting for an answer.
    Abort(u16, String),
}

/// The protocol side of a connection: decisions only, no I/O.
pub trait Peer {
    /// A text frame arrived. Push any replies onto `out`.
    fn on_text(&mut self, text: &str, out: &mut Vec<String>) -> Flow;
    /// The tick interval passed (heartbeats, liveness checks).
    fn on_tick(&mut self, out: &mut Vec<String>) -> Flow;
    /// Someone sent [`Outgoing::Nudge`].
    fn on_nudge(&mut self, _out: &mut Vec<String>) -> Flow {
        Flow::Continue
    }
}

/// Transport-level liveness: a ping every `every`, and the connection counts as dead
/// when nothing at all (a frame, a pong) has come from the peer for `dead_after`. This
/// keeps idle connections alive through proxies that drop them (nginx and cloud load
/// balancers at 60 s) and detects a peer that vanished without closing (a stalled
/// network keeps the socket open forever otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub every: Duration,
    pub dead_after: Duration,
}

impl Keepalive {
    /// Pings every `every`; dead after two intervals without an answer.
    pub fn every(every: Duration) -> Keepalive {
        Keepalive {
            every,
            dead_after: every * 2,
        }
    }
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq)]
pub enum End {
    /// The peer closed (with this code and reason, if it sent a close frame), or the
    /// TCP connection ended.
    Closed(Option<(u16, String)>),
    /// We closed, with this reason.
    WeClosed(String),
    /// Nothing came from the peer for this long: given up as dead.
    Silent(Duration),
}

const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Runs the connection until it ends. Returns an error for a broken connection.
pub fn run<S: Transport>(
    ws: &mut WebSocket<S>,
    inbox: &Inbox,
    tick: Duration,
    keepalive: Option<Keepalive>,
    peer: &mut dyn Peer,
) -> Result<End, WsError> {
    ws.get_ref().tcp().set_nonblocking(true)?;
    let mut next_tick = Instant::now() + tick;
    let mut last_rx = Instant::now();
    let mut next_ping = keepalive.map(|k| Instant::now() + k.every);
    let mut out: Vec<String> = Vec::new();
    // Set once we started a close: (reason, give-up time).
    let mut closing: Option<(String, Instant)> = None;
    let mut peer_closed = false;
    let mut peer_frame: Option<(u16, String)> = None;

    loop {
        // Inbound: everything the socket has.
        loop {
            let read = ws.read();
            if read.is_ok() {
                last_rx = Instant::now();
            }
            match read {
                Ok(Message::Text(text)) => {
                    if closing.is_none() && !peer_closed {
                        let flow = peer.on_text(text.as_str(), &mut out);
                        if let Some(end) = follow(ws, &mut closing, flow)? {
                            return Ok(end);
                        }
                    }
                }
                Ok(Message::Close(frame)) => {
                    peer_closed = true;
                    peer_frame = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                }
                Ok(_) => {} // ping/pong are answered by tungstenite; binary is not ours
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(WsError::ConnectionClosed) => return Ok(end_of(closing, &peer_frame)),
                Err(WsError::AlreadyClosed) => return Ok(end_of(closing, &peer_frame)),
                Err(WsError::Capacity(e)) => {
                    // Say why before hanging up: 1009 is "message too big".
                    let reason = format!("message too big: {e}");
                    if let Some(end) = follow(ws, &mut closing, Flow::Abort(1009, reason))? {
                        return Ok(end);
                    }
                }
                Err(e) => return Err(e),
            }
        }

        let now = Instant::now();
        if now >= next_tick {
            next_tick = now + tick;
            if closing.is_none() && !peer_closed {
                let flow = peer.on_tick(&mut out);
                if let Some(end) = follow(ws, &mut closing, flow)? {
                    return Ok(end);
                }
            }
        }
        if let Some((reason, give_up)) = &closing {
            if now >= *give_up {
                return Ok(End::WeClosed(reason.clone()));
            }
        }
        if let Some(k) = keepalive {
            let silent = now.duration_since(last_rx);
            if silent >= k.dead_after {
                return Ok(End::Silent(silent));
            }
            if next_ping.is_some_and(|p| now >= p) && closing.is_none() && !peer_closed {
                next_ping = Some(now + k.every);
                match ws.write(Message::Ping(Vec::new().into())) {
                    Ok(()) => {}
                    Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(WsError::ConnectionClosed) | Err(WsError::AlreadyClosed) => {
                        return Ok(end_of(closing, &peer_frame))
                    }
                    Err(e) => return Err(e),
                }
            }
        }

        // Outbound: drain the wake-up bytes first, then the queue, so that a message
        // queued after this point always leaves a byte for the next poll.
        inbox.drain_wake();
        if let Some((code, reason)) = inbox.take_abort() {
            if let Some(end) = follow(ws, &mut closing, Flow::Abort(code, reason))? {
                return Ok(end);
            }
        }
        // Backpressure: while the socket does not take what we have, leave the queue
        // alone (a bounded sender then sees it fill up).
        let mut want_write = match flush(ws)? {
            Flushed::Done => false,
            Flushed::Blocked => true,
            Flushed::Closed => return Ok(end_of(closing, &peer_frame)),
        };
        if !want_write {
            loop {
                match inbox.try_recv() {
                    Ok(Outgoing::Text(t)) => out.push(t),
                    Ok(Outgoing::Nudge) => {
                        let flow = peer.on_nudge(&mut out);
                        if closing.is_none() && !peer_closed {
                            if let Some(end) = follow(ws, &mut closing, flow)? {
                                return Ok(end);
                            }
                        }
                    }
                    Ok(Outgoing::Close(code, reason)) => {
                        // Whatever was queued before the close goes out first.
                        write_all(ws, &mut out, closing.is_some() || peer_closed)?;
                        if closing.is_none() && !peer_closed {
                            start_close(ws, &mut closing, code, reason)?;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        write_all(ws, &mut out, closing.is_some() || peer_closed)?;
                        if closing.is_none() && !peer_closed {
                            start_close(ws, &mut closing, 1001, "shutting down".into())?;
                        }
                        break;
                    }
                }
            }
        }
        write_all(ws, &mut out, closing.is_some() || peer_closed)?;
        match flush(ws)? {
            Flushed::Done => want_write = false,
            Flushed::Blocked => want_write = true,
            Flushed::Closed => return Ok(end_of(closing, &peer_frame)),
        }

        // Sleep until the socket or the mailbox has something, or the next tick.
        let now = Instant::now();
        let mut deadline = next_tick;
        if let Some((_, give_up)) = &closing {
            deadline = deadline.min(*give_up);
        }
        if let (Some(k), Some(p)) = (keepalive, next_ping) {
            deadline = deadline.min(p).min(last_rx + k.dead_after);
        }
        let timeout =
            Timespec::try_from(deadline.saturating_duration_since(now)).unwrap_or(Timespec {
                tv_sec: 1,
                tv_nsec: 0,
            });
        let mut sock_flags = PollFlags::IN;
        if want_write {
            sock_flags |= PollFlags::OUT;
        }
        let mut fds = [
            PollFd::new(ws.get_ref().tcp(), sock_flags),
            PollFd::new(&inbox.wake, PollFlags::IN),
        ];
        match poll(&mut fds, Some(&timeout)) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(WsError::Io(e.into())),
        }
    }
}

enum Flushed {
    Done,
    /// The socket took less than we had; the rest waits in tungstenite's buffer.
    Blocked,
    Closed,
}

fn flush<S: Transport>(ws: &mut WebSocket<S>) -> Result<Flushed, WsError> {
    match ws.flush() {
        Ok(()) => Ok(Flushed::Done),
        Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Ok(Flushed::Blocked),
        Err(WsError::ConnectionClosed) | Err(WsError::AlreadyClosed) => Ok(Flushed::Closed),
        Err(e) => Err(e),
    }
}

/// Hands the texts to tungstenite (which buffers what the socket does not take yet);
/// drops them when the connection is closing.
fn write_all<S: Transport>(
    ws: &mut WebSocket<S>,
    out: &mut Vec<String>,
    discard: bool,
) -> Result<(), WsError> {
    if discard {
        out.clear();
        return Ok(());
    }
    for text in out.drain(..) {
        match ws.write(Message::text(text)) {
            Ok(()) => {}
            Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(WsError::ConnectionClosed) | Err(WsError::AlreadyClosed) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Acts on a handler's [`Flow`]; `Some` when the loop must end now.
fn follow<S: Transport>(
    ws: &mut WebSocket<S>,
    closing: &mut Option<(String, Instant)>,
    flow: Flow,
) -> Result<Option<End>, WsError> {
    match flow {
        Flow::Continue => Ok(None),
        Flow::Close(code, reason) => start_close(ws, closing, code, reason).map(|()| None),
        Flow::Abort(code, reason) => {
            start_close(ws, closing, code, reason.clone())?;
            let _ = ws.flush();
            Ok(Some(End::WeClosed(reason)))
        }
    }
}

fn start_close<S: Transport>(
    ws: &mut WebSocket<S>,
    closing: &mut Option<(String, Instant)>,
    code: u16,
    reason: String,
) -> Result<(), WsError> {
    log::debug!("closing WebSocket: {code} {reason}");
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.clone().into(),
    };
    *closing = Some((reason, Instant::now() + CLOSE_GRACE));
    match ws.close(Some(frame)) {
        Ok(()) => Ok(()),
        Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        Err(WsError::ConnectionClosed) | Err(WsError::AlreadyClosed) => Ok(()),
        Err(e) => Err(e),
    }
}

fn end_of(closing: Option<(String, Instant)>, peer_frame: &Option<(u16, String)>) -> End {
    match closing {
        Some((reason, _)) => End::WeClosed(reason),
        None => End::Closed(peer_frame.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;
    use tungstenite::protocol::Role;

    /// Echoes every text back upper-cased; closes on "bye".
    struct Echo {
        ticks: usize,
    }

    impl Peer for Echo {
        fn on_text(&mut self, text: &str, out: &mut Vec<String>) -> Flow {
            if text == "bye" {
                return Flow::Close(1000, "bye".into());
            }
            out.push(text.to_uppercase());
            Flow::Continue
        }
        fn on_tick(&mut self, _out: &mut Vec<String>) -> Flow {
            self.ticks += 1;
            Flow::Continue
        }
    }

    fn pair() -> (WebSocket<TcpStream>, WebSocket<TcpStream>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (
            WebSocket::from_raw_socket(s, Role::Server, Some(control_config())),
            WebSocket::from_raw_socket(c, Role::Client, None),
        )
    }

    /// Runs the loop with an [`Echo`] peer on a thread of its own.
    fn echo_on(
        mut server: WebSocket<TcpStream>,
        inbox: Inbox,
        keepalive: Option<Keepalive>,
    ) -> thread::JoinHandle<Result<End, WsError>> {
        thread::spawn(move || {
            let mut echo = Echo { ticks: 0 };
            run(
                &mut server,
                &inbox,
                Duration::from_secs(3600),
                keepalive,
                &mut echo,
            )
        })
    }

    #[test]
    fn replies_pushes_from_mailbox_and_closes() {
        let (server, mut client) = pair();
        let (mbox, inbox) = mailbox().unwrap();
        let h = echo_on(server, inbox, None);
        client.send(Message::text("hello")).unwrap();
        assert_eq!(client.read().unwrap(), Message::text("HELLO"));
        // A message pushed from another thread arrives while the loop sleeps in poll.
        assert!(mbox.send_text("pushed".into()));
        assert_eq!(client.read().unwrap(), Message::text("pushed"));
        client.send(Message::text("bye")).unwrap();
        match client.read().unwrap() {
            Message::Close(Some(f)) => assert_eq!(f.reason.as_str(), "bye"),
            other => panic!("expected a close, got {other:?}"),
        }
        let _ = client.flush();
        let end = h.join().unwrap().unwrap();
        assert_eq!(end, End::WeClosed("bye".into()));
    }

    #[test]
    fn dropping_every_mailbox_closes_with_1001() {
        let (server, mut client) = pair();
        let (mbox, inbox) = mailbox().unwrap();
        let h = echo_on(server, inbox, None);
        drop(mbox);
        match client.read().unwrap() {
            Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 1001),
            other => panic!("expected a close, got {other:?}"),
        }
        let _ = client.flush();
        assert!(matches!(h.join().unwrap(), Ok(End::WeClosed(_))));
    }

    #[test]
    fn a_reader_that_stalls_fills_its_bound_and_is_aborted() {
        let (server, client) = pair();
        let (mbox, inbox) = mailbox().unwrap();
        let h = echo_on(server, inbox, None);
        // The client never reads: kernel buffers, then tungstenite's, then the bound fill.
        let line = "x".repeat(1000);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut sent = 0usize;
        loop {
            match mbox.send_bounded(line.clone(), 64 * 1024) {
                Delivery::Sent => sent += 1,
                Delivery::Full => break,
                Delivery::Gone => panic!("the loop ended early"),
            }
            assert!(
                Instant::now() < deadline,
                "the bound never filled ({sent} sent)"
            );
            if sent.is_multiple_of(100) {
                thread::yield_now();
            }
        }
        mbox.abort(4008, "too slow");
        assert_eq!(h.join().unwrap().unwrap(), End::WeClosed("too slow".into()));
        drop(client);
    }

    #[test]
    fn pings_keep_a_peer_alive_and_silence_ends_the_loop() {
        let (server, mut client) = pair();
        let (_mbox, inbox) = mailbox().unwrap();
        let k = Keepalive::every(Duration::from_millis(50));
        let h = echo_on(server, inbox, Some(k));
        // A client that reads (and so answers pings) keeps the connection up.
        let start = Instant::now();
        let mut pings = 0;
        while start.elapsed() < Duration::from_millis(400) {
            if let Message::Ping(_) = client.read().unwrap() {
                pings += 1;
            }
        }
        assert!(pings >= 3, "{pings} pings");
        assert!(!h.is_finished());
        // A client that stops answering is given up within two intervals (and a bit).
        let stopped = Instant::now();
        let end = h.join().unwrap().unwrap();
        assert!(
            matches!(end, End::Silent(d) if d >= k.dead_after),
            "{end:?}"
        );
        assert!(stopped.elapsed() < Duration::from_secs(2));
    }

    /// Sends "tick" on every tick.
    struct Ticker;

    impl Peer for Ticker {
        fn on_text(&mut self, _text: &str, _out: &mut Vec<String>) -> Flow {
            Flow::Continue
        }
        fn on_tick(&mut self, out: &mut Vec<String>) -> Flow {
            out.push("tick".into());
            Flow::Continue
        }
    }

    #[test]
    fn ticks_fire_and_peer_close_ends_the_loop() {
        let (mut server, mut client) = pair();
        let (_mbox, inbox) = mailbox().unwrap();
        let h = thread::spawn(move || {
            run(
                &mut server,
                &inbox,
                Duration::from_millis(10),
                None,
                &mut Ticker,
            )
        });
        for _ in 0..3 {
            assert_eq!(client.read().unwrap(), Message::text("tick"));
        }
        client
            .close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            }))
            .unwrap();
        while client.read().is_ok() {}
        assert_eq!(
            h.join().unwrap().unwrap(),
            End::Closed(Some((1000, String::new())))
        );
    }
}
