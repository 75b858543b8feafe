//! The web UI end to end in a real headless Chromium (Debian's, through chromedriver),
//! against the real server and agent (with the stand-in Terraform where timing matters).
//! Screenshots of the agents page and of a live log go to `target/screenshots/`.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use support::webdriver::Browser;
use support::*;

const LONG: Duration = Duration::from_secs(60);

fn screenshots() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/screenshots")
}

#[test]
fn a_user_signs_in_watches_a_task_live_reads_its_log_and_cancels_another() {
    let dir = TempDir::new("web-ui");
    let server = Server::start(&dir.path().join("data"), 0, &[]);
    let client = server.client();
    let _agent = Agent::start_with(
        &server.url,
        "agent-web",
        &dir.path().join("work"),
        &slow_terraform(),
        &["--label", "zone=lab"],
        &[("FAKE_LINES", "80"), ("FAKE_DELAY", "0.05")],
    );
    client.wait_online("agent-web", Duration::from_secs(30));
    let b = Browser::start();

    // A wrong token is refused with a message; the right one signs in.
    b.go(&server.url);
    b.type_into("#token", "not-the-token-000");
    b.click("#signin");
    let msg = b.wait_text("#signin-error", "refused", LONG);
    assert!(msg.contains("api-token"), "{msg}");
    b.type_into("#token", API_TOKEN);
    b.click("#signin");
    b.wait("#tasks");

    // The agent, online, with its slots and labels.
    b.go(&format!("{}/#/agents", server.url));
    let row = b.wait_text("[data-agent=agent-web]", "online", LONG);
    assert!(row.contains("zone=lab") && row.contains("0 / "), "{row}");
    b.screenshot(&screenshots().join("agents.png"));

    // The form checks the JSON before sending it.
    b.go(&format!("{}/#/new", server.url));
    b.type_into("#tf-json", "{not json");
    b.click("#create");
    b.wait_text("#form-error", "not valid JSON", LONG);
    // A plan task through the form; its page follows it live.
    b.type_into("#tf-json", r#"{"output": {"x": {"value": "y"}}}"#);
    b.click("#create");
    b.wait("#task-status");
    let id = b
        .js("return location.hash.split('/')[2]")
        .as_str()
        .unwrap()
        .to_string();
    wait_for("live lines while the task runs", LONG, || {
        let lines = b
            .js("return Number(document.getElementById('log').dataset.lines || 0)")
            .as_u64()?;
        let status = client.task(&id)["status"].as_str()?.to_string();
        (lines >= 10 && status == "running").then_some(())
    });
    assert_eq!(b.text("#log-mode").unwrap(), "live");
    b.screenshot(&screenshots().join("live-log.png"));
    b.wait_text("#task-status", "succeeded", LONG);
    b.wait_text("#log", "the task ended", LONG);
    let log = b.text("#log").unwrap();
    assert!(log.contains("plan line 79"), "every line arrived: {log}");
    assert!(!log.contains("plan line 80"));

    // Opened again, the finished task shows its archived log.
    b.go(&format!("{}/#/tasks", server.url));
    b.wait(&format!("[data-task='{id}']"));
    b.go(&format!("{}/#/tasks/{id}", server.url));
    b.wait_text("#log-mode", "archived", LONG);
    b.wait_text("#log", "plan line 79", LONG);
    assert!(b
        .text("[data-phase=plan]")
        .unwrap()
        .contains("download log"));
    // Downloading a log works; one that does not exist gives the server's message.
    let download = |phase: &str| {
        b.js(&format!(
            "return download('{id}', '{phase}').then(() => 'downloaded', (e) => 'error ' + e.status)"
        ))
    };
    assert_eq!(download("plan"), "downloaded");
    assert_eq!(download("apply"), "error 404");

    // Cancel a running task from its page.
    let slow = client.create_task(
        &json!({"action": "apply", "tf_json": {}, "variables": {"fake_seconds": 600}}),
    );
    b.go(&format!("{}/#/tasks/{slow}", server.url));
    b.wait_text("#task-status", "running", LONG);
    b.click("#cancel");
    b.wait_text("#task-status", "canceled", LONG);
    assert_eq!(client.task(&slow)["status"], "canceled");

    // The task list shows both, filtered by status.
    b.go(&format!("{}/#/tasks", server.url));
    b.wait(&format!("[data-task='{slow}']"));
    let all = b.text("#tasks").unwrap();
    assert!(all.contains(&id) && all.contains(&slow), "{all}");

    // Signing out forgets the token.
    b.click("#signout");
    b.wait("#token");
    assert_eq!(
        b.js("return localStorage.getItem('iac.apiToken')"),
        serde_json::Value::Null
    );
}

#[test]
fn a_log_of_tens_of_mb_renders_in_frames_while_the_page_stays_usable() {
    let dir = TempDir::new("web-ui-big");
    let server = Server::start(&dir.path().join("data"), 0, &[]);
    let client = server.client();
    let _agent = Agent::start_with(
        &server.url,
        "agent-big",
        &dir.path().join("work"),
        &slow_terraform(),
        &[],
        &[("FAKE_BULK", "300000")],
    );
    client.wait_online("agent-big", Duration::from_secs(30));
    let id = client.create_task(&json!({"action": "plan", "tf_json": {}}));
    assert_eq!(client.wait_done(&id, LONG)["status"], "succeeded");
    let (code, log) = client.log(&id, "plan");
    assert_eq!(code, 200);
    assert!(log.len() > 30_000_000, "{} bytes", log.len());
    let total = log.lines().count() as u64;

    let b = Browser::start();
    b.go(&server.url);
    b.type_into("#token", API_TOKEN);
    b.click("#signin");
    b.wait("#tasks");
    // The page notes its longest main-thread task (Chromium reports those over 50 ms).
    b.js(
        "window.longest = 0; new PerformanceObserver((l) => { for (const e of l.getEntries()) \
          window.longest = Math.max(window.longest, e.duration); }).observe({ type: 'longtask' });",
    );
    b.js(&format!("location.hash = '#/tasks/{id}'"));
    let rendered = "const l = document.getElementById('log'); \
                    return l ? Number(l.dataset.lines || 0) : 0";
    // The page answers scripts while the log is still being rendered: the work is cut
    // in frames, not done in one go.
    let mut partial = None;
    wait_for("every line of the log rendered", LONG, || {
        let n = b.js(rendered).as_u64()?;
        if n > 0 && n < total {
            partial.get_or_insert(n);
        }
        (n == total).then_some(())
    });
    assert!(
        partial.is_some(),
        "the page never answered while it rendered"
    );
    // Figures, not bounds: the longest main-thread task and the JS heap.
    eprintln!(
        "a {} MiB log: {} lines; the page answered at {} lines; longest main-thread task {} ms; JS heap {} MiB",
        log.len() >> 20,
        total,
        partial.unwrap(),
        b.js("return Math.round(window.longest)"),
        b.js("return performance.memory ? Math.round(performance.memory.usedJSHeapSize / 1048576) : -1")
    );
    // Its first and last lines are there, and the end can be scrolled to.
    let first = b.js("return document.querySelector('#log .blk div').textContent");
    assert_eq!(first.as_str(), log.lines().next());
    let last = b.js(
        "const l = document.getElementById('log'); l.scrollTop = l.scrollHeight; \
         const bs = l.querySelectorAll('.blk'); return bs[bs.length - 1].lastChild.textContent",
    );
    assert_eq!(last.as_str(), log.lines().last());
    // And the page still works.
    b.click("a[href='#/tasks']");
    b.wait(&format!("[data-task='{id}']"));
}
