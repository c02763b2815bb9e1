//! The two ends of a vm_event ring, following the macros of `xen/io/ring.h`.
//!
//! [`BackRing`] is the pager's end (`BACK_RING_INIT`, `RING_GET_REQUEST`,
//! `RING_PUSH_RESPONSES`, `RING_FINAL_CHECK_FOR_REQUESTS`); Memtap uses it on
//! both the real and the simulated hypervisor. [`FrontRing`] is the
//! hypervisor's end and is used by the simulator only.

use crate::abi::{self, VmEvent, VM_EVENT_RING_SIZE};
use crate::sys::{Mapping, RawRing};
use std::io;
use std::sync::Arc;

/// A vm_event shared ring page (`vm_event_sring_t`), shareable between the
/// two ends.
#[derive(Clone)]
pub struct RingPage {
    raw: Arc<RawRing>,
}

impl std::fmt::Debug for RingPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingPage")
            .field("req_prod", &self.raw.load(abi::SRING_REQ_PROD))
            .field("rsp_prod", &self.raw.load(abi::SRING_RSP_PROD))
            .finish()
    }
}

impl RingPage {
    /// A fresh page of shared anonymous memory laid out as a ring (for the simulator).
    pub fn anonymous() -> io::Result<RingPage> {
        let map = Mapping::anonymous(abi::XC_PAGE_SIZE)?;
        Ok(RingPage {
            raw: Arc::new(RawRing::new(map)?),
        })
    }

    #[cfg(feature = "xen")]
    pub(crate) fn from_mapping(map: Mapping) -> io::Result<RingPage> {
        Ok(RingPage {
            raw: Arc::new(RawRing::new(map)?),
        })
    }

    /// Give back the mapping if this is the last reference.
    #[cfg(feature = "xen")]
    pub(crate) fn into_mapping(self) -> Option<Mapping> {
        Arc::into_inner(self.raw).map(RawRing::into_mapping)
    }

    /// `SHARED_RING_INIT`: indexes 0, event thresholds 1.
    pub fn shared_init(&self) {
        self.raw.clear_header();
        self.raw.store(abi::SRING_REQ_EVENT, 1);
        self.raw.store(abi::SRING_RSP_EVENT, 1);
    }

    /// `sring->req_prod`.
    pub fn req_prod(&self) -> u32 {
        self.raw.load(abi::SRING_REQ_PROD)
    }

    /// `sring->rsp_prod`.
    pub fn rsp_prod(&self) -> u32 {
        self.raw.load(abi::SRING_RSP_PROD)
    }
}

/// The pager's (back) end of the ring.
#[derive(Debug)]
pub struct BackRing {
    page: RingPage,
    rsp_prod_pvt: u32,
    req_cons: u32,
}

impl BackRing {
    /// `BACK_RING_INIT` over `page` (call [`RingPage::shared_init`] first when
    /// this end owns initialisation, as a pager does).
    pub fn new(page: RingPage) -> BackRing {
        BackRing {
            page,
            rsp_prod_pvt: 0,
            req_cons: 0,
        }
    }

    /// `RING_HAS_UNCONSUMED_REQUESTS`.
    pub fn unconsumed_requests(&self) -> u32 {
        let req = self.page.req_prod().wrapping_sub(self.req_cons);
        let rsp = VM_EVENT_RING_SIZE.wrapping_sub(self.req_cons.wrapping_sub(self.rsp_prod_pvt));
        req.min(rsp)
    }

    /// Take the next request, if any (`RING_GET_REQUEST`, then `req_cons++`
    /// and `req_event = req_cons + 1` as xenpaging does).
    pub fn take_request(&mut self) -> Option<VmEvent> {
        if self.unconsumed_requests() == 0 {
            // RING_FINAL_CHECK_FOR_REQUESTS: ask for a notification, re-check.
            self.page
                .raw
                .store(abi::SRING_REQ_EVENT, self.req_cons.wrapping_add(1));
            self.page.raw.mb();
            if self.unconsumed_requests() == 0 {
                return None;
            }
        }
        let ev = self.page.raw.read_entry(self.req_cons);
        self.req_cons = self.req_cons.wrapping_add(1);
        self.page
            .raw
            .store(abi::SRING_REQ_EVENT, self.req_cons.wrapping_add(1));
        Some(ev)
    }

    /// Queue a response (`RING_GET_RESPONSE` + `rsp_prod_pvt++`); publish with
    /// [`BackRing::push_responses`].
    pub fn put_response(&mut self, rsp: &VmEvent) {
        self.page.raw.write_entry(self.rsp_prod_pvt, rsp);
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
    }

    /// `RING_PUSH_RESPONSES`: make queued responses visible.
    pub fn push_responses(&mut self) {
        self.page.raw.store(abi::SRING_RSP_PROD, self.rsp_prod_pvt);
    }
}

/// The hypervisor's (front) end of the ring, as Xen's `vm_event.c` drives it.
#[derive(Debug)]
pub struct FrontRing {
    page: RingPage,
    req_prod_pvt: u32,
    rsp_cons: u32,
}

impl FrontRing {
    /// `FRONT_RING_INIT`.
    pub fn new(page: RingPage) -> FrontRing {
        FrontRing {
            page,
            req_prod_pvt: 0,
            rsp_cons: 0,
        }
    }

    /// `RING_FREE_REQUESTS`.
    pub fn free_requests(&self) -> u32 {
        VM_EVENT_RING_SIZE.wrapping_sub(self.req_prod_pvt.wrapping_sub(self.rsp_cons))
    }

    /// Put a request and publish it (`RING_PUSH_REQUESTS`); false if the ring is full.
    pub fn put_request(&mut self, req: &VmEvent) -> bool {
        if self.free_requests() == 0 {
            return false;
        }
        self.page.raw.write_entry(self.req_prod_pvt, req);
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
        self.page.raw.store(abi::SRING_REQ_PROD, self.req_prod_pvt);
        true
    }

    /// Take the next published response (`vm_event_get_response`).
    pub fn take_response(&mut self) -> Option<VmEvent> {
        if self.rsp_cons == self.page.rsp_prod() {
            return None;
        }
        let ev = self.page.raw.read_entry(self.rsp_cons);
        self.rsp_cons = self.rsp_cons.wrapping_add(1);
        self.page
            .raw
            .store(abi::SRING_RSP_EVENT, self.rsp_cons.wrapping_add(1));
        Some(ev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_responses_wrap_around_the_ring() {
        let page = RingPage::anonymous().expect("ring page");
        page.shared_init();
        let mut front = FrontRing::new(page.clone());
        let mut back = BackRing::new(page);
        let mut next_gfn = 0u64;
        let mut seen = 0u64;
        for round in 0..5u32 {
            // Fill the ring completely, then drain it.
            let mut put = 0;
            while front.put_request(&VmEvent::paging_request(round, next_gfn, 1, 0)) {
                next_gfn += 1;
                put += 1;
            }
            assert_eq!(put, VM_EVENT_RING_SIZE);
            while let Some(req) = back.take_request() {
                assert_eq!(req.u.mem_paging.gfn, seen);
                assert_eq!(req.vcpu_id, round);
                seen += 1;
                back.put_response(&VmEvent::paging_response(&req));
            }
            back.push_responses();
            let mut got = 0;
            while let Some(rsp) = front.take_response() {
                assert_eq!(rsp.version, abi::VM_EVENT_INTERFACE_VERSION);
                got += 1;
            }
            assert_eq!(got, VM_EVENT_RING_SIZE);
        }
        assert_eq!(seen, 5 * u64::from(VM_EVENT_RING_SIZE));
    }
}
