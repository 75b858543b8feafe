//! Fuzz target: `iac::fuzzing::ws1_message` must not panic on any input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    iac::fuzzing::ws1_message(data);
});
