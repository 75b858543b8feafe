//! A small W3C WebDriver client over ureq, driving Debian's headless Chromium through
//! chromedriver for the web UI's end-to-end tests. Only what the tests use.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use super::{free_port, wait_for, Proc, TempDir};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    _driver: Proc,
    _profile: TempDir,
    base: String,
    session: String,
    http: ureq::Agent,
}

fn find(names: &[&str]) -> String {
    for n in names {
        for dir in ["/usr/bin", "/usr/local/bin", "/usr/lib/chromium"] {
            let p = Path::new(dir).join(n);
            if p.exists() {
                return p.to_string_lossy().into_owned();
            }
        }
    }
    panic!("none of {names:?} is installed: apt-get install chromium chromium-driver");
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session.
    pub fn start() -> Browser {
        let driver = find(&["chromedriver"]);
        let chromium = find(&["chromium", "chromium-browser"]);
        let port = free_port();
        let mut cmd = Command::new(driver);
        cmd.arg(format!("--port={port}")).stdout(Stdio::null());
        let proc = Proc::spawn_cmd(cmd);
        let http = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(60)))
                .build(),
        );
        let base = format!("http://127.0.0.1:{port}");
        wait_for("chromedriver", Duration::from_secs(30), || {
            let mut r = http.get(&format!("{base}/status")).call().ok()?;
            let v: Value = serde_json::from_str(&r.body_mut().read_to_string().ok()?).ok()?;
            (v["value"]["ready"] == true).then_some(())
        });
        let profile = TempDir::new("chromium-profile");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,860", "--disable-quic", "--no-first-run",
                         "--disable-background-networking", "--disable-component-update", "--disable-sync",
                         format!("--user-data-dir={}", profile.path().display())]
            }
        }}});
        let mut b = Browser {
            _driver: proc,
            _profile: profile,
            base,
            session: String::new(),
            http,
        };
        let v = b.call("POST", "/session", Some(caps));
        b.session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {v}"))
            .to_string();
        b
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.base);
        let resp = match (method, body) {
            ("POST", b) => self.http.post(&url).send_json_text(b.unwrap_or(json!({}))),
            ("DELETE", _) => self.http.delete(&url).call(),
            _ => self.http.get(&url).call(),
        };
        let mut resp = resp.unwrap_or_else(|e| panic!("webdriver {method} {path}: {e}"));
        let text = resp
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .unwrap();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        v
    }

    fn s(&self, path: &str) -> String {
        format!("/session/{}{path}", self.session)
    }

    pub fn go(&self, url: &str) {
        self.call("POST", &self.s("/url"), Some(json!({"url": url})));
    }

    /// Runs JavaScript in the page and returns its result.
    pub fn js(&self, script: &str) -> Value {
        self.call(
            "POST",
            &self.s("/execute/sync"),
            Some(json!({"script": script, "args": []})),
        )["value"]
            .clone()
    }

    fn element(&self, css: &str) -> Option<String> {
        let v = self.call(
            "POST",
            &self.s("/element"),
            Some(json!({"using": "css selector", "value": css})),
        );
        v["value"][ELEMENT].as_str().map(str::to_string)
    }

    /// Waits for an element to be there; returns its id.
    pub fn wait(&self, css: &str) -> String {
        wait_for(&format!("element {css}"), Duration::from_secs(30), || {
            self.element(css)
        })
    }

    /// Waits until the element's text contains `needle`; returns the text.
    pub fn wait_text(&self, css: &str, needle: &str, within: Duration) -> String {
        wait_for(&format!("{css} to contain {needle:?}"), within, || {
            let t = self.text(css)?;
            t.contains(needle).then_some(t)
        })
    }

    pub fn text(&self, css: &str) -> Option<String> {
        let id = self.element(css)?;
        self.call("GET", &self.s(&format!("/element/{id}/text")), None)["value"]
            .as_str()
            .map(str::to_string)
    }

    pub fn click(&self, css: &str) {
        let id = self.wait(css);
        self.call(
            "POST",
            &self.s(&format!("/element/{id}/click")),
            Some(json!({})),
        );
    }

    pub fn type_into(&self, css: &str, text: &str) {
        let id = self.wait(css);
        self.call(
            "POST",
            &self.s(&format!("/element/{id}/clear")),
            Some(json!({})),
        );
        self.call(
            "POST",
            &self.s(&format!("/element/{id}/value")),
            Some(json!({"text": text})),
        );
    }

    /// Saves a PNG of the window.
    pub fn screenshot(&self, path: &Path) {
        let v = self.call("GET", &self.s("/screenshot"), None);
        let png = base64_decode(v["value"].as_str().expect("a screenshot"));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self
                .http
                .delete(&format!("{}/session/{}", self.base, self.session))
                .call();
        }
    }
}

trait SendJsonText {
    fn send_json_text(self, v: Value) -> Result<ureq::http::Response<ureq::Body>, ureq::Error>;
}

impl SendJsonText for ureq::RequestBuilder<ureq::typestate::WithBody> {
    fn send_json_text(self, v: Value) -> Result<ureq::http::Response<ureq::Body>, ureq::Error> {
        self.header("Content-Type", "application/json")
            .send(v.to_string())
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => 0,
    };
    let bytes: Vec<u8> = s
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, c)| {
            acc | (u32::from(val(*c)) << (18 - 6 * i))
        });
        out.push((n >> 16) as u8);
        if chunk.len() > 2 {
            out.push((n >> 8) as u8);
        }
        if chunk.len() > 3 {
            out.push(n as u8);
        }
    }
    out
}
