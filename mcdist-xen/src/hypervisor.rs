//! The seam between Memtap and a hypervisor: the real Xen backend
//! (`XenHypervisor`, feature `xen`) and the simulator ([`crate::sim`]) both
//! implement [`Hypervisor`].

use crate::ring::RingPage;
use std::io;
use std::os::fd::RawFd;
use thiserror::Error;

/// A hypervisor call failed. Names the domain and the call.
#[derive(Debug, Error)]
#[error("domain {domid}: {call} failed: {source}")]
pub struct HypervisorError {
    /// The domain being paged.
    pub domid: u32,
    /// The call that failed (e.g. `xc_mem_paging_load`).
    pub call: &'static str,
    /// The OS / hypervisor error.
    #[source]
    pub source: io::Error,
}

impl HypervisorError {
    /// Build one.
    pub fn new(domid: u32, call: &'static str, source: io::Error) -> Self {
        HypervisorError {
            domid,
            call,
            source,
        }
    }
}

/// What happened to a page Memtap asked to evict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictOutcome {
    /// The page is now paged out; the next guest access raises a paging request.
    Evicted,
    /// The hypervisor refused to page this gfn (not RAM, a special page, in
    /// use by I/O). It keeps whatever content it has.
    NotPageable,
}

/// What Memtap needs from a hypervisor to page one domain.
///
/// The ring itself is driven by Memtap through [`crate::ring::BackRing`], so
/// the same ring code runs against the real hypervisor and the simulator.
pub trait Hypervisor: Send {
    /// The domain being paged.
    fn domid(&self) -> u32;

    /// Enable mem_paging for the domain and bind its event channel
    /// (`xc_mem_paging_enable`, `xenevtchn_bind_interdomain`); returns the
    /// mapped ring page. The caller initialises the ring (`SHARED_RING_INIT`).
    fn enable_paging(&mut self) -> Result<RingPage, HypervisorError>;

    /// Page `gfn` out (`xc_mem_paging_nominate` + `xc_mem_paging_evict`).
    fn evict(&mut self, gfn: u64) -> Result<EvictOutcome, HypervisorError>;

    /// Fill paged-out `gfn` with `page` (`xc_mem_paging_load`). `page` is one
    /// page, page-aligned.
    fn load(&mut self, gfn: u64, page: &mut PageBuf) -> Result<(), HypervisorError>;

    /// A descriptor that becomes readable when the hypervisor signals the
    /// event channel.
    fn event_fd(&self) -> RawFd;

    /// Acknowledge a signal on [`Hypervisor::event_fd`] (`xenevtchn_pending`
    /// + `xenevtchn_unmask`). Returns whether an event was pending.
    fn ack_event(&mut self) -> Result<bool, HypervisorError>;

    /// Signal the hypervisor that responses are on the ring (`xenevtchn_notify`).
    fn notify(&mut self) -> Result<(), HypervisorError>;

    /// Disable paging and release the ring and event channel
    /// (`xc_mem_paging_disable`, `xenevtchn_unbind`).
    fn disable_paging(&mut self) -> Result<(), HypervisorError>;
}

/// One page-aligned page of memory, the buffer `xc_mem_paging_load` needs.
pub struct PageBuf {
    map: crate::sys::Mapping,
}

impl std::fmt::Debug for PageBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageBuf")
            .field("len", &self.map.as_slice().len())
            .finish()
    }
}

impl PageBuf {
    /// A zeroed, page-aligned buffer of `len` bytes.
    pub fn new(len: usize) -> io::Result<PageBuf> {
        Ok(PageBuf {
            map: crate::sys::Mapping::anonymous(len)?,
        })
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        self.map.as_slice()
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.map.as_mut_slice()
    }

    #[cfg(feature = "xen")]
    pub(crate) fn mapping_mut(&mut self) -> &mut crate::sys::Mapping {
        &mut self.map
    }
}
