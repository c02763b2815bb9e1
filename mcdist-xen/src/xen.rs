//! The real Xen backend (cargo feature `xen`): mem_paging for one domain
//! through libxenctrl, libxenevtchn and libxenforeignmemory.
//!
//! The ring set-up follows Xen's own pager (xenpaging) and
//! `xc_vm_event_enable`: read `HVM_PARAM_PAGING_RING_PFN`, map that gfn of
//! the domain (populating it first if the map fails), `xc_mem_paging_enable`,
//! bind the returned port with `xenevtchn_bind_interdomain`, then remove the
//! ring page from the guest's physmap so the guest cannot scribble on it.
//!
//! Runs against a real Xen 4.17 (booted under QEMU TCG) in the `real_xen_*`
//! tests: enable, nominate/evict, load, the event channel and the ring; its
//! prototypes are also checked against the installed headers.

use crate::abi;
use crate::hypervisor::{EvictOutcome, Hypervisor, HypervisorError, PageBuf};
use crate::ring::RingPage;
use crate::sys::xen::XenHandles;
use std::io;
use std::os::fd::RawFd;

/// mem_paging of one Xen domain.
pub struct XenHypervisor {
    domid: u32,
    h: XenHandles,
    evtchn_fd: RawFd,
    local_port: Option<u32>,
    ring: Option<RingPage>,
    ring_gfn: u64,
}

impl std::fmt::Debug for XenHypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenHypervisor")
            .field("domid", &self.domid)
            .field("local_port", &self.local_port)
            .finish()
    }
}

impl XenHypervisor {
    /// Open the Xen libraries for domain `domid` and check the hypervisor
    /// speaks vm_event interface version 7.
    pub fn open(domid: u32) -> Result<XenHypervisor, HypervisorError> {
        let mut h = XenHandles::open().map_err(|(call, e)| HypervisorError::new(domid, call, e))?;
        let version = h
            .vm_event_version()
            .map_err(|e| HypervisorError::new(domid, "xc_vm_event_get_version", e))?;
        if version != abi::VM_EVENT_INTERFACE_VERSION {
            return Err(HypervisorError::new(
                domid,
                "xc_vm_event_get_version",
                io::Error::other(format!(
                    "hypervisor vm_event interface {version:#x}, mcdist-xen speaks {:#x}",
                    abi::VM_EVENT_INTERFACE_VERSION
                )),
            ));
        }
        let evtchn_fd = h
            .evtchn_fd()
            .map_err(|e| HypervisorError::new(domid, "xenevtchn_fd", e))?;
        Ok(XenHypervisor {
            domid,
            h,
            evtchn_fd,
            local_port: None,
            ring: None,
            ring_gfn: 0,
        })
    }

    /// Pages the domain's physmap spans (`xc_domain_maximum_gpfn` + 1).
    pub fn max_pages(&mut self) -> Result<u64, HypervisorError> {
        self.h
            .maximum_gpfn(self.domid)
            .map(|g| g + 1)
            .map_err(|e| self.err("xc_domain_maximum_gpfn", e))
    }

    fn err(&self, call: &'static str, e: io::Error) -> HypervisorError {
        HypervisorError::new(self.domid, call, e)
    }

    fn release_ring(&mut self) {
        if let Some(page) = self.ring.take() {
            match page.into_mapping() {
                Some(map) => {
                    if let Err(e) = self.h.unmap_page(map) {
                        tracing::warn!(domid = self.domid, error = %e, "xenforeignmemory_unmap of the ring failed");
                    }
                }
                None => tracing::warn!(
                    domid = self.domid,
                    "ring page still referenced; leaving it mapped"
                ),
            }
        }
    }
}

impl Hypervisor for XenHypervisor {
    fn domid(&self) -> u32 {
        self.domid
    }

    fn enable_paging(&mut self) -> Result<RingPage, HypervisorError> {
        let domid = self.domid;
        let ring_gfn = self
            .h
            .hvm_param_get(domid, abi::HVM_PARAM_PAGING_RING_PFN)
            .map_err(|e| self.err("xc_hvm_param_get(HVM_PARAM_PAGING_RING_PFN)", e))?;
        let map = match self.h.map_page(domid, ring_gfn) {
            Ok(m) => m,
            Err(_) => {
                // Not populated yet (it was removed by an earlier pager): populate and retry.
                self.h
                    .populate_one(domid, ring_gfn)
                    .map_err(|e| self.err("xc_domain_populate_physmap_exact", e))?;
                self.h
                    .map_page(domid, ring_gfn)
                    .map_err(|e| self.err("xenforeignmemory_map", e))?
            }
        };
        let page = RingPage::from_mapping(map).map_err(|e| self.err("xenforeignmemory_map", e))?;
        self.ring = Some(page.clone());
        self.ring_gfn = ring_gfn;
        let remote_port = match self.h.paging_enable(domid) {
            Ok(p) => p,
            Err(e) => {
                drop(page);
                self.release_ring();
                return Err(self.err("xc_mem_paging_enable", e));
            }
        };
        let local = match self.h.bind_interdomain(domid, remote_port) {
            Ok(p) => p,
            Err(e) => {
                let _ = self.h.paging_disable(domid);
                drop(page);
                self.release_ring();
                return Err(self.err("xenevtchn_bind_interdomain", e));
            }
        };
        self.local_port = Some(local);
        // Take the ring page out of the guest's physmap, as xc_vm_event_enable does.
        if let Err(e) = self.h.decrease_one(domid, ring_gfn) {
            tracing::warn!(domid, error = %e, "xc_domain_decrease_reservation_exact of the ring page failed");
        }
        Ok(page)
    }

    fn evict(&mut self, gfn: u64) -> Result<EvictOutcome, HypervisorError> {
        if gfn == self.ring_gfn && self.ring.is_some() {
            return Ok(EvictOutcome::NotPageable);
        }
        match self.h.paging_nominate(self.domid, gfn) {
            Ok(()) => {}
            // Not pageable: not RAM, a special page, or mapped by someone else.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL) | Some(libc::EBUSY) | Some(libc::ENOENT)
                ) =>
            {
                tracing::debug!(domid = self.domid, gfn, error = %e, "gfn not pageable");
                return Ok(EvictOutcome::NotPageable);
            }
            Err(e) => return Err(self.err("xc_mem_paging_nominate", e)),
        }
        match self.h.paging_evict(self.domid, gfn) {
            Ok(()) => Ok(EvictOutcome::Evicted),
            // Touched or mapped between nominate and evict: stays present.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(EvictOutcome::NotPageable),
            Err(e) => Err(self.err("xc_mem_paging_evict", e)),
        }
    }

    fn load(&mut self, gfn: u64, page: &mut PageBuf) -> Result<(), HypervisorError> {
        loop {
            match self.h.paging_load(self.domid, gfn, page.mapping_mut()) {
                Ok(()) => return Ok(()),
                // Xen is short of memory for the domain: xenpaging waits and retries.
                Err(e) if e.raw_os_error() == Some(libc::ENOMEM) => {
                    tracing::warn!(
                        domid = self.domid,
                        gfn,
                        "xc_mem_paging_load: ENOMEM, retrying"
                    );
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(e) => return Err(self.err("xc_mem_paging_load", e)),
            }
        }
    }

    fn event_fd(&self) -> RawFd {
        self.evtchn_fd
    }

    fn ack_event(&mut self) -> Result<bool, HypervisorError> {
        let Some(local) = self.local_port else {
            return Ok(false);
        };
        let port = match self.h.pending() {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(self.err("xenevtchn_pending", e)),
        };
        self.h
            .unmask(port)
            .map_err(|e| self.err("xenevtchn_unmask", e))?;
        Ok(port == local)
    }

    fn notify(&mut self) -> Result<(), HypervisorError> {
        let Some(local) = self.local_port else {
            return Err(self.err(
                "xenevtchn_notify",
                io::Error::from_raw_os_error(libc::ENOTCONN),
            ));
        };
        self.h
            .notify(local)
            .map_err(|e| self.err("xenevtchn_notify", e))
    }

    fn disable_paging(&mut self) -> Result<(), HypervisorError> {
        let domid = self.domid;
        let res = self
            .h
            .paging_disable(domid)
            .map_err(|e| self.err("xc_mem_paging_disable", e));
        if let Some(port) = self.local_port.take() {
            if let Err(e) = self.h.unbind(port) {
                tracing::warn!(domid, error = %e, "xenevtchn_unbind failed");
            }
        }
        self.release_ring();
        res
    }
}

impl Drop for XenHypervisor {
    fn drop(&mut self) {
        self.release_ring();
    }
}
