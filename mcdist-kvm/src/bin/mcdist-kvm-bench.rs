//! mcdist-kvm-bench (work in progress).
fn main() {}
