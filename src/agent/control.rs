//! The C&C manager, agent side of WS 1: registers, connects, reconnects with backoff and
//! full jitter, heartbeats its state, and turns server commands into scheduler
//! decisions and worker threads. It owns the WS 1 socket for as long as it lives.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use tungstenite::client::ClientRequestBuilder;
use tungstenite::{Message, WebSocket};

use super::scheduler::Admission;
use super::{runner, streamer, Credentials, Ctx, Error};
use crate::protocol::{valid_task_id, AgentMsg, RegisterRequest, RegisterResponse, ServerMsg};
use crate::tls::ClientStream;
use crate::util::Backoff;
use crate::wsloop::{self, Flow, Inbox, Keepalive, Peer};

/// A WS 1 session that lasted this long resets the backoff.
const STABLE: Duration = Duration::from_secs(30);

/// Registers and keeps WS 1 up until the server refuses the registration token.
pub(crate) fn run(ctx: Arc<Ctx>, inbox: Inbox) -> Result<(), Error> {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        let creds = match ctx.credentials() {
            Some(c) => c,
            None => match register(&ctx) {
                Ok(c) => {
                    ctx.set_credentials(Some(c.clone()));
                    c
                }
                Err(RegisterError::Refused(msg)) => return Err(Error::Refused(msg)),
                Err(RegisterError::Retry(msg)) => {
                    let wait = backoff.next_wait();
                    log::warn!(
                        "registration failed: {msg}; retrying in {:.1} s",
                        wait.as_secs_f64()
                    );
                    thread::sleep(wait);
                    continue;
                }
            },
        };
        match connect(&ctx, &creds) {
            Ok(mut ws) => {
                log::info!(
                    "connected to {} as {}",
                    ctx.config.server.ws("/agent/control"),
                    creds.agent_id
                );
                let started = Instant::now();
                ctx.connection_changed();
                let mut peer = ServerPeer { ctx: ctx.clone() };
                let end = send_state(&ctx, &mut ws).and_then(|()| {
                    wsloop::run(
                        &mut ws,
                        &inbox,
                        creds.heartbeat,
                        Some(Keepalive::every(creds.ping_interval)),
                        &mut peer,
                    )
                });
                ctx.connection_changed();
                match end {
                    Ok(end) => log::warn!("C&C connection ended: {end:?}"),
                    Err(e) => log::warn!("C&C connection broke: {e}"),
                }
                if started.elapsed() >= STABLE {
                    backoff.reset();
                }
            }
            Err(ConnectError::Unauthorized) => {
                log::warn!("the server no longer knows this agent's token: registering again");
                ctx.set_credentials(None);
                continue;
            }
            Err(ConnectError::Other(msg)) => log::warn!("cannot connect WS 1: {msg}"),
        }
        let wait = backoff.next_wait();
        log::info!("reconnecting in {:.1} s", wait.as_secs_f64());
        thread::sleep(wait);
    }
}

enum RegisterError {
    Refused(String),
    Retry(String),
}

fn register(ctx: &Ctx) -> Result<Credentials, RegisterError> {
    let c = &ctx.config;
    let body = serde_json::to_string(&RegisterRequest {
        name: c.name.clone(),
        hostname: c.hostname.clone(),
        version: crate::VERSION.to_string(),
        plan_limit: c.plan_limit,
        labels: c.labels.clone(),
    })
    .expect("a registration always serializes");
    let url = c.server.http("/agents/register");
    let mut resp = ctx
        .http
        .post(&url)
        .header("Authorization", format!("Bearer {}", c.registration_token))
        .header("Content-Type", "application/json")
        .send(body)
        .map_err(|e| {
            let why = crate::tls::describe_with_identity(&e, c.identity.is_some());
            RegisterError::Retry(format!("{url}: {why}"))
        })?;
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    match status {
        200 => {
            let r: RegisterResponse = serde_json::from_str(&text).map_err(|e| {
                RegisterError::Retry(format!("unreadable registration answer: {e}"))
            })?;
            log::info!("registered as {}", r.agent_id);
            Ok(Credentials {
                agent_id: r.agent_id,
                token: r.agent_token,
                heartbeat: Duration::from_millis(r.heartbeat_interval_ms.clamp(100, 600_000)),
                ping_interval: Duration::from_millis(r.ping_interval_ms.clamp(100, 600_000)),
            })
        }
        408 | 429 | 500..=599 => Err(RegisterError::Retry(format!("{status}: {text}"))),
        _ => Err(RegisterError::Refused(format!(
            "the server refused the registration ({status}): {}",
            crate::protocol::error_message(&text)
        ))),
    }
}

pub(crate) enum ConnectError {
    Unauthorized,
    Other(String),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Unauthorized => write!(f, "the server refused the agent token"),
            ConnectError::Other(s) => write!(f, "{s}"),
        }
    }
}

fn connect(ctx: &Ctx, creds: &Credentials) -> Result<WebSocket<ClientStream>, ConnectError> {
    connect_ws(ctx, creds, "/agent/control", wsloop::control_config())
}

/// Opens a WebSocket to `path` on the server with the agent's token.
pub(crate) fn connect_ws(
    ctx: &Ctx,
    creds: &Credentials,
    path: &str,
    config: tungstenite::protocol::WebSocketConfig,
) -> Result<WebSocket<ClientStream>, ConnectError> {
    let server = &ctx.config.server;
    let other = |e: &dyn std::fmt::Display| ConnectError::Other(e.to_string());
    let stream = ClientStream::connect(server, ctx.config.tls.as_ref()).map_err(|e| other(&e))?;
    let uri = server
        .ws(path)
        .parse()
        .map_err(|e: tungstenite::http::uri::InvalidUri| other(&e))?;
    let request = ClientRequestBuilder::new(uri)
        .with_header("Authorization", format!("Bearer {}", creds.token));
    match tungstenite::client::client_with_config(request, stream, Some(config)) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp)))
            if resp.status() == 401 =>
        {
            Err(ConnectError::Unauthorized)
        }
        Err(e) => Err(other(&e)),
    }
}

/// Whether more logs wait for the server than the agent may keep.
fn spool_full(ctx: &Ctx) -> bool {
    ctx.outbox.spool_bytes(&ctx.config.work_dir) > ctx.config.max_spool_bytes
}

fn state_msg(ctx: &Ctx) -> String {
    let (mut state, running) = ctx.scheduler.snapshot();
    state.spool_full = spool_full(ctx);
    serde_json::to_string(&AgentMsg::State { state, running }).expect("state always serializes")
}

fn send_state(ctx: &Ctx, ws: &mut WebSocket<ClientStream>) -> Result<(), tungstenite::Error> {
    ws.send(Message::text(state_msg(ctx)))
}

struct ServerPeer {
    ctx: Arc<Ctx>,
}

fn event(msg: &AgentMsg) -> String {
    serde_json::to_string(msg).expect("an event always serializes")
}

impl ServerPeer {
    fn on_command(&mut self, cmd: ServerMsg, out: &mut Vec<String>) {
        let ctx = &self.ctx;
        match cmd {
            ServerMsg::RunTask { task_data } => {
                let task_id = task_data.task_id.clone();
                if !valid_task_id(&task_id) {
                    log::warn!("the server sent an invalid task id {task_id:?}");
                    return;
                }
                if spool_full(ctx) {
                    log::warn!(
                        "rejected {task_id}: the spool is over {} bytes",
                        ctx.config.max_spool_bytes
                    );
                    out.push(event(&AgentMsg::TaskRejected {
                        task_id,
                        reason: "spool full: logs wait for the server".into(),
                    }));
                    out.push(state_msg(ctx));
                    return;
                }
                match ctx.scheduler.try_start(&task_id, task_data.action) {
                    Ok(Admission::Start) => {
                        log::info!("accepted {task_id} ({})", task_data.action.as_str());
                        // The task's directory exists before the server hears "accepted":
                        // a crash from here on is found and reported by the next start.
                        let prepared = runner::prepare(&ctx.config.work_dir, &task_data);
                        out.push(event(&AgentMsg::TaskAccepted {
                            task_id: task_id.clone(),
                        }));
                        out.push(state_msg(ctx));
                        let cancel = Arc::new(runner::TaskHandle::new(task_data.action));
                        ctx.tasks().insert(task_id.clone(), cancel.clone());
                        let worker_ctx = ctx.clone();
                        let spawned = thread::Builder::new()
                            .name(format!("task {task_id}"))
                            .spawn(move || {
                                runner::run_task(&worker_ctx, task_data, prepared, &cancel)
                            });
                        if let Err(e) = spawned {
                            log::error!("cannot start a worker for {task_id}: {e}");
                            ctx.tasks().remove(&task_id);
                            ctx.scheduler.finish(&task_id);
                            out.push(event(&AgentMsg::TaskFinished {
                                task_id,
                                status: crate::protocol::FinalStatus::Failed,
                                exit_code: None,
                            }));
                            out.push(state_msg(ctx));
                        }
                    }
                    Ok(Admission::AlreadyRunning) => {
                        out.push(event(&AgentMsg::TaskAccepted { task_id }));
                    }
                    Err(reason) => {
                        log::info!("rejected {task_id}: {reason}");
                        out.push(event(&AgentMsg::TaskRejected {
                            task_id,
                            reason: reason.to_string(),
                        }));
                    }
                }
            }
            ServerMsg::CancelTask { task_id } => {
                let cancel = ctx.tasks().get(&task_id).cloned();
                match cancel {
                    Some(c) => {
                        log::info!("canceling {task_id}");
                        c.cancel(ctx.config.cancel_grace);
                    }
                    None => {
                        log::info!("cancel of {task_id}, which does not run here: nothing to do")
                    }
                }
            }
            ServerMsg::StartRealtimeStream { task_id } => streamer::start(ctx, &task_id),
            ServerMsg::StopRealtimeStream { task_id } => streamer::stop(ctx, &task_id),
            ServerMsg::Ack { seq } => ctx.ack(seq),
        }
    }
}

impl Peer for ServerPeer {
    fn on_text(&mut self, text: &str, out: &mut Vec<String>) -> Flow {
        match serde_json::from_str::<ServerMsg>(text) {
            Ok(cmd) => self.on_command(cmd, out),
            Err(e) => log::warn!("the server sent a command this agent cannot read: {e}"),
        }
        Flow::Continue
    }

    fn on_tick(&mut self, out: &mut Vec<String>) -> Flow {
        out.push(state_msg(&self.ctx));
        Flow::Continue
    }

    fn on_nudge(&mut self, out: &mut Vec<String>) -> Flow {
        out.push(state_msg(&self.ctx));
        Flow::Continue
    }
}
