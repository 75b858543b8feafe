//! The uploader: sends a phase's complete log file to
//! `POST /api/tasks/{id}/logs/upload?phase=...`, retrying with backoff while the server
//! is unreachable or busy, so a log is not lost to a passing outage. Uploads are
//! idempotent on the server (the same phase again replaces it), so a retry is safe.
//! Each carries the log's size and SHA-256, which the server checks before it keeps it.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::thread;
use std::time::Duration;

use super::Ctx;
use crate::protocol::{Phase, LENGTH_HEADER, SHA256_HEADER};
use crate::util::Backoff;

/// Whether an HTTP status is worth retrying. 422: the body arrived damaged.
pub(crate) fn retryable(status: u16) -> bool {
    matches!(status, 401 | 408 | 422 | 429 | 500..=599)
}

/// Uploads `path` as the `phase` log of `task_id`.
pub(crate) fn upload(ctx: &Ctx, task_id: &str, phase: Phase, path: &Path) -> Result<(), String> {
    let url = ctx.config.server.http(&format!(
        "/api/tasks/{task_id}/logs/upload?phase={}",
        phase.as_str()
    ));
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        let outcome = attempt_upload(ctx, &url, path);
        match outcome {
            Ok(()) => return Ok(()),
            Err((status, msg)) if status.is_some_and(|s| !retryable(s)) => {
                return Err(format!("the server refused it: {msg}"))
            }
            Err((_, msg)) => {
                let wait = backoff.next_wait();
                log::warn!(
                    "upload of {task_id} {} log failed: {msg}; retrying in {:.1} s",
                    phase.as_str(),
                    wait.as_secs_f64()
                );
                thread::sleep(wait);
            }
        }
    }
}

/// The size and hex SHA-256 of a file.
pub(crate) fn digest(path: &Path) -> io::Result<(u64, String)> {
    let mut f = File::open(path)?;
    let mut hasher = crate::util::Sha256::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok((len, hasher.hex()))
}

fn attempt_upload(ctx: &Ctx, url: &str, path: &Path) -> Result<(), (Option<u16>, String)> {
    let Some(creds) = ctx.credentials() else {
        return Err((None, "not registered yet".into()));
    };
    let unreadable = |e: io::Error| (Some(0), format!("cannot read {}: {e}", path.display()));
    let (len, sha) = digest(path).map_err(unreadable)?;
    let file = File::open(path).map_err(unreadable)?;
    let mut resp = ctx
        .http
        .post(url)
        .header("Authorization", format!("Bearer {}", creds.token))
        .header("Content-Type", "text/plain; charset=utf-8")
        .header(SHA256_HEADER, sha)
        .header(LENGTH_HEADER, len.to_string())
        .send(file)
        .map_err(|e| (None, crate::tls::describe(&e)))?;
    let status = resp.status().as_u16();
    if (200..300).contains(&status) {
        return Ok(());
    }
    let body = resp.body_mut().read_to_string().unwrap_or_default();
    Err((
        Some(status),
        format!("{status}: {}", crate::protocol::error_message(&body)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_statuses_are_retried() {
        for s in [401, 408, 422, 429, 500, 502, 503] {
            assert!(retryable(s), "{s}");
        }
        for s in [0, 400, 403, 404, 409, 413] {
            assert!(!retryable(s), "{s}");
        }
    }
}
