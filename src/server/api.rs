//! The HTTP API: the route table, authentication, and one handler per endpoint of
//! PROTOCOL.md. A connection thread runs [`serve_connection`]: it reads requests on a
//! keep-alive connection until the client leaves or a WebSocket takes the socket over.
//!
//! Every failure a client can cause is a 4xx with `{"error": "..."}`; a store failure
//! is a 500 with a generic message (the detail goes to the server log).

use std::io::{self, Read};
use std::sync::Arc;

use super::http::{Conn, Head, HeadError, Response};
use super::lifecycle::{Change, Refusal};
use super::store::{AgentRow, StoreError};
use super::{auth, client_hub, control, stream, Shared};
use crate::protocol::{
    valid_task_id, AgentList, CreateTask, Phase, RegisterRequest, RegisterResponse, ServerMsg,
    TaskList, TaskStatus,
};
use crate::tls::ServerStream;
use crate::util::now_rfc3339;
use crate::wsloop::Outgoing;

/// Every route: method and path pattern (`{name}` matches one segment). The OpenAPI
/// document is checked against this table in the tests.
pub(crate) const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/healthz"),
    ("GET", "/api/openapi.json"),
    ("POST", "/agents/register"),
    ("GET", "/agent/control"),
    ("GET", "/agent/stream/{task_id}"),
    ("POST", "/api/tasks"),
    ("GET", "/api/tasks"),
    ("GET", "/api/tasks/{task_id}"),
    ("POST", "/api/tasks/{task_id}/cancel"),
    ("GET", "/api/tasks/{task_id}/logs/live"),
    ("GET", "/api/tasks/{task_id}/logs/{phase}"),
    ("POST", "/api/tasks/{task_id}/logs/upload"),
    ("GET", "/api/agents"),
    ("DELETE", "/api/agents/{agent_id}"),
    ("POST", "/api/registration-token/rotate"),
];

/// The outcome of routing a path.
#[derive(Debug, PartialEq)]
pub(crate) enum Routed<'a> {
    /// Index into [`ROUTES`] and the captured segments, in order.
    Found(usize, Vec<&'a str>),
    /// The path exists, with these methods.
    WrongMethod(Vec<&'static str>),
    NotFound,
}

pub(crate) fn route<'a>(method: &str, path: &'a str) -> Routed<'a> {
    let segs: Vec<&str> = path.split('/').skip(1).collect();
    // Every route whose pattern fits the path, with how many literal segments it has:
    // only the most specific ones count (`/logs/upload` is not a `/logs/{phase}`).
    let mut fits: Vec<(usize, usize, Vec<&'a str>)> = Vec::new();
    for (i, (_, pattern)) in ROUTES.iter().enumerate() {
        let pat: Vec<&str> = pattern.split('/').skip(1).collect();
        if pat.len() != segs.len() {
            continue;
        }
        let mut caps = Vec::new();
        let mut literals = 0;
        let matched = pat.iter().zip(&segs).all(|(p, s)| {
            if p.starts_with('{') {
                caps.push(*s);
                !s.is_empty()
            } else {
                literals += 1;
                p == s
            }
        });
        if matched {
            fits.push((i, literals, caps));
        }
    }
    let best = fits.iter().map(|f| f.1).max().unwrap_or(0);
    fits.retain(|f| f.1 == best);
    if let Some(pos) = fits.iter().position(|(i, _, _)| ROUTES[*i].0 == method) {
        let (i, _, caps) = fits.swap_remove(pos);
        return Routed::Found(i, caps);
    }
    if fits.is_empty() {
        return Routed::NotFound;
    }
    let mut allowed: Vec<&'static str> = fits.iter().map(|(i, _, _)| ROUTES[*i].0).collect();
    allowed.sort_unstable();
    allowed.dedup();
    Routed::WrongMethod(allowed)
}

/// What a handler produced.
enum Reply {
    Answer(Response),
    /// A file streamed as the body.
    File(std::fs::File, u64, &'static str),
    /// Switch to a WebSocket: the `Sec-WebSocket-Accept` value and what it is for.
    Upgrade(String, Upgrade),
}

/// The three WebSockets of the contract.
enum Upgrade {
    /// WS 1 of this agent.
    Control(AgentRow),
    /// WS 3: this agent's live stream of a task.
    Stream(String),
    /// WS 2: a viewer of a task's live log.
    Viewer(String),
}

type Handled = Result<Reply, Response>;

fn internal(e: StoreError) -> Response {
    log::error!("store: {e}");
    Response::error(
        500,
        "the server could not read or write its store; see the server log",
    )
}

/// One request in flight: its head, its connection (for the body) and whether the
/// body was consumed (if not, the connection cannot be reused).
struct Req<'a> {
    head: &'a Head,
    conn: &'a mut Conn<ServerStream>,
    body_len: u64,
    body_read: bool,
}

impl Req<'_> {
    fn json_body<T: serde::de::DeserializeOwned>(&mut self, limit: u64) -> Result<T, Response> {
        if self.body_len > limit {
            return Err(Response::error(
                413,
                format!("the body is {} bytes; the limit is {limit}", self.body_len),
            ));
        }
        let bytes = self
            .conn
            .read_body(self.body_len)
            .map_err(|e| Response::error(400, format!("could not read the body: {e}")))?;
        self.body_read = true;
        serde_json::from_slice(&bytes)
            .map_err(|e| Response::error(400, format!("invalid JSON body: {e}")))
    }
}

/// Serves one client connection until it closes or becomes a WebSocket.
pub(crate) fn serve_connection(shared: Arc<Shared>, stream: ServerStream) {
    let mut conn = Conn::new(stream, shared.config.limits);
    loop {
        let head = match conn.read_head() {
            Ok(h) => h,
            Err(HeadError::Idle) | Err(HeadError::Io(_)) => return,
            Err(e) => {
                let status = match e {
                    HeadError::TooLarge => 431,
                    HeadError::TimedOut => 408,
                    _ => 400,
                };
                if conn
                    .write_response(&Response::error(status, e.to_string()), false)
                    .is_ok()
                {
                    conn.close_gracefully();
                }
                return;
            }
        };
        let body_len = match head.content_length() {
            Ok(n) => n,
            Err(resp) => {
                if conn.write_response(&resp, false).is_ok() {
                    conn.close_gracefully();
                }
                return;
            }
        };
        let mut req = Req {
            head: &head,
            conn: &mut conn,
            body_len,
            body_read: body_len == 0,
        };
        let reply = handle(&shared, &mut req).unwrap_or_else(Reply::Answer);
        let req_body_read = req.body_read;
        let reusable = req_body_read && head.keep_alive();
        let written = match reply {
            Reply::Answer(resp) => conn.write_response(&resp, reusable),
            Reply::File(mut f, len, ctype) => conn.write_stream(200, ctype, &mut f, len, reusable),
            Reply::Upgrade(accept_key, upgrade) => {
                let (mut stream, leftover) = conn.into_parts();
                if switch_protocols(&mut stream, &accept_key).is_err() {
                    return;
                }
                match upgrade {
                    Upgrade::Control(agent) => control::serve(shared, agent, stream, leftover),
                    Upgrade::Stream(task) => stream::serve(shared, task, stream, leftover),
                    Upgrade::Viewer(task) => client_hub::serve(shared, task, stream, leftover),
                }
                return;
            }
        };
        match written {
            Ok(()) if reusable => {}
            // An answer before the body was read (413, 401, ...): let the client read it.
            Ok(()) if !req_body_read => return conn.close_gracefully(),
            _ => return,
        }
    }
}

fn switch_protocols(stream: &mut ServerStream, accept_key: &str) -> io::Result<()> {
    use std::io::Write;
    write!(
        stream,
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept_key}\r\n\r\n"
    )?;
    stream.flush()
}

fn handle(shared: &Shared, req: &mut Req<'_>) -> Handled {
    let head = req.head;
    let (index, caps) = match route(&head.method, &head.path) {
        Routed::Found(i, caps) => (i, caps),
        Routed::WrongMethod(allowed) => {
            return Err(Response::error(
                405,
                format!("{} is not allowed on {}", head.method, head.path),
            )
            .with_header("Allow", allowed.join(", ")))
        }
        Routed::NotFound => {
            return Err(Response::error(
                404,
                format!("no such endpoint: {}", head.path),
            ))
        }
    };
    if shared.config.agents_need_client_cert {
        client_cert_check(ROUTES[index].1, req.conn.stream.client_certified())?;
    }
    let task = || -> Result<&str, Response> {
        let id = caps[0];
        if valid_task_id(id) {
            Ok(id)
        } else {
            Err(Response::error(404, format!("no task {id:?}")))
        }
    };
    match ROUTES[index] {
        ("GET", "/") => Ok(Reply::Answer(
            Response::text(200, "text/html; charset=utf-8", include_str!("ui.html"))
                // The page loads nothing from anywhere else, and may not.
                .with_header(
                    "Content-Security-Policy",
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                     connect-src 'self' ws: wss:; img-src 'self' data:; base-uri 'none'; form-action 'self'",
                )
                .with_header("X-Content-Type-Options", "nosniff")
                .with_header("Referrer-Policy", "no-referrer"),
        )),
        ("GET", "/healthz") => Ok(Reply::Answer(Response::text(200, "text/plain", "ok"))),
        ("GET", "/api/openapi.json") => Ok(Reply::Answer(Response::text(
            200,
            "application/json",
            include_str!("openapi.json"),
        ))),
        ("POST", "/agents/register") => register(shared, req),
        ("GET", "/agent/control") => control_upgrade(shared, head),
        ("GET", "/agent/stream/{task_id}") => stream_upgrade(shared, head, task()?),
        ("GET", "/api/tasks/{task_id}/logs/live") => viewer_upgrade(shared, head, task()?),
        ("POST", "/api/tasks") => create_task(shared, req),
        ("GET", "/api/tasks") => list_tasks(shared, head),
        ("GET", "/api/tasks/{task_id}") => get_task(shared, head, task()?),
        ("POST", "/api/tasks/{task_id}/cancel") => cancel_task(shared, head, task()?),
        ("GET", "/api/tasks/{task_id}/logs/{phase}") => get_log(shared, head, task()?, caps[1]),
        ("POST", "/api/tasks/{task_id}/logs/upload") => upload_log(shared, req, task()?),
        ("GET", "/api/agents") => list_agents(shared, head),
        ("DELETE", "/api/agents/{agent_id}") => revoke_agent(shared, head, caps[0]),
        ("POST", "/api/registration-token/rotate") => rotate_registration(shared, head),
        (m, p) => Err(Response::error(
            500,
            format!("route {m} {p} has no handler"),
        )),
    }
}

/// Whether the route is one only agents use.
pub(crate) fn agent_endpoint(pattern: &str) -> bool {
    matches!(
        pattern,
        "/agents/register"
            | "/agent/control"
            | "/agent/stream/{task_id}"
            | "/api/tasks/{task_id}/logs/upload"
    )
}

/// With `--client-ca`, an agent endpoint needs a verified client certificate (mutual
/// TLS); the others stay open to browsers and API clients, which hold no certificate.
fn client_cert_check(pattern: &str, certified: bool) -> Result<(), Response> {
    if agent_endpoint(pattern) && !certified {
        return Err(Response::error(
            403,
            "this server requires agents to present a client certificate signed by its \
             --client-ca (mutual TLS): start the agent with --client-cert and --client-key",
        ));
    }
    Ok(())
}

fn client_auth(shared: &Shared, head: &Head) -> Result<(), Response> {
    match head.bearer() {
        Some(t) if auth::matches_any(t, &shared.api_token_hashes) => Ok(()),
        Some(_) => Err(Response::error(401, "the API token is not valid")),
        None => Err(Response::error(
            401,
            "missing API token: send Authorization: Bearer <api token>",
        )),
    }
}

fn agent_auth(shared: &Shared, head: &Head) -> Result<AgentRow, Response> {
    let Some(token) = head.bearer() else {
        return Err(Response::error(
            401,
            "missing agent token: send Authorization: Bearer <agent token>",
        ));
    };
    shared
        .store
        .agent_by_token(&auth::hash(token))
        .map_err(internal)?
        .ok_or_else(|| Response::error(401, "the agent token is not valid (re-register the agent)"))
}

fn register(shared: &Shared, req: &mut Req<'_>) -> Handled {
    match req.head.bearer() {
        Some(t) if auth::matches(t, &shared.registration_hash()) => {}
        _ => return Err(Response::error(
            401,
            "missing or wrong registration token: send Authorization: Bearer <registration token>",
        )),
    }
    let body: RegisterRequest = req.json_body(shared.config.max_request_bytes)?;
    if body.name.is_empty() || body.name.len() > 64 || !valid_task_id(&body.name) {
        return Err(Response::error(
            400,
            "name must be 1-64 characters of letters, digits, '.', '_' or '-'",
        ));
    }
    if !(1..=1024).contains(&body.plan_limit) {
        return Err(Response::error(
            400,
            "plan_limit must be between 1 and 1024",
        ));
    }
    if body.labels.len() > 64
        || body
            .labels
            .iter()
            .any(|(k, v)| !crate::protocol::label_ok(k, v))
    {
        return Err(Response::error(
            400,
            "at most 64 labels, keys 1-63 characters, values at most 255",
        ));
    }
    let token = auth::new_token().map_err(|e| internal(e.into()))?;
    let agent_id = match shared
        .store
        .register_agent(&body, &auth::hash(&token), &now_rfc3339())
    {
        Ok(id) => id,
        Err(StoreError::Revoked(msg)) => return Err(Response::error(403, msg)),
        Err(e) => return Err(internal(e)),
    };
    log::info!("agent {} registered as {agent_id}", body.name);
    Ok(Reply::Answer(Response::json(
        200,
        &RegisterResponse {
            agent_id,
            agent_token: token,
            heartbeat_interval_ms: shared.config.heartbeat_interval.as_millis() as u64,
            ping_interval_ms: shared.config.ping_interval.as_millis() as u64,
        },
    )))
}

/// Checks a WebSocket upgrade request; returns the `Sec-WebSocket-Accept` value.
fn websocket_accept(head: &Head) -> Result<String, Response> {
    if !head.is_websocket_upgrade() || !head.header_has_token("connection", "upgrade") {
        return Err(
            Response::error(426, "this endpoint is a WebSocket: send Upgrade: websocket")
                .with_header("Upgrade", "websocket"),
        );
    }
    if head.header("sec-websocket-version").map(str::trim) != Some("13") {
        return Err(Response::error(400, "Sec-WebSocket-Version must be 13")
            .with_header("Sec-WebSocket-Version", "13"));
    }
    let Some(key) = head.header("sec-websocket-key") else {
        return Err(Response::error(400, "missing Sec-WebSocket-Key"));
    };
    Ok(tungstenite::handshake::derive_accept_key(
        key.trim().as_bytes(),
    ))
}

fn control_upgrade(shared: &Shared, head: &Head) -> Handled {
    let agent = agent_auth(shared, head)?;
    let accept = websocket_accept(head)?;
    Ok(Reply::Upgrade(accept, Upgrade::Control(agent)))
}

fn stream_upgrade(shared: &Shared, head: &Head, id: &str) -> Handled {
    let agent = agent_auth(shared, head)?;
    let rec = shared
        .store
        .task(id)
        .map_err(internal)?
        .ok_or_else(|| no_task(id))?;
    if rec.agent_id.as_deref() != Some(agent.agent_id.as_str()) {
        return Err(Response::error(
            403,
            format!("task {id} is not assigned to agent {}", agent.agent_id),
        ));
    }
    let accept = websocket_accept(head)?;
    Ok(Reply::Upgrade(accept, Upgrade::Stream(id.to_string())))
}

fn viewer_upgrade(shared: &Shared, head: &Head, id: &str) -> Handled {
    // Browsers cannot set headers on a WebSocket: the token may come as a parameter.
    match (head.bearer(), head.query_param("access_token")) {
        (Some(_), _) => client_auth(shared, head)?,
        (None, Some(t)) if auth::matches_any(&t, &shared.api_token_hashes) => {}
        (None, Some(_)) => return Err(Response::error(401, "the API token is not valid")),
        (None, None) => {
            return Err(Response::error(
                401,
                "missing API token: send Authorization: Bearer <api token> or ?access_token=",
            ))
        }
    }
    shared
        .store
        .task(id)
        .map_err(internal)?
        .ok_or_else(|| no_task(id))?;
    let accept = websocket_accept(head)?;
    Ok(Reply::Upgrade(accept, Upgrade::Viewer(id.to_string())))
}

fn create_task(shared: &Shared, req: &mut Req<'_>) -> Handled {
    client_auth(shared, req.head)?;
    let body: CreateTask = req.json_body(shared.config.max_request_bytes)?;
    let mut task = body.normalize().map_err(|e| Response::error(400, e))?;
    task.timeout_s = task
        .timeout_s
        .or(Some(shared.config.task_timeout.as_secs()));
    let rec = shared
        .store
        .create_task(&task, &now_rfc3339())
        .map_err(internal)?;
    log::info!("task {} queued ({})", rec.task_id, rec.action.as_str());
    shared.kick();
    Ok(Reply::Answer(Response::json(201, &rec)))
}

fn list_tasks(shared: &Shared, head: &Head) -> Handled {
    client_auth(shared, head)?;
    let status = match head.query_param("status") {
        None => None,
        Some(s) => Some(TaskStatus::parse(&s).ok_or_else(|| {
            Response::error(
                400,
                format!("unknown status {s:?}: use queued, running, succeeded, failed, canceled or lost"),
            )
        })?),
    };
    let limit = match head.query_param("limit") {
        None => 100,
        Some(s) => s
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| Response::error(400, "limit must be a number from 1 to 1000"))?,
    };
    let tasks = shared.store.tasks(status, limit).map_err(internal)?;
    Ok(Reply::Answer(Response::json(200, &TaskList { tasks })))
}

fn no_task(id: &str) -> Response {
    Response::error(404, format!("no task {id}"))
}

fn get_task(shared: &Shared, head: &Head, id: &str) -> Handled {
    client_auth(shared, head)?;
    let rec = shared
        .store
        .task(id)
        .map_err(internal)?
        .ok_or_else(|| no_task(id))?;
    Ok(Reply::Answer(Response::json(200, &rec)))
}

fn parse_phase(s: &str) -> Result<Phase, Response> {
    Phase::parse(s)
        .ok_or_else(|| Response::error(400, format!("unknown phase {s:?}: use plan or apply")))
}

fn get_log(shared: &Shared, head: &Head, id: &str, phase: &str) -> Handled {
    client_auth(shared, head)?;
    let phase = parse_phase(phase)?;
    let rec = shared
        .store
        .task(id)
        .map_err(internal)?
        .ok_or_else(|| no_task(id))?;
    if !rec.phases.contains_key(phase.as_str()) {
        return Err(Response::error(
            404,
            format!(
                "task {id} is a {} task: it has no {} phase",
                rec.action.as_str(),
                phase.as_str()
            ),
        ));
    }
    match shared.store.open_log(id, phase).map_err(internal)? {
        Some((f, len)) => Ok(Reply::File(f, len, "text/plain; charset=utf-8")),
        None => Err(Response::error(
            404,
            format!(
                "the {} log of {id} has not been uploaded yet",
                phase.as_str()
            ),
        )),
    }
}

fn cancel_task(shared: &Shared, head: &Head, id: &str) -> Handled {
    client_auth(shared, head)?;
    let (outcome, rec) = shared
        .store
        .update_task(id, |r| r.cancel(&now_rfc3339()))
        .map_err(internal)?
        .ok_or_else(|| no_task(id))?;
    match outcome {
        Ok(Change::Changed) => {
            log::info!("task {id} canceled while queued");
            Ok(Reply::Answer(Response::json(200, &rec)))
        }
        Ok(Change::Unchanged) => {
            // Running: the agent stops it and reports `canceled`.
            let agent = rec.agent_id.clone().unwrap_or_default();
            let sent = shared.registry().mailbox(&agent).is_some_and(|m| {
                let msg = ServerMsg::CancelTask {
                    task_id: id.to_string(),
                };
                m.send(Outgoing::Text(
                    serde_json::to_string(&msg).unwrap_or_default(),
                ))
            });
            if !sent {
                return Err(Response::error(
                    409,
                    format!("task {id} runs on agent {agent}, which is offline: it cannot be canceled now"),
                ));
            }
            log::info!("cancel of running task {id} sent to {agent}");
            Ok(Reply::Answer(Response::json(202, &rec)))
        }
        Err(Refusal::Conflict(msg)) => Err(Response::error(409, msg)),
        Err(_) => Err(Response::error(
            409,
            format!("task {id} cannot be canceled now"),
        )),
    }
}

fn upload_log(shared: &Shared, req: &mut Req<'_>, id: &str) -> Handled {
    let agent = agent_auth(shared, req.head)?;
    let phase = match req.head.query_param("phase") {
        Some(p) => parse_phase(&p)?,
        None => return Err(Response::error(400, "missing ?phase=plan or ?phase=apply")),
    };
    let rec = shared
        .store
        .task(id)
        .map_err(internal)?
        .ok_or_else(|| no_task(id))?;
    match rec.may_upload(&agent.agent_id, phase) {
        Ok(()) => {}
        Err(Refusal::Conflict(msg)) => return Err(Response::error(409, msg)),
        Err(_) => {
            return Err(Response::error(
                403,
                format!("task {id} is not assigned to agent {}", agent.agent_id),
            ))
        }
    }
    let limit = shared.config.max_log_bytes;
    if req.body_len > limit {
        return Err(Response::error(
            413,
            format!("the log is {} bytes; the limit is {limit}", req.body_len),
        ));
    }
    let len = req.body_len;
    if let Some(announced) = req.head.header(crate::protocol::LENGTH_HEADER) {
        if announced.trim().parse::<u64>().ok() != Some(len) {
            return Err(Response::error(
                422,
                format!(
                    "the log is {announced} bytes by {}, but the body is {len}",
                    crate::protocol::LENGTH_HEADER
                ),
            ));
        }
    }
    let sha256 = req
        .head
        .header(crate::protocol::SHA256_HEADER)
        .map(str::to_string);
    let mut body = req
        .conn
        .body(len)
        .map_err(|e| Response::error(400, format!("could not read the body: {e}")))?;
    let saved = shared.store.save_log(
        id,
        phase,
        &mut body as &mut dyn Read,
        len,
        sha256.as_deref(),
    );
    req.body_read = true;
    match saved {
        Ok(n) => {
            log::info!("{} log of {id} archived ({n} bytes)", phase.as_str());
            Ok(Reply::Answer(Response::json(
                200,
                &serde_json::json!({"task_id": id, "phase": phase.as_str(), "bytes": n}),
            )))
        }
        // A body that broke off is the client's problem; nothing was recorded.
        Err(StoreError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof || is_timeout(&e) => {
            req.body_read = false;
            Err(Response::error(400, format!("the upload broke off: {e}")))
        }
        Err(StoreError::Mismatch(msg)) => Err(Response::error(422, msg)),
        Err(e) => {
            req.body_read = false;
            Err(internal(e))
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn revoke_agent(shared: &Shared, head: &Head, agent_id: &str) -> Handled {
    client_auth(shared, head)?;
    let now = now_rfc3339();
    if !shared
        .store
        .revoke_agent(agent_id, &now)
        .map_err(internal)?
    {
        return Err(Response::error(404, format!("no agent {agent_id:?}")));
    }
    // Its running tasks end here (the agent is told to stop them while it can hear).
    let mailbox = shared.registry().mailbox(agent_id);
    let mut canceled = Vec::new();
    for t in shared
        .store
        .tasks(Some(TaskStatus::Running), 10_000)
        .map_err(internal)?
    {
        if t.agent_id.as_deref() != Some(agent_id) {
            continue;
        }
        if let Some(m) = &mailbox {
            let msg = ServerMsg::CancelTask {
                task_id: t.task_id.clone(),
            };
            m.send_text(serde_json::to_string(&msg).unwrap_or_default());
        }
        shared
            .store
            .update_task(&t.task_id, |r| r.cancel_by_server(&now))
            .map_err(internal)?;
        shared.hub().nudge(&t.task_id);
        canceled.push(t.task_id);
    }
    if let Some(m) = mailbox {
        m.send(Outgoing::Close(4003, "agent token revoked".into()));
    }
    log::warn!("agent {agent_id} revoked; its running tasks {canceled:?} canceled");
    Ok(Reply::Answer(Response::json(
        200,
        &serde_json::json!({"agent_id": agent_id, "revoked": true, "canceled_tasks": canceled}),
    )))
}

fn rotate_registration(shared: &Shared, head: &Head) -> Handled {
    client_auth(shared, head)?;
    let mut reg = shared
        .registration
        .write()
        .unwrap_or_else(|p| p.into_inner());
    if reg.from_flag {
        return Err(Response::error(
            409,
            "the registration token is set by --registration-token (or IAC_REGISTRATION_TOKEN): change it there",
        ));
    }
    let token = auth::new_token().map_err(|e| internal(e.into()))?;
    auth::save(&token, &shared.config.data_dir.join("registration-token"))
        .map_err(|e| internal(e.into()))?;
    reg.hash = auth::hash(&token);
    log::warn!("registration token rotated; registered agents keep their own tokens");
    Ok(Reply::Answer(Response::json(
        200,
        &serde_json::json!({"registration_token": token}),
    )))
}

fn list_agents(shared: &Shared, head: &Head) -> Handled {
    client_auth(shared, head)?;
    let rows = shared.store.agents().map_err(internal)?;
    let registry = shared.registry();
    let agents = rows
        .iter()
        .map(|row| {
            let mut v = row.offline_view();
            registry.fill_view(&mut v);
            v
        })
        .collect();
    Ok(Reply::Answer(Response::json(200, &AgentList { agents })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_a_client_ca_only_agent_endpoints_need_a_client_certificate() {
        let agent_routes: Vec<&str> = ROUTES
            .iter()
            .map(|r| r.1)
            .filter(|p| agent_endpoint(p))
            .collect();
        assert_eq!(
            agent_routes,
            [
                "/agents/register",
                "/agent/control",
                "/agent/stream/{task_id}",
                "/api/tasks/{task_id}/logs/upload"
            ]
        );
        for (_, pattern) in ROUTES {
            assert!(client_cert_check(pattern, true).is_ok());
            let without = client_cert_check(pattern, false);
            if agent_endpoint(pattern) {
                let resp = without.unwrap_err();
                assert_eq!(resp.status, 403);
                assert!(String::from_utf8_lossy(&resp.body).contains("--client-cert"));
            } else {
                assert!(without.is_ok(), "{pattern}: browsers hold no certificate");
            }
        }
    }

    #[test]
    fn routes_and_methods() {
        let at = |m: &str, p: &str| ROUTES.iter().position(|r| *r == (m, p)).unwrap();
        assert_eq!(
            route("GET", "/healthz"),
            Routed::Found(at("GET", "/healthz"), vec![])
        );
        let logs = at("GET", "/api/tasks/{task_id}/logs/{phase}");
        assert_eq!(
            route("GET", "/api/tasks/T-1/logs/plan"),
            Routed::Found(logs, vec!["T-1", "plan"])
        );
        assert_eq!(
            route("POST", "/api/tasks/T-1/logs/upload"),
            Routed::Found(at("POST", "/api/tasks/{task_id}/logs/upload"), vec!["T-1"])
        );
        // The literal route comes first in the table: `live` is not a phase.
        assert_eq!(
            route("GET", "/api/tasks/T-1/logs/live"),
            Routed::Found(at("GET", "/api/tasks/{task_id}/logs/live"), vec!["T-1"])
        );
        assert_eq!(
            route("DELETE", "/api/tasks"),
            Routed::WrongMethod(vec!["GET", "POST"])
        );
        assert_eq!(route("GET", "/api/tasks/T-1/logs"), Routed::NotFound);
        assert_eq!(route("GET", "/api/tasks//cancel"), Routed::NotFound);
        assert_eq!(route("GET", "/nope"), Routed::NotFound);
        // The upload path only answers POST: it is not a phase called "upload".
        assert_eq!(
            route("GET", "/api/tasks/T-1/logs/upload"),
            Routed::WrongMethod(vec!["POST"])
        );
        assert_eq!(
            route("POST", "/api/tasks/T-1/logs/plan"),
            Routed::WrongMethod(vec!["GET"])
        );
    }

    #[test]
    fn every_route_is_in_the_openapi_document() {
        let doc: serde_json::Value = serde_json::from_str(include_str!("openapi.json")).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for (method, path) in ROUTES {
            let op = &paths
                .get(*path)
                .unwrap_or_else(|| panic!("{path} is not in openapi.json"))[method.to_lowercase()];
            assert!(op.is_object(), "{method} {path} is not in openapi.json");
        }
        let documented: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
        assert_eq!(
            documented,
            ROUTES.len(),
            "openapi.json documents routes the server lacks"
        );
    }
}
