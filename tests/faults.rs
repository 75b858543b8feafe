//! Fault injection with the real binaries: the server killed and restarted, the network
//! cut or stalled (a TCP proxy between agent and server), the agent killed.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

const LONG: Duration = Duration::from_secs(120);

/// A fresh event log for the stand-in Terraform, and its path as a string.
fn events(dir: &Path) -> (std::path::PathBuf, String) {
    let p = dir.join("events");
    std::fs::write(&p, "").unwrap();
    let s = p.to_str().unwrap().to_string();
    (p, s)
}

/// The pids the stand-in recorded for a task's commands.
fn pids(events: &Path, task: &str) -> Vec<u32> {
    std::fs::read_to_string(events)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("start ") && l.split_whitespace().nth(1) == Some(task))
        .filter_map(|l| l.split_whitespace().nth(4)?.parse().ok())
        .collect()
}

fn wait_status(client: &Client, id: &str, status: &str) -> serde_json::Value {
    wait_for(&format!("{id} {status}"), LONG, || {
        let t = client.task(id);
        (t["status"] == status).then_some(t)
    })
}

#[test]
fn server_killed_during_a_plan_the_task_still_succeeds_with_its_log_byte_for_byte() {
    let dir = TempDir::new("kill-server");
    let (_, ev) = events(dir.path());
    let data = dir.path().join("data");
    let port = free_port();
    let mut server = Server::start(&data, port, &["--ping-interval-ms", "1000"]);
    let work = dir.path().join("work");
    let _agent = Agent::start_with(
        &server.url,
        "agent-k",
        &work,
        &slow_terraform(),
        &[],
        &[
            ("FAKE_LINES", "60"),
            ("FAKE_DELAY", "0.05"),
            ("FAKE_TF_EVENTS", &ev),
        ],
    );
    let client = server.client();
    client.wait_online("agent-k", Duration::from_secs(30));
    let id = client.create_task(&json!({"action": "plan", "tf_json": {}}));
    wait_status(&client, &id, "running");
    server.proc.kill9();
    // The plan goes on while the server is down.
    let local = work.join("logs").join(&id).join("plan.log");
    wait_for("the plan to write more", LONG, || {
        std::fs::read_to_string(&local)
            .ok()
            .filter(|t| t.contains("plan line 30"))
            .map(|_| ())
    });
    let server = Server::start(&data, port, &["--ping-interval-ms", "1000"]);
    let client = server.client();
    let task = client.wait_done(&id, LONG);
    assert_eq!(task["status"], "succeeded", "{task}");
    let (status, archived) = client.log(&id, "plan");
    assert_eq!(status, 200);
    assert_eq!(
        archived.as_bytes(),
        std::fs::read(&local).unwrap(),
        "archived log == the agent's file"
    );
}

#[test]
fn a_cut_network_delays_the_log_and_the_result_and_delivers_them_exactly_once() {
    let dir = TempDir::new("cut");
    let (_, ev) = events(dir.path());
    let server = Server::start(&dir.path().join("data"), 0, &["--ping-interval-ms", "500"]);
    let proxy = Proxy::start(server.port);
    let agent = Agent::start_with(
        &proxy.url(),
        "agent-c",
        &dir.path().join("work"),
        &slow_terraform(),
        &[],
        &[
            ("FAKE_LINES", "20"),
            ("FAKE_DELAY", "0.05"),
            ("FAKE_TF_EVENTS", &ev),
        ],
    );
    let client = server.client();
    client.wait_online("agent-c", Duration::from_secs(30));
    let id = client.create_task(&json!({"action": "apply", "tf_json": {}}));
    wait_status(&client, &id, "running");
    proxy.cut();
    // The task ends on the agent while the network is down: its uploads and reports wait.
    agent.proc.wait_line(&format!("{id}: succeeded"), LONG);
    // The network stays cut for 30 s (a real outage, longer than the backoff cap).
    let cut_for = Instant::now();
    while cut_for.elapsed() < Duration::from_secs(30) {
        assert_eq!(
            client.task(&id)["status"],
            "running",
            "nothing can arrive while cut"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    proxy.restore();
    let restored = Instant::now();
    let task = client.wait_done(&id, LONG);
    assert!(
        restored.elapsed() < Duration::from_secs(35),
        "back within one backoff cap (30 s)"
    );
    assert_eq!(task["status"], "succeeded", "{task}");
    assert_eq!(task["phases"]["plan"]["status"], "succeeded");
    assert_eq!(task["phases"]["apply"]["status"], "succeeded");
    let local = dir.path().join("work").join("logs").join(&id);
    for phase in ["plan", "apply"] {
        let (status, archived) = client.log(&id, phase);
        assert_eq!(status, 200);
        assert_eq!(
            archived.as_bytes(),
            std::fs::read(local.join(format!("{phase}.log"))).unwrap()
        );
    }
    // Exactly once: one transition to succeeded, one archive of each log.
    let out = server.proc.output();
    assert_eq!(
        out.matches(&format!("task {id} succeeded on")).count(),
        1,
        "{out}"
    );
    for phase in ["plan", "apply"] {
        let archived = out
            .matches(&format!("{phase} log of {id} archived"))
            .count();
        assert!(archived >= 1, "{out}");
    }
}

#[test]
fn a_stalled_connection_is_detected_and_replaced_within_two_ping_intervals() {
    let dir = TempDir::new("stall");
    let server = Server::start(&dir.path().join("data"), 0, &["--ping-interval-ms", "500"]);
    let proxy = Proxy::start(server.port);
    let agent = Agent::start(&proxy.url(), "agent-s", &dir.path().join("work"), &[]);
    let client = server.client();
    client.wait_online("agent-s", Duration::from_secs(30));
    proxy.stall();
    let stalled = Instant::now();
    let line = agent
        .proc
        .wait_line("C&C connection ended: Silent", Duration::from_secs(10));
    let detected = stalled.elapsed();
    assert!(
        detected < Duration::from_millis(2 * 500 + 900),
        "detected after {detected:?}: {line}"
    );
    // The server gives up on its side too and shows the agent offline.
    wait_for("offline", Duration::from_secs(10), || {
        client
            .agents()
            .into_iter()
            .find(|a| a["name"] == "agent-s" && a["online"] == false)
    });
    proxy.restore();
    client.wait_online("agent-s", Duration::from_secs(60));
    let id = client.create_task(
        &json!({"action": "plan", "tf_json": hello_config(), "variables": {"name": "x"}}),
    );
    assert_eq!(client.wait_done(&id, LONG)["status"], "succeeded");
}

#[test]
fn an_agent_killed_mid_plan_and_restarted_reports_it_failed_and_leaves_no_process() {
    let dir = TempDir::new("kill-agent");
    let (evp, ev) = events(dir.path());
    let server = Server::start(&dir.path().join("data"), 0, &[]);
    let client = server.client();
    let work = dir.path().join("work");
    let env = [("FAKE_TF_SECONDS", "600"), ("FAKE_TF_EVENTS", ev.as_str())];
    let mut agent = Agent::start_with(&server.url, "agent-x", &work, &slow_terraform(), &[], &env);
    client.wait_online("agent-x", Duration::from_secs(30));
    let id = client.create_task(&json!({"action": "plan", "tf_json": {}}));
    let pid = wait_for("terraform to start", LONG, || {
        pids(&evp, &id).first().copied()
    });
    assert!(alive(pid));
    agent.proc.kill9();
    assert!(
        alive(pid),
        "the orphan outlives the agent until it is restarted"
    );
    let _agent = Agent::start_with(&server.url, "agent-x", &work, &slow_terraform(), &[], &env);
    let restarted = Instant::now();
    let task = client.wait_done(&id, LONG);
    assert!(restarted.elapsed() < Duration::from_secs(30));
    assert_eq!(task["status"], "failed", "{task}");
    assert_eq!(task["phases"]["plan"]["status"], "failed");
    assert!(!alive(pid), "no Terraform process is left behind");
    let (status, log) = client.log(&id, "plan");
    assert_eq!(status, 200);
    assert!(
        log.contains("the agent stopped while this task ran"),
        "{log}"
    );
}

#[test]
fn an_agent_that_never_comes_back_loses_its_task_after_the_grace_period() {
    let dir = TempDir::new("lost");
    let (evp, ev) = events(dir.path());
    let server = Server::start(
        &dir.path().join("data"),
        0,
        &["--lost-grace-s", "2", "--heartbeat-ms", "200"],
    );
    let client = server.client();
    let env = [("FAKE_TF_SECONDS", "600"), ("FAKE_TF_EVENTS", ev.as_str())];
    let mut agent = Agent::start_with(
        &server.url,
        "agent-l",
        &dir.path().join("work"),
        &slow_terraform(),
        &[],
        &env,
    );
    client.wait_online("agent-l", Duration::from_secs(30));
    let id = client.create_task(&json!({"action": "apply", "tf_json": {}}));
    let pid = wait_for("terraform to start", LONG, || {
        pids(&evp, &id).first().copied()
    });
    agent.proc.kill9();
    let gone = Instant::now();
    let task = wait_status(&client, &id, "lost");
    assert!(
        gone.elapsed() >= Duration::from_secs(2),
        "not before the grace period"
    );
    assert_eq!(
        task["phases"]["apply"]["status"], "skipped",
        "an apply is never re-run"
    );
    assert!(task["finished_at"].is_string());
    // Clean up the orphan this test made on purpose.
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
}

#[test]
fn a_task_over_its_timeout_is_stopped_and_fails() {
    let dir = TempDir::new("timeout");
    let server = Server::start(&dir.path().join("data"), 0, &[]);
    let client = server.client();
    let _agent = Agent::start_with(
        &server.url,
        "agent-t",
        &dir.path().join("work"),
        &slow_terraform(),
        &["--cancel-grace-s", "5"],
        &[("FAKE_TF_SECONDS", "600")],
    );
    client.wait_online("agent-t", Duration::from_secs(30));
    let started = Instant::now();
    let id = client.create_task(&json!({"action": "plan", "tf_json": {}, "timeout_s": 2}));
    assert_eq!(client.task(&id)["timeout_s"], 2);
    let task = client.wait_done(&id, LONG);
    assert_eq!(task["status"], "failed", "{task}");
    assert!(started.elapsed() >= Duration::from_secs(2));
    let (_, log) = client.log(&id, "plan");
    assert!(log.contains("ran over its timeout of 2 s"), "{log}");
    // The server's default applies to tasks that do not ask.
    let other =
        client.create_task(&json!({"action": "plan", "tf_json": {}, "labels": {"nobody": "x"}}));
    assert_eq!(client.task(&other)["timeout_s"], 14400);
    let (status, err) = client.call(
        "POST",
        "/api/tasks",
        Some(&json!({"action": "plan", "tf_json": {}, "timeout_s": 0})),
    );
    assert_eq!(status, 400, "{err}");
}

#[test]
fn a_running_plan_is_canceled() {
    let dir = TempDir::new("cancel-plan");
    let (evp, ev) = events(dir.path());
    let server = Server::start(&dir.path().join("data"), 0, &[]);
    let client = server.client();
    let env = [("FAKE_TF_SECONDS", "600"), ("FAKE_TF_EVENTS", ev.as_str())];
    let _agent = Agent::start_with(
        &server.url,
        "agent-p",
        &dir.path().join("work"),
        &slow_terraform(),
        &[],
        &env,
    );
    client.wait_online("agent-p", Duration::from_secs(30));
    let id = client.create_task(&json!({"action": "plan", "tf_json": {}}));
    let pid = wait_for("terraform to start", LONG, || {
        pids(&evp, &id).first().copied()
    });
    let (status, _) = client.call("POST", &format!("/api/tasks/{id}/cancel"), None);
    assert_eq!(status, 202);
    let task = client.wait_done(&id, LONG);
    assert_eq!(task["status"], "canceled");
    assert_eq!(task["phases"]["plan"]["status"], "canceled");
    assert!(!alive(pid), "SIGINT stopped Terraform's process group");
}

fn signal(pid: u32, sig: &str) {
    let st = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn sigterm_drains_the_agent_then_it_exits_0() {
    let dir = TempDir::new("drain");
    let server = Server::start(&dir.path().join("data"), 0, &[]);
    let client = server.client();
    let mut agent = Agent::start_with(
        &server.url,
        "agent-d",
        &dir.path().join("work"),
        &slow_terraform(),
        &[],
        &[("FAKE_LINES", "30"), ("FAKE_DELAY", "0.05")],
    );
    client.wait_online("agent-d", Duration::from_secs(30));
    let id = client.create_task(&json!({"action": "plan", "tf_json": {}}));
    wait_status(&client, &id, "running");
    signal(agent.proc.pid(), "-TERM");
    agent
        .proc
        .wait_line("shutting down", Duration::from_secs(10));
    // Draining: a new task is not sent to it, and the running one finishes.
    let later = client.create_task(&json!({"action": "plan", "tf_json": {}}));
    let status = wait_for("the agent to exit", LONG, || {
        agent.proc.child.try_wait().unwrap()
    });
    assert_eq!(status.code(), Some(0), "{}", agent.proc.output());
    assert_eq!(client.task(&id)["status"], "succeeded");
    assert_eq!(client.task(&later)["status"], "queued");
}

#[test]
fn a_second_sigterm_cancels_running_tasks_at_once() {
    let dir = TempDir::new("drain2");
    let (evp, ev) = events(dir.path());
    let server = Server::start(&dir.path().join("data"), 0, &[]);
    let client = server.client();
    let mut agent = Agent::start_with(
        &server.url,
        "agent-d2",
        &dir.path().join("work"),
        &slow_terraform(),
        &[],
        &[("FAKE_TF_SECONDS", "600"), ("FAKE_TF_EVENTS", ev.as_str())],
    );
    client.wait_online("agent-d2", Duration::from_secs(30));
    let id = client.create_task(&json!({"action": "apply", "tf_json": {}}));
    let pid = wait_for("terraform to start", LONG, || {
        pids(&evp, &id).first().copied()
    });
    signal(agent.proc.pid(), "-TERM");
    agent
        .proc
        .wait_line("shutting down", Duration::from_secs(10));
    assert!(alive(pid), "the first SIGTERM lets the task run");
    signal(agent.proc.pid(), "-TERM");
    let status = wait_for("the agent to exit", LONG, || {
        agent.proc.child.try_wait().unwrap()
    });
    assert_eq!(status.code(), Some(0), "{}", agent.proc.output());
    assert!(!alive(pid));
    let task = client.wait_done(&id, LONG);
    assert_eq!(task["status"], "canceled", "{task}");
    assert_eq!(
        client.log(&id, "plan").0,
        200,
        "its log was uploaded before the exit"
    );
}

#[test]
fn sigterm_stops_the_server_cleanly_and_it_comes_back_with_everything() {
    let dir = TempDir::new("server-term");
    let data = dir.path().join("data");
    let port = free_port();
    let mut server = Server::start(&data, port, &[]);
    let client = server.client();
    let agent = Agent::start(&server.url, "agent-st", &dir.path().join("work"), &[]);
    client.wait_online("agent-st", Duration::from_secs(30));
    let id = client.create_task(
        &json!({"action": "plan", "tf_json": hello_config(), "variables": {"name": "x"}}),
    );
    assert_eq!(client.wait_done(&id, LONG)["status"], "succeeded");
    signal(server.proc.pid(), "-TERM");
    let status = wait_for("the server to exit", Duration::from_secs(20), || {
        server.proc.child.try_wait().unwrap()
    });
    assert_eq!(status.code(), Some(0));
    agent
        .proc
        .wait_line("server shutting down", Duration::from_secs(10));
    let server = Server::start(&data, port, &[]);
    let client = server.client();
    assert_eq!(client.task(&id)["status"], "succeeded");
    client.wait_online("agent-st", LONG);
}

/// A small deterministic generator, seeded from the clock (the seed is printed).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next(hi - lo))
    }
}

#[test]
fn twenty_random_faults_with_tasks_in_flight_leave_no_task_stuck_and_every_log_whole() {
    let seed = std::env::var("IAC_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("chaos seed {seed} (IAC_CHAOS_SEED={seed} replays it)");
    let mut rng = Lcg(seed);
    let dir = TempDir::new("chaos");
    let data = dir.path().join("data");
    let work = dir.path().join("work");
    let port = free_port();
    let server_args = ["--ping-interval-ms", "500", "--heartbeat-ms", "500"];
    let mut server = Server::start(&data, port, &server_args);
    let client = server.client();
    let proxy = Proxy::start(port);
    let env = [("FAKE_LINES", "10"), ("FAKE_DELAY", "0.03")];
    let start_agent = || {
        Agent::start_with(
            &proxy.url(),
            "agent-chaos",
            &work,
            &slow_terraform(),
            &["--plan-limit", "3"],
            &env,
        )
    };
    let mut agent = start_agent();
    client.wait_online("agent-chaos", Duration::from_secs(30));
    let mut ids = Vec::new();
    let mut faults = Vec::new();
    for _ in 0..20 {
        for _ in 0..=rng.next(2) {
            let action = if rng.next(3) == 0 { "apply" } else { "plan" };
            ids.push(client.create_task(&json!({"action": action, "tf_json": {}})));
        }
        std::thread::sleep(rng.millis(100, 600));
        let fault = rng.next(4);
        faults.push(fault);
        match fault {
            0 => {
                proxy.cut();
                std::thread::sleep(rng.millis(300, 1500));
                proxy.restore();
            }
            1 => {
                proxy.stall();
                std::thread::sleep(rng.millis(300, 1500));
                proxy.restore();
            }
            2 => {
                server.proc.kill9();
                server = Server::start(&data, port, &server_args);
            }
            _ => {
                agent.proc.kill9();
                agent = start_agent();
            }
        }
    }
    eprintln!("faults (0 cut, 1 stall, 2 server kill, 3 agent kill): {faults:?}");
    for id in &ids {
        let t = client.wait_done(id, Duration::from_secs(180));
        let status = t["status"].as_str().unwrap();
        assert!(
            matches!(status, "succeeded" | "failed"),
            "{id}: {t}\n{}",
            agent.proc.output()
        );
        for (phase, p) in t["phases"].as_object().unwrap() {
            let ran = !matches!(
                p["status"].as_str().unwrap(),
                "skipped" | "pending" | "running"
            );
            if !ran {
                continue;
            }
            let local = std::fs::read(work.join("logs").join(id).join(format!("{phase}.log")))
                .unwrap_or_else(|e| panic!("{id} {phase}: no local log ({e}): {t}"));
            let (code, archived) = client.log(id, phase);
            assert_eq!(code, 200, "{id} {phase} was not archived: {t}");
            assert!(
                archived.as_bytes() == local.as_slice(),
                "{id} {phase}: the archived log is not the whole log"
            );
        }
    }
    let (_, running) = client.call("GET", "/api/tasks?status=running", None);
    assert_eq!(running["tasks"].as_array().unwrap().len(), 0, "{running}");
    drop(agent);
}
