//! The fault thread: one loop for both kinds of page provider. It reads fault events, asks
//! the coordinator which pages to request, repeats requests that are due, and waits: in
//! `poll` over the userfaultfd and the stop event when the fetcher has its own thread
//! ([`Threaded`]), or inside the fetcher when it runs on this thread ([`InlineFetcher`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::poll::PollContext;

use super::coord::Inner;
use super::{FaultWait, InlineFetcher, LazyConfig, LazyFailure, LazyHandle, PageFetcher, UffdOp};

/// How the fault loop asks for pages and waits for the next event.
pub(super) trait Driver {
    /// Page `pfn` is missing: ask for it.
    fn request(&mut self, pfn: u64, handle: &LazyHandle);
    /// Prefetched pages: ask for them all.
    fn request_many(&mut self, pfns: &[u64], handle: &LazyHandle) {
        for &pfn in pfns {
            self.request(pfn, handle);
        }
    }
    /// Waits at most `timeout` for the next event. `Ok(false)`: stop.
    fn wait(&mut self, timeout: Duration, handle: &LazyHandle) -> std::io::Result<bool>;
    /// Whether the replies arrive on this thread (in [`Driver::wait`]): then the loop keeps
    /// polling without sleeping while a reply is due, and does not sleep right after faults
    /// (the driver's readiness may be edge-triggered). Otherwise `wait` sleeps in a
    /// level-triggered poll that returns at once while faults are pending.
    fn inline(&self) -> bool;
    /// Whether the userfaultfd may hold events (see [`InlineFetcher::watched_ready`]).
    fn faults_ready(&mut self) -> bool {
        true
    }
}

/// A fetcher with its own thread: the fault thread hands it requests and sleeps in `poll`.
pub(super) struct Threaded {
    fetcher: Arc<dyn PageFetcher>,
    poll: PollContext<u32>,
    /// The wake event (stop or prefetch), drained when it wakes the poll.
    wake: EventFd,
    spin: bool,
}

const TOKEN_WAKE: u32 = 1;

impl Threaded {
    pub(super) fn new(
        fetcher: Arc<dyn PageFetcher>,
        inner: &Inner,
        stop: &EventFd,
        wait: FaultWait,
    ) -> std::io::Result<Self> {
        let poll = PollContext::new().map_err(std::io::Error::from)?;
        poll.add(&inner.uffd.fd(), 0)
            .map_err(std::io::Error::from)?;
        poll.add(stop, TOKEN_WAKE).map_err(std::io::Error::from)?;
        Ok(Self {
            fetcher,
            poll,
            wake: stop.try_clone()?,
            spin: wait == FaultWait::Spin,
        })
    }
}

impl Driver for Threaded {
    fn request(&mut self, pfn: u64, _handle: &LazyHandle) {
        self.fetcher.request(pfn);
    }

    fn wait(&mut self, timeout: Duration, _handle: &LazyHandle) -> std::io::Result<bool> {
        if self.spin {
            std::hint::spin_loop();
            return Ok(true);
        }
        let events = self
            .poll
            .wait_timeout(timeout)
            .map_err(std::io::Error::from)?;
        if events.iter_readable().any(|e| e.token() == TOKEN_WAKE) {
            // The loop checks its stop flag; the event only woke it (the poll is
            // level-triggered, so it is drained).
            let _ = self.wake.read();
        }
        Ok(true)
    }

    fn inline(&self) -> bool {
        false
    }
}

/// A driver that runs on the fault thread and waits inside its own `poll` (which also watches
/// the userfaultfd and the stop event).
pub(super) struct Inline {
    pub(super) driver: Box<dyn InlineFetcher>,
    /// The fetcher that handed the driver over, kept alive while the driver runs.
    pub(super) _keep: Option<Arc<dyn PageFetcher>>,
}

impl Driver for Inline {
    fn request(&mut self, pfn: u64, handle: &LazyHandle) {
        self.driver.request(pfn, handle);
    }

    fn request_many(&mut self, pfns: &[u64], handle: &LazyHandle) {
        self.driver.request_many(pfns, handle);
    }

    fn wait(&mut self, timeout: Duration, handle: &LazyHandle) -> std::io::Result<bool> {
        self.driver.poll(timeout, handle);
        Ok(true)
    }

    fn inline(&self) -> bool {
        true
    }

    fn faults_ready(&mut self) -> bool {
        self.driver.watched_ready()
    }
}

/// The fault thread: read faults, request, repeat due requests, wait (for the next fault or
/// a reply), until `stop_flag` is set.
pub(super) fn run(
    handle: LazyHandle,
    cfg: &LazyConfig,
    stop_flag: &AtomicBool,
    driver: &mut dyn Driver,
) {
    let inner = &*handle.inner;
    let tick = cfg
        .rerequest_interval
        .clamp(Duration::from_millis(1), Duration::from_secs(1));
    let inline = driver.inline();
    let reply_spin = if inline {
        cfg.reply_spin
    } else {
        Duration::ZERO
    };
    let mut last_check = Instant::now();
    let mut last_request: Option<Instant> = None;
    loop {
        if stop_flag.load(Ordering::SeqCst) {
            return;
        }
        let prefetch = inner.take_prefetch();
        if !prefetch.is_empty() {
            driver.request_many(&prefetch, &handle);
            last_request = Some(Instant::now());
        }
        let mut got = false;
        // Whenever the userfaultfd may hold events, read it until it would block.
        let mut ready = driver.faults_ready();
        while ready {
            match inner.uffd.read_fault() {
                Ok(Some(addr)) => {
                    got = true;
                    let t0 = Instant::now();
                    if let Some(pfn) = inner.on_fault(addr, t0) {
                        driver.request(pfn, &handle);
                        if inner.trace {
                            inner.note_sent(pfn, Instant::now());
                        }
                        last_request = Some(t0);
                    }
                }
                Ok(None) => ready = false,
                Err(e) => {
                    let mut st = inner.lock();
                    inner.fail_locked(&mut st, LazyFailure::uffd(UffdOp::Read, e));
                    return;
                }
            }
        }
        let since = last_check.elapsed();
        if since >= tick {
            last_check = Instant::now();
            for pfn in inner.check_pending(cfg) {
                driver.request(pfn, &handle);
            }
        }
        let spin_for_reply = !reply_spin.is_zero()
            && last_request.is_some_and(|t| t.elapsed() < reply_spin)
            && inner.has_pending();
        let timeout = if (got && inline) || spin_for_reply || cfg.wait == FaultWait::Spin {
            Duration::ZERO
        } else {
            tick.saturating_sub(since)
        };
        if spin_for_reply && !got {
            // Let a thread queued on this core (often the server, on a small host) run
            // instead of spinning through its time slice.
            std::thread::yield_now();
        }
        match driver.wait(timeout, &handle) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                let mut st = inner.lock();
                inner.fail_locked(&mut st, LazyFailure::uffd(UffdOp::Poll, e));
                return;
            }
        }
    }
}
