//! The HTTP/1.1 layer of the one listening port: reads a request head with `httparse`
//! under strict limits, reads or streams a `Content-Length` body, writes answers, and
//! hands the socket (with any bytes read past the head) to a WebSocket on upgrade.
//!
//! Deliberately small: no chunked bodies (`411`), no pipelining beyond simple
//! keep-alive, a deadline for the whole head so a slow client cannot hold a thread.

use std::fmt;
use std::io::{self, Read};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::protocol::ErrorBody;
use crate::wsloop::Transport;

/// Limits on what a client may send.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_head_bytes: usize,
    pub max_headers: usize,
    /// The whole head must arrive within this time.
    pub head_timeout: Duration,
    /// Each read of a body must make progress within this time.
    pub body_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head_bytes: 16 * 1024,
            max_headers: 64,
            head_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
        }
    }
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Head {
    pub method: String,
    pub path: String,
    pub query: String,
    pub http10: bool,
    pub headers: Vec<(String, String)>,
}

/// Why no request could be read.
#[derive(Debug)]
pub(crate) enum HeadError {
    /// The client closed (or went idle) before sending anything: not an error.
    Idle,
    TimedOut,
    TooLarge,
    Malformed(String),
    Io(io::Error),
}

impl fmt::Display for HeadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeadError::Idle => write!(f, "connection closed"),
            HeadError::TimedOut => write!(f, "the request head did not arrive in time"),
            HeadError::TooLarge => write!(f, "the request head is too large"),
            HeadError::Malformed(s) => write!(f, "malformed request: {s}"),
            HeadError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// An answer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json<T: Serialize>(status: u16, value: &T) -> Response {
        let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
        Response {
            status,
            content_type: "application/json",
            headers: Vec::new(),
            body,
        }
    }

    /// A non-2xx answer with the contract's `{"error": "..."}` body.
    pub fn error(status: u16, message: impl Into<String>) -> Response {
        Response::json(
            status,
            &ErrorBody {
                error: message.into(),
            },
        )
    }

    pub fn text(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            content_type,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }
}

pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether a header holds `token` in its comma-separated list (case-insensitive).
    pub fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// The first value of a query parameter, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k)? == name)
                .then(|| percent_decode(v))
                .flatten()
        })
    }

    /// The token of `Authorization: Bearer <token>`.
    pub fn bearer(&self) -> Option<&str> {
        let v = self.header("authorization")?.trim();
        let (scheme, token) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    }

    pub fn keep_alive(&self) -> bool {
        if self.header_has_token("connection", "close") {
            return false;
        }
        !self.http10 || self.header_has_token("connection", "keep-alive")
    }

    pub fn is_websocket_upgrade(&self) -> bool {
        self.header_has_token("upgrade", "websocket")
    }

    /// The body's length: `Ok(0)` when there is none. Both `Content-Length` and
    /// `Transfer-Encoding` is a request smuggling risk: refused.
    pub fn content_length(&self) -> Result<u64, Response> {
        let te = self.header("transfer-encoding");
        let cls: Vec<&str> = self
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.as_str())
            .collect();
        match (te, cls.as_slice()) {
            (Some(_), [_, ..]) => Err(Response::error(
                400,
                "a request may not have both Content-Length and Transfer-Encoding",
            )),
            (Some(_), []) => Err(Response::error(
                411,
                "chunked request bodies are not supported: send Content-Length",
            )),
            (None, []) => Ok(0),
            (None, [one]) => one
                .trim()
                .parse::<u64>()
                .map_err(|_| Response::error(400, format!("invalid Content-Length {one:?}"))),
            (None, [first, rest @ ..]) => {
                if rest.iter().all(|v| v == first) {
                    first
                        .trim()
                        .parse::<u64>()
                        .map_err(|_| Response::error(400, "invalid Content-Length"))
                } else {
                    Err(Response::error(400, "conflicting Content-Length headers"))
                }
            }
        }
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// One client connection: the socket plus bytes read past the last head.
pub(crate) struct Conn<S: Transport> {
    pub stream: S,
    buf: Vec<u8>,
    limits: Limits,
}

impl<S: Transport> Conn<S> {
    pub fn new(stream: S, limits: Limits) -> Conn<S> {
        Conn {
            stream,
            buf: Vec::new(),
            limits,
        }
    }

    /// Reads the next request head. Bytes after it stay buffered for the body.
    pub fn read_head(&mut self) -> Result<Head, HeadError> {
        let deadline = Instant::now() + self.limits.head_timeout;
        let mut chunk = [0u8; 4096];
        loop {
            if !self.buf.is_empty() {
                if let Some((head, n)) = parse_head(&self.buf, &self.limits)? {
                    self.buf.drain(..n);
                    return Ok(head);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(HeadError::TimedOut);
            }
            self.stream
                .tcp()
                .set_read_timeout(Some(left))
                .map_err(HeadError::Io)?;
            match self.stream.read(&mut chunk) {
                Ok(0) if self.buf.is_empty() => return Err(HeadError::Idle),
                Ok(0) => {
                    return Err(HeadError::Malformed(
                        "the connection closed mid-head".into(),
                    ))
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if is_timeout(&e) && self.buf.is_empty() => return Err(HeadError::Idle),
                Err(e) if is_timeout(&e) => return Err(HeadError::TimedOut),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(HeadError::Io(e)),
            }
        }
    }

    /// A reader of exactly `len` body bytes (buffered ones first).
    pub fn body(&mut self, len: u64) -> io::Result<Body<'_, S>> {
        self.stream
            .tcp()
            .set_read_timeout(Some(self.limits.body_timeout))?;
        Ok(Body {
            conn: self,
            left: len,
        })
    }

    /// Reads a whole body of `len` bytes into memory.
    pub fn read_body(&mut self, len: u64) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(len.min(1 << 20) as usize);
        self.body(len)?.read_to_end(&mut out)?;
        if (out.len() as u64) < len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the body ended early",
            ));
        }
        Ok(out)
    }

    pub fn write_response(&mut self, resp: &Response, keep_alive: bool) -> io::Result<()> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
            resp.status,
            reason(resp.status),
            resp.content_type,
            resp.body.len()
        );
        for (k, v) in &resp.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(if keep_alive {
            "Connection: keep-alive\r\n\r\n"
        } else {
            "Connection: close\r\n\r\n"
        });
        self.stream.write_all(head.as_bytes())?;
        self.stream.write_all(&resp.body)?;
        self.stream.flush()
    }

    /// Writes a head and streams `len` bytes of `body` after it.
    pub fn write_stream(
        &mut self,
        status: u16,
        content_type: &str,
        body: &mut dyn Read,
        len: u64,
        keep_alive: bool,
    ) -> io::Result<()> {
        let head = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {len}\r\nConnection: {}\r\n\r\n",
            reason(status),
            if keep_alive { "keep-alive" } else { "close" }
        );
        self.stream.write_all(head.as_bytes())?;
        let n = io::copy(&mut body.take(len), &mut self.stream)?;
        if n != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "log shrank while sent",
            ));
        }
        self.stream.flush()
    }

    /// Ends a connection after an error answer without losing that answer: a close with
    /// unread input makes the kernel send a reset, which can destroy the answer before
    /// the client reads it. So: shut our side, then read and drop what the client still
    /// sends, for a bounded time and size.
    pub fn close_gracefully(mut self) {
        let tcp = self.stream.tcp();
        let _ = tcp.shutdown(std::net::Shutdown::Write);
        let _ = tcp.set_read_timeout(Some(Duration::from_secs(2)));
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut sink = [0u8; 8192];
        let mut total = 0usize;
        while Instant::now() < deadline && total < (1 << 20) {
            match self.stream.read(&mut sink) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    }

    /// The socket and the bytes already read past the head (the start of a WebSocket).
    pub fn into_parts(self) -> (S, Vec<u8>) {
        (self.stream, self.buf)
    }
}

/// A body reader over a connection.
pub(crate) struct Body<'a, S: Transport> {
    conn: &'a mut Conn<S>,
    left: u64,
}

impl<S: Transport> Read for Body<'_, S> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 || out.is_empty() {
            return Ok(0);
        }
        let want = out.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = if !self.conn.buf.is_empty() {
            let n = want.min(self.conn.buf.len());
            out[..n].copy_from_slice(&self.conn.buf[..n]);
            self.conn.buf.drain(..n);
            n
        } else {
            self.conn.stream.read(&mut out[..want])?
        };
        self.left -= n as u64;
        Ok(n)
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Parses a request head from the start of `buf`: `Ok(None)` while it is incomplete
/// (and within the limits), else the head and its length in bytes. No I/O: the fuzz
/// target `http_head` drives this directly.
pub(crate) fn parse_head(buf: &[u8], limits: &Limits) -> Result<Option<(Head, usize)>, HeadError> {
    let mut headers = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= limits.max_head_bytes => {
            Ok(Some((to_head(&req)?, n)))
        }
        Ok(httparse::Status::Complete(_)) => Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) if buf.len() >= limits.max_head_bytes => {
            Err(HeadError::TooLarge)
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge),
        Err(e) => Err(HeadError::Malformed(e.to_string())),
    }
}

fn to_head(req: &httparse::Request<'_, '_>) -> Result<Head, HeadError> {
    let method = req.method.unwrap_or_default().to_string();
    let target = req.path.unwrap_or_default();
    if !target.starts_with('/') {
        return Err(HeadError::Malformed(format!(
            "the request target must be a path, not {target:?}"
        )));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut headers = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value)
            .map_err(|_| HeadError::Malformed(format!("header {} is not UTF-8", h.name)))?;
        headers.push((h.name.to_string(), value.to_string()));
    }
    Ok(Head {
        method,
        path: path.to_string(),
        query: query.to_string(),
        http10: req.version == Some(0),
        headers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};

    /// A connection whose peer already sent `bytes` (and keeps the socket open or not).
    fn conn_with(bytes: &[u8], close: bool, limits: Limits) -> (Conn<TcpStream>, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        client.write_all(bytes).unwrap();
        if close {
            client.shutdown(std::net::Shutdown::Write).unwrap();
        }
        (Conn::new(server, limits), client)
    }

    #[test]
    fn parses_head_query_and_body() {
        let (mut c, _client) = conn_with(
            b"POST /api/tasks?status=queued&access_token=a%2Bb HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer  tok \r\nContent-Length: 5\r\n\r\nhello",
            false,
            Limits::default(),
        );
        let h = c.read_head().unwrap();
        assert_eq!((h.method.as_str(), h.path.as_str()), ("POST", "/api/tasks"));
        assert_eq!(h.query_param("status").as_deref(), Some("queued"));
        assert_eq!(h.query_param("access_token").as_deref(), Some("a+b"));
        assert_eq!(h.query_param("nope"), None);
        assert_eq!(h.bearer(), Some("tok"));
        assert!(h.keep_alive());
        assert_eq!(h.content_length().unwrap(), 5);
        assert_eq!(c.read_body(5).unwrap(), b"hello");
    }

    #[test]
    fn keep_alive_reads_two_requests() {
        let (mut c, _client) = conn_with(
            b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.0\r\n\r\n",
            true,
            Limits::default(),
        );
        assert_eq!(c.read_head().unwrap().path, "/a");
        let b = c.read_head().unwrap();
        assert_eq!(b.path, "/b");
        assert!(!b.keep_alive());
        assert!(matches!(c.read_head(), Err(HeadError::Idle)));
    }

    #[test]
    fn refuses_bad_heads() {
        let (mut c, _cl) = conn_with(b"GARBAGE\x01\r\n\r\n", true, Limits::default());
        assert!(matches!(c.read_head(), Err(HeadError::Malformed(_))));
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
        let (mut c, _cl) = conn_with(big.as_bytes(), false, Limits::default());
        assert!(matches!(c.read_head(), Err(HeadError::TooLarge)));
        let many: String = (0..100).map(|i| format!("X{i}: y\r\n")).collect();
        let (mut c, _cl) = conn_with(
            format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes(),
            false,
            Limits::default(),
        );
        assert!(matches!(c.read_head(), Err(HeadError::TooLarge)));
        let (mut c, _cl) = conn_with(b"GET http://x/ HTTP/1.1\r\n\r\n", true, Limits::default());
        assert!(matches!(c.read_head(), Err(HeadError::Malformed(_))));
    }

    #[test]
    fn a_slow_head_times_out() {
        let limits = Limits {
            head_timeout: Duration::from_millis(200),
            ..Limits::default()
        };
        let (mut c, _client) = conn_with(b"GET / HTTP/1.1\r\nHost:", false, limits);
        assert!(matches!(c.read_head(), Err(HeadError::TimedOut)));
    }

    #[test]
    fn content_length_rules() {
        let head = |hs: &[(&str, &str)]| Head {
            method: "POST".into(),
            path: "/".into(),
            query: String::new(),
            http10: false,
            headers: hs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        assert_eq!(head(&[]).content_length().unwrap(), 0);
        assert_eq!(
            head(&[("Content-Length", "3"), ("Transfer-Encoding", "chunked")])
                .content_length()
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            head(&[("Transfer-Encoding", "chunked")])
                .content_length()
                .unwrap_err()
                .status,
            411
        );
        assert_eq!(
            head(&[("Content-Length", "-1")])
                .content_length()
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            head(&[("Content-Length", "1"), ("Content-Length", "2")])
                .content_length()
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            head(&[("Content-Length", "2"), ("content-length", "2")])
                .content_length()
                .unwrap(),
            2
        );
    }

    #[test]
    fn responses_have_length_and_json_errors() {
        let (mut c, mut client) = conn_with(b"", false, Limits::default());
        c.write_response(&Response::error(404, "no task T-1"), false)
            .unwrap();
        drop(c);
        let mut text = String::new();
        client.read_to_string(&mut text).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
        let body = r#"{"error":"no task T-1"}"#;
        assert!(
            text.contains(&format!("Content-Length: {}\r\n", body.len())),
            "{text}"
        );
        assert!(text.ends_with(body), "{text}");
    }
}
