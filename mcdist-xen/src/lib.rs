//! # mcdist-xen — memtap for Xen clones
//!
//! SnowFlock's original backend: a **memtap** per clone domain fills the
//! clone's memory on demand. This crate does that on today's Xen (4.17)
//! through the vm_event / mem_paging interface, with pages coming from an
//! mcdist client ([`mcdist::node::ClientNode`]) that receives them by multicast.
//!
//! - [`abi`]: the `vm_event` request/response struct and shared-ring layout,
//!   hand-written from the Xen 4.17 headers and checked against them by a test.
//! - [`ring`]: the back (pager) and front (hypervisor) ends of the ring, as the
//!   `xen/io/ring.h` macros define them.
//! - [`hypervisor::Hypervisor`]: the seam between Memtap and a hypervisor.
//! - [`memtap::Memtap`]: enable paging, evict every page, then serve paging
//!   requests: zero pages filled locally, other pages asked of the mcdist
//!   client once however many vCPUs fault on them, pushed pages loaded ahead
//!   of faults, responses and event-channel notification, clean disable.
//! - [`sim`]: a simulated hypervisor with the same ring in shared memory and a
//!   fake guest whose vCPUs fault on pages.
//! - `XenHypervisor` (cargo feature `xen`): the real backend over libxenctrl,
//!   libxenevtchn and libxenforeignmemory (Debian's `libxen-dev`).
//!
//! - [`dom0`] (feature `xen`): reading a paused parent's memory and giving a
//!   clone the parent's vCPU state, for the dom0 helper `mcdist-xen-dom0`.
//!
//! ## What has run where
//! With feature `xen` the real FFI is compiled and linked, and a test compiles
//! C against the installed headers to check every struct size, field offset,
//! constant and function prototype the crate relies on. The `real_xen_*`
//! tests boot Xen 4.17 (Debian's source with memory paging) under QEMU TCG
//! with a PV dom0: `XenHypervisor::open`, `enable_paging`, `evict`, `load`,
//! `ack_event`, `notify` and `disable_paging` run there against the real
//! hypervisor, and two clone domains are paged in by `Memtap` over mcdist.
//! Still only against the simulator: requests from foreign mappings,
//! `MEM_PAGING_DROP_PAGE`, `MEM_PAGING_EVICT_FAIL`, gfns Xen refuses to
//! nominate, and `ENOMEM` from `xc_mem_paging_load`.

pub mod abi;
pub mod descriptor;
#[cfg(feature = "xen")]
pub mod dom0;
mod event;
pub mod hypervisor;
#[cfg(test)]
mod layout_tests;
pub mod memtap;
pub mod ring;
pub mod sim;
mod sys;
#[cfg(feature = "xen")]
pub mod xen;

pub use descriptor::{DescriptorError, XenDescriptor};
#[cfg(feature = "xen")]
pub use dom0::{CpuReg, XenControl};
pub use hypervisor::{EvictOutcome, Hypervisor, HypervisorError, PageBuf};
pub use memtap::{
    InboxError, InboxReceiver, Memtap, MemtapConfig, MemtapError, MemtapStats, PageFetcher,
    PageInbox,
};
pub use sim::{SimGuest, SimGuestError, SimReport, SimXen};
#[cfg(feature = "xen")]
pub use xen::XenHypervisor;
