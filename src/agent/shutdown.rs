//! Graceful shutdown. On the first SIGTERM (or SIGINT) the agent takes no new task (its
//! state says `draining`, so the server sends none), keeps heartbeating, and lets its
//! running tasks finish for up to `--drain-timeout-s`; then it cancels what still runs,
//! waits for the outbox to reach the server (briefly: what is left stays on disk for the
//! next start), closes WS 1 and exits 0. A second signal cancels running tasks at once.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use super::Ctx;
use crate::wsloop::Outgoing;

/// How long to wait for the outbox to drain before exiting.
const OUTBOX_WAIT: Duration = Duration::from_secs(30);

/// Starts the thread that waits for SIGTERM/SIGINT.
pub(crate) fn watch(ctx: Arc<Ctx>) -> std::io::Result<()> {
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut seen = 0;
            for sig in signals.forever() {
                seen += 1;
                if seen == 1 {
                    log::warn!(
                        "signal {sig}: shutting down; no new tasks, running ones may finish (up to {} s); signal again to cancel them now",
                        ctx.config.drain_timeout.as_secs()
                    );
                    ctx.scheduler.drain();
                    ctx.mailbox.send(Outgoing::Nudge);
                    let c = ctx.clone();
                    let _ = thread::Builder::new().name("drain".into()).spawn(move || drain(&c));
                } else {
                    log::warn!("signal {sig} again: canceling running tasks now");
                    cancel_all(&ctx);
                }
            }
        })?;
    Ok(())
}

fn cancel_all(ctx: &Ctx) {
    let tasks: Vec<_> = ctx.tasks().values().cloned().collect();
    for t in tasks {
        t.cancel(ctx.config.cancel_grace);
    }
}

/// Waits (polling, bounded) until `done` holds or `limit` passes; true if it holds.
fn wait_until(limit: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(100));
    }
    true
}

fn drain(ctx: &Ctx) -> ! {
    if !wait_until(ctx.config.drain_timeout, || ctx.scheduler.running() == 0) {
        log::warn!(
            "{} task(s) still running after {} s: canceling them",
            ctx.scheduler.running(),
            ctx.config.drain_timeout.as_secs()
        );
        cancel_all(ctx);
        let limit = ctx.config.cancel_grace + Duration::from_secs(10);
        if !wait_until(limit, || ctx.scheduler.running() == 0) {
            log::error!("tasks did not stop after SIGKILL; exiting anyway");
        }
    }
    if !wait_until(OUTBOX_WAIT, || ctx.outbox.len() == 0) {
        log::warn!(
            "{} report(s) not delivered yet: they stay in the outbox for the next start",
            ctx.outbox.len()
        );
    }
    ctx.mailbox
        .send(Outgoing::Close(1001, "agent shutting down".into()));
    // Give the C&C thread a moment to send the close frame.
    wait_until(Duration::from_secs(1), || false);
    log::info!("stopped");
    std::process::exit(0)
}
