//! Command-line flags for both binaries: `--name value` or `--name=value`, each readable
//! from an environment variable too (a flag wins over the variable), plus `--help` and
//! `--version`. Small on purpose: the flag tables live next to each binary's `Config`.

use std::ops::RangeInclusive;
use std::time::Duration;

/// A flag table row: flag, environment variable, help text.
pub type FlagSpec = (&'static str, &'static str, &'static str);

/// Parsed command-line flags.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    values: Vec<(String, String)>,
    switches: Vec<String>,
}

impl Flags {
    /// Parses `args` (without the program name) against the flags of `table` and the
    /// value-less `switches`.
    pub fn parse<I: IntoIterator<Item = String>>(
        args: I,
        table: &[FlagSpec],
        switches: &[&str],
    ) -> Result<Flags, String> {
        let mut flags = Flags::default();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
                _ => (arg.clone(), None),
            };
            if switches.contains(&name.as_str()) {
                if inline.is_some() {
                    return Err(format!("{name} takes no value"));
                }
                flags.switches.push(name);
            } else if table.iter().any(|(f, _, _)| *f == name) {
                let value = match inline {
                    Some(v) => v,
                    None => args.next().ok_or_else(|| format!("{name} needs a value"))?,
                };
                flags.values.push((name, value));
            } else if name.starts_with('-') {
                return Err(format!("unknown flag {name} (see --help)"));
            } else {
                return Err(format!("unexpected argument {arg:?} (see --help)"));
            }
        }
        Ok(flags)
    }

    pub fn has(&self, switch: &str) -> bool {
        self.switches.iter().any(|s| s == switch)
    }

    /// The last value of a flag, else its environment variable (unset or empty: none).
    pub fn value(&self, name: &str, table: &[FlagSpec]) -> Option<String> {
        debug_assert!(
            table.iter().any(|(f, _, _)| *f == name),
            "{name} is read but not in the flag table"
        );
        if let Some((_, v)) = self.values.iter().rev().find(|(n, _)| n == name) {
            return Some(v.clone());
        }
        let env = table.iter().find(|(f, _, _)| *f == name)?.1;
        std::env::var(env).ok().filter(|v| !v.is_empty())
    }

    /// Every value of a repeatable flag, in order.
    pub fn values(&self, name: &str) -> Vec<String> {
        debug_assert!(name.starts_with("--"));
        self.values
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// A whole number within `range`, or `default` when not given.
    pub fn number(
        &self,
        name: &str,
        table: &[FlagSpec],
        default: u64,
        range: RangeInclusive<u64>,
    ) -> Result<u64, String> {
        match self.value(name, table) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|n| range.contains(n))
                .ok_or_else(|| {
                    format!(
                        "{name} must be a whole number from {} to {}, not {v:?}",
                        range.start(),
                        range.end()
                    )
                }),
        }
    }
}

/// Why a binary stops: bad usage (exit code 2) or a failure at run time (exit code 1).
#[derive(Debug)]
pub enum Failure {
    Usage(String),
    Runtime(String),
}

/// The `main` of every binary, so that each stays a thin mapping of `run()` to an exit
/// code: parses flags, answers `--help` and `--version`, starts logging, calls `run`.
pub fn main(
    name: &str,
    synopsis: &str,
    about: &str,
    table: &[FlagSpec],
    run: impl FnOnce(&Flags) -> Result<(), Failure>,
) -> std::process::ExitCode {
    let result = Flags::parse(std::env::args().skip(1), table, &["--help", "--version"])
        .map_err(Failure::Usage)
        .and_then(|flags| {
            if flags.has("--help") {
                print!("{}", usage(synopsis, about, table));
                return Ok(());
            }
            if flags.has("--version") {
                println!("{name} {}", crate::VERSION);
                return Ok(());
            }
            crate::init_logging(flags.value("--log-level", table).as_deref())
                .map_err(Failure::Usage)?;
            run(&flags)
        });
    exit_code(name, result)
}

/// Reports a failure on stderr and maps it to the exit code: 0, 1 (runtime), 2 (usage).
pub fn exit_code(name: &str, result: Result<(), Failure>) -> std::process::ExitCode {
    use std::process::ExitCode;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(e)) => {
            eprintln!("{name}: {e}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}

impl Flags {
    /// A duration given in milliseconds (`--x-ms`), checked against `range`.
    pub fn millis(
        &self,
        name: &str,
        table: &[FlagSpec],
        default: u64,
        range: RangeInclusive<u64>,
    ) -> Result<Duration, String> {
        self.number(name, table, default, range)
            .map(Duration::from_millis)
    }

    /// A duration given in seconds (`--x-s`), checked against `range`.
    pub fn secs(
        &self,
        name: &str,
        table: &[FlagSpec],
        default: u64,
        range: RangeInclusive<u64>,
    ) -> Result<Duration, String> {
        self.number(name, table, default, range)
            .map(Duration::from_secs)
    }
}

/// The `--help` text of a binary.
pub fn usage(synopsis: &str, about: &str, table: &[FlagSpec]) -> String {
    let mut s = format!("{about}\n\nUsage: {synopsis}\n\nFlags (each also read from the environment variable shown):\n");
    for (flag, env, help) in table {
        s.push_str(&format!("  {flag:<24} {env:<24} {help}\n"));
    }
    s.push_str("  --help                                            print this help\n");
    s.push_str("  --version                                         print the version\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &[FlagSpec] = &[
        ("--name", "IAC_TEST_CLI_NAME", ""),
        ("--label", "IAC_TEST_CLI_LABELS", ""),
        ("--n", "IAC_TEST_CLI_N", ""),
    ];

    fn parse(args: &[&str]) -> Result<Flags, String> {
        Flags::parse(args.iter().map(|s| s.to_string()), T, &["--help"])
    }

    #[test]
    fn values_switches_and_errors() {
        let f = parse(&[
            "--name",
            "a",
            "--label=x=1",
            "--label",
            "y=2",
            "--help",
            "--name=b",
        ])
        .unwrap();
        assert_eq!(f.value("--name", T).as_deref(), Some("b"));
        assert_eq!(f.values("--label"), ["x=1", "y=2"]);
        assert!(f.has("--help"));
        assert!(parse(&["--nope"])
            .unwrap_err()
            .contains("unknown flag --nope"));
        assert!(parse(&["--name"]).unwrap_err().contains("needs a value"));
        assert!(parse(&["stray"])
            .unwrap_err()
            .contains("unexpected argument"));
        assert!(parse(&["--help=1"]).is_err());
    }

    #[test]
    fn numbers_are_checked() {
        let f = parse(&["--n", "7"]).unwrap();
        assert_eq!(f.number("--n", T, 1, 1..=10).unwrap(), 7);
        let f = parse(&["--n", "70"]).unwrap();
        assert!(f
            .number("--n", T, 1, 1..=10)
            .unwrap_err()
            .contains("from 1 to 10"));
        assert_eq!(parse(&[]).unwrap().number("--n", T, 3, 1..=10).unwrap(), 3);
    }
}
