//! Every message that crosses a process boundary: agent ⇄ server (WS 1, registration,
//! log upload) and client ⇄ server (the HTTP API). `../shared/PROTOCOL.md` is the
//! contract; this file is its one typed copy, used by both binaries and the tests.
//!
//! Names and tags here are binding. Extend with new optional fields (`#[serde(default)]`)
//! rather than renaming anything.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Labels of an agent or a task: `{"zone": "dmz"}`.
pub type Labels = BTreeMap<String, String>;

/// The concurrency report an agent sends as its heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AgentState {
    pub plan_running_count: u32,
    pub plan_limit: u32,
    pub apply_running: bool,
    /// Extension: the agent is shutting down (SIGTERM): it takes no new task and lets
    /// its running ones finish.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
    /// Extension: more logs wait for the server than the agent may keep
    /// (`--max-spool-bytes`): it takes no new task until they are delivered.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub spool_full: bool,
}

impl AgentState {
    /// The concurrency rules of the design, in one place: the agent's scheduler decides
    /// with it, and the server's dispatch respects it. `Err` carries the reason.
    pub fn admits(&self, action: Action) -> Result<(), &'static str> {
        if self.draining {
            return Err("agent shutting down");
        }
        if self.spool_full {
            return Err("spool full: logs wait for the server");
        }
        if self.apply_running {
            return Err("apply running");
        }
        match action {
            Action::Plan if self.plan_running_count >= self.plan_limit => Err("plan limit reached"),
            Action::Apply if self.plan_running_count > 0 => Err("plans running"),
            _ => Ok(()),
        }
    }

    /// The state after starting `action`.
    pub fn with_started(mut self, action: Action) -> AgentState {
        match action {
            Action::Plan => self.plan_running_count += 1,
            Action::Apply => self.apply_running = true,
        }
        self
    }
}

/// `plan`, or `apply` (plan, then apply the saved plan, in one exclusive run).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Plan,
    Apply,
}

/// The two phases of a task. A `plan` task has only the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Plan,
    Apply,
}

/// How a task ended, as the agent reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalStatus {
    Succeeded,
    Failed,
    Canceled,
}

/// A task's status as the API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Canceled,
    Lost,
}

/// A phase's status as the API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PhaseStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
    Canceled,
    Skipped,
}

/// Agent → server on WS 1, tagged by `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMsg {
    State {
        state: AgentState,
        #[serde(default)]
        running: Vec<String>,
    },
    TaskAccepted {
        task_id: String,
    },
    TaskRejected {
        task_id: String,
        reason: String,
    },
    PhaseFinished {
        task_id: String,
        phase: Phase,
        exit_code: i32,
    },
    TaskFinished {
        task_id: String,
        status: FinalStatus,
        #[serde(default)]
        exit_code: Option<i32>,
    },
}

/// What `run_task` carries. `tf_json` and `variables` are strings holding JSON objects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskData {
    pub task_id: String,
    pub action: Action,
    pub tf_json: String,
    pub variables: String,
    /// Extension: the agent stops the task (as a cancel does) after this many seconds
    /// and reports it `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// Extension: names of variables whose values the agent masks in every log line.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sensitive_variables: Vec<String>,
}

/// Server → agent on WS 1, tagged by `command`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum ServerMsg {
    RunTask {
        task_data: TaskData,
    },
    StartRealtimeStream {
        task_id: String,
    },
    StopRealtimeStream {
        task_id: String,
    },
    CancelTask {
        task_id: String,
    },
    /// Extension: the server stored every agent event up to `seq` (the agent's outbox
    /// number, sent as a `seq` field beside the event's own fields).
    Ack {
        seq: u64,
    },
}

/// `POST /agents/register` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub name: String,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub version: String,
    pub plan_limit: u32,
    #[serde(default)]
    pub labels: Labels,
}

/// `POST /agents/register` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub agent_id: String,
    pub agent_token: String,
    pub heartbeat_interval_ms: u64,
    /// WebSocket ping interval the agent should use (extension; default 20 s).
    #[serde(default = "default_ping_ms")]
    pub ping_interval_ms: u64,
}

fn default_ping_ms() -> u64 {
    20_000
}

/// `POST /api/tasks` body. `tf_json` and `variables` may be objects or strings that
/// hold objects; [`CreateTask::normalize`] checks that and turns both into strings.
#[derive(Debug, Clone, Deserialize)]
pub struct CreateTask {
    pub action: Action,
    pub tf_json: serde_json::Value,
    #[serde(default)]
    pub variables: Option<serde_json::Value>,
    #[serde(default)]
    pub labels: Labels,
    /// Extension: seconds the task may run (default: the server's `--task-timeout-s`).
    #[serde(default, deserialize_with = "whole_number")]
    pub timeout_s: Option<u64>,
    /// Extension: variables whose values must never show in a log or an answer.
    #[serde(default)]
    pub sensitive_variables: Vec<String>,
}

/// The longest `timeout_s` a task may ask for: a week.
pub const MAX_TIMEOUT_S: u64 = 7 * 86_400;

/// A whole number given as JSON `840` or `840.0` (both are integers to JSON Schema).
fn whole_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Option::<serde_json::Number>::deserialize(d)? {
        None => Ok(None),
        Some(n) => n
            .as_u64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= 1e15)
                    .map(|f| f as u64)
            })
            .map(Some)
            .ok_or_else(|| {
                serde::de::Error::custom(format!("{n} is not a whole number of seconds"))
            }),
    }
}

/// A checked task request, ready to store.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    pub action: Action,
    pub tf_json: String,
    pub variables: String,
    pub labels: Labels,
    pub timeout_s: Option<u64>,
    pub sensitive_variables: Vec<String>,
}

impl CreateTask {
    /// Checks the request and returns it with `tf_json`/`variables` as JSON object text.
    pub fn normalize(self) -> Result<NewTask, String> {
        let tf_json = object_text("tf_json", &self.tf_json)?;
        let variables = match &self.variables {
            None | Some(serde_json::Value::Null) => "{}".to_string(),
            Some(v) => object_text("variables", v)?,
        };
        for (k, v) in &self.labels {
            if !label_ok(k, v) {
                return Err(format!(
                    "label {k:?}: keys must be 1-63 characters and values at most 255"
                ));
            }
        }
        if let Some(t) = self.timeout_s {
            if !(1..=MAX_TIMEOUT_S).contains(&t) {
                return Err(format!(
                    "timeout_s must be from 1 to {MAX_TIMEOUT_S} seconds"
                ));
            }
        }
        if self.sensitive_variables.len() > 256
            || self
                .sensitive_variables
                .iter()
                .any(|n| n.is_empty() || n.chars().count() > 128)
        {
            return Err("sensitive_variables: at most 256 names of 1-128 characters".into());
        }
        Ok(NewTask {
            action: self.action,
            tf_json,
            variables,
            labels: self.labels,
            timeout_s: self.timeout_s,
            sensitive_variables: self.sensitive_variables,
        })
    }
}

/// A label's limits, in characters (as JSON Schema's `maxLength` counts them).
pub fn label_ok(key: &str, value: &str) -> bool {
    let k = key.chars().count();
    (1..=63).contains(&k) && value.chars().count() <= 255
}

/// A JSON object given as an object or as a string holding one, returned as compact text.
fn object_text(field: &str, value: &serde_json::Value) -> Result<String, String> {
    let parsed;
    let obj = match value {
        serde_json::Value::String(s) => {
            parsed = serde_json::from_str::<serde_json::Value>(s)
                .map_err(|e| format!("{field}: the string does not hold valid JSON: {e}"))?;
            &parsed
        }
        v => v,
    };
    if !obj.is_object() {
        return Err(format!(
            "{field} must be a JSON object (or a string holding one)"
        ));
    }
    Ok(obj.to_string())
}

/// One phase of a task, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseView {
    pub status: PhaseStatus,
    pub exit_code: Option<i32>,
    pub log_bytes: Option<u64>,
    #[serde(default)]
    pub started_at: Option<String>,
    #[serde(default)]
    pub finished_at: Option<String>,
}

/// A task, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskView {
    pub task_id: String,
    pub action: Action,
    pub status: TaskStatus,
    pub agent_id: Option<String>,
    pub labels: Labels,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub exit_code: Option<i32>,
    pub phases: BTreeMap<String, PhaseView>,
    /// Extension: the seconds the task may run.
    #[serde(default)]
    pub timeout_s: Option<u64>,
    /// Extension: the names (never the values) of its sensitive variables.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sensitive_variables: Vec<String>,
}

/// `GET /api/tasks` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskList {
    pub tasks: Vec<TaskView>,
}

/// An agent, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentView {
    pub agent_id: String,
    pub name: String,
    pub hostname: String,
    pub version: String,
    pub online: bool,
    pub state: AgentState,
    pub running: Vec<String>,
    pub labels: Labels,
    pub last_seen: Option<String>,
    /// Extension: when an administrator revoked the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
}

/// `GET /api/agents` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentList {
    pub agents: Vec<AgentView>,
}

/// The body of every non-2xx answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// The `error` of a JSON error body, or (for anything else) the start of the body.
pub fn error_message(body: &str) -> String {
    serde_json::from_str::<ErrorBody>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| body.chars().take(200).collect())
}

/// Log upload header (extension): the hex SHA-256 of the body, checked by the server.
pub const SHA256_HEADER: &str = "X-IAC-Content-SHA256";
/// Log upload header (extension): the size of the whole log, checked by the server.
pub const LENGTH_HEADER: &str = "X-IAC-Log-Length";

/// The line a live viewer sees between the plan phase's lines and the apply phase's.
pub const APPLY_MARKER: &str = "--- apply ---";

/// The reason of the agent's normal close of WS 3 once the task's log is complete.
pub const END_OF_TASK: &str = "end of task";

/// The longest line sent on WS 2/WS 3: a longer one is cut into pieces of this size.
pub const MAX_LINE: usize = 64 * 1024;

/// Cuts a log into the lines of WS 2/WS 3: split at `\n` (which is not part of the line),
/// pieces of at most [`MAX_LINE`] bytes, invalid UTF-8 replaced. Fed incrementally by the
/// agent's streamer and at once for an archived log, so both give the same lines.
#[derive(Debug, Default)]
pub struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    /// Feeds bytes; returns the lines they complete.
    pub fn push(&mut self, mut bytes: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        while !bytes.is_empty() {
            let room = MAX_LINE - self.partial.len();
            let take = bytes.len().min(room);
            match bytes[..take].iter().position(|b| *b == b'\n') {
                Some(i) => {
                    self.partial.extend_from_slice(&bytes[..i]);
                    lines.push(self.take());
                    bytes = &bytes[i + 1..];
                }
                None => {
                    self.partial.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    if self.partial.len() == MAX_LINE {
                        lines.push(self.take());
                    }
                }
            }
        }
        lines
    }

    /// The last line, if the log did not end with a newline.
    pub fn finish(&mut self) -> Option<String> {
        (!self.partial.is_empty()).then(|| self.take())
    }

    fn take(&mut self) -> String {
        let line = String::from_utf8_lossy(&self.partial).into_owned();
        self.partial.clear();
        line
    }
}

/// All the lines of a complete log.
pub fn log_lines(bytes: &[u8]) -> Vec<String> {
    let mut s = LineSplitter::default();
    let mut lines = s.push(bytes);
    lines.extend(s.finish());
    lines
}

/// Task ids match `^[A-Za-z0-9._-]{1,64}$`, and `.`/`..` are refused too, so that an id
/// can name a directory or file without any path traversal.
pub fn valid_task_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Plan => "plan",
            Action::Apply => "apply",
        }
    }
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Plan => "plan",
            Phase::Apply => "apply",
        }
    }

    pub fn parse(s: &str) -> Option<Phase> {
        match s {
            "plan" => Some(Phase::Plan),
            "apply" => Some(Phase::Apply),
            _ => None,
        }
    }
}

macro_rules! str_enum {
    ($ty:ty { $($variant:ident => $s:literal),* $(,)? }) => {
        impl $ty {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $s),* }
            }
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($s => Some(Self::$variant),)* _ => None }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(self.as_str())
            }
        }
    };
}

str_enum!(TaskStatus { Queued => "queued", Running => "running", Succeeded => "succeeded",
    Failed => "failed", Canceled => "canceled", Lost => "lost" });
str_enum!(PhaseStatus { Pending => "pending", Running => "running", Succeeded => "succeeded",
    Failed => "failed", Canceled => "canceled", Skipped => "skipped" });
str_enum!(FinalStatus { Succeeded => "succeeded", Failed => "failed", Canceled => "canceled" });

impl TaskStatus {
    pub fn is_terminal(self) -> bool {
        !matches!(self, TaskStatus::Queued | TaskStatus::Running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_messages_match_the_contract() {
        let m: AgentMsg = serde_json::from_str(
            r#"{"type": "state", "state": {"plan_running_count": 1, "plan_limit": 4, "apply_running": false}, "running": ["T-000001"]}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            AgentMsg::State {
                state: AgentState {
                    plan_running_count: 1,
                    plan_limit: 4,
                    apply_running: false,
                    draining: false,
                    spool_full: false,
                },
                running: vec!["T-000001".into()]
            }
        );
        let m: AgentMsg = serde_json::from_str(
            r#"{"type": "task_finished", "task_id": "T-000001", "status": "succeeded", "exit_code": 0}"#,
        )
        .unwrap();
        assert!(matches!(
            m,
            AgentMsg::TaskFinished {
                status: FinalStatus::Succeeded,
                exit_code: Some(0),
                ..
            }
        ));
        let text = serde_json::to_string(&AgentMsg::PhaseFinished {
            task_id: "T-1".into(),
            phase: Phase::Plan,
            exit_code: 2,
        })
        .unwrap();
        assert_eq!(
            text,
            r#"{"type":"phase_finished","task_id":"T-1","phase":"plan","exit_code":2}"#
        );
    }

    #[test]
    fn server_commands_match_the_contract() {
        let text = serde_json::to_string(&ServerMsg::RunTask {
            task_data: TaskData {
                task_id: "T-000001".into(),
                action: Action::Plan,
                tf_json: "{}".into(),
                variables: "{}".into(),
                timeout_s: None,
                sensitive_variables: Vec::new(),
            },
        })
        .unwrap();
        assert_eq!(
            text,
            r#"{"command":"run_task","task_data":{"task_id":"T-000001","action":"plan","tf_json":"{}","variables":"{}"}}"#
        );
        let m: ServerMsg =
            serde_json::from_str(r#"{"command": "cancel_task", "task_id": "T-000001"}"#).unwrap();
        assert_eq!(
            m,
            ServerMsg::CancelTask {
                task_id: "T-000001".into()
            }
        );
    }

    #[test]
    fn create_task_accepts_objects_and_strings() {
        let req: CreateTask = serde_json::from_str(
            r#"{"action": "apply", "tf_json": "{\"output\": {}}", "variables": {"a": 1}}"#,
        )
        .unwrap();
        let t = req.normalize().unwrap();
        assert_eq!(t.tf_json, r#"{"output":{}}"#);
        assert_eq!(t.variables, r#"{"a":1}"#);
        let req: CreateTask = serde_json::from_str(r#"{"action": "plan", "tf_json": {}}"#).unwrap();
        assert_eq!(req.normalize().unwrap().variables, "{}");
    }

    #[test]
    fn timeouts_are_whole_numbers() {
        let parse = |t: &str| {
            serde_json::from_str::<CreateTask>(&format!(
                r#"{{"action": "plan", "tf_json": {{}}, "timeout_s": {t}}}"#
            ))
            .map(|c| c.timeout_s)
        };
        assert_eq!(parse("840").unwrap(), Some(840));
        assert_eq!(parse("840.0").unwrap(), Some(840));
        assert_eq!(parse("null").unwrap(), None);
        assert!(parse("1.5").is_err());
        assert!(parse("-3").is_err());
        assert!(parse("\"10\"").is_err());
    }

    #[test]
    fn create_task_refuses_non_objects() {
        for body in [
            r#"{"action": "plan", "tf_json": 3}"#,
            r#"{"action": "plan", "tf_json": "[1]"}"#,
            r#"{"action": "plan", "tf_json": "{nope"}"#,
            r#"{"action": "plan", "tf_json": {}, "variables": "x"}"#,
        ] {
            let req: CreateTask = serde_json::from_str(body).unwrap();
            assert!(req.normalize().is_err(), "{body}");
        }
        assert!(
            serde_json::from_str::<CreateTask>(r#"{"action": "destroy", "tf_json": {}}"#).is_err()
        );
    }

    #[test]
    fn concurrency_rule_table() {
        let st = |count, limit, apply| AgentState {
            plan_running_count: count,
            plan_limit: limit,
            apply_running: apply,
            draining: false,
            spool_full: false,
        };
        let draining = AgentState {
            draining: true,
            ..st(0, 2, false)
        };
        assert_eq!(draining.admits(Action::Plan), Err("agent shutting down"));
        assert_eq!(draining.admits(Action::Apply), Err("agent shutting down"));
        let full = AgentState {
            spool_full: true,
            ..st(0, 2, false)
        };
        assert!(full
            .admits(Action::Plan)
            .unwrap_err()
            .starts_with("spool full"));
        // apply running: nothing is admitted
        assert_eq!(st(0, 2, true).admits(Action::Plan), Err("apply running"));
        assert_eq!(st(0, 2, true).admits(Action::Apply), Err("apply running"));
        // plans below the limit / at the limit
        assert_eq!(st(1, 2, false).admits(Action::Plan), Ok(()));
        assert_eq!(
            st(2, 2, false).admits(Action::Plan),
            Err("plan limit reached")
        );
        assert_eq!(
            st(0, 0, false).admits(Action::Plan),
            Err("plan limit reached")
        );
        // apply with 0 and with >0 plans
        assert_eq!(st(0, 2, false).admits(Action::Apply), Ok(()));
        assert_eq!(st(1, 2, false).admits(Action::Apply), Err("plans running"));
        assert_eq!(st(2, 2, false).admits(Action::Apply), Err("plans running"));
        assert_eq!(st(0, 2, false).with_started(Action::Apply), st(0, 2, true));
        assert_eq!(st(1, 2, false).with_started(Action::Plan), st(2, 2, false));
    }

    #[test]
    fn log_lines_split_like_the_stream() {
        assert_eq!(log_lines(b"a\nb\n"), ["a", "b"]);
        assert_eq!(log_lines(b"a\n\nb"), ["a", "", "b"]);
        assert_eq!(log_lines(b"a\r\n"), ["a\r"]);
        assert!(log_lines(b"").is_empty());
        assert_eq!(log_lines(b"\xff\n"), ["\u{fffd}"]);
        // Fed in any pieces, the same lines come out.
        let text = format!("one\ntwo\n{}\nthree", "x".repeat(MAX_LINE + 10));
        let whole = log_lines(text.as_bytes());
        assert_eq!(whole.len(), 5);
        assert_eq!(whole[2].len(), MAX_LINE);
        assert_eq!(whole[3].len(), 10);
        for piece in [1, 7, 4096, MAX_LINE] {
            let mut s = LineSplitter::default();
            let mut lines = Vec::new();
            for chunk in text.as_bytes().chunks(piece) {
                lines.extend(s.push(chunk));
            }
            lines.extend(s.finish());
            assert_eq!(lines, whole, "pieces of {piece}");
        }
    }

    #[test]
    fn limits_count_characters_not_bytes() {
        assert!(label_ok(&"é".repeat(63), &"𝐓".repeat(255)));
        assert!(!label_ok("", "x"));
        assert!(!label_ok(&"a".repeat(64), "x"));
        let req: CreateTask = serde_json::from_str(&format!(
            r#"{{"action": "plan", "tf_json": {{}}, "sensitive_variables": ["{}"]}}"#,
            "𝐓".repeat(128)
        ))
        .unwrap();
        assert!(req.normalize().is_ok());
    }

    #[test]
    fn task_ids() {
        for ok in ["T-000001", "a", "a.b_c-d", &"x".repeat(64)] {
            assert!(valid_task_id(ok), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "..%2F", "a b", &"x".repeat(65), "é"] {
            assert!(!valid_task_id(bad), "{bad}");
        }
    }

    #[test]
    fn statuses_round_trip() {
        for s in [
            "queued",
            "running",
            "succeeded",
            "failed",
            "canceled",
            "lost",
        ] {
            assert_eq!(TaskStatus::parse(s).unwrap().as_str(), s);
        }
        assert!(TaskStatus::Lost.is_terminal());
        assert!(!TaskStatus::Running.is_terminal());
    }
}
