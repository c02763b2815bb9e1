//! KVM + userfaultfd backend for mcdist: SnowFlock-style VM cloning.
//!
//! - [`lazy::LazyMemory`]: guest RAM registered with userfaultfd; missing pages are fetched on
//!   first touch (one request per page however many vCPUs fault on it), zero pages are filled
//!   locally, pushed pages are installed as they arrive. Per-clone statistics.
//! - [`inline::InlineMcdist`]: an mcdist client driven by the fault thread itself (one poll
//!   over the userfaultfd and the client's sockets, no thread hand-off per fault).
//! - [`share::HostCache`]: one mcdist client and page cache shared by every clone of a parent
//!   on this host, so a page crosses the network once per host, not once per clone.
//! - [`vm`]: a small VMM on kvm-ioctls; [`guest`]: the demo guest program.
//! - [`descriptor::Descriptor`]: what a clone needs besides memory contents.
//! - [`clone`]: parent, fork point, tickets, clone, join, kill; the memory server
//!   ([`clone::MemoryServer`]) and the clone factory ([`clone::connect_fetcher`]).
//! - [`session`]: joining the session a descriptor names (a leaf module);
//!   [`threaded::McdistFetcher`]: an mcdist client on its own thread.
//! - [`linux`]: a real Linux guest (Debian's kernel, busybox initramfs, 8250 console, in-kernel
//!   irqchip and PIT) forked at a point its init chooses, with full machine state in the
//!   descriptor (see `LINUX.md`).
//!
//! Linux/x86-64 only; needs `/dev/kvm` and userfaultfd (root, or
//! `vm.unprivileged_userfaultfd=1`). It does not do live migration, device emulation,
//! interrupts or guest paging; the demo guest runs in flat 32-bit protected mode.

pub mod clone;
pub mod descriptor;
pub mod fcuffd;
pub mod fuse;
pub mod guest;
pub mod inline;
pub mod lazy;
pub mod linux;
pub mod netns;
pub mod qemu;
pub mod session;
pub mod share;
pub mod source;
mod sys;
pub mod threaded;
pub mod vm;

pub use clone::{
    connect_fetcher, CloneError, CloneReport, CloneSet, CloneTicket, Frozen, MemoryServer, Parent,
};
pub use descriptor::{Descriptor, DescriptorFile, SessionParams};
pub use lazy::{
    FaultStamps, FaultWait, InlineFetcher, LazyConfig, LazyHandle, LazyMemory, LazyStats,
    PageFetcher, Prefetched, SourceFetcher,
};
pub use session::SessionError;
pub use share::{HostCache, HostCacheStats};
pub use source::{PageBitmap, PageSource};
pub use threaded::McdistFetcher;
