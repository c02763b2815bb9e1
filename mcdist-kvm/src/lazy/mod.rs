//! Lazy guest memory: an anonymous mapping registered with userfaultfd (missing mode).
//!
//! A fault thread reads page-fault events. Zero pages (from the descriptor's zero map) are
//! filled locally with `UFFDIO_ZEROPAGE` and never requested. Other pages are requested once
//! from a [`PageFetcher`] however many vCPUs fault on them; the fetcher delivers pages through
//! a [`LazyHandle`], which installs them with `UFFDIO_COPY`. Pages that arrive before anyone
//! faults on them (pushed pages) are installed the same way; `EEXIST` is normal.
//!
//! Fail closed: once the source fails (session lost, page timed out, integrity failure) no
//! page is installed any more and no fault is resolved; [`LazyMemory::is_failed`] tells the
//! vCPU runner to kick its vCPUs out of `KVM_RUN` and stop the clone ("memory lost").

use std::collections::HashMap;
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::source::{PageBitmap, PageSource};
use crate::sys::{AnonMap, Uffd};

mod coord;
mod fault_loop;
mod stats;

use coord::{Inner, PageData, State};
pub use stats::{FaultStamps, LatencyHistogram, LazyStats};

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

/// A page provider's error, as handed to [`LazyHandle::fail`].
pub type SourceError = Box<dyn std::error::Error + Send + Sync>;

/// The userfaultfd operation that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UffdOp {
    /// `UFFDIO_COPY` of a page.
    Copy(u64),
    /// `UFFDIO_ZEROPAGE` of a page.
    ZeroPage(u64),
    /// Reading a fault event.
    Read,
    /// Waiting for events.
    Poll,
}

impl std::fmt::Display for UffdOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UffdOp::Copy(pfn) => write!(f, "UFFDIO_COPY page {pfn}"),
            UffdOp::ZeroPage(pfn) => write!(f, "UFFDIO_ZEROPAGE page {pfn}"),
            UffdOp::Read => f.write_str("read"),
            UffdOp::Poll => f.write_str("poll"),
        }
    }
}

/// Why lazy memory stopped serving faults from its fetcher.
#[derive(Debug, Clone, thiserror::Error)]
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
    Source(#[source] Arc<dyn std::error::Error + Send + Sync>),
    /// A userfaultfd operation failed.
    #[error("userfaultfd error: {op}: {source}")]
    Uffd {
        /// What failed.
        op: UffdOp,
        /// The OS error.
        #[source]
        source: Arc<io::Error>,
    },
}

impl LazyFailure {
    pub(crate) fn uffd(op: UffdOp, source: io::Error) -> Self {
        LazyFailure::Uffd {
            op,
            source: Arc::new(source),
        }
    }
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
    /// Many pages are wanted at once (a prefetch): ask for them all. The default asks one
    /// by one; a network fetcher packs them into as few datagrams as it can.
    fn request_many(&mut self, pfns: &[u64], handle: &LazyHandle) {
        for &pfn in pfns {
            self.request(pfn, handle);
        }
    }
    /// Waits at most `timeout` (zero: do not block) for replies or a watched descriptor,
    /// handles what arrived (installing pages with [`LazyHandle::install`], reporting a dead
    /// source with [`LazyHandle::fail`]) and returns.
    fn poll(&mut self, timeout: Duration, handle: &LazyHandle);
    /// Whether a watched descriptor may have become readable since the last call: the fault
    /// thread reads the userfaultfd (until it would block) only then. The default says
    /// always (a read that finds no event costs one system call).
    fn watched_ready(&mut self) -> bool {
        true
    }
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
    /// Keep the timestamps of every demand fault ([`LazyMemory::fault_trace`]): off by
    /// default; when off the fault path takes no extra clock reading.
    pub trace_faults: bool,
    /// Most prefetched pages asked for and not yet installed ([`LazyMemory::prefetch`]): the
    /// rest wait, so that no page waits behind so many others that the fetcher's
    /// retransmission timer fires for it. Default 256 (1 MiB: 8 ms at 1 Gbit/s).
    pub prefetch_window: usize,
}

impl Default for LazyConfig {
    fn default() -> Self {
        Self {
            page_size: 4096,
            fetch_timeout: Duration::from_secs(10),
            rerequest_interval: Duration::from_millis(250),
            wait: FaultWait::Block,
            reply_spin: Duration::from_micros(200),
            trace_faults: false,
            prefetch_window: 256,
        }
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
        self.inner.install(pfn, PageData::Bytes(data), None)
    }

    /// [`LazyHandle::install`] of a page whose datagram was received at `received` (kept in
    /// the fault trace, [`LazyConfig::trace_faults`]).
    pub fn install_received(&self, pfn: u64, data: &[u8], received: Instant) {
        self.inner
            .install(pfn, PageData::Bytes(data), Some(received))
    }

    /// Installs page `pfn` from `len` bytes at `offset` of `map` (see [`LazyHandle::install`]).
    pub(crate) fn install_mapped(&self, pfn: u64, map: &AnonMap, offset: usize, len: usize) {
        self.inner
            .install(pfn, PageData::Mapped { map, offset, len }, None)
    }

    /// Reports that no more pages will come: the memory fails closed. No page is installed
    /// from here on (no zero page, no late page), waiting and later faults stay unresolved,
    /// and the owner stops the vCPUs ([`LazyMemory::is_failed`]).
    pub fn fail(&self, reason: impl Into<SourceError>) {
        let mut st = self.inner.lock();
        self.inner
            .fail_locked(&mut st, LazyFailure::Source(Arc::from(reason.into())));
    }

    /// Whether the memory failed (fail closed: nothing is installed any more).
    pub fn is_failed(&self) -> bool {
        self.inner.failed.load(Ordering::SeqCst)
    }

    /// Why the memory failed, if it did.
    pub fn failure(&self) -> Option<LazyFailure> {
        self.inner.lock().failure.clone()
    }

    /// Ends this process once the memory fails: prints one line, "memory lost: ...", on
    /// standard error and exits with status 1. For clone processes: the exit stops every
    /// vCPU, also one whose guest access KVM resolves in a way a signal cannot interrupt
    /// (its fault stays unresolved: no zero or stale page is ever installed).
    pub fn exit_process_on_loss(&self) -> std::io::Result<()> {
        let h = self.clone();
        std::thread::Builder::new()
            .name("mcdist-loss".into())
            .spawn(move || loop {
                if let Some(f) = h.failure() {
                    eprintln!("memory lost: {f}");
                    std::process::exit(1);
                }
                std::thread::sleep(Duration::from_millis(10));
            })
            .map(drop)
    }

    /// Whether page `pfn` is installed.
    pub fn is_installed(&self, pfn: u64) -> bool {
        self.inner.lock().installed.get(pfn)
    }

    /// [`LazyMemory::prefetch_start`] from a fetcher (for example on the server's hint of
    /// earlier clones' working set).
    pub fn prefetch_start(&self, pages: &[u64]) -> u64 {
        let asked = self.inner.queue_prefetch(pages);
        if asked > 0 {
            // Wakes the fault thread, which takes the queue (it checks its stop flag, not
            // this event, to stop).
            let _ = self.inner.wake.write(1);
        }
        asked
    }

    /// Number of pages of the memory this handle delivers into.
    pub fn page_count(&self) -> u64 {
        self.inner.pages
    }
}

/// What a [`LazyMemory::prefetch`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefetched {
    /// Pages asked for (those of the list that were neither zero, present nor asked for).
    pub asked: u64,
    /// Of those, pages not installed when it returned (the timeout passed).
    pub missing: u64,
    /// Time from the call to its return.
    pub elapsed: Duration,
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
        let stop =
            Arc::new(EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(UffdSetupError::Thread)?);
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
                    trace: Vec::new(),
                    prefetch_queue: std::collections::VecDeque::new(),
                    prefetch_left: 0,
                    prefetch_in_flight: 0,
                }),
                trace: cfg.trace_faults,
                prefetch_queued: AtomicBool::new(false),
                prefetch_done: std::sync::Condvar::new(),
                prefetch_window: cfg.prefetch_window.max(1) as u64,
                wake: stop.try_clone().map_err(UffdSetupError::Thread)?,
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
        let mut driver = fault_loop::Threaded::new(fetcher, &self.inner, &self.stop, self.cfg.wait)
            .map_err(UffdSetupError::Thread)?;
        self.spawn(move |h, cfg, stop| fault_loop::run(h, cfg, stop, &mut driver))
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
            .watch(&[self.inner.uffd.fd(), crate::sys::event_fd(&self.stop)])
            .map_err(UffdSetupError::Thread)?;
        let mut driver = fault_loop::Inline {
            driver,
            _keep: keep,
        };
        self.spawn(move |h, cfg, stop| fault_loop::run(h, cfg, stop, &mut driver))
    }

    fn spawn(
        &mut self,
        body: impl FnOnce(LazyHandle, &LazyConfig, &AtomicBool) + Send + 'static,
    ) -> Result<(), UffdSetupError> {
        let handle = self.handle();
        let cfg = self.cfg.clone();
        let stop_flag = self.stop_flag.clone();
        let t = std::thread::Builder::new()
            .name("mcdist-uffd".into())
            .spawn(move || body(handle, &cfg, &stop_flag))
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
        self.settled().stats.clone()
    }

    /// The timestamps of the demand faults resolved since the last call, in the order their
    /// pages were installed (empty unless [`LazyConfig::trace_faults`] is on). Waits for
    /// installs under way like [`LazyMemory::stats`].
    pub fn fault_trace(&self) -> Vec<FaultStamps> {
        std::mem::take(&mut self.settled().trace)
    }

    /// The state once installs under way are counted (waiting at most [`STATS_SETTLE`]).
    fn settled(&self) -> std::sync::MutexGuard<'_, State> {
        let deadline = Instant::now() + STATS_SETTLE;
        loop {
            let st = self.inner.lock();
            // Counts are taken under the lock, so a zero seen here means none is pending.
            if self.inner.installing.load(Ordering::SeqCst) == 0 || Instant::now() >= deadline {
                return st;
            }
            drop(st);
            std::thread::yield_now();
        }
    }

    /// Whether the memory failed (cheap; polled by vCPU runners to stop a clone whose faults
    /// will not be resolved).
    pub fn is_failed(&self) -> bool {
        self.inner.failed.load(Ordering::SeqCst)
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

    /// Brings `pages` in before they are touched and waits for them: a working set recorded
    /// by an earlier clone of the same parent, fetched in bulk before the guest's first
    /// instruction so that a clone touching pages faster than the network delivers them one
    /// fault at a time does not fault on them (record and prefetch, as REAP does for
    /// snapshot restores). Zero pages and pages present or already asked for are left out;
    /// the rest are asked for in the list's order, at most [`LazyConfig::prefetch_window`]
    /// at a time (a network fetcher packs each batch into few requests), and installed
    /// through the usual path, each verified by the fetcher before it is installed. The fault thread must run. Returns once all are installed, the memory
    /// fails, or `timeout` passes: pages still missing then keep coming (a fault on one
    /// that still waits its turn asks for it at once).
    pub fn prefetch(&self, pages: &[u64], timeout: Duration) -> Result<Prefetched, LazyFailure> {
        let t0 = Instant::now();
        let asked = self.prefetch_start(pages);
        let missing = self.inner.wait_prefetch(timeout);
        if let Some(f) = self.failure() {
            return Err(f);
        }
        Ok(Prefetched {
            asked,
            missing,
            elapsed: t0.elapsed(),
        })
    }

    /// Starts a [`LazyMemory::prefetch`] of `pages` and returns at once with the number of
    /// pages asked for: the pages come while the guest runs, and a fault on one still waiting
    /// its turn asks for it at once.
    pub fn prefetch_start(&self, pages: &[u64]) -> u64 {
        self.handle().prefetch_start(pages)
    }

    /// The non-zero pages installed so far, in ascending order: what this clone touched or
    /// was pushed (to record as the working set a later clone prefetches).
    pub fn installed_pages(&self) -> Vec<u64> {
        let st = self.settled();
        (0..self.inner.pages)
            .filter(|&pfn| st.installed.get(pfn))
            .collect()
    }

    /// Copies every page from `source` now (the eager baseline; zero pages are skipped).
    pub fn populate_from(&self, source: &dyn PageSource) -> io::Result<()> {
        let mut buf = vec![0u8; self.inner.page_size];
        for pfn in 0..self.inner.pages {
            if self.inner.zero.get(pfn) {
                continue;
            }
            source.read_page(pfn, &mut buf)?;
            self.inner.install(pfn, PageData::Bytes(&buf), None);
        }
        Ok(())
    }

    /// Stops the fault thread (waits for it). Pages keep their contents.
    pub fn stop(&mut self) {
        self.stop_flag.store(true, Ordering::SeqCst);
        let _ = self.stop.write(1);
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
