//! IAC: a Terraform execution platform for networks that only allow outbound
//! connections. `iac-server` is the control plane ([`server`]); `iac-agent` dials out to
//! it, holds one WebSocket for command and control, and runs Terraform ([`agent`]).
//! [`client`] is the `iac` terminal client. [`protocol`] is the wire contract all share.

#![forbid(unsafe_code)]

pub mod agent;
pub mod cli;
pub mod client;
#[doc(hidden)]
pub mod fuzzing;
pub mod protocol;
pub mod server;
pub mod tls;
pub mod util;
pub mod wsloop;

/// The version every binary reports and agents register with.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Logging to stderr (journald picks it up under systemd), at `level`.
pub fn init_logging(level: Option<&str>) -> Result<(), String> {
    let level = match level.unwrap_or("info").to_ascii_lowercase().as_str() {
        "error" => log::LevelFilter::Error,
        "warn" => log::LevelFilter::Warn,
        "info" => log::LevelFilter::Info,
        "debug" => log::LevelFilter::Debug,
        "trace" => log::LevelFilter::Trace,
        other => {
            return Err(format!(
                "unknown log level {other:?}: use error, warn, info, debug or trace"
            ))
        }
    };
    let config = simplelog::ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_target_level(log::LevelFilter::Off)
        .set_thread_level(log::LevelFilter::Off)
        .build();
    simplelog::WriteLogger::init(level, config, std::io::stderr()).map_err(|e| e.to_string())
}
