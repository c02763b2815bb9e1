//! The fault coordinator of one clone's memory: the one owner of "is page p present, is it
//! requested, who waits for it". Faults ask it what to request ([`Inner::on_fault`]),
//! deliveries go through it into the guest ([`Inner::install`]), and the fault loop asks it
//! which requests are due again ([`Inner::check_pending`]).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{FaultStamps, LazyConfig, LazyFailure, LazyStats, UffdOp};
use crate::source::PageBitmap;
use crate::sys::{AnonMap, Install, Uffd};
use vmm_sys_util::eventfd::EventFd;

/// The bytes of a delivered page: a buffer of the deliverer, or a page of a mapping others
/// may write (the host page cache), which is handed to `UFFDIO_COPY` without a slice.
#[derive(Clone, Copy)]
pub(crate) enum PageData<'a> {
    /// A buffer.
    Bytes(&'a [u8]),
    /// `len` bytes at `offset` of a mapping.
    Mapped {
        /// The mapping.
        map: &'a AnonMap,
        /// Where the page starts.
        offset: usize,
        /// Its length.
        len: usize,
    },
}

impl PageData<'_> {
    fn len(&self) -> usize {
        match self {
            PageData::Bytes(b) => b.len(),
            PageData::Mapped { len, .. } => *len,
        }
    }

    fn copy_into(&self, uffd: &Uffd, dst: usize) -> std::io::Result<Install> {
        match *self {
            PageData::Bytes(b) => uffd.copy(dst, b),
            PageData::Mapped { map, offset, len } => uffd.copy_from_map(dst, map, offset, len),
        }
    }
}

pub(super) struct State {
    pub(super) installed: PageBitmap,
    pub(super) pending: HashMap<u64, Pending>,
    pub(super) stats: LazyStats,
    pub(super) failure: Option<LazyFailure>,
    /// Resolved demand faults' timestamps (only with `Inner::trace`).
    pub(super) trace: Vec<FaultStamps>,
    /// Prefetched pages the fault thread has yet to ask for.
    pub(super) prefetch_queue: VecDeque<u64>,
    /// Prefetched pages not installed yet.
    pub(super) prefetch_left: u64,
    /// Prefetched pages handed to the fetcher and not installed yet.
    pub(super) prefetch_in_flight: u64,
}

pub(super) struct Pending {
    pub(super) faults: Vec<Instant>,
    pub(super) last_request: Instant,
    /// Asked for by a prefetch (faults may have come since).
    pub(super) prefetch: bool,
    /// A prefetched page still in the queue, not handed to the fetcher yet (no repeats).
    pub(super) queued: bool,
    /// When the fetcher was asked and when its `request` returned (only with `Inner::trace`).
    pub(super) asked: Option<Instant>,
    pub(super) sent: Option<Instant>,
}

pub(super) struct Inner {
    pub(super) map: AnonMap,
    pub(super) uffd: Uffd,
    pub(super) zero: PageBitmap,
    pub(super) page_size: usize,
    pub(super) pages: u64,
    pub(super) state: Mutex<State>,
    pub(super) failed: AtomicBool,
    pub(super) first_fault_ns: AtomicU64,
    /// Installs between their `UFFDIO_COPY` (which wakes the faulting vCPU) and their count.
    pub(super) installing: AtomicU64,
    pub(super) created: Instant,
    /// Keep per-fault timestamps (`LazyConfig::trace_faults`).
    pub(super) trace: bool,
    /// `State::prefetch_queue` holds pages for the fault thread.
    pub(super) prefetch_queued: AtomicBool,
    /// Notified when the last prefetched page is installed or the memory fails.
    pub(super) prefetch_done: Condvar,
    /// Most prefetched pages asked for and not installed (`LazyConfig::prefetch_window`).
    pub(super) prefetch_window: u64,
    /// Wakes the fault thread (the stop event; the thread checks its stop flag to stop).
    pub(super) wake: EventFd,
}

impl Inner {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (plain counters and sets).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether some fault waits for its page.
    pub(super) fn has_pending(&self) -> bool {
        !self.lock().pending.is_empty()
    }

    pub(super) fn page_addr(&self, pfn: u64) -> usize {
        self.map.addr() + pfn as usize * self.page_size
    }

    /// Notes when the fetcher's `request` for `pfn` returned (for the fault trace).
    pub(super) fn note_sent(&self, pfn: u64, sent: Instant) {
        if let Some(p) = self.lock().pending.get_mut(&pfn) {
            p.sent = Some(sent);
        }
    }

    /// Installs a delivered page; `received` is when its datagram came (for the trace).
    pub(super) fn install(&self, pfn: u64, data: PageData<'_>, received: Option<Instant>) {
        let delivered = self.trace.then(Instant::now);
        if pfn >= self.pages || data.len() != self.page_size {
            tracing::debug!(pfn, len = data.len(), "dropping out-of-range page delivery");
            return;
        }
        if self.failed.load(Ordering::SeqCst) {
            // After a failure nothing is installed: the page may belong to a lost session.
            return;
        }
        if self.zero.get(pfn) {
            self.lock().stats.zero_pages_received += 1;
            return;
        }
        // The copy wakes the faulting vCPU before the page is counted below; `installing`
        // lets a reader of the statistics wait for that count (see `LazyMemory::stats`).
        self.installing.fetch_add(1, Ordering::SeqCst);
        let res = data.copy_into(&self.uffd, self.page_addr(pfn));
        let now = Instant::now();
        let mut st = self.lock();
        self.installing.fetch_sub(1, Ordering::SeqCst);
        match res {
            Ok(outcome) => {
                st.installed.set(pfn);
                st.stats.bytes_received += data.len() as u64;
                let waiters = st.pending.remove(&pfn);
                if let Some(p) = waiters.as_ref().filter(|p| p.prefetch) {
                    st.prefetch_left -= 1;
                    if !p.queued {
                        st.prefetch_in_flight -= 1;
                    }
                    if st.prefetch_left == 0 {
                        self.prefetch_done.notify_all();
                    } else if !st.prefetch_queue.is_empty()
                        && st.prefetch_in_flight <= self.prefetch_window / 2
                        && !self.prefetch_queued.swap(true, Ordering::SeqCst)
                    {
                        // Half the window is free: the fault thread asks for more.
                        let _ = self.wake.write(1);
                    }
                }
                match (outcome, waiters) {
                    (_, Some(p)) if p.faults.is_empty() => st.stats.pages_prefetched += 1,
                    (_, Some(p)) => {
                        st.stats.pages_demand += 1;
                        if let (Some(delivered), Some(&read), Some(asked)) =
                            (delivered, p.faults.first(), p.asked)
                        {
                            st.trace.push(FaultStamps {
                                pfn,
                                read,
                                asked,
                                sent: p.sent,
                                received,
                                delivered,
                                installed: now,
                            });
                        }
                        for t in p.faults {
                            st.stats
                                .fault_latency
                                .record(now.saturating_duration_since(t));
                        }
                    }
                    (Install::Done, None) => st.stats.pages_pushed += 1,
                    (Install::AlreadyPresent, None) => st.stats.duplicates += 1,
                }
            }
            Err(e) => self.fail_locked(&mut st, LazyFailure::uffd(UffdOp::Copy(pfn), e)),
        }
    }

    pub(super) fn fail_locked(&self, st: &mut State, f: LazyFailure) {
        if st.failure.is_none() {
            tracing::warn!(error = %f, "lazy memory failed");
            st.failure = Some(f);
        }
        self.failed.store(true, Ordering::SeqCst);
        // Fail closed: no waiting vCPU is given a page (neither a zero page nor a stale one).
        // They stay blocked in their faults until the owner, which watches `failed`, kicks
        // them out of `KVM_RUN` and stops the clone.
        st.pending.clear();
        st.prefetch_queue.clear();
        st.prefetch_in_flight = 0;
        self.prefetch_done.notify_all();
    }

    /// Marks the pages of `pages` that are neither zero, installed nor asked for as
    /// prefetched and queues them for the fault thread. Returns how many it queued.
    pub(super) fn queue_prefetch(&self, pages: &[u64]) -> u64 {
        let now = Instant::now();
        let mut st = self.lock();
        if self.failed.load(Ordering::SeqCst) {
            return 0;
        }
        let mut queued = 0;
        for &pfn in pages {
            if pfn >= self.pages
                || self.zero.get(pfn)
                || st.installed.get(pfn)
                || st.pending.contains_key(&pfn)
            {
                continue;
            }
            st.pending.insert(
                pfn,
                Pending {
                    faults: Vec::new(),
                    last_request: now,
                    prefetch: true,
                    queued: true,
                    asked: None,
                    sent: None,
                },
            );
            st.prefetch_queue.push_back(pfn);
            queued += 1;
        }
        st.prefetch_left += queued;
        st.stats.pages_requested += queued;
        if queued > 0 {
            self.prefetch_queued.store(true, Ordering::SeqCst);
        }
        queued
    }

    /// The prefetched pages the fault thread is to ask for now: as many of the queue as
    /// keep at most `window` prefetched pages asked for and not installed (empty when none
    /// are queued or the window is full).
    pub(super) fn take_prefetch(&self) -> Vec<u64> {
        if !self.prefetch_queued.load(Ordering::Relaxed)
            || !self.prefetch_queued.swap(false, Ordering::SeqCst)
        {
            return Vec::new();
        }
        let mut st = self.lock();
        let st = &mut *st;
        let mut take = Vec::new();
        let now = Instant::now();
        while st.prefetch_in_flight < self.prefetch_window {
            let Some(pfn) = st.prefetch_queue.pop_front() else {
                break;
            };
            // A page that came (pushed) while it waited in the queue is not asked for.
            if let Some(p) = st.pending.get_mut(&pfn).filter(|p| p.queued) {
                p.queued = false;
                p.last_request = now;
                st.prefetch_in_flight += 1;
                take.push(pfn);
            }
        }
        take
    }

    /// Waits until every prefetched page is installed, the memory fails, or `timeout`
    /// passes; returns the prefetched pages still missing (0: all in, or failed).
    pub(super) fn wait_prefetch(&self, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if st.prefetch_left == 0 || self.failed.load(Ordering::SeqCst) {
                return st.prefetch_left;
            }
            let now = Instant::now();
            if now >= deadline {
                return st.prefetch_left;
            }
            st = self
                .prefetch_done
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Handles one fault at `addr`. Returns the page to request, if any.
    pub(super) fn on_fault(&self, addr: u64, t0: Instant) -> Option<u64> {
        let base = self.map.addr() as u64;
        if addr < base || addr >= base + self.map.len() as u64 {
            return None;
        }
        let _ = self.first_fault_ns.compare_exchange(
            0,
            t0.duration_since(self.created).as_nanos().max(1) as u64,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        let pfn = (addr - base) / self.page_size as u64;
        let page_addr = self.page_addr(pfn);
        if self.failed.load(Ordering::SeqCst) {
            // Fail closed: the fault stays unresolved (see `fail_locked`).
            return None;
        }
        if self.zero.get(pfn) {
            match self.uffd.zeropage(page_addr, self.page_size) {
                Ok(Install::Done) => self.lock().stats.zero_pages += 1,
                Ok(_) => {}
                Err(e) => {
                    let mut st = self.lock();
                    self.fail_locked(&mut st, LazyFailure::uffd(UffdOp::ZeroPage(pfn), e));
                }
            }
            return None;
        }
        let mut st = self.lock();
        if st.installed.get(pfn) {
            drop(st);
            let _ = self.uffd.wake(page_addr, self.page_size);
            return None;
        }
        st.stats.demand_faults += 1;
        let st = &mut *st;
        match st.pending.get_mut(&pfn) {
            Some(p) if p.queued => {
                // A prefetched page still waiting its turn: a vCPU needs it now.
                p.queued = false;
                p.last_request = t0;
                p.faults.push(t0);
                st.prefetch_in_flight += 1;
                Some(pfn)
            }
            Some(p) => {
                p.faults.push(t0);
                None
            }
            None => {
                st.pending.insert(
                    pfn,
                    Pending {
                        faults: vec![t0],
                        last_request: t0,
                        prefetch: false,
                        queued: false,
                        asked: self.trace.then(Instant::now),
                        sent: None,
                    },
                );
                st.stats.pages_requested += 1;
                Some(pfn)
            }
        }
    }

    /// Fails on timed-out faults and returns pages due for a repeated request.
    pub(super) fn check_pending(&self, cfg: &LazyConfig) -> Vec<u64> {
        let now = Instant::now();
        let mut st = self.lock();
        let mut again = Vec::new();
        let mut timed_out = None;
        for (&pfn, p) in st.pending.iter_mut() {
            if let Some(&first) = p.faults.first() {
                if now.duration_since(first) > cfg.fetch_timeout {
                    timed_out = Some(pfn);
                    break;
                }
            }
            if !p.queued && now.duration_since(p.last_request) >= cfg.rerequest_interval {
                p.last_request = now;
                again.push(pfn);
            }
        }
        if let Some(pfn) = timed_out {
            self.fail_locked(
                &mut st,
                LazyFailure::FetchTimeout {
                    pfn,
                    timeout: cfg.fetch_timeout,
                },
            );
            return Vec::new();
        }
        again
    }
}
