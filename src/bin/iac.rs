//! `iac`: the terminal client. Arguments → `client::main()` → an exit code
//! (0 ok or task succeeded, 1 failure or task did not succeed, 2 bad usage).

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    iac::cli::exit_code("iac", iac::client::main(&args))
}
