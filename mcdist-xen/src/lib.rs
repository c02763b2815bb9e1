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
//! ## What has run where
//! A Xen hypervisor cannot run on the machine this crate is developed and
//! tested on (no Xen dom0). With feature `xen` the real FFI is compiled and
//! linked, and a test compiles C against the installed headers to check every
//! struct size, field offset, constant and function prototype the crate
//! relies on. **Everything that calls into Xen has run only against the
//! simulator**, namely:
//! - `XenHypervisor::open`, `enable_paging` (ring-page mapping,
//!   `xc_mem_paging_enable`, event-channel bind, removing the ring page from
//!   the physmap), `evict` (`xc_mem_paging_nominate`/`evict`), `load`
//!   (`xc_mem_paging_load`), `ack_event` (`xenevtchn_pending`/`unmask`),
//!   `notify` (`xenevtchn_notify`), `disable_paging`;
//! - Memtap's handling of what only a real Xen produces: requests from foreign
//!   mappings, `MEM_PAGING_DROP_PAGE`, `MEM_PAGING_EVICT_FAIL`, gfns Xen
//!   refuses to nominate (MMIO holes, special pages);
//! - the `xen_memtap` example program.
//!
//! The Memtap logic, the ring code and the mcdist client over real UDP
//! multicast have run end to end against the simulator.

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
