//! Replays every input in `fuzz/regressions/<target>/` (seeds, and any crash a fuzz run
//! found, kept here once fixed) through the fuzz targets' entry points, so a fixed crash
//! stays fixed without a fuzzer in CI.

use std::path::Path;

/// A fuzz target's name and entry point.
type Target = (&'static str, fn(&[u8]));

#[test]
fn every_kept_fuzz_input_runs_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let targets: [Target; 3] = [
        ("http_head", iac::fuzzing::http_head),
        ("ws1_message", iac::fuzzing::ws1_message),
        ("upload", iac::fuzzing::upload),
    ];
    let mut replayed = 0;
    for (name, run) in targets {
        for entry in std::fs::read_dir(root.join(name)).unwrap() {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            run(&data);
            replayed += 1;
        }
    }
    assert!(replayed >= 3, "the seeds are missing");
}
