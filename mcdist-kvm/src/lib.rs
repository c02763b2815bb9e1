//! KVM + userfaultfd backend for mcdist.
//!
//! - [`lazy::LazyMemory`]: guest RAM registered with userfaultfd; missing pages are fetched on
//!   first touch, zero pages filled locally.
//! - The clone system (work in progress).
//!
//! Linux/x86-64 only; needs `/dev/kvm` and userfaultfd (root, or
//! `vm.unprivileged_userfaultfd=1`).

pub mod lazy;
pub mod source;
mod sys;

pub use lazy::{
    FaultWait, LazyConfig, LazyHandle, LazyMemory, LazyStats, PageFetcher, SourceFetcher,
};
pub use source::{PageBits, PageSource};
