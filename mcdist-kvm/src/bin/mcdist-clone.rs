//! mcdist-clone (work in progress).
fn main() {}
