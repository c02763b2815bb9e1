//! Benchmarks for mcdist: criterion benches and the end-to-end bench binary.
