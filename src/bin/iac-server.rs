//! `iac-server`: parses flags into a checked config, starts logging, runs the server,
//! and maps the result to an exit code (0 ok, 1 runtime failure, 2 bad usage).

use std::process::ExitCode;

use iac::cli::{usage, Flags};
use iac::server::{self, Config, FLAGS};

fn main() -> ExitCode {
    let flags = match Flags::parse(std::env::args().skip(1), FLAGS, &["--help", "--version"]) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("iac-server: {e}");
            return ExitCode::from(2);
        }
    };
    if flags.has("--help") {
        print!(
            "{}",
            usage(
                "iac-server [FLAGS]",
                "The IAC control plane: HTTP API, agent C&C hub and store.",
                FLAGS
            )
        );
        return ExitCode::SUCCESS;
    }
    if flags.has("--version") {
        println!("iac-server {}", iac::VERSION);
        return ExitCode::SUCCESS;
    }
    if let Err(e) = iac::init_logging(flags.value("--log-level", FLAGS).as_deref()) {
        eprintln!("iac-server: {e}");
        return ExitCode::from(2);
    }
    let config = match Config::from_flags(&flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("iac-server: {e}");
            return ExitCode::from(2);
        }
    };
    match server::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iac-server: {e}");
            ExitCode::FAILURE
        }
    }
}
