//! mcdist-kvm-demo (work in progress).
fn main() {}
