//! `iac`, the terminal client: every command is a call of the public API (HTTP, and WS 2
//! for `--follow`), with the server's own error messages passed through.

use std::fmt::Write as _;
use std::io::{self, Write};
use std::time::Duration;

use serde_json::{json, Value};
use tungstenite::client::ClientRequestBuilder;
use tungstenite::Message;

use crate::cli::Failure;
use crate::protocol::{AgentList, TaskList, TaskView, APPLY_MARKER};
use crate::util::ServerUrl;

pub const USAGE: &str = "\
iac: the IAC terminal client

Usage: iac [--server URL] [--token TOKEN] COMMAND [ARGS]

Commands:
  submit FILE.tf.json [--var k=v]... [--action plan|apply] [--label k=v]... [--follow]
                      create a task (default action: plan); print its id, or with
                      --follow its live log and then its result
  tasks [--status S]  list tasks, newest first
  show ID             one task, as JSON
  logs ID [--phase plan|apply] [--follow]
                      the archived logs (both phases by default), or follow it live
  agents              list agents
  cancel ID           cancel a queued or running task

  --server URL        the server (environment: IAC_SERVER; default http://127.0.0.1:8080)
  --token TOKEN       the API token (environment: IAC_API_TOKEN)
  --ca-cert PEM       trust this CA besides the system roots, for https:// (IAC_CA_CERT)
  --version           print the version

--var values that are JSON (numbers, true/false, lists, objects) are passed as such,
anything else as a string. With --follow the exit code is 0 when the task succeeded
and 1 when it did not.
";

/// A parsed command line.
#[derive(Debug, Default, PartialEq)]
struct Args {
    server: Option<String>,
    token: Option<String>,
    ca_cert: Option<String>,
    command: String,
    positional: Vec<String>,
    vars: Vec<String>,
    labels: Vec<String>,
    action: Option<String>,
    phase: Option<String>,
    status: Option<String>,
    follow: bool,
    help: bool,
    version: bool,
}

fn parse(args: &[String]) -> Result<Args, String> {
    let mut a = Args::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let value = |it: &mut std::slice::Iter<'_, String>| {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match name {
            "--server" => a.server = Some(value(&mut it)?),
            "--token" => a.token = Some(value(&mut it)?),
            "--ca-cert" => a.ca_cert = Some(value(&mut it)?),
            "--var" => a.vars.push(value(&mut it)?),
            "--label" => a.labels.push(value(&mut it)?),
            "--action" => a.action = Some(value(&mut it)?),
            "--phase" => a.phase = Some(value(&mut it)?),
            "--status" => a.status = Some(value(&mut it)?),
            "--follow" | "-f" => a.follow = true,
            "--version" => a.version = true,
            "--help" | "-h" => a.help = true,
            n if n.starts_with('-') => return Err(format!("unknown flag {n} (see iac --help)")),
            _ if a.command.is_empty() => a.command = arg.clone(),
            _ => a.positional.push(arg.clone()),
        }
    }
    Ok(a)
}

/// `k=v` pairs; a value that parses as JSON (other than a bare string) keeps its type.
fn parse_vars(items: &[String], typed: bool) -> Result<serde_json::Map<String, Value>, String> {
    let mut map = serde_json::Map::new();
    for item in items {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?} must be KEY=VALUE"))?;
        if k.is_empty() {
            return Err(format!("{item:?} has an empty key"));
        }
        let value = match serde_json::from_str::<Value>(v) {
            Ok(j) if typed && !j.is_string() => j,
            _ => Value::String(v.to_string()),
        };
        map.insert(k.to_string(), value);
    }
    Ok(map)
}

/// Runs the client with `args` (without the program name).
pub fn main(args: &[String]) -> Result<(), Failure> {
    let a = parse(args).map_err(Failure::Usage)?;
    if a.version {
        println!("iac {}", crate::VERSION);
        return Ok(());
    }
    if a.help || a.command.is_empty() {
        print!("{USAGE}");
        return if a.help {
            Ok(())
        } else {
            Err(Failure::Usage("no command given".into()))
        };
    }
    let server = a
        .server
        .clone()
        .or_else(|| std::env::var("IAC_SERVER").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let token = a
        .token
        .clone()
        .or_else(|| {
            std::env::var("IAC_API_TOKEN")
                .ok()
                .filter(|s| !s.is_empty())
        })
        .ok_or_else(|| Failure::Usage("an API token is needed: --token or IAC_API_TOKEN".into()))?;
    let ca = a
        .ca_cert
        .clone()
        .or_else(|| std::env::var("IAC_CA_CERT").ok().filter(|s| !s.is_empty()));
    let api = Api::new(
        ServerUrl::parse(&server).map_err(Failure::Usage)?,
        token,
        ca.as_deref(),
    )
    .map_err(Failure::Usage)?;
    let one = |what: &str| -> Result<String, Failure> {
        match a.positional.as_slice() {
            [id] => Ok(id.clone()),
            _ => Err(Failure::Usage(format!(
                "{} takes exactly one {what}",
                a.command
            ))),
        }
    };
    match a.command.as_str() {
        "submit" => submit(&api, &a, &one("file")?),
        "tasks" => tasks(&api, a.status.as_deref()),
        "show" => {
            let v = api.get(&format!("/api/tasks/{}", one("task id")?))?;
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            Ok(())
        }
        "logs" => {
            let id = one("task id")?;
            if a.follow {
                follow(&api, &id)
            } else {
                logs(&api, &id, a.phase.as_deref())
            }
        }
        "agents" => agents(&api),
        "cancel" => {
            let id = one("task id")?;
            let v = api.call(
                "POST",
                &format!("/api/tasks/{id}/cancel"),
                Some(String::new()),
            )?;
            let t: TaskView = from_value(v)?;
            let how = if t.status.is_terminal() {
                ""
            } else {
                " (cancel sent to its agent)"
            };
            println!("{} {}{how}", t.task_id, t.status);
            Ok(())
        }
        other => Err(Failure::Usage(format!(
            "unknown command {other:?} (see iac --help)"
        ))),
    }
}

fn runtime(e: impl std::fmt::Display) -> Failure {
    Failure::Runtime(e.to_string())
}

fn from_value<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, Failure> {
    serde_json::from_value(v)
        .map_err(|e| runtime(format!("unexpected answer from the server: {e}")))
}

/// The public API over HTTP.
struct Api {
    url: ServerUrl,
    token: String,
    http: ureq::Agent,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl Api {
    fn new(url: ServerUrl, token: String, ca: Option<&str>) -> Result<Api, String> {
        let roots = if url.tls {
            crate::tls::roots(ca.map(std::path::Path::new))?
        } else {
            Vec::new()
        };
        let tls = if url.tls {
            Some(crate::tls::client_config(&roots, None)?)
        } else {
            None
        };
        let http = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .tls_config(crate::tls::ureq_config(&roots, None))
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(60)))
                .user_agent(format!("iac/{}", crate::VERSION))
                .build(),
        );
        Ok(Api {
            url,
            token,
            http,
            tls,
        })
    }

    /// A request; the answer's body, or the server's error message.
    fn raw(&self, method: &str, path: &str, body: Option<String>) -> Result<String, Failure> {
        let mut text = Vec::new();
        self.send(method, path, body, &mut text)?;
        String::from_utf8(text).map_err(|_| runtime("the server's answer is not UTF-8"))
    }

    /// A request whose answer body is copied to `out` as it arrives (logs can be large).
    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
        out: &mut dyn Write,
    ) -> Result<(), Failure> {
        let url = self.url.http(path);
        let auth = format!("Bearer {}", self.token);
        let result = match (method, body) {
            ("POST", body) => self
                .http
                .post(&url)
                .header("Authorization", &auth)
                .header("Content-Type", "application/json")
                .send(body.unwrap_or_default()),
            (_, _) => self.http.get(&url).header("Authorization", &auth).call(),
        };
        let mut resp = result
            .map_err(|e| runtime(format!("cannot reach {url}: {}", crate::tls::describe(&e))))?;
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            let mut reader = resp.body_mut().as_reader();
            io::copy(&mut reader, out).map_err(|e| runtime(format!("reading {url}: {e}")))?;
            return Ok(());
        }
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let msg = crate::protocol::error_message(&text);
        Err(runtime(format!("{msg} (HTTP {status})")))
    }

    fn call(&self, method: &str, path: &str, body: Option<String>) -> Result<Value, Failure> {
        let text = self.raw(method, path, body)?;
        serde_json::from_str(&text)
            .map_err(|e| runtime(format!("unexpected answer from the server: {e}")))
    }

    fn get(&self, path: &str) -> Result<Value, Failure> {
        self.call("GET", path, None)
    }
}

fn submit(api: &Api, a: &Args, file: &str) -> Result<(), Failure> {
    let text =
        std::fs::read_to_string(file).map_err(|e| runtime(format!("cannot read {file}: {e}")))?;
    let tf_json: Value = serde_json::from_str(&text)
        .map_err(|e| Failure::Usage(format!("{file} is not valid JSON: {e}")))?;
    let action = a.action.clone().unwrap_or_else(|| "plan".into());
    if action != "plan" && action != "apply" {
        return Err(Failure::Usage(format!(
            "--action must be plan or apply, not {action:?}"
        )));
    }
    let body = json!({
        "action": action,
        "tf_json": tf_json,
        "variables": parse_vars(&a.vars, true).map_err(Failure::Usage)?,
        "labels": parse_vars(&a.labels, false).map_err(Failure::Usage)?,
    });
    let t: TaskView = from_value(api.call("POST", "/api/tasks", Some(body.to_string()))?)?;
    if !a.follow {
        println!("{}", t.task_id);
        return Ok(());
    }
    eprintln!("task {} {}", t.task_id, t.status);
    follow(api, &t.task_id)
}

fn tasks(api: &Api, status: Option<&str>) -> Result<(), Failure> {
    let path = match status {
        Some(s) => format!("/api/tasks?status={s}"),
        None => "/api/tasks".into(),
    };
    let list: TaskList = from_value(api.get(&path)?)?;
    let mut out = format!(
        "{:<12} {:<10} {:<7} {:<10} {:<21} {}\n",
        "TASK", "STATUS", "ACTION", "AGENT", "CREATED", "LABELS"
    );
    for t in list.tasks {
        let labels: Vec<String> = t.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(
            out,
            "{:<12} {:<10} {:<7} {:<10} {:<21} {}",
            t.task_id,
            t.status,
            t.action.as_str(),
            t.agent_id.unwrap_or_else(|| "-".into()),
            t.created_at,
            labels.join(",")
        );
    }
    print!("{out}");
    Ok(())
}

fn agents(api: &Api) -> Result<(), Failure> {
    let list: AgentList = from_value(api.get("/api/agents")?)?;
    let mut out = format!(
        "{:<10} {:<20} {:<8} {:<7} {:<6} {:<21} {}\n",
        "AGENT", "NAME", "ONLINE", "PLANS", "APPLY", "LAST SEEN", "LABELS"
    );
    for a in list.agents {
        let labels: Vec<String> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(
            out,
            "{:<10} {:<20} {:<8} {:<7} {:<6} {:<21} {}",
            a.agent_id,
            a.name,
            if a.online { "yes" } else { "no" },
            format!("{}/{}", a.state.plan_running_count, a.state.plan_limit),
            if a.state.apply_running { "yes" } else { "no" },
            a.last_seen.unwrap_or_else(|| "-".into()),
            labels.join(",")
        );
    }
    print!("{out}");
    Ok(())
}

fn logs(api: &Api, id: &str, phase: Option<&str>) -> Result<(), Failure> {
    let mut stdout = io::stdout().lock();
    if let Some(p) = phase {
        return api.send(
            "GET",
            &format!("/api/tasks/{id}/logs/{p}"),
            None,
            &mut stdout,
        );
    }
    let task: TaskView = from_value(api.get(&format!("/api/tasks/{id}"))?)?;
    for p in ["plan", "apply"] {
        let Some(ph) = task.phases.get(p) else {
            continue;
        };
        if ph.log_bytes.is_none() {
            continue;
        }
        if p == "apply" {
            writeln!(stdout, "{APPLY_MARKER}").map_err(runtime)?;
        }
        api.send(
            "GET",
            &format!("/api/tasks/{id}/logs/{p}"),
            None,
            &mut stdout,
        )?;
    }
    Ok(())
}

/// Prints the task's live log (WS 2) until the task ends; the result is the task's.
fn follow(api: &Api, id: &str) -> Result<(), Failure> {
    let url = &api.url;
    let stream = crate::tls::ClientStream::connect(url, api.tls.as_ref())
        .map_err(|e| runtime(format!("cannot reach {}: {e}", url.http(""))))?;
    // The log may be quiet for a long time: no read timeout while following it.
    crate::wsloop::Transport::tcp(&stream)
        .set_read_timeout(None)
        .map_err(runtime)?;
    let uri = url
        .ws(&format!("/api/tasks/{id}/logs/live"))
        .parse()
        .map_err(runtime)?;
    let req = ClientRequestBuilder::new(uri)
        .with_header("Authorization", format!("Bearer {}", api.token));
    let (mut ws, _) = tungstenite::client::client(req, stream).map_err(|e| match e {
        tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            runtime(format!(
                "{} (HTTP {})",
                crate::protocol::error_message(&body),
                resp.status()
            ))
        }
        e => runtime(e),
    })?;
    let mut stdout = io::stdout().lock();
    let close = loop {
        match ws.read() {
            Ok(Message::Text(line)) => {
                writeln!(stdout, "{line}").map_err(runtime)?;
            }
            Ok(Message::Close(frame)) => break frame,
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => break None,
            Err(e) => return Err(runtime(format!("the live log broke off: {e}"))),
        }
    };
    let _ = stdout.flush();
    if let Some(f) = &close {
        if u16::from(f.code) != 1000 {
            return Err(runtime(format!(
                "the server ended the live log: {} ({})",
                f.reason,
                u16::from(f.code)
            )));
        }
    }
    let t: TaskView = from_value(api.get(&format!("/api/tasks/{id}"))?)?;
    let code = t
        .exit_code
        .map(|c| format!(", exit code {c}"))
        .unwrap_or_default();
    eprintln!("task {} {}{code}", t.task_id, t.status);
    if t.status == crate::protocol::TaskStatus::Succeeded {
        Ok(())
    } else {
        Err(Failure::Runtime(format!("task {} {}", t.task_id, t.status)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn parses_commands_and_flags_anywhere() {
        let a = parse(&args(&[
            "submit",
            "x.tf.json",
            "--var",
            "a=1",
            "--var=b=two",
            "--follow",
            "--action",
            "apply",
            "--label",
            "zone=dmz",
            "--server",
            "http://h:1",
        ]))
        .unwrap();
        assert_eq!(a.command, "submit");
        assert_eq!(a.positional, ["x.tf.json"]);
        assert_eq!(a.vars, ["a=1", "b=two"]);
        assert_eq!(a.labels, ["zone=dmz"]);
        assert!(a.follow);
        assert_eq!(a.action.as_deref(), Some("apply"));
        assert_eq!(a.server.as_deref(), Some("http://h:1"));
        assert!(parse(&args(&["tasks", "--bogus"])).is_err());
        assert!(parse(&args(&["logs", "--phase"])).is_err());
    }

    #[test]
    fn vars_keep_json_types_labels_stay_strings() {
        let v = parse_vars(
            &args(&["n=3", "b=true", "s=hello", "l=[1,2]", "q=\"x\"", "e="]),
            true,
        )
        .unwrap();
        assert_eq!(
            Value::Object(v),
            json!({"n": 3, "b": true, "s": "hello", "l": [1, 2], "q": "\"x\"", "e": ""})
        );
        let l = parse_vars(&args(&["n=3"]), false).unwrap();
        assert_eq!(l["n"], "3");
        assert!(parse_vars(&args(&["novalue"]), true).is_err());
        assert!(parse_vars(&args(&["=x"]), true).is_err());
    }
}
