//! The whole workflow with the real binaries and a real Terraform: plan, plan+apply,
//! a broken configuration, labels, and the concurrency rules (with a slow stand-in).

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

const TASK_TIME: Duration = Duration::from_secs(120);

struct Setup {
    _dir: TempDir,
    server: Server,
    _agent: Agent,
    client: Client,
}

fn setup(name: &str, agent_args: &[&str]) -> Setup {
    let dir = TempDir::new(name);
    let server = Server::start(&dir.path().join("data"), 0, &[]);
    let agent = Agent::start(&server.url, "agent-1", &dir.path().join("work"), agent_args);
    let client = server.client();
    client.wait_online("agent-1", Duration::from_secs(30));
    Setup {
        _dir: dir,
        server,
        _agent: agent,
        client,
    }
}

#[test]
fn a_plan_task_succeeds_with_the_plan_in_its_archived_log() {
    let s = setup("plan", &[]);
    let id = s.client.create_task(&json!({
        "action": "plan", "tf_json": hello_config(), "variables": {"name": "world"}
    }));
    let task = s.client.wait_done(&id, TASK_TIME);
    assert_eq!(
        task["status"],
        "succeeded",
        "{task}\n{}",
        s.server.proc.output()
    );
    assert_eq!(task["exit_code"], 0);
    assert_eq!(task["phases"]["plan"]["status"], "succeeded");
    assert!(
        task["phases"].get("apply").is_none(),
        "a plan task has no apply phase: {task}"
    );
    for field in ["created_at", "started_at", "finished_at"] {
        assert!(
            task[field].as_str().unwrap().ends_with('Z'),
            "{field}: {task}"
        );
    }
    let (status, log) = s.client.log(&id, "plan");
    assert_eq!(status, 200);
    let log = strip_ansi(&log);
    assert!(
        log.contains("Terraform has been successfully initialized"),
        "{log}"
    );
    assert!(log.contains("greeting = \"hello world\""), "{log}");
    assert_eq!(
        task["phases"]["plan"]["log_bytes"].as_u64().unwrap() as usize,
        s.client.log(&id, "plan").1.len()
    );
    let (status, err) = s
        .client
        .call("GET", &format!("/api/tasks/{id}/logs/apply"), None);
    assert_eq!(status, 404, "{err}");
    assert!(
        err["error"].as_str().unwrap().contains("no apply phase"),
        "{err}"
    );
}

#[test]
fn an_apply_task_archives_both_logs_and_the_output() {
    let s = setup("apply", &[]);
    let id = s.client.create_task(&json!({
        "action": "apply",
        "tf_json": hello_config().to_string(),
        "variables": json!({"name": "apply"}).to_string()
    }));
    let task = s.client.wait_done(&id, TASK_TIME);
    assert_eq!(task["status"], "succeeded", "{task}");
    assert_eq!(task["phases"]["plan"]["status"], "succeeded");
    assert_eq!(task["phases"]["apply"]["status"], "succeeded");
    let plan = strip_ansi(&s.client.log(&id, "plan").1);
    assert!(
        plan.contains("$ terraform plan -input=false -out=tfplan"),
        "{plan}"
    );
    assert!(plan.contains("+ greeting = \"hello apply\""), "{plan}");
    let (status, apply) = s.client.log(&id, "apply");
    assert_eq!(status, 200);
    let apply = strip_ansi(&apply);
    assert!(apply.contains("Apply complete!"), "{apply}");
    assert!(apply.contains("greeting = \"hello apply\""), "{apply}");
    // The task directory (with the 0600 variables file) is gone; the logs stay.
    let work = s._agent.work_dir.clone();
    assert!(!work.join("tasks").join(&id).exists());
    assert!(work.join("logs").join(&id).join("apply.log").exists());
}

#[test]
fn a_broken_configuration_fails_and_skips_the_apply() {
    let s = setup("broken", &[]);
    let id = s.client.create_task(&json!({
        "action": "apply",
        "tf_json": {"output": {"x": {"value": "${var.missing}"}}}
    }));
    let task = s.client.wait_done(&id, TASK_TIME);
    assert_eq!(task["status"], "failed", "{task}");
    assert_ne!(task["exit_code"], 0);
    assert_eq!(task["phases"]["plan"]["status"], "failed");
    assert_eq!(task["phases"]["apply"]["status"], "skipped");
    let plan = strip_ansi(&s.client.log(&id, "plan").1);
    assert!(
        plan.contains("Reference to undeclared input variable"),
        "{plan}"
    );
    assert_eq!(
        s.client.log(&id, "apply").0,
        404,
        "a skipped phase has no log"
    );
}

#[test]
fn a_labelled_task_waits_for_an_agent_with_those_labels() {
    let s = setup("labels", &["--label", "zone=lan"]);
    let id = s.client.create_task(&json!({
        "action": "plan", "tf_json": hello_config(), "variables": {"name": "dmz"},
        "labels": {"zone": "dmz"}
    }));
    // A plan with no labels runs on agent-1 meanwhile: dispatch is working, and the
    // labelled task is still queued after it.
    let other = s.client.create_task(
        &json!({"action": "plan", "tf_json": hello_config(), "variables": {"name": "x"}}),
    );
    assert_eq!(s.client.wait_done(&other, TASK_TIME)["status"], "succeeded");
    assert_eq!(s.client.task(&id)["status"], "queued");
    let dir = TempDir::new("labels-agent2");
    let _dmz = Agent::start(
        &s.server.url,
        "agent-dmz",
        dir.path(),
        &["--label", "zone=dmz", "--label", "os=linux"],
    );
    let task = s.client.wait_done(&id, TASK_TIME);
    assert_eq!(task["status"], "succeeded", "{task}");
    let dmz = s.client.wait_online("agent-dmz", Duration::from_secs(10));
    assert_eq!(task["agent_id"], dmz["agent_id"]);
    assert_eq!(dmz["labels"], json!({"zone": "dmz", "os": "linux"}));
}

#[test]
fn a_queued_task_can_be_canceled() {
    let s = setup("cancel", &[]);
    let id = s.client.create_task(&json!({
        "action": "plan", "tf_json": hello_config(), "labels": {"nobody": "has-this"}
    }));
    let (status, task) = s
        .client
        .call("POST", &format!("/api/tasks/{id}/cancel"), None);
    assert_eq!(status, 200, "{task}");
    assert_eq!(task["status"], "canceled");
    assert!(task["finished_at"].is_string());
    let (status, err) = s
        .client
        .call("POST", &format!("/api/tasks/{id}/cancel"), None);
    assert_eq!(status, 409, "{err}");
    let (_, list) = s.client.call("GET", "/api/tasks?status=canceled", None);
    assert_eq!(list["tasks"][0]["task_id"], id.as_str());
}

#[test]
fn a_running_task_is_canceled_on_its_agent() {
    let dir = TempDir::new("cancel-running");
    let server = Server::start(&dir.path().join("data"), 0, &[]);
    let client = server.client();
    let events = dir.path().join("events");
    let slow =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/slow-terraform");
    let _agent = Agent::start_with(
        &server.url,
        "agent-cancel",
        &dir.path().join("work"),
        &slow,
        &[],
        &[
            ("FAKE_TF_EVENTS", events.to_str().unwrap()),
            ("FAKE_TF_SECONDS", "600"),
        ],
    );
    let id = client.create_task(&json!({"action": "apply", "tf_json": {}}));
    wait_for("terraform to start", Duration::from_secs(30), || {
        std::fs::read_to_string(&events)
            .ok()
            .filter(|t| t.contains("start"))
            .map(|_| ())
    });
    let (status, task) = client.call("POST", &format!("/api/tasks/{id}/cancel"), None);
    assert_eq!(status, 202, "{task}");
    let task = client.wait_done(&id, Duration::from_secs(60));
    assert_eq!(task["status"], "canceled", "{task}");
    assert_eq!(task["phases"]["plan"]["status"], "canceled", "{task}");
    assert_eq!(task["phases"]["apply"]["status"], "skipped", "{task}");
    let (status, log) = client.log(&id, "plan");
    assert_eq!(status, 200, "the interrupted phase's log is archived");
    assert!(log.contains("$ terraform init"), "{log}");
}

/// With `--plan-limit 2`, 5 plans and 1 apply: at most 2 plans at once, the apply alone.
#[test]
fn the_concurrency_rules_hold() {
    let dir = TempDir::new("rules");
    let server = Server::start(&dir.path().join("data"), 0, &[]);
    let client = server.client();
    let events = dir.path().join("events");
    std::fs::write(&events, "").unwrap();
    let slow =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/slow-terraform");
    // Queue everything first, so the agent meets a full queue: P P A P P P.
    let actions = ["plan", "plan", "apply", "plan", "plan", "plan"];
    let ids: Vec<String> = actions
        .iter()
        .map(|a| client.create_task(&json!({"action": a, "tf_json": {}})))
        .collect();
    let _agent = Agent::start_with(
        &server.url,
        "agent-rules",
        &dir.path().join("work"),
        &slow,
        &["--plan-limit", "2"],
        &[
            ("FAKE_TF_EVENTS", events.to_str().unwrap()),
            ("FAKE_TF_SECONDS", "0.3"),
        ],
    );
    for id in &ids {
        assert_eq!(client.wait_done(id, TASK_TIME)["status"], "succeeded");
    }
    // Replay the stand-in's start/end records: a task is active from its first command's
    // start to its last command's end.
    let text = std::fs::read_to_string(&events).unwrap();
    let apply_id = &ids[2];
    let last_cmd = |id: &str| if id == apply_id { "apply" } else { "plan" };
    let mut active: Vec<String> = Vec::new();
    let mut max_plans = 0;
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let (kind, id, cmd) = (parts[0], parts[1], parts[2]);
        match kind {
            "start" => {
                if !active.iter().any(|a| a == id) {
                    active.push(id.to_string());
                }
                let apply_active = active.iter().any(|a| a == apply_id);
                assert!(
                    !apply_active || active.len() == 1,
                    "the apply ran beside {active:?}\n{text}"
                );
                let plans = active.iter().filter(|a| *a != apply_id).count();
                assert!(plans <= 2, "{plans} plans at once: {active:?}\n{text}");
                max_plans = max_plans.max(plans);
            }
            "end" if cmd == last_cmd(id) => active.retain(|a| a != id),
            _ => {}
        }
    }
    assert_eq!(max_plans, 2, "plans should run two at a time\n{text}");
    // Every task ran: 5 plans × (init, plan) + the apply's init, plan and apply.
    assert_eq!(
        text.lines().filter(|l| l.starts_with("start")).count(),
        13,
        "{text}"
    );
}
