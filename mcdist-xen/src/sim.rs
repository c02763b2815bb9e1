//! A simulated Xen: the hypervisor side of mem_paging for one domain, with
//! the real vm_event ring layout in a shared memory page, an "event channel"
//! pair of eventfds, and a fake guest whose vCPUs fault on paged-out pages.
//!
//! What it models (from Xen 4.17's `p2m.c` / `vm_event.c`):
//! - `xc_mem_paging_nominate` + `evict`: a present page becomes paged out and
//!   its memory is dropped; evicting a gfn twice or outside the domain fails.
//! - A vCPU touching a paged-out gfn is paused and a
//!   `VM_EVENT_REASON_MEM_PAGING` request with `VM_EVENT_FLAG_VCPU_PAUSED` is
//!   put on the front ring; every faulting vCPU raises its own request, even
//!   for a gfn already being paged in. When the ring is full the vCPU waits for
//!   a slot (`vm_event_wait_slot`). The event channel is signalled.
//! - `xc_mem_paging_load` with a buffer makes the page present at once; it
//!   fails for a gfn that is not paged out.
//! - A response unpauses its vCPU, which retries the access (and faults again
//!   if the page is still absent). A response for a paused vCPU whose page is
//!   not loaded is recorded as a protocol violation.
//! - `xc_mem_paging_disable` unpauses every vCPU; touching a paged-out page
//!   with no ring crashes the domain.
//!
//! What it does not model: p2m types other than RAM, foreign mappings,
//! `MEM_PAGING_DROP_PAGE` from ballooning, altp2m, ring-page placement in the
//! guest physmap.

use crate::abi::{self, VmEvent};
use crate::event::{self, EventFd, Readable};
use crate::hypervisor::{EvictOutcome, Hypervisor, HypervisorError, PageBuf};
use crate::ring::{FrontRing, RingPage};
use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use thiserror::Error;

/// A fake guest's access failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SimGuestError {
    /// The simulated domain crashed: a paging fault on `gfn` with no ring in place.
    #[error("domain crashed: paging gfn {gfn:#x} yet no ring in place")]
    Crashed {
        /// The gfn whose fault crashed the domain.
        gfn: u64,
    },
    /// The vCPU stayed paused longer than the test allows.
    #[error("vcpu {vcpu} still paused on gfn {gfn:#x} after {waited:?}")]
    Timeout {
        /// The vCPU.
        vcpu: u32,
        /// The gfn.
        gfn: u64,
        /// How long it waited.
        waited: Duration,
    },
    /// The gfn is outside the domain.
    #[error("gfn {0:#x} is outside the domain")]
    OutOfRange(u64),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum PageState {
    Present,
    PagedOut,
}

struct SimMem {
    data: Vec<u8>,
    state: Vec<PageState>,
    paused: HashSet<u32>,
    front: Option<FrontRing>,
    enabled: bool,
    crashed: Option<u64>,
    report: SimReport,
}

/// What the simulated hypervisor saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimReport {
    /// Paging requests raised by vCPU faults.
    pub requests_raised: u64,
    /// Times a vCPU waited for a free ring slot.
    pub ring_full_waits: u64,
    /// Pages evicted.
    pub evictions: u64,
    /// `xc_mem_paging_load` calls that succeeded.
    pub loads: u64,
    /// Responses consumed.
    pub responses: u64,
    /// vCPUs resumed by a response.
    pub unpauses: u64,
    /// Faults raised again after a resume (page still absent).
    pub refaults: u64,
    /// Event-channel notifications from the pager.
    pub notifications: u64,
    /// Protocol violations by the pager (each described).
    pub violations: Vec<String>,
}

struct Shared {
    domid: u32,
    page_size: usize,
    page_count: u64,
    not_pageable: HashSet<u64>,
    mem: Mutex<SimMem>,
    cond: Condvar,
    to_pager: EventFd,
    to_xen: EventFd,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, SimMem> {
        self.mem.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The pager-facing side of the simulator; implements [`Hypervisor`].
pub struct SimXen {
    shared: Arc<Shared>,
    xen_thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for SimXen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimXen")
            .field("domid", &self.shared.domid)
            .finish()
    }
}

/// The fake guest of a [`SimXen`] domain: vCPU accesses that fault.
#[derive(Clone)]
pub struct SimGuest {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SimGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimGuest")
            .field("domid", &self.shared.domid)
            .finish()
    }
}

/// Byte the simulated clone's memory holds before Memtap pages it out, so a
/// page that was never loaded cannot pass for the image.
pub const STALE_BYTE: u8 = 0xA5;

impl SimXen {
    /// A simulated domain with `page_count` present pages of stale memory.
    /// `not_pageable` gfns refuse nomination (like special pages).
    pub fn new(
        domid: u32,
        page_size: usize,
        page_count: u64,
        not_pageable: &[u64],
    ) -> io::Result<(SimXen, SimGuest)> {
        let len = usize::try_from(page_count)
            .ok()
            .and_then(|n| n.checked_mul(page_size))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "domain too large"))?;
        let shared = Arc::new(Shared {
            domid,
            page_size,
            page_count,
            not_pageable: not_pageable.iter().copied().collect(),
            mem: Mutex::new(SimMem {
                data: vec![STALE_BYTE; len],
                state: vec![PageState::Present; len / page_size.max(1)],
                paused: HashSet::new(),
                front: None,
                enabled: false,
                crashed: None,
                report: SimReport::default(),
            }),
            cond: Condvar::new(),
            to_pager: event::event_fd()?,
            to_xen: event::event_fd()?,
            stop: AtomicBool::new(false),
        });
        Ok((
            SimXen {
                shared: shared.clone(),
                xen_thread: None,
            },
            SimGuest { shared },
        ))
    }

    fn err(&self, call: &'static str, errno: i32) -> HypervisorError {
        HypervisorError::new(self.shared.domid, call, io::Error::from_raw_os_error(errno))
    }

    fn stop_thread(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        let _ = event::signal(&self.shared.to_xen);
        if let Some(t) = self.xen_thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for SimXen {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// The hypervisor's reaction to the pager's notifications: consume responses
/// and resume vCPUs (`vm_event_resume`).
fn xen_loop(shared: &Shared) {
    let poll_failed = |e: std::io::Error| {
        shared
            .lock()
            .report
            .violations
            .push(format!("simulator poll failed: {e}"));
    };
    let poll = match Readable::new(&[shared.to_xen.as_raw_fd()]) {
        Ok(p) => p,
        Err(e) => return poll_failed(e),
    };
    while !shared.stop.load(Ordering::Acquire) {
        match poll.wait(Duration::from_millis(20)) {
            Ok(r) if r & 1 != 0 => {
                let _ = event::drain(&shared.to_xen);
            }
            Ok(_) => {}
            Err(e) => return poll_failed(e),
        }
        let mut mem = shared.lock();
        let mem = &mut *mem;
        let Some(front) = mem.front.as_mut() else {
            continue;
        };
        let mut woke = false;
        while let Some(rsp) = front.take_response() {
            mem.report.responses += 1;
            if rsp.version != abi::VM_EVENT_INTERFACE_VERSION {
                mem.report.violations.push(format!(
                    "response with interface version {:#x}",
                    rsp.version
                ));
                continue;
            }
            if rsp.flags & abi::VM_EVENT_FLAG_VCPU_PAUSED == 0 {
                continue;
            }
            let gfn = rsp.u.mem_paging.gfn;
            if rsp.reason == abi::VM_EVENT_REASON_MEM_PAGING {
                let present = usize::try_from(gfn)
                    .ok()
                    .and_then(|g| mem.state.get(g))
                    .is_some_and(|s| *s == PageState::Present);
                if !present {
                    mem.report.violations.push(format!(
                        "vcpu {} resumed on gfn {gfn:#x} that is not loaded",
                        rsp.vcpu_id
                    ));
                }
            }
            if mem.paused.remove(&rsp.vcpu_id) {
                mem.report.unpauses += 1;
            } else {
                mem.report.violations.push(format!(
                    "response for vcpu {} that is not paused",
                    rsp.vcpu_id
                ));
            }
            woke = true;
        }
        if woke {
            shared.cond.notify_all();
        }
    }
}

impl Hypervisor for SimXen {
    fn domid(&self) -> u32 {
        self.shared.domid
    }

    fn enable_paging(&mut self) -> Result<RingPage, HypervisorError> {
        let page = RingPage::anonymous()
            .map_err(|e| HypervisorError::new(self.shared.domid, "xc_mem_paging_enable", e))?;
        {
            let mut mem = self.shared.lock();
            if mem.enabled {
                return Err(self.err("xc_mem_paging_enable", libc::EBUSY));
            }
            mem.front = Some(FrontRing::new(page.clone()));
            mem.enabled = true;
        }
        self.shared.stop.store(false, Ordering::Release);
        let shared = self.shared.clone();
        let t = std::thread::Builder::new()
            .name("sim-xen".into())
            .spawn(move || xen_loop(&shared))
            .map_err(|e| {
                HypervisorError::new(self.shared.domid, "xenevtchn_bind_interdomain", e)
            })?;
        self.xen_thread = Some(t);
        Ok(page)
    }

    fn evict(&mut self, gfn: u64) -> Result<EvictOutcome, HypervisorError> {
        if gfn >= self.shared.page_count {
            return Err(self.err("xc_mem_paging_nominate", libc::EINVAL));
        }
        if self.shared.not_pageable.contains(&gfn) {
            return Ok(EvictOutcome::NotPageable);
        }
        let ps = self.shared.page_size;
        let mut mem = self.shared.lock();
        let g = gfn as usize;
        if mem.state[g] != PageState::Present {
            return Err(self.err("xc_mem_paging_nominate", libc::EINVAL));
        }
        mem.state[g] = PageState::PagedOut;
        mem.data[g * ps..(g + 1) * ps].fill(0);
        mem.report.evictions += 1;
        Ok(EvictOutcome::Evicted)
    }

    fn load(&mut self, gfn: u64, page: &mut PageBuf) -> Result<(), HypervisorError> {
        let ps = self.shared.page_size;
        if gfn >= self.shared.page_count || page.as_slice().len() != ps {
            return Err(self.err("xc_mem_paging_load", libc::EINVAL));
        }
        let mut mem = self.shared.lock();
        let g = gfn as usize;
        if mem.state[g] != PageState::PagedOut {
            mem.report
                .violations
                .push(format!("load of gfn {gfn:#x} that is not paged out"));
            return Err(self.err("xc_mem_paging_load", libc::EINVAL));
        }
        mem.data[g * ps..(g + 1) * ps].copy_from_slice(page.as_slice());
        mem.state[g] = PageState::Present;
        mem.report.loads += 1;
        Ok(())
    }

    fn event_fd(&self) -> RawFd {
        self.shared.to_pager.as_raw_fd()
    }

    fn ack_event(&mut self) -> Result<bool, HypervisorError> {
        event::drain(&self.shared.to_pager)
            .map_err(|e| HypervisorError::new(self.shared.domid, "xenevtchn_pending", e))
    }

    fn notify(&mut self) -> Result<(), HypervisorError> {
        self.shared.lock().report.notifications += 1;
        event::signal(&self.shared.to_xen)
            .map_err(|e| HypervisorError::new(self.shared.domid, "xenevtchn_notify", e))
    }

    fn disable_paging(&mut self) -> Result<(), HypervisorError> {
        {
            let mut mem = self.shared.lock();
            if !mem.enabled {
                return Err(self.err("xc_mem_paging_disable", libc::EINVAL));
            }
            mem.enabled = false;
            mem.front = None;
            mem.paused.clear();
        }
        self.shared.cond.notify_all();
        self.stop_thread();
        Ok(())
    }
}

impl SimGuest {
    /// Pages in the domain.
    pub fn page_count(&self) -> u64 {
        self.shared.page_count
    }

    /// What the hypervisor saw so far.
    pub fn report(&self) -> SimReport {
        self.shared.lock().report.clone()
    }

    /// Gfns still paged out.
    pub fn paged_out(&self) -> u64 {
        self.shared
            .lock()
            .state
            .iter()
            .filter(|s| **s == PageState::PagedOut)
            .count() as u64
    }

    /// vCPU `vcpu` reads page `gfn`: faults and waits (at most `timeout` in
    /// total) while it is paged out. Returns the page's bytes.
    pub fn touch(&self, vcpu: u32, gfn: u64, timeout: Duration) -> Result<Vec<u8>, SimGuestError> {
        if gfn >= self.shared.page_count {
            return Err(SimGuestError::OutOfRange(gfn));
        }
        let ps = self.shared.page_size;
        let g = gfn as usize;
        let start = Instant::now();
        let timed_out = || SimGuestError::Timeout {
            vcpu,
            gfn,
            waited: start.elapsed(),
        };
        let mut mem = self.shared.lock();
        let mut faults = 0u32;
        loop {
            if let Some(c) = mem.crashed {
                return Err(SimGuestError::Crashed { gfn: c });
            }
            if mem.state[g] == PageState::Present {
                return Ok(mem.data[g * ps..(g + 1) * ps].to_vec());
            }
            if !mem.enabled {
                mem.crashed = Some(gfn);
                self.shared.cond.notify_all();
                return Err(SimGuestError::Crashed { gfn });
            }
            if faults > 0 {
                mem.report.refaults += 1;
            }
            faults += 1;
            // Claim a ring slot, waiting while the ring is full.
            let req = VmEvent::paging_request(vcpu, gfn, abi::VM_EVENT_FLAG_VCPU_PAUSED, 0);
            let mut waited_for_slot = false;
            while let Some(f) = mem.front.as_mut() {
                if f.put_request(&req) {
                    break;
                }
                if !waited_for_slot {
                    mem.report.ring_full_waits += 1;
                    waited_for_slot = true;
                }
                mem = self.wait(mem, start, timeout).ok_or_else(timed_out)?;
            }
            if mem.front.is_none() {
                continue; // disabled meanwhile: the next round crashes
            }
            mem.report.requests_raised += 1;
            mem.paused.insert(vcpu);
            let _ = event::signal(&self.shared.to_pager);
            while mem.paused.contains(&vcpu) {
                mem = self.wait(mem, start, timeout).ok_or_else(timed_out)?;
            }
        }
    }

    fn wait<'a>(
        &'a self,
        mem: MutexGuard<'a, SimMem>,
        start: Instant,
        timeout: Duration,
    ) -> Option<MutexGuard<'a, SimMem>> {
        let left = timeout.checked_sub(start.elapsed())?;
        let (g, _) = self
            .shared
            .cond
            .wait_timeout(mem, left.min(Duration::from_millis(50)))
            .unwrap_or_else(PoisonError::into_inner);
        Some(g)
    }
}
