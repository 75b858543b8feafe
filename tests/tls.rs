//! TLS on the one port: HTTPS and WSS with certificates made at test time; the agent
//! and `iac` trust a private CA with `--ca-cert`, and refuse anything else.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use support::*;

const LONG: Duration = Duration::from_secs(120);

fn tls_server(dir: &TempDir, cert: &std::path::Path, key: &std::path::Path) -> Server {
    Server::start(
        &dir.path().join("data"),
        0,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    )
}

/// Starts an agent that trusts the test CA against `server` and returns the line in
/// which it says why its registration failed.
fn failed_registration(dir: &TempDir, server: &Server, pki: &Pki) -> String {
    let agent = Agent::start(
        &server.url,
        "agent-x",
        &dir.path().join("work"),
        &["--ca-cert", pki.ca.to_str().unwrap()],
    );
    agent
        .proc
        .wait_line("registration failed", Duration::from_secs(30))
}

#[test]
fn the_whole_workflow_runs_over_tls_with_a_private_ca() {
    let dir = TempDir::new("tls");
    let pki = Pki::new(dir.path());
    let server = tls_server(&dir, &pki.cert, &pki.key);
    assert!(
        server.url.starts_with("https://127.0.0.1:"),
        "{}",
        server.url
    );
    let ca = pki.ca.to_str().unwrap();
    let _agent = Agent::start(
        &server.url,
        "agent-tls",
        &dir.path().join("work"),
        &["--ca-cert", ca],
    );
    let client = Client::with_ca(&server.url, API_TOKEN, Some(&pki.ca));
    client.wait_online("agent-tls", Duration::from_secs(30));
    let id = client.create_task(
        &json!({"action": "apply", "tf_json": hello_config(), "variables": {"name": "tls"}}),
    );
    let task = client.wait_done(&id, LONG);
    assert_eq!(task["status"], "succeeded", "{task}");
    assert!(strip_ansi(&client.log(&id, "apply").1).contains("greeting = \"hello tls\""));

    // Live logs over WSS, through the terminal client.
    let file = dir.path().join("hello.tf.json");
    std::fs::write(&file, hello_config().to_string()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_iac"))
        .args([
            "submit",
            file.to_str().unwrap(),
            "--var",
            "name=wss",
            "--follow",
            "--ca-cert",
            ca,
        ])
        .env("IAC_SERVER", &server.url)
        .env("IAC_API_TOKEN", API_TOKEN)
        .output()
        .unwrap();
    let stdout = strip_ansi(&String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("+ greeting = \"hello wss\""), "{stdout}");

    // No plain text on the TLS port.
    let plain = server.url.replacen("https://", "http://", 1);
    let mut s = std::net::TcpStream::connect(plain.trim_start_matches("http://")).unwrap();
    use std::io::{Read, Write};
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert!(
        !String::from_utf8_lossy(&answer).contains("200 OK"),
        "plain HTTP must not be served"
    );
    // Without the CA, the terminal client refuses the server and says why.
    let out = Command::new(env!("CARGO_BIN_EXE_iac"))
        .args(["tasks"])
        .env("IAC_SERVER", &server.url)
        .env("IAC_API_TOKEN", API_TOKEN)
        .env_remove("IAC_CA_CERT")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--ca-cert"), "{err}");
}

#[test]
fn the_agent_refuses_a_server_certificate_from_another_ca() {
    let dir = TempDir::new("tls-other-ca");
    let pki = Pki::new(dir.path());
    let server = tls_server(&dir, &pki.other_ca_cert, &pki.other_ca_key);
    let line = failed_registration(&dir, &server, &pki);
    assert!(
        line.contains("not signed by a CA this side trusts"),
        "{line}"
    );
    // A client that does trust that CA sees no agent: nothing got through.
    let other_ca = dir.path().join("other-ca.pem");
    assert!(Client::with_ca(&server.url, API_TOKEN, Some(&other_ca))
        .agents()
        .is_empty());
}

#[test]
fn the_agent_refuses_a_certificate_for_another_host_name() {
    let dir = TempDir::new("tls-name");
    let pki = Pki::new(dir.path());
    let server = tls_server(&dir, &pki.wrong_name_cert, &pki.wrong_name_key);
    let line = failed_registration(&dir, &server, &pki);
    assert!(line.contains("not for the host name"), "{line}");
}

#[test]
fn with_a_client_ca_only_agents_holding_a_certificate_from_it_get_in() {
    let dir = TempDir::new("mtls");
    let pki = Pki::new(dir.path());
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let server = Server::start(
        &dir.path().join("data"),
        0,
        &[
            "--tls-cert",
            &path(&pki.cert),
            "--tls-key",
            &path(&pki.key),
            "--client-ca",
            &path(&pki.client_ca),
        ],
    );
    let ca = path(&pki.ca);
    // Without a certificate: refused, with what to do, and the agent stops.
    let bare = Agent::start(
        &server.url,
        "agent-bare",
        &dir.path().join("work-bare"),
        &["--ca-cert", &ca],
    );
    let line = bare
        .proc
        .wait_line("refused the registration", Duration::from_secs(30));
    assert!(
        line.contains("403") && line.contains("--client-cert"),
        "{line}"
    );
    // With one from another CA: the handshake fails, and the agent says why.
    let rogue = Agent::start(
        &server.url,
        "agent-rogue",
        &dir.path().join("work-rogue"),
        &[
            "--ca-cert",
            &ca,
            "--client-cert",
            &path(&pki.rogue_client_cert),
            "--client-key",
            &path(&pki.rogue_client_key),
        ],
    );
    let line = rogue
        .proc
        .wait_line("registration failed", Duration::from_secs(30));
    assert!(line.contains("--client-cert"), "{line}");
    // With its certificate, the agent does everything: WS 1, a real Terraform run, the
    // live log over WS 3 (followed by `iac`, which needs no certificate), the uploads.
    let _agent = Agent::start(
        &server.url,
        "agent-m",
        &dir.path().join("work"),
        &[
            "--ca-cert",
            &ca,
            "--client-cert",
            &path(&pki.client_cert),
            "--client-key",
            &path(&pki.client_key),
        ],
    );
    let client = Client::with_ca(&server.url, API_TOKEN, Some(&pki.ca));
    client.wait_online("agent-m", Duration::from_secs(30));
    let file = dir.path().join("hello.tf.json");
    std::fs::write(&file, hello_config().to_string()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_iac"))
        .args([
            "submit",
            file.to_str().unwrap(),
            "--action",
            "apply",
            "--var",
            "name=mtls",
            "--follow",
            "--ca-cert",
            &ca,
        ])
        .env("IAC_SERVER", &server.url)
        .env("IAC_API_TOKEN", API_TOKEN)
        .output()
        .unwrap();
    let stdout = strip_ansi(&String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("greeting = \"hello mtls\""), "{stdout}");
    let (_, tasks) = client.call("GET", "/api/tasks", None);
    let id = tasks["tasks"][0]["task_id"].as_str().unwrap();
    assert!(strip_ansi(&client.log(id, "apply").1).contains("Apply complete!"));
    let names: Vec<String> = client
        .agents()
        .iter()
        .map(|a| a["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["agent-m"], "no other agent got in");
    // An agent endpoint asked without a certificate, even with a valid token: 403.
    let (status, body) = client.raw(
        "POST",
        "/agents/register",
        Some(REG_TOKEN),
        Some(r#"{"name":"x","hostname":"x","version":"0","plan_limit":1,"labels":{}}"#),
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("mutual TLS"), "{body}");
}
