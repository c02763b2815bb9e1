//! cargo-fuzz target: see `mcdist_fuzz::integrity`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mcdist_fuzz::integrity(data));
