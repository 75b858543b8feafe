//! Fuzz target: `iac::fuzzing::upload` must not panic on any input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    iac::fuzzing::upload(data);
});
