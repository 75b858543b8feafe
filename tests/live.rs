//! Live logs on demand: WS 2 viewers, `start/stop_realtime_stream`, the agent's streamer
//! on WS 3, and the `iac` terminal client, with the real binaries.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

const LONG: Duration = Duration::from_secs(120);

struct Setup {
    _dir: TempDir,
    server: Server,
    agent: Agent,
    client: Client,
}

/// A server and an agent running the stand-in Terraform with these settings.
fn setup(name: &str, env: &[(&str, &str)], agent_args: &[&str]) -> Setup {
    let dir = TempDir::new(name);
    let server = Server::start(&dir.path().join("data"), 0, &[]);
    let agent = Agent::start_with(
        &server.url,
        "agent-live",
        &dir.path().join("work"),
        &slow_terraform(),
        agent_args,
        env,
    );
    let client = server.client();
    client.wait_online("agent-live", Duration::from_secs(30));
    Setup {
        _dir: dir,
        server,
        agent,
        client,
    }
}

fn streamers(pid: u32) -> usize {
    thread_names(pid)
        .iter()
        .filter(|n| n.starts_with("stream "))
        .count()
}

#[test]
fn nobody_watching_costs_one_connection_and_leaving_ends_the_stream() {
    let s = setup(
        "on-demand",
        &[("FAKE_LINES", "400"), ("FAKE_DELAY", "0.05")],
        &[],
    );
    let pid = s.agent.proc.pid();
    let id = s
        .client
        .create_task(&json!({"action": "plan", "tf_json": {}}));
    wait_for("running", LONG, || {
        (s.client.task(&id)["status"] == "running").then_some(())
    });
    // Unwatched: WS 1 only, no streamer thread.
    assert_eq!(connections_to(pid, s.server.port), 1);
    assert_eq!(streamers(pid), 0, "{:?}", thread_names(pid));
    let a = Viewer::connect(&s.server, &id, false);
    let b = Viewer::connect(&s.server, &id, true);
    a.wait_lines(5, LONG);
    b.wait_lines(5, LONG);
    assert_eq!(connections_to(pid, s.server.port), 2, "WS 1 and WS 3");
    assert_eq!(streamers(pid), 1);
    a.leave();
    b.wait_lines(b.count() + 2, LONG); // one viewer left: the stream goes on
    b.leave();
    let left = Instant::now();
    wait_for("WS 3 to close", Duration::from_secs(2), || {
        (connections_to(pid, s.server.port) == 1 && streamers(pid) == 0).then_some(())
    });
    assert!(left.elapsed() < Duration::from_secs(2));
    assert_eq!(
        s.client.task(&id)["status"],
        "running",
        "the task goes on unwatched"
    );
    let (status, _) = s
        .client
        .call("POST", &format!("/api/tasks/{id}/cancel"), None);
    assert_eq!(status, 202);
}

#[test]
fn viewers_get_every_line_live_and_late_joiners_the_same_sequence() {
    let s = setup(
        "fan-out",
        &[("FAKE_LINES", "40"), ("FAKE_DELAY", "0.05")],
        &[],
    );
    let id = s
        .client
        .create_task(&json!({"action": "apply", "tf_json": {}}));
    let first = Viewer::connect(&s.server, &id, false);
    first.wait_lines(10, LONG);
    let status_at_first_lines = s.client.task(&id)["status"].clone();
    let second = Viewer::connect(&s.server, &id, true);
    let (closed_at, code, reason) = first.wait_closed(LONG);
    assert_eq!((code, reason.as_str()), (1000, "task ended"));
    // At the close, the final status is already there.
    let task = s.client.task(&id);
    assert_eq!(task["status"], "succeeded", "{task}");
    assert_eq!(second.wait_closed(LONG).1, 1000);
    assert_eq!(
        status_at_first_lines, "running",
        "lines arrive while the task runs"
    );
    let first_line_at = first.lines.lock().unwrap()[0].0;
    assert!(
        closed_at.duration_since(first_line_at) > Duration::from_secs(1),
        "the first line came well before the end"
    );
    let expected = expected_stream(&s.client, &id);
    assert!(expected.contains(&"--- apply ---".to_string()));
    assert!(expected.len() > 80, "{expected:?}");
    assert_eq!(
        first.texts(),
        expected,
        "the live lines equal the archived log, line for line"
    );
    assert_eq!(
        second.texts(),
        expected,
        "a late viewer gets the same full sequence"
    );
}

#[test]
fn a_viewer_of_a_queued_task_waits_for_it_to_start() {
    let dir = TempDir::new("queued-viewer");
    let server = Server::start(&dir.path().join("data"), 0, &[]);
    let client = server.client();
    let id = client.create_task(
        &json!({"action": "plan", "tf_json": hello_config(), "variables": {"name": "queued"}}),
    );
    let viewer = Viewer::connect(&server, &id, false);
    assert_eq!(client.task(&id)["status"], "queued");
    let _agent = Agent::start(&server.url, "late-agent", &dir.path().join("work"), &[]);
    let (_, code, _) = viewer.wait_closed(LONG);
    assert_eq!(code, 1000);
    assert_eq!(client.task(&id)["status"], "succeeded");
    let lines = viewer.texts();
    assert_eq!(lines, expected_stream(&client, &id));
    assert!(
        lines
            .iter()
            .any(|l| strip_ansi(l).contains("greeting = \"hello queued\"")),
        "{lines:?}"
    );
}

#[test]
fn a_viewer_of_a_finished_task_gets_the_archived_logs_then_a_normal_close() {
    let dir = TempDir::new("finished-viewer");
    let server = Server::start(&dir.path().join("data"), 0, &[]);
    let client = server.client();
    let _agent = Agent::start(&server.url, "agent-f", &dir.path().join("work"), &[]);
    let id = client.create_task(
        &json!({"action": "apply", "tf_json": hello_config(), "variables": {"name": "done"}}),
    );
    assert_eq!(client.wait_done(&id, LONG)["status"], "succeeded");
    let viewer = Viewer::connect(&server, &id, true);
    let (_, code, reason) = viewer.wait_closed(LONG);
    assert_eq!((code, reason.as_str()), (1000, "task ended"));
    let lines = viewer.texts();
    assert_eq!(lines, expected_stream(&client, &id));
    let marker = lines
        .iter()
        .position(|l| l == "--- apply ---")
        .expect("a phase marker");
    assert!(lines[..marker]
        .iter()
        .any(|l| l.starts_with("$ terraform plan")));
    assert!(lines[marker..]
        .iter()
        .any(|l| strip_ansi(l).contains("Apply complete!")));
}

#[test]
fn a_viewer_that_never_reads_is_dropped_without_slowing_anything() {
    // ~30 MB of log, more than the socket buffers and the viewer's bound together.
    let scratch = TempDir::new("stalled-events");
    let events = scratch.path().join("events");
    std::fs::write(&events, "").unwrap();
    let s = setup(
        "stalled",
        // Each command takes 5 s, and plan prints 30 MB over 3 s more: a run of ~13 s,
        // so 10 % is ~1.3 s, well above the jitter of a busy 2-core machine. The
        // 10 MB/s pace is what a fast Terraform run gives at most; a viewer that reads
        // keeps up with it even on a loaded machine (a debug-built test client that
        // reads a 30 MB burst all at once may not, and would rightly be dropped).
        &[
            ("FAKE_BULK", "300000"),
            ("FAKE_BULK_CHUNK", "10000"),
            ("FAKE_BULK_PAUSE", "0.1"),
            ("FAKE_TF_SECONDS", "5"),
            ("FAKE_TF_EVENTS", events.to_str().unwrap()),
        ],
        &[],
    );
    // A task's duration: from its first command's start to its last command's end.
    let duration = |id: &str| -> f64 {
        let text = std::fs::read_to_string(&events).unwrap();
        let times: Vec<f64> = text
            .lines()
            .filter(|l| l.split_whitespace().nth(1) == Some(id))
            .filter_map(|l| l.split_whitespace().nth(3)?.parse().ok())
            .collect();
        times.iter().cloned().fold(f64::MIN, f64::max)
            - times.iter().cloned().fold(f64::MAX, f64::min)
    };
    let unwatched = s
        .client
        .create_task(&json!({"action": "plan", "tf_json": {}}));
    assert_eq!(s.client.wait_done(&unwatched, LONG)["status"], "succeeded");
    let watched = s
        .client
        .create_task(&json!({"action": "plan", "tf_json": {}}));
    // A viewer that completes the handshake and then never reads a byte.
    let stalled = {
        let stream = std::net::TcpStream::connect(("127.0.0.1", s.server.port)).unwrap();
        let uri = format!(
            "ws://127.0.0.1:{}/api/tasks/{watched}/logs/live",
            s.server.port
        );
        let req = tungstenite::client::ClientRequestBuilder::new(uri.parse().unwrap())
            .with_header("Authorization", format!("Bearer {API_TOKEN}"));
        tungstenite::client::client(req, stream)
            .expect("handshake")
            .0
    };
    let reader = Viewer::connect(&s.server, &watched, false);
    // The stalled viewer is dropped while Terraform still prints: the stream ran more
    // than the viewer's bound ahead of it, so nothing waited for it.
    let dropped = format!("a viewer of {watched} did not keep up: dropped");
    wait_for("the stalled viewer to be dropped", LONG, || {
        s.server.proc.output().contains(&dropped).then_some(())
    });
    assert_eq!(
        s.client.task(&watched)["status"],
        "running",
        "the stalled viewer was dropped before the task ended"
    );
    let (_, code, _) = reader.wait_closed(LONG);
    assert_eq!(code, 1000);
    assert_eq!(s.client.task(&watched)["status"], "succeeded");
    let expected = expected_stream(&s.client, &watched);
    assert!(
        expected.len() > 300_000,
        "{} lines: {:?}",
        expected.len(),
        &expected[..expected.len().min(20)]
    );
    let got = reader.texts();
    assert_eq!(
        got.len(),
        expected.len(),
        "the reading viewer got every line"
    );
    assert!(
        got == expected,
        "the reading viewer's lines differ from the archive"
    );
    // The issue's bound: within 10 % of an unwatched run (the figures are printed).
    let (d_unwatched, d_watched) = (duration(&unwatched), duration(&watched));
    eprintln!("task duration: unwatched {d_unwatched:.3} s, watched by a stalled and a reading viewer {d_watched:.3} s");
    assert!(
        d_watched <= d_unwatched * 1.1,
        "watched {d_watched:.2} s vs unwatched {d_unwatched:.2} s"
    );
    drop(stalled);
}

fn iac(server: &Server, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_iac"))
        .args(args)
        .env("IAC_SERVER", &server.url)
        .env("IAC_API_TOKEN", API_TOKEN)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn iac_submit_follow_prints_the_live_log_and_exits_with_the_result() {
    let dir = TempDir::new("cli");
    let server = Server::start(&dir.path().join("data"), 0, &[]);
    let client = server.client();
    let _agent = Agent::start(&server.url, "agent-cli", &dir.path().join("work"), &[]);
    client.wait_online("agent-cli", Duration::from_secs(30));
    let good = dir.path().join("good.tf.json");
    std::fs::write(&good, hello_config().to_string()).unwrap();
    let (code, out, err) = iac(
        &server,
        &[
            "submit",
            good.to_str().unwrap(),
            "--action",
            "apply",
            "--var",
            "name=cli",
            "--follow",
        ],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    let out = strip_ansi(&out);
    assert!(out.contains("$ terraform plan"), "{out}");
    assert!(out.contains("--- apply ---"), "{out}");
    assert!(out.contains("greeting = \"hello cli\""), "{out}");
    assert!(err.contains("succeeded"), "{err}");

    let bad = dir.path().join("bad.tf.json");
    std::fs::write(&bad, r#"{"output": {"x": {"value": "${var.nope}"}}}"#).unwrap();
    let (code, out, err) = iac(&server, &["submit", bad.to_str().unwrap(), "--follow"]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        strip_ansi(&out).contains("Reference to undeclared input variable"),
        "{out}"
    );
    assert!(err.contains("failed"), "{err}");

    // The other commands, against the same server.
    let (code, out, _) = iac(&server, &["tasks"]);
    assert_eq!(code, 0);
    assert!(
        out.lines().count() >= 3 && out.contains("succeeded") && out.contains("failed"),
        "{out}"
    );
    let (code, out, _) = iac(&server, &["agents"]);
    assert_eq!(code, 0);
    assert!(out.contains("agent-cli"), "{out}");
    let (code, out, _) = iac(&server, &["logs", "T-000001"]);
    assert_eq!(code, 0);
    assert_eq!(
        iac::protocol::log_lines(out.as_bytes()),
        expected_stream(&client, "T-000001")
    );
    let (code, out, _) = iac(&server, &["show", "T-000001"]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["status"],
        "succeeded"
    );
    let (code, _, err) = iac(&server, &["show", "T-999999"]);
    assert_eq!(code, 1);
    assert!(err.contains("no task T-999999 (HTTP 404)"), "{err}");
    let (code, _, err) = iac(&server, &["frobnicate"]);
    assert_eq!(code, 2, "{err}");
}
