//! WS 1 as an external agent sees it: a hand-driven agent (real sockets, tungstenite)
//! against the real server, to exercise what the real agent never does on purpose:
//! rejecting a task, going silent, connecting twice.

mod support;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;
use tungstenite::client::ClientRequestBuilder;
use tungstenite::{Message, WebSocket};

struct FakeAgent {
    ws: WebSocket<TcpStream>,
    agent_id: String,
}

impl FakeAgent {
    fn connect(server: &Server, name: &str, labels: Value) -> FakeAgent {
        let (token, agent_id) = FakeAgent::register_with(server, name, labels);
        let ws = FakeAgent::open(server, "/agent/control", &token);
        FakeAgent { ws, agent_id }
    }

    fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).unwrap();
    }

    fn report_free(&mut self, running: &[&str]) {
        self.send(json!({"type": "state", "state": {"plan_running_count": running.len(), "plan_limit": 2, "apply_running": false}, "running": running}));
    }

    /// The next command from the server.
    fn command(&mut self) -> Value {
        loop {
            match self.ws.read().expect("a command") {
                Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
                Message::Close(f) => panic!("closed: {f:?}"),
                _ => {}
            }
        }
    }
}

#[test]
fn a_rejected_task_goes_back_to_the_queue_and_is_dispatched_again() {
    let dir = TempDir::new("reject");
    let server = Server::start(&dir.path().join("data"), 0, &[]);
    let client = server.client();
    let mut agent = FakeAgent::connect(&server, "fake", json!({}));
    agent.report_free(&[]);
    let id = client
        .create_task(&json!({"action": "plan", "tf_json": {"output": {}}, "variables": {"a": 1}}));
    let cmd = agent.command();
    assert_eq!(cmd["command"], "run_task");
    assert_eq!(cmd["task_data"]["task_id"], id.as_str());
    assert_eq!(cmd["task_data"]["action"], "plan");
    assert_eq!(cmd["task_data"]["tf_json"], r#"{"output":{}}"#);
    assert_eq!(cmd["task_data"]["variables"], r#"{"a":1}"#);
    agent.send(json!({"type": "task_rejected", "task_id": id, "reason": "busy"}));
    assert_eq!(client.task(&id)["status"], "queued");
    // Back in the queue: the next report of room brings it again.
    agent.report_free(&[]);
    let again = agent.command();
    assert_eq!(again["task_data"]["task_id"], id.as_str());
    agent.send(json!({"type": "task_accepted", "task_id": id}));
    agent.report_free(&[&id]);
    let running = wait_for("running", Duration::from_secs(10), || {
        let t = client.task(&id);
        (t["status"] == "running").then_some(t)
    });
    assert_eq!(running["agent_id"], agent.agent_id.as_str());
    agent.send(json!({"type": "phase_finished", "task_id": id, "phase": "plan", "exit_code": 0}));
    agent.send(
        json!({"type": "task_finished", "task_id": id, "status": "succeeded", "exit_code": 0}),
    );
    // A duplicate report changes nothing.
    agent.send(json!({"type": "task_finished", "task_id": id, "status": "failed", "exit_code": 1}));
    let done = client.wait_done(&id, Duration::from_secs(10));
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["phases"]["plan"]["status"], "succeeded");
    // Messages the server cannot read are logged, not fatal.
    agent.send(json!({"type": "from_the_future"}));
    agent.ws.send(Message::text("not json")).unwrap();
    agent.report_free(&[]);
    wait_for("the last state report", Duration::from_secs(10), || {
        client.agents().into_iter().find(|a| {
            a["name"] == "fake" && a["online"] == true && a["state"]["plan_running_count"] == 0
        })
    });
}

#[test]
fn an_agent_that_accepts_a_canceled_task_is_told_to_cancel_it() {
    let dir = TempDir::new("accept-canceled");
    let server = Server::start(&dir.path().join("data"), 0, &[]);
    let client = server.client();
    let mut agent = FakeAgent::connect(&server, "fake", json!({}));
    agent.report_free(&[]);
    let id = client.create_task(&json!({"action": "plan", "tf_json": {}}));
    assert_eq!(agent.command()["command"], "run_task");
    // Canceled while dispatched, before the agent accepted it.
    let (status, _) = client.call("POST", &format!("/api/tasks/{id}/cancel"), None);
    assert_eq!(status, 200);
    agent.send(json!({"type": "task_accepted", "task_id": id}));
    let cmd = agent.command();
    assert_eq!(cmd, json!({"command": "cancel_task", "task_id": id}));
    assert_eq!(client.task(&id)["status"], "canceled");
}

#[test]
fn a_silent_agent_is_disconnected_and_shown_offline() {
    let dir = TempDir::new("silent");
    let server = Server::start(&dir.path().join("data"), 0, &["--heartbeat-ms", "200"]);
    let client = server.client();
    let mut agent = FakeAgent::connect(&server, "quiet", json!({"zone": "x"}));
    agent.report_free(&[]);
    client.wait_online("quiet", Duration::from_secs(10));
    // Say nothing more: within 3 heartbeat intervals (and some slack) the server closes.
    let started = Instant::now();
    let close = loop {
        match agent.ws.read() {
            Ok(Message::Close(f)) => break f,
            Ok(_) => {}
            Err(e) => panic!("expected a close frame, got {e}"),
        }
    };
    let frame = close.expect("a close frame with a reason");
    assert_eq!(u16::from(frame.code), 4000);
    assert!(
        frame.reason.as_str().contains("no heartbeat"),
        "{}",
        frame.reason
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    let a = wait_for("offline", Duration::from_secs(10), || {
        client
            .agents()
            .into_iter()
            .find(|a| a["name"] == "quiet" && a["online"] == false)
    });
    assert!(a["last_seen"].is_string());
    assert_eq!(a["labels"], json!({"zone": "x"}));
}

#[test]
fn a_second_connection_of_the_same_agent_replaces_the_first() {
    let dir = TempDir::new("replace");
    let server = Server::start(&dir.path().join("data"), 0, &[]);
    let mut first = FakeAgent::connect(&server, "twin", json!({}));
    first.report_free(&[]);
    let mut second = FakeAgent::connect(&server, "twin", json!({}));
    assert_eq!(first.agent_id, second.agent_id, "same name, same id");
    let close = loop {
        match first.ws.read() {
            Ok(Message::Close(f)) => break f,
            Ok(_) => {}
            Err(e) => panic!("expected a close frame, got {e}"),
        }
    };
    assert_eq!(u16::from(close.unwrap().code), 4001);
    // The first registration's token no longer works; the second connection does.
    second.report_free(&[]);
    let id = server
        .client()
        .create_task(&json!({"action": "plan", "tf_json": {}}));
    assert_eq!(second.command()["task_data"]["task_id"], id.as_str());
}

impl FakeAgent {
    /// Registers an agent; its token and id.
    fn register(server: &Server, name: &str) -> (String, String) {
        FakeAgent::register_with(server, name, json!({}))
    }

    fn register_with(server: &Server, name: &str, labels: Value) -> (String, String) {
        let c = server.client();
        let body = json!({"name": name, "hostname": "test", "version": "0", "plan_limit": 2, "labels": labels});
        let (status, text) = c.raw(
            "POST",
            "/agents/register",
            Some(REG_TOKEN),
            Some(&body.to_string()),
        );
        assert_eq!(status, 200, "{text}");
        let reg: Value = serde_json::from_str(&text).unwrap();
        (
            reg["agent_token"].as_str().unwrap().to_string(),
            reg["agent_id"].as_str().unwrap().to_string(),
        )
    }

    /// Opens a WebSocket at `path` with an agent token.
    fn open(server: &Server, path: &str, token: &str) -> WebSocket<TcpStream> {
        let stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let uri = format!("ws://127.0.0.1:{}{path}", server.port)
            .parse()
            .unwrap();
        let req =
            ClientRequestBuilder::new(uri).with_header("Authorization", format!("Bearer {token}"));
        tungstenite::client::client(req, stream)
            .expect("handshake")
            .0
    }

    /// Runs `task_id` as far as the server is concerned: accepted, reported running.
    fn take(&mut self, server: &Server) -> String {
        let id = server
            .client()
            .create_task(&json!({"action": "plan", "tf_json": {}}));
        assert_eq!(self.command()["task_data"]["task_id"], id.as_str());
        self.send(json!({"type": "task_accepted", "task_id": id}));
        self.report_free(&[&id]);
        id
    }
}

#[test]
fn a_broken_ws3_is_asked_for_again_and_no_line_is_doubled() {
    let dir = TempDir::new("ws3-broken");
    let server = Server::start(&dir.path().join("data"), 0, &[]);
    let (token, agent_id) = FakeAgent::register(&server, "streamer");
    let ws = FakeAgent::open(&server, "/agent/control", &token);
    let mut agent = FakeAgent { ws, agent_id };
    agent.report_free(&[]);
    let id = agent.take(&server);
    let viewer = Viewer::connect(&server, &id, false);
    assert_eq!(
        agent.command(),
        json!({"command": "start_realtime_stream", "task_id": id})
    );
    let path = format!("/agent/stream/{id}");
    let mut ws3 = FakeAgent::open(&server, &path, &token);
    for i in 0..5 {
        ws3.send(Message::text(format!("line {i}"))).unwrap();
    }
    viewer.wait_lines(5, Duration::from_secs(10));
    drop(ws3); // broken: no close frame
               // The server asks again; the new stream starts from the first line.
    assert_eq!(
        agent.command(),
        json!({"command": "start_realtime_stream", "task_id": id})
    );
    let mut ws3 = FakeAgent::open(&server, &path, &token);
    for i in 0..10 {
        ws3.send(Message::text(format!("line {i}"))).unwrap();
    }
    viewer.wait_lines(10, Duration::from_secs(10));
    let expected: Vec<String> = (0..10).map(|i| format!("line {i}")).collect();
    assert_eq!(viewer.texts(), expected);
    // The viewer leaves: the agent is told to stop, and WS 3 is closed by the server too.
    viewer.leave();
    assert_eq!(
        agent.command(),
        json!({"command": "stop_realtime_stream", "task_id": id})
    );
    let close = loop {
        match ws3.read() {
            Ok(Message::Close(f)) => break f,
            Ok(_) => {}
            Err(e) => panic!("expected a close, got {e}"),
        }
    };
    assert_eq!(close.unwrap().reason.as_str(), "nobody is watching");
}

#[test]
fn viewers_wait_while_ws1_is_down_and_the_stream_starts_when_the_agent_is_back() {
    let dir = TempDir::new("ws1-down");
    let server = Server::start(&dir.path().join("data"), 0, &[]);
    let (token, _) = FakeAgent::register(&server, "flaky");
    let connect = || {
        let ws = FakeAgent::open(&server, "/agent/control", &token);
        FakeAgent {
            ws,
            agent_id: String::new(),
        }
    };
    let mut agent = connect();
    agent.report_free(&[]);
    let id = agent.take(&server);
    drop(agent); // WS 1 down, the task still runs on the agent
    wait_for("offline", Duration::from_secs(10), || {
        server
            .client()
            .agents()
            .into_iter()
            .find(|a| a["name"] == "flaky" && a["online"] == false)
    });
    let viewer = Viewer::connect(&server, &id, true);
    let mut agent = connect();
    agent.report_free(&[&id]);
    assert_eq!(
        agent.command(),
        json!({"command": "start_realtime_stream", "task_id": id})
    );
    let mut ws3 = FakeAgent::open(&server, &format!("/agent/stream/{id}"), &token);
    ws3.send(Message::text("hello")).unwrap();
    viewer.wait_lines(1, Duration::from_secs(10));
    assert_eq!(viewer.texts(), ["hello"]);
    // Another agent may not open a stream of this task.
    let (other, _) = FakeAgent::register(&server, "other");
    let stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    let uri = format!("ws://127.0.0.1:{}/agent/stream/{id}", server.port)
        .parse()
        .unwrap();
    let req =
        ClientRequestBuilder::new(uri).with_header("Authorization", format!("Bearer {other}"));
    match tungstenite::client::client(req, stream) {
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            assert_eq!(resp.status(), 403)
        }
        other => panic!("expected 403, got {:?}", other.map(|_| ())),
    }
}
