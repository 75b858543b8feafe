//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz, libFuzzer) and for the
//! regression test that replays what they found (`tests/fuzz_regressions.rs`). Each
//! takes arbitrary bytes and must neither panic nor loop, whatever they are. Not an API.

use std::io::{self, Cursor, Read, Write};

use crate::protocol::{log_lines, valid_task_id, Phase};
use crate::server::api::{route, Routed};
use crate::server::http::{parse_head, Limits};

/// The HTTP request head parser, and what the server reads from a head.
pub fn http_head(data: &[u8]) {
    let limits = Limits::default();
    if let Ok(Some((head, n))) = parse_head(data, &limits) {
        assert!(n <= data.len());
        let _ = head.content_length();
        let _ = head.bearer();
        let _ = head.keep_alive();
        let _ = head.is_websocket_upgrade();
        let _ = head.query_param("access_token");
        let _ = head.query_param("status");
        if let Routed::Found(_, caps) = route(&head.method, &head.path) {
            for c in caps {
                let _ = valid_task_id(c);
            }
        }
    }
}

/// A byte stream that reads the fuzz input and swallows what is written.
struct Replay {
    input: Cursor<Vec<u8>>,
}

impl Read for Replay {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Replay {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// WS 1 from an agent: WebSocket frames (as the server reads them, with its limits),
/// then the decoding of each text message.
pub fn ws1_message(data: &[u8]) {
    use tungstenite::protocol::Role;
    let config = crate::wsloop::control_config()
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20));
    let stream = Replay {
        input: Cursor::new(data.to_vec()),
    };
    let mut ws = tungstenite::WebSocket::from_raw_socket(stream, Role::Server, Some(config));
    for _ in 0..1000 {
        match ws.read() {
            Ok(tungstenite::Message::Text(t)) => {
                let _ = crate::server::control::decode(t.as_str());
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    // And the bytes as one text, as if a frame had carried them.
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::server::control::decode(text);
    }
}

/// A log upload: its request head, then its body checked and cut into lines as the
/// server does for viewers of the archive.
pub fn upload(data: &[u8]) {
    let limits = Limits::default();
    let Ok(Some((head, n))) = parse_head(data, &limits) else {
        return;
    };
    let body = &data[n..];
    let Ok(len) = head.content_length() else {
        return;
    };
    let _ = head.query_param("phase").as_deref().and_then(Phase::parse);
    let _ = head.header(crate::protocol::SHA256_HEADER);
    let take = body.len().min(usize::try_from(len).unwrap_or(usize::MAX));
    let body = &body[..take];
    let _ = crate::util::sha256_hex(body);
    let lines = log_lines(body);
    assert!(lines
        .iter()
        .all(|l| l.len() <= crate::protocol::MAX_LINE * 3));
}
