//! `iac-server`: flags → a checked `Config` → `server::run()` → an exit code
//! (0 ok, 1 runtime failure, 2 bad usage).

use iac::cli::{self, Failure};
use iac::server::{self, Config, FLAGS};

fn main() -> std::process::ExitCode {
    cli::main(
        "iac-server",
        "iac-server [FLAGS]",
        "The IAC control plane: HTTP API, agent C&C hub and store.",
        FLAGS,
        |flags| {
            let config = Config::from_flags(flags).map_err(Failure::Usage)?;
            server::run(config).map_err(|e| Failure::Runtime(e.to_string()))
        },
    )
}
