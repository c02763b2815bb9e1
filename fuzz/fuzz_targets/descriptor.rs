//! cargo-fuzz target: see `mcdist_fuzz::descriptor`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mcdist_fuzz::descriptor(data));
