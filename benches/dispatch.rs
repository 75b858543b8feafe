//! Figures, not pass/fail: how fast a task reaches an agent, and what an idle connected
//! agent costs. Run with `cargo bench --bench dispatch`; it prints:
//! - dispatch latency: `POST /api/tasks` sent → the agent logs "accepted" (p50, p99, max);
//! - idle cost: CPU time of the server and the agent over an idle window with WS 1 open,
//!   and their resident memory.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use support::*;

/// Seconds since midnight UTC of an RFC 3339 timestamp at the start of a log line.
fn day_secs(line: &str) -> Option<f64> {
    let t = line.split_whitespace().next()?;
    let time = t.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

fn now_day_secs() -> f64 {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    (d.as_secs() % 86_400) as f64 + f64::from(d.subsec_nanos()) / 1e9
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let dir = TempDir::new("bench");
    let server = Server::start(&dir.path().join("data"), 0, &["--log-level", "info"]);
    let client = server.client();
    let events = dir.path().join("events");
    let slow =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/slow-terraform");
    let agent = Agent::start_with(
        &server.url,
        "bench-agent",
        &dir.path().join("work"),
        &slow,
        &["--plan-limit", "4"],
        &[
            ("FAKE_TF_EVENTS", events.to_str().unwrap()),
            ("FAKE_TF_SECONDS", "0"),
        ],
    );
    client.wait_online("bench-agent", Duration::from_secs(30));

    let n = 50;
    let mut lat_ms = Vec::new();
    for _ in 0..n {
        let sent = now_day_secs();
        let id = client.create_task(&json!({"action": "plan", "tf_json": {}}));
        let line = agent
            .proc
            .wait_line(&format!("accepted {id} "), Duration::from_secs(30));
        let accepted = day_secs(&line).expect("timestamped log line");
        lat_ms.push((accepted - sent) * 1000.0);
        client.wait_done(&id, Duration::from_secs(30));
    }
    lat_ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| lat_ms[((lat_ms.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "dispatch latency (POST /api/tasks -> agent accepted), {n} tasks: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        pct(0.5),
        pct(0.99),
        lat_ms[lat_ms.len() - 1]
    );

    let window = Duration::from_secs(10);
    let (s0, a0) = (cpu_ticks(server.proc.pid()), cpu_ticks(agent.proc.pid()));
    std::thread::sleep(window); // a measurement window, not synchronisation
    let (s1, a1) = (cpu_ticks(server.proc.pid()), cpu_ticks(agent.proc.pid()));
    println!(
        "idle over {} s with WS 1 open (heartbeat 5 s): server {} ticks, agent {} ticks (1 tick = 10 ms)",
        window.as_secs(),
        s1 - s0,
        a1 - a0
    );
    println!(
        "resident memory: server {} KiB, agent {} KiB",
        rss_kib(server.proc.pid()),
        rss_kib(agent.proc.pid())
    );
}
