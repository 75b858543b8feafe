//! `iac-agent`: flags → a checked `Config` → `agent::run()` → an exit code
//! (1 when the server refused the agent or it could not start, 2 bad usage).

use iac::agent::{self, Config, FLAGS};
use iac::cli::{self, Failure};

fn main() -> std::process::ExitCode {
    cli::main(
        "iac-agent",
        "iac-agent --server URL --registration-token TOKEN [FLAGS]",
        "The IAC agent: dials out to the server and runs Terraform tasks.",
        FLAGS,
        |flags| {
            let config = Config::from_flags(flags).map_err(Failure::Usage)?;
            agent::run(config).map_err(|e| Failure::Runtime(e.to_string()))
        },
    )
}
