//! Fuzz target: `iac::fuzzing::http_head` must not panic on any input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    iac::fuzzing::http_head(data);
});
