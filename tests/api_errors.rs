//! Bad requests get a 4xx with a JSON error a person can act on; none gets a 5xx or
//! takes the server down.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

/// Sends raw bytes on a new connection; returns the status code and the body.
fn raw_exchange(port: u16, bytes: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(bytes).unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn assert_json_error(status: u16, body: &str, want: u16, what: &str) {
    assert_eq!(status, want, "{what}: {body}");
    let v: Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {body}"));
    let msg = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no error field: {body}"));
    assert!(!msg.is_empty(), "{what}");
}

/// Method, path, token, body, expected status.
type Case = (
    &'static str,
    String,
    Option<&'static str>,
    Option<String>,
    u16,
);

#[test]
fn bad_requests_get_json_errors_and_the_server_keeps_serving() {
    let dir = TempDir::new("errors");
    let server = Server::start(
        &dir.path().join("data"),
        0,
        &["--max-request-bytes", "4096"],
    );
    let c = server.client();
    let known = c.create_task(&json!({"action": "plan", "tf_json": {}, "labels": {"nobody": "x"}}));
    let big = format!(
        r#"{{"action": "plan", "tf_json": {{"x": "{}"}}}}"#,
        "a".repeat(5000)
    );
    let cases: Vec<Case> = vec![
        // (method, path, token, body, expected status)
        (
            "POST",
            "/api/tasks".into(),
            Some(API_TOKEN),
            Some("{not json".into()),
            400,
        ),
        (
            "POST",
            "/api/tasks".into(),
            Some(API_TOKEN),
            Some(r#"{"action": 1, "tf_json": {}}"#.into()),
            400,
        ),
        (
            "POST",
            "/api/tasks".into(),
            Some(API_TOKEN),
            Some(r#"{"action": "destroy", "tf_json": {}}"#.into()),
            400,
        ),
        (
            "POST",
            "/api/tasks".into(),
            Some(API_TOKEN),
            Some(r#"{"action": "plan"}"#.into()),
            400,
        ),
        (
            "POST",
            "/api/tasks".into(),
            Some(API_TOKEN),
            Some(r#"{"action": "plan", "tf_json": [1]}"#.into()),
            400,
        ),
        (
            "POST",
            "/api/tasks".into(),
            Some(API_TOKEN),
            Some(r#"{"action": "plan", "tf_json": "{oops"}"#.into()),
            400,
        ),
        (
            "POST",
            "/api/tasks".into(),
            Some(API_TOKEN),
            Some(r#"{"action": "plan", "tf_json": {}, "labels": {"a": 1}}"#.into()),
            400,
        ),
        ("POST", "/api/tasks".into(), Some(API_TOKEN), Some(big), 413),
        (
            "POST",
            "/api/tasks".into(),
            None,
            Some(r#"{"action": "plan", "tf_json": {}}"#.into()),
            401,
        ),
        (
            "POST",
            "/api/tasks".into(),
            Some("wrong"),
            Some(r#"{"action": "plan", "tf_json": {}}"#.into()),
            401,
        ),
        ("GET", "/api/tasks".into(), None, None, 401),
        (
            "GET",
            "/api/tasks?status=done".into(),
            Some(API_TOKEN),
            None,
            400,
        ),
        (
            "GET",
            "/api/tasks?limit=0".into(),
            Some(API_TOKEN),
            None,
            400,
        ),
        (
            "GET",
            "/api/tasks/T-999999".into(),
            Some(API_TOKEN),
            None,
            404,
        ),
        (
            "GET",
            "/api/tasks/..%2F..%2Fetc".into(),
            Some(API_TOKEN),
            None,
            404,
        ),
        (
            "GET",
            format!("/api/tasks/{known}/logs/plan"),
            Some(API_TOKEN),
            None,
            404,
        ),
        (
            "GET",
            format!("/api/tasks/{known}/logs/nope"),
            Some(API_TOKEN),
            None,
            400,
        ),
        (
            "GET",
            "/api/tasks/T-999999/logs/plan".into(),
            Some(API_TOKEN),
            None,
            404,
        ),
        (
            "POST",
            "/api/tasks/T-999999/cancel".into(),
            Some(API_TOKEN),
            None,
            404,
        ),
        ("GET", "/api/agents".into(), Some("wrong"), None, 401),
        ("DELETE", "/api/tasks".into(), Some(API_TOKEN), None, 405),
        ("GET", "/api/nothing".into(), Some(API_TOKEN), None, 404),
        (
            "POST",
            "/agents/register".into(),
            None,
            Some(r#"{"name": "a", "plan_limit": 1}"#.into()),
            401,
        ),
        (
            "POST",
            "/agents/register".into(),
            Some(API_TOKEN),
            Some(r#"{"name": "a", "plan_limit": 1}"#.into()),
            401,
        ),
        (
            "POST",
            "/agents/register".into(),
            Some(REG_TOKEN),
            Some(r#"{"name": "a/b", "plan_limit": 1}"#.into()),
            400,
        ),
        (
            "POST",
            "/agents/register".into(),
            Some(REG_TOKEN),
            Some(r#"{"name": "a", "plan_limit": 0}"#.into()),
            400,
        ),
        (
            "POST",
            "/agents/register".into(),
            Some(REG_TOKEN),
            Some(r#"{"name": "a", "plan_limit": "x"}"#.into()),
            400,
        ),
        // Agent endpoints do not take the API token.
        (
            "POST",
            format!("/api/tasks/{known}/logs/upload?phase=plan"),
            Some(API_TOKEN),
            Some("log".into()),
            401,
        ),
        ("GET", "/agent/control".into(), Some(API_TOKEN), None, 401),
    ];
    for (method, path, token, body, want) in cases {
        let (status, text) = c.raw(method, &path, token, body.as_deref());
        assert_json_error(status, &text, want, &format!("{method} {path}"));
    }

    // An agent may upload only for its own tasks, and only real phases.
    let (status, reg) = c.raw(
        "POST",
        "/agents/register",
        Some(REG_TOKEN),
        Some(r#"{"name": "stranger", "plan_limit": 1}"#),
    );
    assert_eq!(status, 200, "{reg}");
    let reg: Value = serde_json::from_str(&reg).unwrap();
    let agent_token = reg["agent_token"].as_str().unwrap();
    let (s, b) = c.raw(
        "POST",
        &format!("/api/tasks/{known}/logs/upload?phase=plan"),
        Some(agent_token),
        Some("log"),
    );
    assert_json_error(s, &b, 403, "upload for another agent's task");
    let (s, b) = c.raw(
        "POST",
        &format!("/api/tasks/{known}/logs/upload"),
        Some(agent_token),
        Some("log"),
    );
    assert_json_error(s, &b, 400, "upload without a phase");
    let (s, b) = c.raw(
        "POST",
        "/api/tasks/T-999999/logs/upload?phase=plan",
        Some(agent_token),
        Some("log"),
    );
    assert_json_error(s, &b, 404, "upload for an unknown task");
    // A plain GET on the WS 1 endpoint, with a good agent token, is told to upgrade.
    let (s, b) = c.raw("GET", "/agent/control", Some(agent_token), None);
    assert_json_error(s, &b, 426, "WS 1 without an upgrade");

    // Requests no HTTP library would send.
    let port = server.port;
    let (s, b) = raw_exchange(port, b"GARBAGE\x01\x02\r\n\r\n");
    assert_json_error(s, &b, 400, "garbage");
    let (s, b) = raw_exchange(
        port,
        b"POST /api/tasks HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}",
    );
    assert_json_error(s, &b, 400, "Content-Length and Transfer-Encoding");
    let (s, b) = raw_exchange(
        port,
        b"POST /api/tasks HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    );
    assert_json_error(s, &b, 411, "chunked");
    let huge = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(40_000));
    let (s, b) = raw_exchange(port, huge.as_bytes());
    assert_json_error(s, &b, 431, "oversized head");
    // A client that vanishes mid-body does not hurt the server.
    {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"POST /api/tasks HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{")
            .unwrap();
    }

    // Still serving, every thread alive.
    assert_eq!(
        c.raw("GET", "/healthz", None, None),
        (200, "ok".to_string())
    );
    let id = c.create_task(&json!({"action": "plan", "tf_json": {}, "labels": {"nobody": "x"}}));
    assert_eq!(c.task(&id)["status"], "queued");
    assert!(
        !server.proc.output().contains("panicked"),
        "{}",
        server.proc.output()
    );
}

#[test]
fn openapi_and_health_need_no_token() {
    let dir = TempDir::new("open");
    let server = Server::start(&dir.path().join("data"), 0, &[]);
    let c = server.client();
    let (status, doc) = c.raw("GET", "/api/openapi.json", None, None);
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/api/tasks"]["post"].is_object());
    let (status, page) = c.raw("GET", "/", None, None);
    assert_eq!(status, 200);
    assert!(page.contains("<html"), "{page}");
}

#[test]
fn connections_over_the_limit_get_503_and_service_resumes() {
    let dir = TempDir::new("conn-limit");
    let server = Server::start(&dir.path().join("data"), 0, &["--max-connections", "2"]);
    // Two clients that connect and say nothing hold the two places.
    let idle: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(("127.0.0.1", server.port)).unwrap())
        .collect();
    wait_for("the limit to be reached", Duration::from_secs(10), || {
        let (status, body) = raw_exchange(server.port, b"GET /healthz HTTP/1.1\r\n\r\n");
        (status == 503).then_some(body)
    });
    let (s, b) = raw_exchange(server.port, b"GET /healthz HTTP/1.1\r\n\r\n");
    assert_json_error(s, &b, 503, "over the limit");
    drop(idle);
    let c = server.client();
    wait_for("service to resume", Duration::from_secs(10), || {
        let (status, _) = c.raw("GET", "/healthz", None, None);
        (status == 200).then_some(())
    });
}

#[test]
fn a_damaged_or_repeated_upload_keeps_one_whole_log() {
    let dir = TempDir::new("upload-integrity");
    let server = Server::start(&dir.path().join("data"), 0, &[]);
    let c = server.client();
    // An agent (by hand) that owns a task.
    let (status, reg) = c.raw(
        "POST",
        "/agents/register",
        Some(REG_TOKEN),
        Some(r#"{"name": "uploader", "plan_limit": 1}"#),
    );
    assert_eq!(status, 200);
    let reg: Value = serde_json::from_str(&reg).unwrap();
    let token = reg["agent_token"].as_str().unwrap().to_string();
    let agent_id = reg["agent_id"].as_str().unwrap().to_string();
    let id = c.create_task(&json!({"action": "plan", "tf_json": {}}));
    let port = server.port;
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let uri = format!("ws://127.0.0.1:{port}/agent/control")
        .parse()
        .unwrap();
    let req = tungstenite::client::ClientRequestBuilder::new(uri)
        .with_header("Authorization", format!("Bearer {token}"));
    let (mut ws, _) = tungstenite::client::client(req, stream).unwrap();
    ws.send(tungstenite::Message::text(json!({"type": "state", "state": {"plan_running_count": 0, "plan_limit": 1, "apply_running": false}, "running": []}).to_string())).unwrap();
    let _run_task = ws.read().unwrap();
    ws.send(tungstenite::Message::text(
        json!({"type": "task_accepted", "task_id": id}).to_string(),
    ))
    .unwrap();
    wait_for("running", Duration::from_secs(10), || {
        (c.task(&id)["agent_id"] == agent_id.as_str()).then_some(())
    });
    let upload = |body: &str, sha: &str| {
        let req = format!(
            "POST /api/tasks/{id}/logs/upload?phase=plan HTTP/1.1\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\nX-IAC-Content-SHA256: {sha}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        raw_exchange(port, req.as_bytes())
    };
    let good = "line one\nline two\n";
    let sha = |s: &str| iac::util::sha256_hex(s.as_bytes());
    let (s, b) = upload("line one\nline tw0\n", &sha(good));
    assert_json_error(s, &b, 422, "damaged on the way");
    assert_eq!(
        c.log(&id, "plan").0,
        404,
        "nothing kept of a damaged upload"
    );
    assert_eq!(upload(good, &sha(good)).0, 200);
    assert_eq!(upload(good, &sha(good)).0, 200, "a repeated upload is fine");
    assert_eq!(c.log(&id, "plan"), (200, good.to_string()));
    assert_eq!(c.task(&id)["phases"]["plan"]["log_bytes"], good.len());
}

#[test]
fn a_slow_head_and_an_oversized_frame_are_cut_off_while_others_are_served() {
    let dir = TempDir::new("slow-head");
    let server = Server::start(
        &dir.path().join("data"),
        0,
        &["--head-timeout-ms", "1500", "--max-message-bytes", "4096"],
    );
    let c = server.client();
    // A client that sends its head a byte at a time, never finishing.
    let mut slow = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        .unwrap();
    let started = std::time::Instant::now();
    // Meanwhile, everybody else is served.
    for _ in 0..20 {
        assert_eq!(
            c.raw("GET", "/healthz", None, None),
            (200, "ok".to_string())
        );
    }
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = String::new();
    let _ = slow.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(started.elapsed() >= Duration::from_millis(1400));

    // An agent that sends a WebSocket message over the limit is cut off (1009).
    let (status, reg) = c.raw(
        "POST",
        "/agents/register",
        Some(REG_TOKEN),
        Some(r#"{"name": "big", "plan_limit": 1}"#),
    );
    assert_eq!(status, 200);
    let reg: Value = serde_json::from_str(&reg).unwrap();
    let token = reg["agent_token"].as_str().unwrap();
    let stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    let uri = format!("ws://127.0.0.1:{}/agent/control", server.port)
        .parse()
        .unwrap();
    let req = tungstenite::client::ClientRequestBuilder::new(uri)
        .with_header("Authorization", format!("Bearer {token}"));
    let (mut ws, _) = tungstenite::client::client(req, stream).unwrap();
    let _ = ws.send(tungstenite::Message::text("x".repeat(10_000)));
    let close = loop {
        match ws.read() {
            Ok(tungstenite::Message::Close(f)) => break f.map(|f| u16::from(f.code)),
            Ok(_) => {}
            Err(_) => break None,
        }
    };
    assert_eq!(close, Some(1009), "closed as too big");
    assert_eq!(
        c.raw("GET", "/healthz", None, None),
        (200, "ok".to_string())
    );
    assert!(
        c.agents().iter().all(|a| a["online"] == false),
        "the agent was dropped"
    );
}
