//! `iac-agent`: dials out to the server, holds WS 1, runs Terraform. Threads:
//!
//! - **C&C** ([`control::run`], the caller's thread): registers, connects WS 1, reconnects
//!   with backoff and jitter, sends the state heartbeat, reads commands. It owns the WS 1
//!   socket; everyone else reaches it through the [`Mailbox`] in [`Ctx`].
//! - **workers** ([`runner::run_task`]): one thread per running task (plans run
//!   concurrently up to the limit; an apply runs alone, as the [`scheduler`] decides).
//!   Each puts its log uploads and events into the on-disk [`outbox`].
//! - **outbox deliverer** ([`outbox::run`]): hands the outbox to the server in order,
//!   uploads over HTTP ([`uploader`]) and events over WS 1, each kept until confirmed.
//! - **streamers** ([`streamer`]): only while somebody watches a task, one thread opens
//!   WS 3 and sends the task's log files line by line as Terraform writes them.
//! - **cancel timers**: a short-lived thread per cancel, to SIGKILL after the grace period;
//!   a timeout thread per task that has a `timeout_s`.
//! - **signals** ([`shutdown`]): waits for SIGTERM/SIGINT and drains the agent.

pub(crate) mod control;
pub(crate) mod masker;
pub(crate) mod outbox;
pub(crate) mod recovery;
pub(crate) mod runner;
pub(crate) mod scheduler;
pub(crate) mod shutdown;
pub(crate) mod streamer;
pub(crate) mod uploader;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::cli::{FlagSpec, Flags};
use crate::protocol::Labels;
pub use crate::util::ServerUrl;
use crate::wsloop::{self, Mailbox};

/// Flags that take a value, with their environment variable and help.
pub const FLAGS: &[FlagSpec] = &[
    ("--server", "IAC_SERVER", "server URL, http:// (required)"),
    (
        "--registration-token",
        "IAC_REGISTRATION_TOKEN",
        "token to register with (required)",
    ),
    (
        "--name",
        "IAC_AGENT_NAME",
        "agent name (default: host name)",
    ),
    (
        "--plan-limit",
        "IAC_PLAN_LIMIT",
        "plans to run at once (default: number of CPUs)",
    ),
    (
        "--work-dir",
        "IAC_WORK_DIR",
        "task dirs and log files (default ./iac-agent-work)",
    ),
    (
        "--terraform",
        "IAC_TERRAFORM",
        "terraform binary (default: terraform from PATH)",
    ),
    (
        "--ca-cert",
        "IAC_CA_CERT",
        "PEM CA bundle to trust besides the system roots (https only)",
    ),
    (
        "--client-cert",
        "IAC_CLIENT_CERT",
        "PEM certificate chain this agent presents to the server (mutual TLS, with --client-key)",
    ),
    (
        "--client-key",
        "IAC_CLIENT_KEY",
        "PEM private key of --client-cert",
    ),
    (
        "--label",
        "IAC_LABELS",
        "KEY=VALUE, repeatable (environment: k=v,k=v)",
    ),
    (
        "--cancel-grace-s",
        "IAC_CANCEL_GRACE_S",
        "seconds between SIGINT and SIGKILL on cancel (default 60)",
    ),
    (
        "--max-spool-bytes",
        "IAC_MAX_SPOOL_BYTES",
        "logs waiting for the server above this: new tasks are rejected (default 1 GiB)",
    ),
    (
        "--keep-logs-days",
        "IAC_KEEP_LOGS_DAYS",
        "days the agent keeps its copy of archived logs (default 7)",
    ),
    (
        "--drain-timeout-s",
        "IAC_DRAIN_TIMEOUT_S",
        "on SIGTERM, seconds running tasks may take to finish before they are canceled (default 600)",
    ),
    (
        "--log-level",
        "IAC_LOG",
        "error, warn, info, debug or trace (default info)",
    ),
];

/// The agent's checked configuration.
#[derive(Clone)]
pub struct Config {
    pub server: ServerUrl,
    /// The roots the agent trusts (system + `--ca-cert`), for an `https://` server.
    pub roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// The client certificate and key for mutual TLS (`--client-cert/--client-key`).
    pub identity: Option<crate::tls::Identity>,
    /// TLS for WebSockets to an `https://` server.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub registration_token: String,
    pub name: String,
    pub hostname: String,
    pub plan_limit: u32,
    pub work_dir: PathBuf,
    pub terraform: PathBuf,
    pub labels: Labels,
    pub cancel_grace: Duration,
    pub drain_timeout: Duration,
    pub max_spool_bytes: u64,
    /// How long the agent keeps its copy of logs the server has archived.
    pub keep_logs: Duration,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "agent".into())
}

impl fmt::Debug for Config {
    // By hand, so that the registration token never reaches a log or a panic message.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("server", &self.server)
            .field("registration_token", &"<redacted>")
            .field("name", &self.name)
            .field("plan_limit", &self.plan_limit)
            .field("work_dir", &self.work_dir)
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

/// Parses `k=v` labels.
pub fn parse_labels<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<Labels, String> {
    let mut labels = Labels::new();
    for item in items {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| format!("label {item:?} must be KEY=VALUE"))?;
        if k.trim().is_empty() {
            return Err(format!("label {item:?} has an empty key"));
        }
        labels.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(labels)
}

/// The Terraform to run: a bare name is looked up on `PATH` by the OS; a relative path is
/// made absolute now, since Terraform runs inside each task's directory.
fn terraform_path(flag: Option<String>) -> Result<PathBuf, String> {
    let path = PathBuf::from(flag.unwrap_or_else(|| "terraform".into()));
    if path.components().count() > 1 && path.is_relative() {
        return std::path::absolute(&path)
            .map_err(|e| format!("--terraform {}: {e}", path.display()));
    }
    Ok(path)
}

impl Config {
    pub fn from_flags(flags: &Flags) -> Result<Config, String> {
        let get = |name: &str| flags.value(name, FLAGS);
        let server = get("--server")
            .ok_or("--server (or IAC_SERVER) is required, e.g. --server http://iac.example:8080")?;
        let registration_token = get("--registration-token")
            .ok_or("--registration-token (or IAC_REGISTRATION_TOKEN) is required")?;
        let host = hostname();
        let name = get("--name").unwrap_or_else(|| host.clone());
        if !crate::protocol::valid_task_id(&name) {
            return Err(format!(
                "agent name {name:?} must be 1-64 letters, digits, '.', '_' or '-'"
            ));
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
        let flag_labels = flags.values("--label");
        let labels = if flag_labels.is_empty() {
            parse_labels(get("--label").unwrap_or_default().split(','))?
        } else {
            parse_labels(flag_labels.iter().map(String::as_str))?
        };
        let server = ServerUrl::parse(&server)?;
        let ca = get("--ca-cert").map(PathBuf::from);
        let roots = if server.tls {
            crate::tls::roots(ca.as_deref())?
        } else {
            Vec::new()
        };
        let identity = match (get("--client-cert"), get("--client-key")) {
            (None, None) => None,
            (Some(cert), Some(key)) if server.tls => Some(crate::tls::Identity::load(
                std::path::Path::new(&cert),
                std::path::Path::new(&key),
            )?),
            (Some(_), Some(_)) => {
                return Err(
                    "--client-cert is for an https:// server: a plain http:// one has no TLS to present it in"
                        .into(),
                )
            }
            _ => {
                return Err(
                    "--client-cert and --client-key go together: give both, or neither".into(),
                )
            }
        };
        Ok(Config {
            tls: if server.tls {
                Some(crate::tls::client_config(&roots, identity.as_ref())?)
            } else {
                None
            },
            identity,
            roots,
            server,
            registration_token,
            name,
            hostname: host,
            plan_limit: flags.number("--plan-limit", FLAGS, cpus, 1..=1024)? as u32,
            work_dir: PathBuf::from(get("--work-dir").unwrap_or_else(|| "./iac-agent-work".into())),
            terraform: terraform_path(get("--terraform"))?,
            labels,
            cancel_grace: flags.secs("--cancel-grace-s", FLAGS, 60, 0..=86_400)?,
            max_spool_bytes: flags.number("--max-spool-bytes", FLAGS, 1 << 30, 1024..=(1 << 50))?,
            keep_logs: Duration::from_secs(
                flags.number("--keep-logs-days", FLAGS, 7, 0..=3650)? * 86_400,
            ),
            drain_timeout: flags.secs("--drain-timeout-s", FLAGS, 600, 0..=7 * 86_400)?,
        })
    }
}

/// Why the agent stopped.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The server refused the registration token: retrying cannot help.
    Refused(String),
    Io(String, std::io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Refused(s) => write!(f, "{s}"),
            Error::Io(what, e) => write!(f, "{what}: {e}"),
        }
    }
}

impl std::error::Error for Error {}

/// The agent's identity, from its last registration. (No `Debug`: it holds the token.)
#[derive(Clone)]
pub(crate) struct Credentials {
    pub agent_id: String,
    pub token: String,
    pub heartbeat: Duration,
    pub ping_interval: Duration,
}

/// The credentials file in the work dir (mode 0600): the agent comes back after a
/// restart with its own token, without using the registration token again.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedCredentials {
    server: String,
    name: String,
    agent_id: String,
    agent_token: String,
    heartbeat_interval_ms: u64,
    ping_interval_ms: u64,
}

fn credentials_path(config: &Config) -> PathBuf {
    config.work_dir.join("agent-credentials.json")
}

/// The saved credentials, if they are for this server and this name.
pub(crate) fn load_credentials(config: &Config) -> Option<Credentials> {
    let bytes = std::fs::read(credentials_path(config)).ok()?;
    let saved: SavedCredentials = serde_json::from_slice(&bytes).ok()?;
    (saved.server == config.server.http("") && saved.name == config.name).then(|| Credentials {
        agent_id: saved.agent_id,
        token: saved.agent_token,
        heartbeat: Duration::from_millis(saved.heartbeat_interval_ms.clamp(100, 600_000)),
        ping_interval: Duration::from_millis(saved.ping_interval_ms.clamp(100, 600_000)),
    })
}

/// Saves (or, with `None`, forgets) the credentials, mode 0600.
pub(crate) fn save_credentials(config: &Config, creds: Option<&Credentials>) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = credentials_path(config);
    let Some(c) = creds else {
        let _ = std::fs::remove_file(&path);
        return;
    };
    let saved = SavedCredentials {
        server: config.server.http(""),
        name: config.name.clone(),
        agent_id: c.agent_id.clone(),
        agent_token: c.token.clone(),
        heartbeat_interval_ms: c.heartbeat.as_millis() as u64,
        ping_interval_ms: c.ping_interval.as_millis() as u64,
    };
    let tmp = path.with_extension("tmp");
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(&serde_json::to_vec(&saved).unwrap_or_default())?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        log::warn!(
            "cannot save the agent's credentials in {}: {e}",
            path.display()
        );
    }
}

/// What the C&C thread and the workers share.
pub(crate) struct Ctx {
    pub config: Config,
    pub http: ureq::Agent,
    pub scheduler: scheduler::Scheduler,
    pub mailbox: Mailbox,
    pub outbox: outbox::Outbox,
    /// The highest outbox sequence number the server acknowledged.
    pub acked: AtomicU64,
    ack_signal: (Mutex<()>, Condvar),
    /// Counts WS 1 connections: odd while one is up, even while down.
    pub connection: AtomicU64,
    credentials: Mutex<Option<Credentials>>,
    tasks: Mutex<HashMap<String, Arc<runner::TaskHandle>>>,
    streams: Mutex<HashMap<String, Arc<AtomicBool>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here is a single read or assignment.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Ctx {
    pub fn credentials(&self) -> Option<Credentials> {
        lock(&self.credentials).clone()
    }

    /// Sets (and saves, or forgets) the agent's credentials.
    pub fn set_credentials(&self, c: Option<Credentials>) {
        save_credentials(&self.config, c.as_ref());
        *lock(&self.credentials) = c;
    }

    /// The tasks running here.
    pub fn tasks(&self) -> MutexGuard<'_, HashMap<String, Arc<runner::TaskHandle>>> {
        lock(&self.tasks)
    }

    /// The live-log streamers running here, by task, with their stop flags.
    pub fn streams(&self) -> MutexGuard<'_, HashMap<String, Arc<AtomicBool>>> {
        lock(&self.streams)
    }

    /// Puts what the server is owed into the outbox (on disk, delivered in order).
    pub fn owe(&self, entry: outbox::Entry) {
        if let Err(e) = self.outbox.push(&entry) {
            // The disk refused it: still try to say it now rather than not at all.
            log::error!("cannot write to the outbox ({e}): sending {entry:?} without a safety net");
            if let outbox::Entry::Event { event } = entry {
                self.mailbox
                    .send_text(serde_json::to_string(&event).expect("an event always serializes"));
            }
        }
    }

    /// The server acknowledged every event up to `seq`.
    pub fn ack(&self, seq: u64) {
        self.acked.fetch_max(seq, Ordering::SeqCst);
        let _guard = lock(&self.ack_signal.0);
        self.ack_signal.1.notify_all();
    }

    /// Waits (at most `timeout`) for an ack of `seq` or a change of connection.
    pub fn wait_ack(&self, seq: u64, timeout: Duration) {
        let guard = lock(&self.ack_signal.0);
        if self.acked.load(Ordering::SeqCst) >= seq {
            return;
        }
        let _ = self.ack_signal.1.wait_timeout(guard, timeout);
    }

    /// WS 1 went up or down: wake the deliverer.
    pub fn connection_changed(&self) {
        self.connection.fetch_add(1, Ordering::SeqCst);
        let _guard = lock(&self.ack_signal.0);
        self.ack_signal.1.notify_all();
    }
}

/// Runs the agent until it is refused or the process ends.
pub fn run(config: Config) -> Result<(), Error> {
    std::fs::create_dir_all(&config.work_dir).map_err(|e| {
        Error::Io(
            format!("cannot create work dir {}", config.work_dir.display()),
            e,
        )
    })?;
    let http = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .tls_config(crate::tls::ureq_config(
                &config.roots,
                config.identity.as_ref(),
            ))
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            // No pooled keep-alive connection: between uploads the agent holds WS 1 only.
            .max_idle_connections(0)
            .max_idle_connections_per_host(0)
            .timeout_global(Some(Duration::from_secs(300)))
            .user_agent(format!("iac-agent/{}", crate::VERSION))
            .build(),
    );
    let (mailbox, inbox) =
        wsloop::mailbox().map_err(|e| Error::Io("cannot create the C&C mailbox".into(), e))?;
    let outbox = outbox::Outbox::open(&config.work_dir.join("outbox"))
        .map_err(|e| Error::Io("cannot open the outbox".into(), e))?;
    let saved = load_credentials(&config);
    let ctx = Arc::new(Ctx {
        outbox,
        acked: AtomicU64::new(0),
        ack_signal: (Mutex::new(()), Condvar::new()),
        connection: AtomicU64::new(0),
        scheduler: scheduler::Scheduler::new(config.plan_limit),
        config,
        http,
        mailbox,
        credentials: Mutex::new(saved),
        tasks: Mutex::new(HashMap::new()),
        streams: Mutex::new(HashMap::new()),
    });
    log::info!(
        "agent {} starting: server {}, plan limit {}, labels {:?}",
        ctx.config.name,
        ctx.config.server.http(""),
        ctx.config.plan_limit,
        ctx.config.labels
    );
    match recovery::recover(&ctx) {
        Ok(0) => {}
        Ok(n) => log::warn!("{n} task(s) were interrupted by the agent's restart: reported failed"),
        Err(e) => log::error!("cannot look for interrupted tasks: {e}"),
    }
    if ctx.outbox.len() > 0 {
        log::info!(
            "{} undelivered reports from an earlier run are in the outbox",
            ctx.outbox.len()
        );
    }
    shutdown::watch(ctx.clone()).map_err(|e| Error::Io("cannot watch for SIGTERM".into(), e))?;
    let deliverer = ctx.clone();
    std::thread::Builder::new()
        .name("outbox".into())
        .spawn(move || outbox::run(deliverer))
        .map_err(|e| Error::Io("cannot start the outbox deliverer".into(), e))?;
    control::run(ctx, inbox)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_terraform_paths_become_absolute() {
        assert_eq!(terraform_path(None).unwrap(), PathBuf::from("terraform"));
        assert_eq!(
            terraform_path(Some("/opt/tf".into())).unwrap(),
            PathBuf::from("/opt/tf")
        );
        let p = terraform_path(Some("./bin/tf".into())).unwrap();
        assert!(p.is_absolute() && p.ends_with("bin/tf"), "{}", p.display());
    }

    #[test]
    fn config_from_flags() {
        let parse = |args: &[&str]| {
            let flags = Flags::parse(args.iter().map(|s| s.to_string()), FLAGS, &[])?;
            Config::from_flags(&flags)
        };
        let c = parse(&[
            "--server",
            "http://h:1",
            "--registration-token",
            "t",
            "--label",
            "a=b",
        ])
        .unwrap();
        assert_eq!(c.server.port, 1);
        assert_eq!(c.labels.get("a").map(String::as_str), Some("b"));
        assert_eq!(c.cancel_grace, Duration::from_secs(60));
        assert!(c.plan_limit >= 1);
        assert!(
            parse(&["--registration-token", "t"]).is_err() || std::env::var("IAC_SERVER").is_ok()
        );
        assert!(parse(&[
            "--server",
            "http://h",
            "--registration-token",
            "t",
            "--name",
            "a/b"
        ])
        .is_err());
        assert!(parse(&[
            "--server",
            "http://h",
            "--registration-token",
            "t",
            "--plan-limit",
            "0"
        ])
        .is_err());
        let mtls = |server: &str, extra: &[&str]| {
            let mut args = vec!["--server", server, "--registration-token", "t"];
            args.extend(extra);
            parse(&args).unwrap_err()
        };
        assert!(mtls("https://h", &["--client-cert", "c.pem"]).contains("go together"));
        assert!(
            mtls("http://h", &["--client-cert", "c", "--client-key", "k"]).contains("https://")
        );
        assert!(mtls(
            "https://h",
            &["--client-cert", "c", "--client-key", "/nonexistent"]
        )
        .contains("--client-key /nonexistent"));
    }

    #[test]
    fn labels() {
        let l = parse_labels(["zone=dmz", " os = linux ", ""]).unwrap();
        assert_eq!(l.get("zone").map(String::as_str), Some("dmz"));
        assert_eq!(l.get("os").map(String::as_str), Some("linux"));
        assert!(parse_labels(["novalue"]).is_err());
        assert!(parse_labels(["=x"]).is_err());
    }
}
