//! The server killed with SIGKILL and restarted on the same data dir keeps every task and
//! log, and the agent comes back by itself.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

#[test]
fn a_killed_server_restarts_with_every_task_and_log_and_the_agent_reconnects() {
    let dir = TempDir::new("restart");
    let data = dir.path().join("data");
    let port = free_port();
    let mut server = Server::start(&data, port, &[]);
    let client = server.client();
    let agent = Agent::start(&server.url, "agent-r", &dir.path().join("work"), &[]);
    client.wait_online("agent-r", Duration::from_secs(30));

    let done = client.create_task(
        &json!({"action": "apply", "tf_json": hello_config(), "variables": {"name": "before"}}),
    );
    let done_task = client.wait_done(&done, Duration::from_secs(120));
    assert_eq!(done_task["status"], "succeeded", "{done_task}");
    let plan_log = client.log(&done, "plan");
    let apply_log = client.log(&done, "apply");
    assert_eq!(apply_log.0, 200);
    let queued = client.create_task(&json!({
        "action": "plan", "tf_json": hello_config(), "labels": {"zone": "nowhere"}
    }));
    let (_, before) = client.call("GET", "/api/tasks", None);

    server.proc.kill9();
    let server = Server::start(&data, port, &[]);
    let client = server.client();

    // Every task and log as before.
    let (status, after) = client.call("GET", "/api/tasks", None);
    assert_eq!(status, 200);
    assert_eq!(after, before);
    assert_eq!(client.task(&queued)["status"], "queued");
    assert_eq!(client.log(&done, "plan"), plan_log);
    assert_eq!(client.log(&done, "apply"), apply_log);
    // The tokens given on the command line still work, and so does the agent's.
    let online = client.wait_online("agent-r", Duration::from_secs(60));
    assert_eq!(online["agent_id"], done_task["agent_id"]);
    // And it runs new work.
    let after_restart = client.create_task(
        &json!({"action": "plan", "tf_json": hello_config(), "variables": {"name": "after"}}),
    );
    let t = client.wait_done(&after_restart, Duration::from_secs(120));
    assert_eq!(
        t["status"],
        "succeeded",
        "{t}\nagent:\n{}",
        agent.proc.output()
    );
}

#[test]
fn generated_tokens_are_printed_once_and_kept_0600() {
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;
    let dir = TempDir::new("tokens");
    let data = dir.path().join("data");
    let start = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_iac-server"));
        cmd.args([
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
        ])
        .env_remove("IAC_API_TOKEN")
        .env_remove("IAC_REGISTRATION_TOKEN");
        support::Proc::spawn_cmd(cmd)
    };
    let first = start();
    first.wait_line("listening on", Duration::from_secs(20));
    let out = first.output();
    let token = std::fs::read_to_string(data.join("api-token")).unwrap();
    assert!(
        out.contains(&format!(
            "generated API token (saved in {}): {}",
            data.join("api-token").display(),
            token.trim()
        )),
        "{out}"
    );
    assert!(out.contains("generated registration token"), "{out}");
    for f in ["api-token", "registration-token"] {
        let mode = std::fs::metadata(data.join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    drop(first);
    let second = start();
    let line = second.wait_line("listening on", Duration::from_secs(20));
    assert!(!second.output().contains(token.trim()), "printed once only");
    let url = &line[line.find("http://").unwrap()..];
    let client = Client::new(url.trim(), token.trim());
    assert_eq!(client.call("GET", "/api/tasks", None).0, 200);
}

#[test]
fn an_agent_started_before_its_server_registers_once_the_server_is_up() {
    let dir = TempDir::new("early-agent");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let agent = Agent::start(&url, "agent-early", &dir.path().join("work"), &[]);
    agent
        .proc
        .wait_line("registration failed", Duration::from_secs(30));
    let server = Server::start(&dir.path().join("data"), port, &[]);
    let client = server.client();
    client.wait_online("agent-early", Duration::from_secs(60));
    let id = client.create_task(
        &json!({"action": "plan", "tf_json": hello_config(), "variables": {"name": "late"}}),
    );
    assert_eq!(
        client.wait_done(&id, Duration::from_secs(120))["status"],
        "succeeded"
    );
}

#[test]
fn a_wrong_registration_token_stops_the_agent_with_a_clear_message() {
    let dir = TempDir::new("bad-reg");
    let server = Server::start(&dir.path().join("data"), 0, &[]);
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_iac-agent"));
    cmd.args([
        "--server",
        &server.url,
        "--registration-token",
        "wrong",
        "--name",
        "x",
    ])
    .args(["--work-dir", dir.path().join("work").to_str().unwrap()]);
    let mut agent = support::Proc::spawn_cmd(cmd);
    let status = wait_for("the agent to exit", Duration::from_secs(30), || {
        agent.child.try_wait().unwrap()
    });
    assert_eq!(status.code(), Some(1));
    assert!(
        agent
            .output()
            .contains("the server refused the registration (401)"),
        "{}",
        agent.output()
    );
}
