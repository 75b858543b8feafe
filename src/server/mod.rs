//! `iac-server`: the control plane. Threads and the channels between them:
//!
//! - **accept loop** (the caller's thread, [`run`]): takes connections on the one port
//!   and starts a connection thread for each.
//! - **connection threads** ([`api::serve_connection`]): HTTP requests on a keep-alive
//!   connection; a WS 1 upgrade turns the thread into that agent's C&C owner
//!   ([`control::serve`]), which sleeps in `poll(2)` and wakes on the agent's frames or
//!   on its [`Mailbox`](crate::wsloop::Mailbox).
//! - **reaper** ([`reaper::run`]): once a second, marks `lost` the running tasks whose
//!   agent stayed offline past the grace period.
//! - **dispatcher** ([`dispatch::run`]): wakes on a kick (`crossbeam` channel of `()`),
//!   matches queued tasks to online agents, and drops `run_task` into their mailboxes.
//!
//! - **WS 3 threads** ([`stream::serve`]): an agent's live stream of a task, relayed line
//!   by line into the [`client_hub`].
//! - **WS 2 threads** ([`client_hub::serve`]): one per viewer of a live log, fed through
//!   its bounded mailbox.
//!
//! - **signals**: on SIGTERM/SIGINT, closes every WebSocket and exits 0.
//!
//! Shared state: the [`store::Store`] (SQLite + log archive, its own mutex), the
//! [`registry::Registry`] of online agents and the [`client_hub::Hub`] of watched tasks,
//! each behind one `Mutex`, never two held at once.

pub(crate) mod api;
pub(crate) mod auth;
pub(crate) mod client_hub;
pub(crate) mod control;
pub(crate) mod dispatch;
pub(crate) mod http;
pub(crate) mod lifecycle;
pub(crate) mod reaper;
pub(crate) mod registry;
pub(crate) mod store;
pub(crate) mod stream;

use std::fmt;
use std::io::{self, Read};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use crossbeam_channel::Sender;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::cli::Flags;

/// The server's checked configuration.
#[derive(Clone)]
pub struct Config {
    pub listen: String,
    pub data_dir: PathBuf,
    /// API tokens given by flags, the environment or a file; more than one lets a token
    /// be rotated without downtime. None given: one is generated.
    pub api_tokens: Vec<String>,
    pub registration_token: Option<String>,
    pub heartbeat_interval: Duration,
    /// WebSocket pings on every connection; a peer silent for two intervals is dead.
    pub ping_interval: Duration,
    /// A running task whose agent is offline this long is `lost`.
    pub lost_grace: Duration,
    /// The timeout of a task that does not ask for one.
    pub task_timeout: Duration,
    /// Connections served at once (each is a thread); more are answered 503.
    pub max_connections: usize,
    /// Largest WebSocket message an agent may send (WS 1, WS 3).
    pub max_message_bytes: usize,
    pub max_request_bytes: u64,
    pub max_log_bytes: u64,
    pub(crate) limits: http::Limits,
    /// HTTPS/WSS on the listening port when set.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// `--client-ca`: agent endpoints demand a client certificate signed by it.
    pub agents_need_client_cert: bool,
}

impl fmt::Debug for Config {
    // By hand, so that the tokens never reach a log or a panic message.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field(
                "api_tokens",
                &format!("<{} redacted>", self.api_tokens.len()),
            )
            .field(
                "registration_token",
                &self.registration_token.as_ref().map(|_| "<redacted>"),
            )
            .field("tls", &self.tls.is_some())
            .field("agents_need_client_cert", &self.agents_need_client_cert)
            .finish_non_exhaustive()
    }
}

/// Flags that take a value, with their environment variable and help.
pub const FLAGS: &[(&str, &str, &str)] = &[
    (
        "--listen",
        "IAC_LISTEN",
        "address to listen on (default 127.0.0.1:8080; port 0 picks a free port)",
    ),
    (
        "--data-dir",
        "IAC_DATA_DIR",
        "database and log archive (default ./iac-data)",
    ),
    (
        "--api-token",
        "IAC_API_TOKEN",
        "token of API clients, repeatable (default: generated, saved in the data dir)",
    ),
    (
        "--api-tokens-file",
        "IAC_API_TOKENS_FILE",
        "a file of API tokens, one per line (with or instead of --api-token)",
    ),
    (
        "--registration-token",
        "IAC_REGISTRATION_TOKEN",
        "token agents register with (default: generated, saved in the data dir)",
    ),
    (
        "--tls-cert",
        "IAC_TLS_CERT",
        "PEM certificate chain: serve HTTPS/WSS on the same port (with --tls-key)",
    ),
    (
        "--tls-key",
        "IAC_TLS_KEY",
        "PEM private key for HTTPS/WSS (with --tls-cert)",
    ),
    (
        "--client-ca",
        "IAC_CLIENT_CA",
        "PEM CA bundle: agents must present a client certificate signed by it (mutual TLS; with --tls-cert)",
    ),
    (
        "--heartbeat-ms",
        "IAC_HEARTBEAT_MS",
        "agent heartbeat interval in ms (default 5000)",
    ),
    (
        "--ping-interval-ms",
        "IAC_PING_INTERVAL_MS",
        "WebSocket ping interval in ms; a peer silent for 2 intervals is dead (default 20000)",
    ),
    (
        "--lost-grace-s",
        "IAC_LOST_GRACE_S",
        "seconds a running task's agent may stay offline before the task is lost (default 300)",
    ),
    (
        "--task-timeout-s",
        "IAC_TASK_TIMEOUT_S",
        "seconds a task may run unless it asks otherwise (timeout_s); then it fails (default 14400)",
    ),
    (
        "--head-timeout-ms",
        "IAC_HEAD_TIMEOUT_MS",
        "a request head must arrive within this time, or 408 (default 10000)",
    ),
    (
        "--max-connections",
        "IAC_MAX_CONNECTIONS",
        "connections served at once; more get 503 (default 20000)",
    ),
    (
        "--max-message-bytes",
        "IAC_MAX_MESSAGE_BYTES",
        "largest WebSocket message from an agent (default 16 MiB)",
    ),
    (
        "--max-request-bytes",
        "IAC_MAX_REQUEST_BYTES",
        "largest JSON request body (default 8 MiB)",
    ),
    (
        "--max-log-bytes",
        "IAC_MAX_LOG_BYTES",
        "largest log upload (default 1 GiB)",
    ),
    (
        "--log-level",
        "IAC_LOG",
        "error, warn, info, debug or trace (default info)",
    ),
];

/// Every API token: each `--api-token` (else `IAC_API_TOKEN`, comma-separated) and each
/// line of `--api-tokens-file`.
fn api_tokens(flags: &Flags) -> Result<Vec<String>, String> {
    let mut tokens = flags.values("--api-token");
    if tokens.is_empty() {
        if let Ok(env) = std::env::var("IAC_API_TOKEN") {
            tokens.extend(env.split(',').map(str::to_string));
        }
    }
    if let Some(file) = flags.value("--api-tokens-file", FLAGS) {
        let text =
            std::fs::read_to_string(&file).map_err(|e| format!("--api-tokens-file {file}: {e}"))?;
        tokens.extend(text.lines().map(str::to_string));
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect();
    if let Some(short) = tokens.iter().find(|t| t.len() < 16) {
        return Err(format!(
            "an API token must have at least 16 characters ({} has {})",
            "a given one",
            short.len()
        ));
    }
    Ok(tokens)
}

impl Config {
    pub fn from_flags(flags: &Flags) -> Result<Config, String> {
        let get = |name: &str| flags.value(name, FLAGS);
        let client_ca = get("--client-ca");
        let tls = match (get("--tls-cert"), get("--tls-key")) {
            (None, None) if client_ca.is_some() => {
                return Err("--client-ca needs TLS: give --tls-cert and --tls-key too".into())
            }
            (None, None) => None,
            (Some(cert), Some(key)) => Some(crate::tls::server_config(
                std::path::Path::new(&cert),
                std::path::Path::new(&key),
                client_ca.as_deref().map(std::path::Path::new),
            )?),
            _ => return Err("--tls-cert and --tls-key go together: give both, or neither".into()),
        };
        let nonempty = |name: &str| -> Result<Option<String>, String> {
            match get(name) {
                Some(v) if v.trim().is_empty() => Err(format!("{name} must not be empty")),
                v => Ok(v),
            }
        };
        Ok(Config {
            listen: get("--listen").unwrap_or_else(|| "127.0.0.1:8080".into()),
            data_dir: PathBuf::from(get("--data-dir").unwrap_or_else(|| "./iac-data".into())),
            api_tokens: api_tokens(flags)?,
            registration_token: nonempty("--registration-token")?,
            heartbeat_interval: flags.millis("--heartbeat-ms", FLAGS, 5000, 100..=600_000)?,
            ping_interval: flags.millis("--ping-interval-ms", FLAGS, 20_000, 100..=600_000)?,
            lost_grace: flags.secs("--lost-grace-s", FLAGS, 300, 1..=(30 * 86_400))?,
            max_connections: flags.number("--max-connections", FLAGS, 20_000, 1..=1_000_000)?
                as usize,
            max_message_bytes: flags.number(
                "--max-message-bytes",
                FLAGS,
                16 << 20,
                1024..=(1 << 30),
            )? as usize,
            task_timeout: flags.secs(
                "--task-timeout-s",
                FLAGS,
                14_400,
                1..=crate::protocol::MAX_TIMEOUT_S,
            )?,
            max_request_bytes: flags.number(
                "--max-request-bytes",
                FLAGS,
                8 << 20,
                1024..=(1 << 30),
            )?,
            max_log_bytes: flags.number("--max-log-bytes", FLAGS, 1 << 30, 1024..=(1 << 40))?,
            limits: http::Limits {
                head_timeout: flags.millis("--head-timeout-ms", FLAGS, 10_000, 100..=600_000)?,
                ..http::Limits::default()
            },
            tls,
            agents_need_client_cert: client_ca.is_some(),
        })
    }
}

/// Why the server could not start or stopped.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The store could not be opened.
    Store(String),
    Io(String, io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Store(e) => write!(f, "{e}"),
            Error::Io(what, e) => write!(f, "{what}: {e}"),
        }
    }
}

impl std::error::Error for Error {}

/// What every thread shares.
pub(crate) struct Shared {
    pub config: Config,
    pub store: store::Store,
    registry: Mutex<registry::Registry>,
    hub: Mutex<client_hub::Hub>,
    kick: Sender<()>,
    /// Hashes of every API token accepted.
    pub api_token_hashes: Vec<String>,
    /// The registration token (hash), which can be rotated while the server runs.
    pub registration: std::sync::RwLock<auth::Registration>,
    /// Connections being served now.
    connections: Arc<AtomicUsize>,
}

impl Shared {
    pub fn registry(&self) -> MutexGuard<'_, registry::Registry> {
        // The registry is plain data updated in short steps; a panic mid-step cannot
        // leave it worse than a stale entry, so a poisoned lock is still usable.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn hub(&self) -> MutexGuard<'_, client_hub::Hub> {
        // Plain data updated in short steps, as the registry.
        self.hub.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// WebSocket settings for what agents send (WS 1, WS 3).
    pub fn agent_ws_config(&self) -> tungstenite::protocol::WebSocketConfig {
        let max = self.config.max_message_bytes;
        crate::wsloop::control_config()
            .max_message_size(Some(max))
            .max_frame_size(Some(max))
    }

    pub fn keepalive(&self) -> crate::wsloop::Keepalive {
        crate::wsloop::Keepalive::every(self.config.ping_interval)
    }

    pub fn registration_hash(&self) -> String {
        self.registration
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .hash
            .clone()
    }

    /// Asks the dispatcher to look at the queue.
    pub fn kick(&self) {
        let _ = self.kick.send(());
    }
}

/// Stack of a connection thread: enough for SQLite and serde, small enough for
/// thousands of agents (untouched stack pages cost no memory).
const CONN_STACK: usize = 512 * 1024;

/// Starts the server and serves until the process ends.
pub fn run(config: Config) -> Result<(), Error> {
    let io_err = |what: String| move |e| Error::Io(what, e);
    let store = store::Store::open(&config.data_dir).map_err(|e| Error::Store(e.to_string()))?;
    let api = auth::load_or_create(
        config.api_tokens.first().map(String::as_str),
        &config.data_dir.join("api-token"),
    )
    .map_err(io_err("api token".into()))?;
    let mut api_token_hashes: Vec<String> =
        config.api_tokens.iter().map(|t| auth::hash(t)).collect();
    if api_token_hashes.is_empty() {
        api_token_hashes.push(auth::hash(&api.0));
    }
    let reg = auth::load_or_create(
        config.registration_token.as_deref(),
        &config.data_dir.join("registration-token"),
    )
    .map_err(io_err("registration token".into()))?;
    for (name, (token, source), file) in [
        ("API token", &api, "api-token"),
        ("registration token", &reg, "registration-token"),
    ] {
        if *source == auth::Source::Generated {
            // Printed once, at generation; afterwards it is only in the 0600 file.
            eprintln!(
                "generated {name} (saved in {}): {token}",
                config.data_dir.join(file).display()
            );
        }
    }
    let listener = TcpListener::bind(&config.listen)
        .map_err(io_err(format!("cannot listen on {}", config.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(io_err("listener address".into()))?;
    let (kick, kicks) = crossbeam_channel::unbounded();
    let shared = Arc::new(Shared {
        store,
        registry: Mutex::new(registry::Registry::default()),
        hub: Mutex::new(client_hub::Hub::default()),
        kick,
        connections: Arc::new(AtomicUsize::new(0)),
        api_token_hashes,
        registration: std::sync::RwLock::new(auth::Registration {
            hash: auth::hash(&reg.0),
            from_flag: reg.1 == auth::Source::Given,
        }),
        config,
    });
    {
        let shared = shared.clone();
        thread::Builder::new()
            .name("dispatch".into())
            .spawn(move || dispatch::run(shared, kicks))
            .map_err(io_err("cannot start the dispatcher".into()))?;
    }
    {
        let shared = shared.clone();
        let started = std::time::Instant::now();
        thread::Builder::new()
            .name("reaper".into())
            .spawn(move || reaper::run(shared, started))
            .map_err(io_err("cannot start the reaper".into()))?;
    }
    // Tasks queued before a restart are dispatched as soon as agents report in.
    shared.kick();
    {
        let shared = shared.clone();
        let mut signals =
            Signals::new([SIGTERM, SIGINT]).map_err(io_err("cannot watch for SIGTERM".into()))?;
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    shutdown(&shared, sig);
                }
            })
            .map_err(io_err("cannot start the signal thread".into()))?;
    }
    let scheme = if shared.config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    eprintln!("listening on {scheme}://{addr}");
    log::info!("data dir {}", shared.config.data_dir.display());
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => start_connection(&shared, stream),
            Err(e) => {
                // EMFILE and friends: back off a little instead of spinning.
                log::warn!("accept failed: {e}");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
    Ok(())
}

/// SIGTERM: every WebSocket is closed with 1001 (agents reconnect to the next server,
/// viewers see why), the WAL is checkpointed, and the process exits 0. Every answer
/// already given was committed before it was sent, so nothing is left to save.
fn shutdown(shared: &Shared, sig: i32) -> ! {
    log::warn!("signal {sig}: shutting down");
    shared.registry().close_all(1001, "server shutting down");
    shared.hub().close_all(1001, "server shutting down");
    // The connection threads send their close frames; give them a moment.
    thread::sleep(Duration::from_millis(300));
    if let Err(e) = shared.store.checkpoint() {
        log::warn!("checkpoint at shutdown: {e}");
    }
    log::info!("stopped");
    std::process::exit(0)
}

/// Counts a live connection for as long as it is held.
struct ConnSlot(Arc<AtomicUsize>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn start_connection(shared: &Arc<Shared>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let live = shared.connections.fetch_add(1, Ordering::SeqCst) + 1;
    let slot = ConnSlot(shared.connections.clone());
    if live > shared.config.max_connections {
        // Over the limit: a short answer (not a silent drop) and the socket is closed.
        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
        let resp = http::Response::error(
            503,
            format!(
                "the server is at its limit of {} connections; try again later",
                shared.config.max_connections
            ),
        )
        .with_header("Retry-After", "5");
        // Take the request if it is already here, so that closing does not reset the
        // connection before the client reads the answer; bounded to ~150 ms.
        let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
        let _ = (&stream).read(&mut [0u8; 16 * 1024]);
        let mut conn = http::Conn::new(stream, shared.config.limits);
        if conn.write_response(&resp, false).is_ok() {
            let _ = conn.stream.shutdown(std::net::Shutdown::Write);
            let _ = conn
                .stream
                .set_read_timeout(Some(Duration::from_millis(100)));
            let _ = conn.stream.read(&mut [0u8; 16 * 1024]);
        }
        log::warn!(
            "connection refused: {} connections is the limit",
            shared.config.max_connections
        );
        drop(slot);
        return;
    }
    let stream = match crate::tls::ServerStream::new(stream, shared.config.tls.as_ref()) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot start TLS on a connection: {e}");
            return;
        }
    };
    let shared = shared.clone();
    let spawned = thread::Builder::new()
        .name("conn".into())
        .stack_size(CONN_STACK)
        .spawn(move || {
            let _slot = slot;
            api::serve_connection(shared, stream)
        });
    if let Err(e) = spawned {
        log::error!("cannot start a connection thread: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let flags = Flags::parse(args.iter().map(|s| s.to_string()), FLAGS, &[])?;
        Config::from_flags(&flags)
    }

    #[test]
    fn defaults_and_every_flag_in_the_table() {
        // Reading a flag that is not in the table fails a debug assertion: this covers all.
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen, "127.0.0.1:8080");
        assert_eq!(c.lost_grace, Duration::from_secs(300));
        assert_eq!(c.ping_interval, Duration::from_secs(20));
        let c = parse(&[
            "--listen",
            "0.0.0.0:0",
            "--lost-grace-s",
            "2",
            "--task-timeout-s",
            "60",
        ])
        .unwrap();
        assert_eq!(
            (
                c.listen.as_str(),
                c.lost_grace.as_secs(),
                c.task_timeout.as_secs()
            ),
            ("0.0.0.0:0", 2, 60)
        );
        assert!(parse(&["--heartbeat-ms", "0"])
            .unwrap_err()
            .contains("--heartbeat-ms"));
        assert!(parse(&["--tls-cert", "x"])
            .unwrap_err()
            .contains("go together"));
        assert!(
            parse(&["--tls-cert", "/nonexistent", "--tls-key", "/nonexistent"])
                .unwrap_err()
                .contains("--tls-cert /nonexistent")
        );
        assert!(parse(&["--client-ca", "/nonexistent"])
            .unwrap_err()
            .contains("--client-ca needs TLS"));
        assert!(parse(&["--api-token", "short"])
            .unwrap_err()
            .contains("at least 16"));
        let c = parse(&[
            "--api-token",
            "0123456789abcdef",
            "--api-token",
            "fedcba9876543210",
        ])
        .unwrap();
        assert_eq!(
            c.api_tokens.len(),
            2,
            "repeatable, for rotation without downtime"
        );
    }
}
