//! libFuzzer target: tandem-fuzz's `gguf` harness, coverage-guided.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tandem_fuzz::one(tandem_fuzz::Target::Gguf, data);
});
