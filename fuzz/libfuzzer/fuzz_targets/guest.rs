//! libFuzzer target: tandem-fuzz's `guest` harness, coverage-guided.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tandem_fuzz::one(tandem_fuzz::Target::Guest, data);
});
