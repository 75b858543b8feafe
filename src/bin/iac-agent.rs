//! `iac-agent`: parses flags into a checked config, starts logging, runs the agent, and
//! maps the result to an exit code (1 when the server refused it, 2 bad usage).

use std::process::ExitCode;

use iac::agent::{self, Config, FLAGS};
use iac::cli::{usage, Flags};

fn main() -> ExitCode {
    let flags = match Flags::parse(std::env::args().skip(1), FLAGS, &["--help", "--version"]) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("iac-agent: {e}");
            return ExitCode::from(2);
        }
    };
    if flags.has("--help") {
        print!(
            "{}",
            usage(
                "iac-agent --server URL --registration-token TOKEN [FLAGS]",
                "The IAC agent: dials out to the server and runs Terraform tasks.",
                FLAGS
            )
        );
        return ExitCode::SUCCESS;
    }
    if flags.has("--version") {
        println!("iac-agent {}", iac::VERSION);
        return ExitCode::SUCCESS;
    }
    if let Err(e) = iac::init_logging(flags.value("--log-level", FLAGS).as_deref()) {
        eprintln!("iac-agent: {e}");
        return ExitCode::from(2);
    }
    let config = match Config::from_flags(&flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("iac-agent: {e}");
            return ExitCode::from(2);
        }
    };
    match agent::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iac-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
