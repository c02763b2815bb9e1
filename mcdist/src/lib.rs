//! mcdist core.
#![forbid(unsafe_code)]
