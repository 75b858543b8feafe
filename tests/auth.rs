//! Who may call what: every endpoint with no token, a wrong token, the other kind of
//! token and a revoked token; revocation, rotation, several API tokens.

mod support;

use std::net::TcpStream;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;
use tungstenite::client::ClientRequestBuilder;

fn register(c: &Client, name: &str) -> (String, String) {
    let (status, text) = c.raw(
        "POST",
        "/agents/register",
        Some(REG_TOKEN),
        Some(&json!({"name": name, "plan_limit": 1}).to_string()),
    );
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    (
        v["agent_id"].as_str().unwrap().into(),
        v["agent_token"].as_str().unwrap().into(),
    )
}

/// The status of a WebSocket handshake at `path` with `token` (101 when it opens).
fn ws_status(server: &Server, path: &str, token: Option<&str>) -> u16 {
    let stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    let uri = format!("ws://127.0.0.1:{}{path}", server.port)
        .parse()
        .unwrap();
    let mut req = ClientRequestBuilder::new(uri);
    if let Some(t) = token {
        req = req.with_header("Authorization", format!("Bearer {t}"));
    }
    match tungstenite::client::client(req, stream) {
        Ok(_) => 101,
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            resp.status().as_u16()
        }
        Err(e) => panic!("{path}: {e}"),
    }
}

#[test]
fn every_endpoint_checks_its_kind_of_token() {
    let dir = TempDir::new("auth-table");
    let server = Server::start(&dir.path().join("data"), 0, &[]);
    let c = server.client();
    let (agent_a, token_a) = register(&c, "agent-a");
    let (_, token_b) = register(&c, "agent-b");
    let (revoked_id, revoked) = register(&c, "agent-r");
    assert_eq!(
        c.call("DELETE", &format!("/api/agents/{revoked_id}"), None)
            .0,
        200
    );
    // A task owned by agent-a, by hand over WS 1.
    let id = c.create_task(&json!({"action": "plan", "tf_json": {}}));
    {
        let stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        let uri = format!("ws://127.0.0.1:{}/agent/control", server.port)
            .parse()
            .unwrap();
        let req = ClientRequestBuilder::new(uri)
            .with_header("Authorization", format!("Bearer {token_a}"));
        let (mut ws, _) = tungstenite::client::client(req, stream).unwrap();
        let state = json!({"type": "state", "state": {"plan_running_count": 0, "plan_limit": 1, "apply_running": false}, "running": []});
        ws.send(tungstenite::Message::text(state.to_string()))
            .unwrap();
        let _ = ws.read().unwrap();
        ws.send(tungstenite::Message::text(
            json!({"type": "task_accepted", "task_id": id}).to_string(),
        ))
        .unwrap();
        wait_for("accepted", Duration::from_secs(10), || {
            (c.task(&id)["agent_id"] == agent_a.as_str()).then_some(())
        });
        std::mem::forget(ws); // keep it open for the rest of the test
    }

    // Client endpoints: only the API token.
    let client_routes = [
        (
            "POST",
            "/api/tasks".to_string(),
            Some(r#"{"action": "plan", "tf_json": {}}"#),
        ),
        ("GET", "/api/tasks".to_string(), None),
        ("GET", format!("/api/tasks/{id}"), None),
        ("POST", format!("/api/tasks/{id}/cancel"), None),
        ("GET", format!("/api/tasks/{id}/logs/plan"), None),
        ("GET", "/api/agents".to_string(), None),
        ("DELETE", format!("/api/agents/{agent_a}"), None),
        ("POST", "/api/registration-token/rotate".to_string(), None),
    ];
    for (method, path, body) in &client_routes {
        for (label, token) in [
            ("no token", None),
            ("wrong token", Some("wrong-token-0000000")),
            ("agent token", Some(token_a.as_str())),
            ("registration token", Some(REG_TOKEN)),
            ("revoked agent token", Some(revoked.as_str())),
        ] {
            let (status, text) = c.raw(method, path, token, *body);
            assert_eq!(status, 401, "{method} {path} with {label}: {text}");
            let v: Value = serde_json::from_str(&text).unwrap();
            assert!(v["error"].is_string());
        }
    }
    assert_eq!(
        ws_status(
            &server,
            &format!("/api/tasks/{id}/logs/live"),
            Some(&token_a)
        ),
        401
    );
    assert_eq!(
        ws_status(&server, &format!("/api/tasks/{id}/logs/live"), None),
        401
    );

    // Agent endpoints: only an agent's token, and only for its own tasks.
    let upload = format!("/api/tasks/{id}/logs/upload?phase=plan");
    for (label, token, want) in [
        ("no token", None, 401),
        ("API token", Some(API_TOKEN), 401),
        ("registration token", Some(REG_TOKEN), 401),
        ("revoked token", Some(revoked.as_str()), 401),
        ("another agent's token", Some(token_b.as_str()), 403),
    ] {
        let (status, text) = c.raw("POST", &upload, token, Some("log"));
        assert_eq!(status, want, "upload with {label}: {text}");
        assert_eq!(
            ws_status(&server, &format!("/agent/stream/{id}"), token),
            want,
            "WS 3 with {label}"
        );
        let control = if want == 403 { 101 } else { want };
        assert_eq!(
            ws_status(&server, "/agent/control", token),
            control,
            "WS 1 with {label}"
        );
    }
    assert_eq!(c.raw("POST", &upload, Some(&token_a), Some("log")).0, 200);
    for (label, token) in [
        ("no token", None),
        ("API token", Some(API_TOKEN)),
        ("an agent token", Some(token_a.as_str())),
    ] {
        let (status, text) = c.raw(
            "POST",
            "/agents/register",
            token,
            Some(r#"{"name": "x", "plan_limit": 1}"#),
        );
        assert_eq!(status, 401, "register with {label}: {text}");
    }
    assert!(
        !server.proc.output().contains(&token_a),
        "tokens never reach the log"
    );
}

#[test]
fn a_revoked_agent_is_cut_off_its_task_canceled_and_it_stops_with_a_clear_message() {
    let dir = TempDir::new("revoke");
    let server = Server::start(&dir.path().join("data"), 0, &[]);
    let c = server.client();
    let mut agent = Agent::start_with(
        &server.url,
        "agent-rev",
        &dir.path().join("work"),
        &slow_terraform(),
        &[],
        &[("FAKE_TF_SECONDS", "600")],
    );
    let a = c.wait_online("agent-rev", Duration::from_secs(30));
    let id = c.create_task(&json!({"action": "plan", "tf_json": {}}));
    wait_for("running", Duration::from_secs(60), || {
        (c.task(&id)["status"] == "running").then_some(())
    });
    let (status, v) = c.call(
        "DELETE",
        &format!("/api/agents/{}", a["agent_id"].as_str().unwrap()),
        None,
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["canceled_tasks"], json!([id]));
    assert_eq!(c.task(&id)["status"], "canceled");
    let exited = wait_for("the agent to stop", Duration::from_secs(60), || {
        agent.proc.child.try_wait().unwrap()
    });
    assert_eq!(exited.code(), Some(1));
    assert!(
        agent.proc.output().contains("was revoked"),
        "{}",
        agent.proc.output()
    );
    let listed = c
        .agents()
        .into_iter()
        .find(|x| x["name"] == "agent-rev")
        .unwrap();
    assert_eq!(listed["online"], false);
    assert!(listed["revoked_at"].is_string());
    assert_eq!(c.call("DELETE", "/api/agents/A-999999", None).0, 404);
}

#[test]
fn rotating_the_registration_token_keeps_registered_agents_and_several_api_tokens_work() {
    let dir = TempDir::new("rotate");
    let data = dir.path().join("data");
    // No registration token on the command line: it is generated, and can be rotated.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_iac-server"));
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
    ])
    .args([
        "--api-token",
        API_TOKEN,
        "--api-token",
        "second-api-token-0002",
    ])
    .env_remove("IAC_REGISTRATION_TOKEN");
    let proc = Proc::spawn_cmd(cmd);
    let line = proc.wait_line("listening on ", Duration::from_secs(20));
    let url = line[line.find("http://").unwrap()..].trim().to_string();
    let c = Client::new(&url, API_TOKEN);
    assert_eq!(
        Client::new(&url, "second-api-token-0002")
            .call("GET", "/api/tasks", None)
            .0,
        200
    );
    let old = std::fs::read_to_string(data.join("registration-token"))
        .unwrap()
        .trim()
        .to_string();
    let mut agent_cmd = std::process::Command::new(env!("CARGO_BIN_EXE_iac-agent"));
    agent_cmd
        .args([
            "--server",
            &url,
            "--registration-token",
            &old,
            "--name",
            "agent-keep",
        ])
        .args(["--work-dir", dir.path().join("work").to_str().unwrap()])
        .args(["--terraform", terraform().to_str().unwrap()]);
    let agent = Proc::spawn_cmd(agent_cmd);
    c.wait_online("agent-keep", Duration::from_secs(30));
    let (status, v) = c.call("POST", "/api/registration-token/rotate", None);
    assert_eq!(status, 200, "{v}");
    let new = v["registration_token"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    assert_eq!(
        std::fs::read_to_string(data.join("registration-token"))
            .unwrap()
            .trim(),
        new
    );
    assert_eq!(
        c.raw(
            "POST",
            "/agents/register",
            Some(&old),
            Some(r#"{"name": "n", "plan_limit": 1}"#)
        )
        .0,
        401
    );
    assert_eq!(
        c.raw(
            "POST",
            "/agents/register",
            Some(&new),
            Some(r#"{"name": "n", "plan_limit": 1}"#)
        )
        .0,
        200
    );
    // The agent registered with the old token is still there, and still works.
    let id = c.create_task(
        &json!({"action": "plan", "tf_json": hello_config(), "variables": {"name": "r"}}),
    );
    assert_eq!(
        c.wait_done(&id, Duration::from_secs(120))["status"],
        "succeeded"
    );
    assert!(c
        .agents()
        .iter()
        .any(|a| a["name"] == "agent-keep" && a["online"] == true));
    drop(agent);
}
