//! Sensitive variables: their values never show in the archived log, the live stream,
//! the API, or either process's own log; even when written in two pieces.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

const SECRET: &str = "s3cret-pw-0123456789-abcdef";

#[test]
fn a_sensitive_value_split_across_writes_is_masked_everywhere() {
    let dir = TempDir::new("secrets");
    let server = Server::start(&dir.path().join("data"), 0, &[]);
    let client = server.client();
    let work = dir.path().join("work");
    let agent = Agent::start_with(
        &server.url,
        "agent-sec",
        &work,
        &slow_terraform(),
        &[],
        &[
            ("FAKE_PRINT_VARS", "1"),
            ("FAKE_LINES", "20"),
            ("FAKE_DELAY", "0.05"),
        ],
    );
    client.wait_online("agent-sec", Duration::from_secs(30));
    let id = client.create_task(&json!({
        "action": "plan",
        "tf_json": {},
        "variables": {"db_password": SECRET, "region": "eu-west-1"},
        "sensitive_variables": ["db_password"]
    }));
    let viewer = Viewer::connect(&server, &id, false);
    let task = client.wait_done(&id, Duration::from_secs(120));
    assert_eq!(task["status"], "succeeded", "{task}");
    assert_eq!(task["sensitive_variables"], json!(["db_password"]));
    assert!(!task.to_string().contains(SECRET));
    viewer.wait_closed(Duration::from_secs(30));

    let (_, log) = client.log(&id, "plan");
    assert!(log.contains("***"), "the value was printed, masked: {log}");
    assert!(
        log.contains("eu-west-1"),
        "other variables are left alone: {log}"
    );
    let live = viewer.texts().join("\n");
    let local = std::fs::read_to_string(work.join("logs").join(&id).join("plan.log")).unwrap();
    for (what, text) in [
        ("archived log", log.as_str()),
        ("live stream", live.as_str()),
        ("agent's file", local.as_str()),
        ("server's log", &server.proc.output()),
        ("agent's log", &agent.proc.output()),
    ] {
        assert!(!text.contains(SECRET), "the secret shows in the {what}");
        assert!(
            !text.contains(&SECRET[..12]),
            "a piece of the secret shows in the {what}"
        );
    }
    assert!(live.contains("***"));
    assert!(
        !work.join("tasks").join(&id).exists(),
        "terraform.tfvars.json went with the task dir"
    );
}
