//! Tokens: the API token and the registration token (from a flag, or generated on first
//! start and kept 0600 in the data dir), and per-agent tokens, of which the store keeps
//! only SHA-256 hashes (ring). Comparisons are of hashes, in constant time.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The hex SHA-256 of a token: what the server keeps and compares.
pub(crate) fn hash(token: &str) -> String {
    crate::util::sha256_hex(token.as_bytes())
}

/// Whether `token` hashes to `expected_hash`, comparing in constant time.
pub(crate) fn matches(token: &str, expected_hash: &str) -> bool {
    let got = hash(token);
    got.len() == expected_hash.len()
        && got
            .bytes()
            .zip(expected_hash.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

pub(crate) fn new_token() -> io::Result<String> {
    crate::util::new_token()
}

/// The registration token as the server holds it.
#[derive(Debug)]
pub(crate) struct Registration {
    pub hash: String,
    /// Set by `--registration-token`: rotating it means changing the flag.
    pub from_flag: bool,
}

/// Whether `token` is one of `hashes`.
pub(crate) fn matches_any(token: &str, hashes: &[String]) -> bool {
    // Every comparison runs, so the time does not say which one matched.
    hashes
        .iter()
        .fold(false, |found, h| matches(token, h) | found)
}

/// Writes a token to `file` with mode 0600, durably.
pub(crate) fn save(token: &str, file: &Path) -> io::Result<()> {
    let tmp = file.with_extension("tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(format!("{token}\n").as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, file)
}

/// Where a token came from, so the server can say so once.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Source {
    Given,
    Saved,
    Generated,
}

/// The token `given` (flag or environment), else the one saved in `file`, else a new
/// one saved there with mode 0600.
pub(crate) fn load_or_create(given: Option<&str>, file: &Path) -> io::Result<(String, Source)> {
    if let Some(t) = given {
        return Ok((t.to_string(), Source::Given));
    }
    match fs::read_to_string(file) {
        Ok(s) if !s.trim().is_empty() => return Ok((s.trim().to_string(), Source::Saved)),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let token = new_token()?;
    save(&token, file)?;
    Ok((token, Source::Generated))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn hashes_compare() {
        let h = hash("secret");
        assert_eq!(h.len(), 64);
        assert!(matches("secret", &h));
        assert!(!matches("secreT", &h));
        assert!(!matches("secret", "short"));
    }

    #[test]
    fn tokens_are_generated_once_and_kept_private() {
        let dir = std::env::temp_dir().join(format!(
            "iac-auth-{}",
            crate::util::hex(&crate::util::random_bytes(6).unwrap())
        ));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("api-token");
        let (t1, s1) = load_or_create(None, &file).unwrap();
        assert_eq!(s1, Source::Generated);
        assert_eq!(
            fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let (t2, s2) = load_or_create(None, &file).unwrap();
        assert_eq!((t2.as_str(), s2), (t1.as_str(), Source::Saved));
        let (t3, s3) = load_or_create(Some("given"), &file).unwrap();
        assert_eq!((t3.as_str(), s3), ("given", Source::Given));
        fs::remove_dir_all(dir).unwrap();
    }
}
