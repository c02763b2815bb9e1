//! Lazy guest memory: an anonymous mapping registered with userfaultfd (missing mode).
//!
//! A fault thread reads page-fault events. Zero pages (from the descriptor's zero map) are
//! filled locally with `UFFDIO_ZEROPAGE` and never requested. Other pages are requested once
//! from a [`PageFetcher`] however many vCPUs fault on them; the fetcher delivers pages through
//! a [`LazyHandle`], which installs them with `UFFDIO_COPY`. Pages that arrive before anyone
//! faults on them (pushed pages) are installed the same way; `EEXIST` is normal.

use std::collections::HashMap;
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::source::{PageBitmap, PageSource};
use crate::sys::{self, AnonMap, EventFd, Install, Uffd};

/// Errors setting up lazy memory.
#[derive(Debug, thiserror::Error)]
pub enum UffdSetupError {
    /// Guest memory size is zero or not a multiple of the page size.
    #[error("memory size {size} is not a non-zero multiple of the page size {page_size}")]
    BadSize {
        /// Requested size.
        size: usize,
        /// Page size.
        page_size: usize,
    },
    /// The zero map does not cover exactly the memory's pages.
    #[error("zero map covers {map} pages, memory has {pages}")]
    ZeroMapMismatch {
        /// Pages in the zero map.
        map: u64,
        /// Pages in the memory.
        pages: u64,
    },
    /// mmap failed.
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Map {
        /// Requested size.
        size: usize,
        /// OS error.
        source: io::Error,
    },
    /// userfaultfd could not be opened (needs root or `vm.unprivileged_userfaultfd=1`).
    #[error("cannot open userfaultfd: {0}")]
    Open(io::Error),
    /// Registering the range failed.
    #[error("cannot register guest memory with userfaultfd: {0}")]
    Register(io::Error),
    /// Thread or eventfd creation failed.
    #[error("cannot start the fault thread: {0}")]
    Thread(io::Error),
    /// `start` was called twice.
    #[error("the fault thread is already running")]
    AlreadyStarted,
}

/// Why lazy memory stopped serving faults from its fetcher.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LazyFailure {
    /// No page arrived for a fault within the fetch timeout.
    #[error("page {pfn} did not arrive within {timeout:?}: the memory server is unreachable")]
    FetchTimeout {
        /// The page that was waited for.
        pfn: u64,
        /// The timeout.
        timeout: Duration,
    },
    /// The fetcher reported a failure (for example the session ended).
    #[error("page source failed: {0}")]
    Source(String),
    /// A userfaultfd operation failed.
    #[error("userfaultfd error: {0}")]
    Uffd(String),
}

/// Asks some page provider for a page. Implementations deliver the page later (or at once)
/// with [`LazyHandle::install`], or report failure with [`LazyHandle::fail`].
pub trait PageFetcher: Send + Sync + 'static {
    /// Requests page `pfn`. Called once per missing page, from the fault thread; it must not
    /// block for long. Repeated calls for one page must be harmless.
    fn request(&self, pfn: u64);

    /// Hands over a driver that runs on the fault thread itself instead of this fetcher's own
    /// thread ([`LazyMemory::start`] asks once and, given one, never calls
    /// [`PageFetcher::request`]). The default has none.
    fn take_inline(&self) -> Option<Box<dyn InlineFetcher>> {
        None
    }
}

/// A page provider driven by the fault thread itself: between reads of fault events the
/// thread calls [`InlineFetcher::request`] for new faults and [`InlineFetcher::poll`] to
/// wait for replies, which the driver installs through the [`LazyHandle`] it is given.
/// Nothing crosses a thread, so on a busy host a remote fault costs one wake-up fewer in each
/// direction than with a fetcher that has its own I/O thread.
pub trait InlineFetcher: Send + 'static {
    /// Called once before the loop starts: `poll` must also return when one of `fds` (the
    /// userfaultfd and the stop event) becomes readable. Readiness may be edge-triggered; the
    /// fault thread drains them.
    fn watch(&mut self, fds: &[BorrowedFd<'_>]) -> io::Result<()>;
    /// Page `pfn` is missing: ask for it now (repeated calls for one page must be harmless).
    fn request(&mut self, pfn: u64, handle: &LazyHandle);
    /// Waits at most `timeout` (zero: do not block) for replies or a watched descriptor,
    /// handles what arrived (installing pages with [`LazyHandle::install`], reporting a dead
    /// source with [`LazyHandle::fail`]) and returns.
    fn poll(&mut self, timeout: Duration, handle: &LazyHandle);
}

/// How the fault thread waits for events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FaultWait {
    /// Block in `poll` (cheap, adds wake-up latency).
    #[default]
    Block,
    /// Spin on non-blocking reads (lowest latency, burns one core while the clone runs).
    Spin,
}

/// Lazy memory options.
#[derive(Debug, Clone)]
pub struct LazyConfig {
    /// Page size (4096).
    pub page_size: usize,
    /// A fault whose page has not arrived within this time fails the memory.
    pub fetch_timeout: Duration,
    /// Pending pages are requested again at this interval (the fetcher may coalesce).
    pub rerequest_interval: Duration,
    /// How the fault thread waits.
    pub wait: FaultWait,
    /// With an [`InlineFetcher`] and [`FaultWait::Block`]: after sending a request, keep
    /// polling without sleeping (yielding the core between polls) for up to this long while a
    /// fault waits for its page, so the reply does not pay a wake-up (zero: always sleep).
    /// Between faults the thread blocks. Default 200 µs: on the measured host that cut the
    /// inline path's p50 by a third and its p99 by half (see the crate README).
    pub reply_spin: Duration,
}

impl Default for LazyConfig {
    fn default() -> Self {
        Self {
            page_size: 4096,
            fetch_timeout: Duration::from_secs(10),
            rerequest_interval: Duration::from_millis(250),
            wait: FaultWait::Block,
            reply_spin: Duration::from_micros(200),
        }
    }
}

/// Fault latencies (fault event read → page installed), in nanoseconds.
#[derive(Debug, Clone, Default)]
pub struct LatencyHistogram {
    samples: Vec<u64>,
}

impl LatencyHistogram {
    /// Adds one sample.
    pub fn record(&mut self, d: Duration) {
        self.samples
            .push(d.as_nanos().min(u128::from(u64::MAX)) as u64);
    }
    /// Number of samples.
    pub fn count(&self) -> usize {
        self.samples.len()
    }
    /// The `q`-quantile (0.0..=1.0), or `None` without samples.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.samples.is_empty() {
            return None;
        }
        let mut s = self.samples.clone();
        s.sort_unstable();
        let idx = ((s.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        Some(Duration::from_nanos(s[idx]))
    }
    /// Counts per power-of-two bucket: `(upper bound, count)` for non-empty buckets.
    pub fn buckets(&self) -> Vec<(Duration, u64)> {
        let mut b = [0u64; 64];
        for &s in &self.samples {
            b[(64 - s.max(1).leading_zeros()) as usize - 1] += 1;
        }
        b.iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(i, &c)| (Duration::from_nanos(1u64 << (i + 1).min(63)), c))
            .collect()
    }
    /// Merges another histogram into this one.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        self.samples.extend_from_slice(&other.samples);
    }
}

/// Per-clone lazy-memory statistics.
#[derive(Debug, Clone, Default)]
pub struct LazyStats {
    /// Fault events for pages that had to be fetched.
    pub demand_faults: u64,
    /// Distinct pages requested from the fetcher.
    pub pages_requested: u64,
    /// Pages installed because a fault asked for them.
    pub pages_demand: u64,
    /// Pages installed before any fault asked (pushed or prefetched).
    pub pages_pushed: u64,
    /// Zero pages filled locally.
    pub zero_pages: u64,
    /// Deliveries of pages already present (`EEXIST` or repeated delivery).
    pub duplicates: u64,
    /// Deliveries for pages that the zero map lists as zero (should stay 0).
    pub zero_pages_received: u64,
    /// Page bytes delivered by the fetcher.
    pub bytes_received: u64,
    /// Fault latency, fault read → page installed, for fetched pages.
    pub fault_latency: LatencyHistogram,
}

impl LazyStats {
    /// Pages whose contents came from the fetcher.
    pub fn pages_fetched(&self) -> u64 {
        self.pages_demand + self.pages_pushed
    }
}

struct State {
    installed: PageBitmap,
    pending: HashMap<u64, Pending>,
    stats: LazyStats,
    failure: Option<LazyFailure>,
}

struct Pending {
    faults: Vec<Instant>,
    last_request: Instant,
}

struct Inner {
    map: AnonMap,
    uffd: Uffd,
    zero: PageBitmap,
    page_size: usize,
    pages: u64,
    state: Mutex<State>,
    failed: AtomicBool,
    first_fault_ns: AtomicU64,
    /// Installs between their `UFFDIO_COPY` (which wakes the faulting vCPU) and their count.
    installing: AtomicU64,
    created: Instant,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (plain counters and sets).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether some fault waits for its page.
    fn has_pending(&self) -> bool {
        !self.lock().pending.is_empty()
    }

    fn page_addr(&self, pfn: u64) -> usize {
        self.map.addr() + pfn as usize * self.page_size
    }

    fn install(&self, pfn: u64, data: &[u8]) {
        if pfn >= self.pages || data.len() != self.page_size {
            tracing::debug!(pfn, len = data.len(), "dropping out-of-range page delivery");
            return;
        }
        if self.zero.get(pfn) {
            self.lock().stats.zero_pages_received += 1;
            return;
        }
        // The copy wakes the faulting vCPU before the page is counted below; `installing`
        // lets a reader of the statistics wait for that count (see `LazyMemory::stats`).
        self.installing.fetch_add(1, Ordering::SeqCst);
        let res = self.uffd.copy(self.page_addr(pfn), data);
        let now = Instant::now();
        let mut st = self.lock();
        self.installing.fetch_sub(1, Ordering::SeqCst);
        match res {
            Ok(outcome) => {
                st.installed.set(pfn);
                st.stats.bytes_received += data.len() as u64;
                let waiters = st.pending.remove(&pfn);
                match (outcome, waiters) {
                    (_, Some(p)) => {
                        st.stats.pages_demand += 1;
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
            Err(e) => self.fail_locked(
                &mut st,
                LazyFailure::Uffd(format!("UFFDIO_COPY page {pfn}: {e}")),
            ),
        }
    }

    fn fail_locked(&self, st: &mut State, f: LazyFailure) {
        if st.failure.is_none() {
            tracing::warn!(error = %f, "lazy memory failed");
            st.failure = Some(f);
        }
        self.failed.store(true, Ordering::SeqCst);
        // Unblock every waiting vCPU with a zero page; the owner sees the failure and
        // discards the clone's result.
        let pending: Vec<u64> = st.pending.drain().map(|(p, _)| p).collect();
        for pfn in pending {
            let _ = self.uffd.zeropage(self.page_addr(pfn), self.page_size);
        }
    }

    /// Handles one fault at `addr`. Returns the page to request, if any.
    fn on_fault(&self, addr: u64, t0: Instant) -> Option<u64> {
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
        if self.zero.get(pfn) || self.failed.load(Ordering::SeqCst) {
            match self.uffd.zeropage(page_addr, self.page_size) {
                Ok(Install::Done) if !self.failed.load(Ordering::SeqCst) => {
                    self.lock().stats.zero_pages += 1
                }
                Ok(_) => {}
                Err(e) => {
                    let mut st = self.lock();
                    self.fail_locked(&mut st, LazyFailure::Uffd(format!("UFFDIO_ZEROPAGE: {e}")));
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
        match st.pending.get_mut(&pfn) {
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
                    },
                );
                st.stats.pages_requested += 1;
                Some(pfn)
            }
        }
    }

    /// Fails on timed-out faults and returns pages due for a repeated request.
    fn check_pending(&self, cfg: &LazyConfig) -> Vec<u64> {
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
            if now.duration_since(p.last_request) >= cfg.rerequest_interval {
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

/// A cloneable handle used by page fetchers to deliver pages into [`LazyMemory`].
#[derive(Clone)]
pub struct LazyHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LazyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyHandle")
            .field("pages", &self.inner.pages)
            .finish()
    }
}

impl LazyHandle {
    /// Installs page `pfn` (demanded or pushed). Safe to call from any thread, any number of
    /// times; deliveries for present pages are counted as duplicates.
    pub fn install(&self, pfn: u64, data: &[u8]) {
        self.inner.install(pfn, data)
    }

    /// Reports that no more pages will come; waiting and later faults get zero pages and the
    /// memory is marked failed.
    pub fn fail(&self, reason: impl Into<String>) {
        let mut st = self.inner.lock();
        self.inner
            .fail_locked(&mut st, LazyFailure::Source(reason.into()));
    }

    /// Whether page `pfn` is installed.
    pub fn is_installed(&self, pfn: u64) -> bool {
        self.inner.lock().installed.get(pfn)
    }

    /// Number of pages of the memory this handle delivers into.
    pub fn page_count(&self) -> u64 {
        self.inner.pages
    }
}

/// How long [`LazyMemory::stats`] waits for installs under way to be counted.
pub const STATS_SETTLE: Duration = Duration::from_millis(100);

/// Guest memory whose pages are installed on first touch.
pub struct LazyMemory {
    inner: Arc<Inner>,
    cfg: LazyConfig,
    stop: Arc<EventFd>,
    stop_flag: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for LazyMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyMemory")
            .field("size", &self.inner.map.len())
            .field("pages", &self.inner.pages)
            .finish()
    }
}

impl LazyMemory {
    /// Maps `size` bytes, registers them with a new userfaultfd in missing mode. `zero` lists
    /// the pages known to be all-zero. No thread runs until [`LazyMemory::start`].
    pub fn new(size: usize, zero: PageBitmap, cfg: LazyConfig) -> Result<Self, UffdSetupError> {
        let page_size = cfg.page_size;
        if size == 0 || page_size == 0 || size % page_size != 0 {
            return Err(UffdSetupError::BadSize { size, page_size });
        }
        let pages = (size / page_size) as u64;
        if zero.len() != pages {
            return Err(UffdSetupError::ZeroMapMismatch {
                map: zero.len(),
                pages,
            });
        }
        let map = AnonMap::new(size).map_err(|source| UffdSetupError::Map { size, source })?;
        let uffd = Uffd::open().map_err(UffdSetupError::Open)?;
        uffd.register_missing(map.addr(), size)
            .map_err(UffdSetupError::Register)?;
        let stop = Arc::new(EventFd::new().map_err(UffdSetupError::Thread)?);
        Ok(Self {
            inner: Arc::new(Inner {
                map,
                uffd,
                zero,
                page_size,
                pages,
                state: Mutex::new(State {
                    installed: PageBitmap::new(pages),
                    pending: HashMap::new(),
                    stats: LazyStats::default(),
                    failure: None,
                }),
                failed: AtomicBool::new(false),
                first_fault_ns: AtomicU64::new(0),
                installing: AtomicU64::new(0),
                created: Instant::now(),
            }),
            cfg,
            stop,
            stop_flag: Arc::new(AtomicBool::new(false)),
            thread: None,
        })
    }

    /// A handle for delivering pages.
    pub fn handle(&self) -> LazyHandle {
        LazyHandle {
            inner: self.inner.clone(),
        }
    }

    /// Starts the fault thread, which requests missing pages from `fetcher` (or, when the
    /// fetcher hands over an [`InlineFetcher`], runs it on the fault thread).
    pub fn start(&mut self, fetcher: Arc<dyn PageFetcher>) -> Result<(), UffdSetupError> {
        if self.thread.is_some() {
            return Err(UffdSetupError::AlreadyStarted);
        }
        if let Some(driver) = fetcher.take_inline() {
            return self.start_inline_keeping(driver, Some(fetcher));
        }
        let inner = self.inner.clone();
        let cfg = self.cfg.clone();
        let stop = self.stop.clone();
        let stop_flag = self.stop_flag.clone();
        let t = std::thread::Builder::new()
            .name("mcdist-uffd".into())
            .spawn(move || fault_loop(&inner, &cfg, &stop, &stop_flag, &*fetcher))
            .map_err(UffdSetupError::Thread)?;
        self.thread = Some(t);
        Ok(())
    }

    /// Starts the fault thread with `driver` running on it: faults become requests and
    /// replies become installed pages on one thread.
    pub fn start_inline(&mut self, driver: Box<dyn InlineFetcher>) -> Result<(), UffdSetupError> {
        self.start_inline_keeping(driver, None)
    }

    fn start_inline_keeping(
        &mut self,
        mut driver: Box<dyn InlineFetcher>,
        keep: Option<Arc<dyn PageFetcher>>,
    ) -> Result<(), UffdSetupError> {
        if self.thread.is_some() {
            return Err(UffdSetupError::AlreadyStarted);
        }
        driver
            .watch(&[self.inner.uffd.fd(), self.stop.fd()])
            .map_err(UffdSetupError::Thread)?;
        let inner = self.inner.clone();
        let cfg = self.cfg.clone();
        let stop_flag = self.stop_flag.clone();
        let t = std::thread::Builder::new()
            .name("mcdist-uffd".into())
            .spawn(move || {
                let _keep = keep;
                inline_loop(inner, &cfg, &stop_flag, driver.as_mut())
            })
            .map_err(UffdSetupError::Thread)?;
        self.thread = Some(t);
        Ok(())
    }

    /// Host address of guest memory (for `KVM_SET_USER_MEMORY_REGION`).
    pub fn host_addr(&self) -> u64 {
        self.inner.map.addr() as u64
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.inner.map.len()
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> usize {
        self.inner.page_size
    }

    /// Number of pages.
    pub fn page_count(&self) -> u64 {
        self.inner.pages
    }

    /// Copies guest memory out (faulting pages in as needed; the fault thread must run).
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> io::Result<()> {
        self.inner.map.read(offset, buf)
    }

    /// Writes guest memory (faulting pages in as needed; the fault thread must run).
    pub fn write(&self, offset: usize, data: &[u8]) -> io::Result<()> {
        self.inner.map.write(offset, data)
    }

    /// A snapshot of the statistics. A page install wakes its faulting vCPU just before it
    /// is counted; the snapshot waits (at most [`STATS_SETTLE`]) for installs under way to
    /// be counted, so that a caller that saw its vCPUs finish sees every page they waited for.
    pub fn stats(&self) -> LazyStats {
        let deadline = Instant::now() + STATS_SETTLE;
        loop {
            let st = self.inner.lock();
            // Counts are taken under the lock, so a zero seen here means none is pending.
            if self.inner.installing.load(Ordering::SeqCst) == 0 || Instant::now() >= deadline {
                return st.stats.clone();
            }
            drop(st);
            std::thread::yield_now();
        }
    }

    /// Why the memory failed, if it did.
    pub fn failure(&self) -> Option<LazyFailure> {
        self.inner.lock().failure.clone()
    }

    /// Time from creation to the first fault, if any fault happened.
    pub fn first_fault_after(&self) -> Option<Duration> {
        match self.inner.first_fault_ns.load(Ordering::SeqCst) {
            0 => None,
            n => Some(Duration::from_nanos(n)),
        }
    }

    /// Copies every page from `source` now (the eager baseline; zero pages are skipped).
    pub fn populate_from(&self, source: &dyn PageSource) -> io::Result<()> {
        let mut buf = vec![0u8; self.inner.page_size];
        for pfn in 0..self.inner.pages {
            if self.inner.zero.get(pfn) {
                continue;
            }
            source.read_page(pfn, &mut buf)?;
            self.inner.install(pfn, &buf);
        }
        Ok(())
    }

    /// Stops the fault thread (waits for it). Pages keep their contents.
    pub fn stop(&mut self) {
        self.stop_flag.store(true, Ordering::SeqCst);
        let _ = self.stop.signal();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for LazyMemory {
    fn drop(&mut self) {
        self.stop();
    }
}

fn fault_loop(
    inner: &Inner,
    cfg: &LazyConfig,
    stop: &EventFd,
    stop_flag: &AtomicBool,
    fetcher: &dyn PageFetcher,
) {
    let tick_ms = (cfg.rerequest_interval.as_millis().clamp(1, 1000)) as i32;
    let mut last_check = Instant::now();
    loop {
        if stop_flag.load(Ordering::SeqCst) {
            return;
        }
        if cfg.wait == FaultWait::Block {
            match sys::poll_readable([inner.uffd.raw(), stop.raw()], tick_ms) {
                Ok([_, true]) => return,
                Ok(_) => {}
                Err(e) => {
                    let mut st = inner.lock();
                    inner.fail_locked(&mut st, LazyFailure::Uffd(format!("poll: {e}")));
                    return;
                }
            }
        }
        let mut got = false;
        loop {
            match inner.uffd.read_fault() {
                Ok(Some(addr)) => {
                    got = true;
                    let t0 = Instant::now();
                    if let Some(pfn) = inner.on_fault(addr, t0) {
                        fetcher.request(pfn);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let mut st = inner.lock();
                    inner.fail_locked(&mut st, LazyFailure::Uffd(format!("read: {e}")));
                    return;
                }
            }
        }
        if !got && cfg.wait == FaultWait::Spin {
            std::hint::spin_loop();
        }
        if last_check.elapsed() >= Duration::from_millis(tick_ms as u64) {
            last_check = Instant::now();
            for pfn in inner.check_pending(cfg) {
                fetcher.request(pfn);
            }
        }
    }
}

/// The fault thread with an inline driver: read faults, request, let the driver wait for
/// replies (and for the next fault: it watches the userfaultfd), repeat.
fn inline_loop(
    inner: Arc<Inner>,
    cfg: &LazyConfig,
    stop_flag: &AtomicBool,
    driver: &mut dyn InlineFetcher,
) {
    let handle = LazyHandle { inner };
    let inner = &*handle.inner;
    let tick = cfg
        .rerequest_interval
        .clamp(Duration::from_millis(1), Duration::from_secs(1));
    let mut last_check = Instant::now();
    let mut last_request: Option<Instant> = None;
    loop {
        if stop_flag.load(Ordering::SeqCst) {
            return;
        }
        let mut got = false;
        loop {
            match inner.uffd.read_fault() {
                Ok(Some(addr)) => {
                    got = true;
                    let t0 = Instant::now();
                    if let Some(pfn) = inner.on_fault(addr, t0) {
                        driver.request(pfn, &handle);
                        last_request = Some(t0);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let mut st = inner.lock();
                    inner.fail_locked(&mut st, LazyFailure::Uffd(format!("read: {e}")));
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
        let spin_for_reply = !cfg.reply_spin.is_zero()
            && last_request.is_some_and(|t| t.elapsed() < cfg.reply_spin)
            && inner.has_pending();
        let timeout = if got || spin_for_reply || cfg.wait == FaultWait::Spin {
            Duration::ZERO
        } else {
            tick.saturating_sub(since)
        };
        if spin_for_reply && !got {
            // Let a thread queued on this core (often the server, on a small host) run
            // instead of spinning through its time slice.
            std::thread::yield_now();
        }
        driver.poll(timeout, &handle);
    }
}

/// A fetcher that reads pages from a local [`PageSource`] on the fault thread and installs
/// them at once (the local snapshot-file handler, Firecracker style).
pub struct SourceFetcher {
    source: Arc<dyn PageSource>,
    handle: LazyHandle,
}

impl SourceFetcher {
    /// Serves `handle`'s memory from `source`.
    pub fn new(source: Arc<dyn PageSource>, handle: LazyHandle) -> Self {
        Self { source, handle }
    }
}

impl PageFetcher for SourceFetcher {
    fn request(&self, pfn: u64) {
        let mut buf = vec![0u8; self.source.page_size()];
        match self.source.read_page(pfn, &mut buf) {
            Ok(()) => self.handle.install(pfn, &buf),
            Err(e) => self.handle.fail(format!("reading page {pfn}: {e}")),
        }
    }
}
