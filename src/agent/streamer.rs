//! The LogStreamer: exists only while somebody watches a task. On
//! `start_realtime_stream` a thread opens WS 3 (`/agent/stream/{task_id}`) and sends the
//! task's log from its first line, one line per text frame, following the files as
//! Terraform writes them: the plan log, then [`APPLY_MARKER`], then the apply log. On
//! `stop_realtime_stream` (or when the server closes WS 3) it closes and ends; at the end
//! of the task it sends the last lines and closes with [`END_OF_TASK`].
//!
//! Terraform never waits for it: Terraform writes its log file, the streamer reads it.

use std::fs::File;
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, WebSocket};

use super::control::connect_ws;
use super::runner::{log_path, TaskHandle};
use super::Ctx;
use crate::protocol::{Action, LineSplitter, Phase, APPLY_MARKER, END_OF_TASK, MAX_LINE};
use crate::tls::ClientStream;
use crate::wsloop::{self, Transport};

/// How often a followed file is looked at for new bytes.
const FOLLOW_EVERY: Duration = Duration::from_millis(50);

/// Starts streaming `task_id`, unless it does not run here or a stream already runs.
pub(crate) fn start(ctx: &Arc<Ctx>, task_id: &str) {
    let Some(handle) = ctx.tasks().get(task_id).cloned() else {
        log::info!("asked to stream {task_id}, which does not run here");
        return;
    };
    let stop = Arc::new(AtomicBool::new(false));
    {
        let mut streams = ctx.streams();
        if streams
            .get(task_id)
            .is_some_and(|s| !s.load(Ordering::SeqCst))
        {
            return; // already streaming
        }
        streams.insert(task_id.to_string(), stop.clone());
    }
    let ctx2 = ctx.clone();
    let id = task_id.to_string();
    let spawned = thread::Builder::new()
        .name(format!("stream {task_id}"))
        .spawn(move || {
            match stream(&ctx2, &id, &handle, &stop) {
                Ok(why) => log::info!("live stream of {id} closed: {why}"),
                Err(e) => log::warn!("live stream of {id} failed: {e}"),
            }
            let mut streams = ctx2.streams();
            if streams.get(&id).is_some_and(|s| Arc::ptr_eq(s, &stop)) {
                streams.remove(&id);
            }
        });
    if let Err(e) = spawned {
        log::error!("cannot start a streamer for {task_id}: {e}");
        ctx.streams().remove(task_id);
    }
}

/// Asks the streamer of `task_id`, if any, to close WS 3 and end.
pub(crate) fn stop(ctx: &Ctx, task_id: &str) {
    if let Some(s) = ctx.streams().get(task_id) {
        s.store(true, Ordering::SeqCst);
    }
}

/// Why a stream ended without an error.
type Closed = &'static str;

fn stream(
    ctx: &Ctx,
    task_id: &str,
    handle: &TaskHandle,
    stop: &AtomicBool,
) -> Result<Closed, String> {
    let creds = ctx.credentials().ok_or("not registered")?;
    let config = wsloop::control_config().max_message_size(Some(64 << 10));
    let mut ws = connect_ws(ctx, &creds, &format!("/agent/stream/{task_id}"), config)
        .map_err(|e| e.to_string())?;
    log::info!("live stream of {task_id} open");
    let tcp = ws.get_ref().tcp();
    tcp.set_write_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    // Short reads: between sends the streamer looks for a close from the server.
    tcp.set_read_timeout(Some(Duration::from_millis(1)))
        .map_err(|e| e.to_string())?;
    let phases: &[Phase] = match handle.action {
        Action::Plan => &[Phase::Plan],
        Action::Apply => &[Phase::Plan, Phase::Apply],
    };
    let mut out = Sender { ws: &mut ws };
    for &phase in phases {
        // Wait for the phase to begin; a task that ends first has no more phases.
        loop {
            if stop.load(Ordering::SeqCst) {
                return out.close("stopped");
            }
            if handle.phase_started(phase) {
                break;
            }
            if handle.is_finished() {
                return out.close(END_OF_TASK);
            }
            out.idle()?;
        }
        if phase == Phase::Apply {
            out.line(APPLY_MARKER.to_string())?;
        }
        let path = log_path(&ctx.config.work_dir, task_id, phase);
        let mut file = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut splitter = LineSplitter::default();
        let mut buf = vec![0u8; MAX_LINE];
        loop {
            if stop.load(Ordering::SeqCst) {
                return out.close("stopped");
            }
            // Read "done" before the last read, so no byte written before it is missed.
            let done = handle.phase_done(phase);
            loop {
                let n = file.read(&mut buf).map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
                for line in splitter.push(&buf[..n]) {
                    out.line(line)?;
                }
            }
            if done {
                if let Some(line) = splitter.finish() {
                    out.line(line)?;
                }
                break;
            }
            out.idle()?;
        }
    }
    out.close(END_OF_TASK)
}

/// WS 3 as the streamer uses it: blocking sends, and a glance for a close between them.
struct Sender<'a> {
    ws: &'a mut WebSocket<ClientStream>,
}

impl Sender<'_> {
    fn line(&mut self, line: String) -> Result<(), String> {
        self.ws.send(Message::text(line)).map_err(|e| e.to_string())
    }

    /// Waits a moment; fails if the server closed WS 3 (nobody watches any more).
    fn idle(&mut self) -> Result<(), String> {
        thread::sleep(FOLLOW_EVERY);
        loop {
            match self.ws.read() {
                Ok(Message::Close(_)) => return Err("the server closed the stream".into()),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(())
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    fn close(&mut self, reason: &'static str) -> Result<Closed, String> {
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: reason.into(),
        };
        let _ = self
            .ws
            .get_ref()
            .tcp()
            .set_read_timeout(Some(Duration::from_secs(5)));
        self.ws.close(Some(frame)).map_err(|e| e.to_string())?;
        // Drive the close handshake until the server has answered (bounded by the timeout).
        while self.ws.read().is_ok() {}
        Ok(reason)
    }
}
