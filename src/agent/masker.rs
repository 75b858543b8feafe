//! Secret masking: the values of a task's sensitive variables never leave the host. The
//! child's output goes through a pipe to a copier that replaces every occurrence of a
//! secret with [`MASK`] before it writes the log file, which is all that is ever uploaded
//! or streamed. A secret split across two writes (or containing a newline) is still
//! caught: the copier holds back the end of a chunk only while it could be the start of
//! a secret, and nothing more, so output is not delayed otherwise.

use std::io::{self, Read, Write};

/// What a secret becomes in a log.
pub(crate) const MASK: &str = "***";

/// Values shorter than this are not masked (masking "a" would garble every log).
pub(crate) const MIN_SECRET: usize = 3;

/// The values to mask: every string of at least [`MIN_SECRET`] bytes found under the
/// named variables of `variables` (a JSON object), in lists and objects too.
pub(crate) fn secrets(variables: &str, names: &[String]) -> Vec<Vec<u8>> {
    fn walk(v: &serde_json::Value, out: &mut Vec<Vec<u8>>) {
        match v {
            serde_json::Value::String(s) if s.len() >= MIN_SECRET => {
                out.push(s.as_bytes().to_vec())
            }
            serde_json::Value::Number(n) if n.to_string().len() >= MIN_SECRET => {
                out.push(n.to_string().into_bytes())
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            serde_json::Value::Object(o) => o.values().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let Ok(serde_json::Value::Object(vars)) = serde_json::from_str(variables) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for name in names {
        if let Some(v) = vars.get(name) {
            walk(v, &mut out);
        }
    }
    out
}

/// Masks a byte stream that arrives in pieces.
pub(crate) struct Masker {
    secrets: Vec<Vec<u8>>,
    held: Vec<u8>,
}

impl Masker {
    pub fn new(mut secrets: Vec<Vec<u8>>) -> Masker {
        // Longest first, so a secret that contains another is masked whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Masker {
            secrets,
            held: Vec::new(),
        }
    }

    /// Feeds a chunk; returns what can be written now.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        if self.secrets.is_empty() {
            return chunk.to_vec();
        }
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(chunk);
        let masked = self.replace(&buf);
        let keep = self.partial_suffix(&masked);
        self.held = masked[masked.len() - keep..].to_vec();
        masked[..masked.len() - keep].to_vec()
    }

    /// The end of the stream: whatever was held back.
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.held)
    }

    fn replace(&self, buf: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(buf.len());
        let mut i = 0;
        'outer: while i < buf.len() {
            for s in &self.secrets {
                if buf[i..].starts_with(s) {
                    out.extend_from_slice(MASK.as_bytes());
                    i += s.len();
                    continue 'outer;
                }
            }
            out.push(buf[i]);
            i += 1;
        }
        out
    }

    /// The length of the longest end of `buf` that is the start of some secret.
    fn partial_suffix(&self, buf: &[u8]) -> usize {
        let longest = self.secrets.iter().map(Vec::len).max().unwrap_or(0);
        (1..longest.min(buf.len() + 1))
            .rev()
            .find(|&n| {
                let tail = &buf[buf.len() - n..];
                self.secrets
                    .iter()
                    .any(|s| s.len() > n && s.starts_with(tail))
            })
            .unwrap_or(0)
    }
}

/// Copies `from` to `to` through a [`Masker`] until `from` ends.
pub(crate) fn copy(
    mut from: impl Read,
    to: &mut impl Write,
    secrets: Vec<Vec<u8>>,
) -> io::Result<()> {
    let mut masker = Masker::new(secrets);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&masker.push(&buf[..n]))?;
    }
    to.write_all(&masker.finish())?;
    to.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(secrets: &[&str], pieces: &[&str]) -> String {
        let mut m = Masker::new(secrets.iter().map(|s| s.as_bytes().to_vec()).collect());
        let mut out = Vec::new();
        for p in pieces {
            out.extend(m.push(p.as_bytes()));
        }
        out.extend(m.finish());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn masks_whole_and_split_secrets() {
        assert_eq!(run(&["hunter2"], &["pass=hunter2\n"]), "pass=***\n");
        assert_eq!(run(&["hunter2"], &["pass=hun", "ter2\n"]), "pass=***\n");
        assert_eq!(
            run(&["hunter2"], &["h", "u", "n", "t", "e", "r", "2", "!"]),
            "***!"
        );
        assert_eq!(run(&["two\nlines"], &["a two\n", "lines b"]), "a *** b");
        assert_eq!(run(&["abc", "abcdef"], &["xabcdefx abcx"]), "x***x ***x");
        // A near miss is written as it is, once it cannot be a secret any more.
        assert_eq!(run(&["hunter2"], &["hunter", "3"]), "hunter3");
    }

    #[test]
    fn nothing_is_held_back_that_cannot_start_a_secret() {
        let mut m = Masker::new(vec![b"secret".to_vec()]);
        assert_eq!(m.push(b"plain line\n"), b"plain line\n");
        assert_eq!(m.push(b"ends with sec"), b"ends with ");
        assert_eq!(m.push(b"tion\n"), b"section\n");
    }

    #[test]
    fn secrets_come_from_the_named_variables_only() {
        let vars = r#"{"db_password": "s3cret-pw", "nested": {"k": ["tok-123", "no"]}, "public": "visible", "pin": 1234}"#;
        let names = [
            "db_password".to_string(),
            "nested".to_string(),
            "pin".to_string(),
            "absent".to_string(),
        ];
        let s = secrets(vars, &names);
        let text: Vec<&str> = s.iter().map(|v| std::str::from_utf8(v).unwrap()).collect();
        assert_eq!(
            text,
            ["s3cret-pw", "tok-123", "1234"],
            "in the order of the names"
        );
        assert!(secrets("not json", &names).is_empty());
    }
}
