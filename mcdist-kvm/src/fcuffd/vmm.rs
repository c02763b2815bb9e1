//! One microVM served: its fault thread (faults, balloon removals, the end of the microVM),
//! its installs (from the fault thread or, for pages that arrive, the host client's thread)
//! and failing closed when its pages stop coming.

use std::collections::HashMap;
use std::io;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::poll::PollContext;

use super::{Backend, HandlerConfig, OnLoss, Region};
use crate::share::external::{CachedPage, ExternalSlot, ExternalTarget};
use crate::share::{CacheFailure, HostCache};
use crate::source::PageBitmap;
use crate::sys::fcuffd::{read_event, UffdEvent};
use crate::sys::{Install, Uffd};

/// Why a microVM's pages can no longer be served.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VmmLost {
    /// The host's mcdist session failed.
    #[error("{0}")]
    Session(#[source] CacheFailure),
    /// A page did not arrive in time.
    #[error("page {pfn} did not arrive within {timeout:?}: the memory server is unreachable")]
    FetchTimeout {
        /// The page.
        pfn: u64,
        /// The timeout.
        timeout: Duration,
    },
    /// Reading the local memory file failed.
    #[error("reading page {pfn} of the memory file: {source}")]
    Read {
        /// The page.
        pfn: u64,
        /// Why.
        #[source]
        source: Arc<io::Error>,
    },
    /// A userfaultfd operation failed.
    #[error("userfaultfd: {0}")]
    Uffd(#[source] Arc<io::Error>),
    /// A fault outside every region.
    #[error("fault at {0:#x} outside the microVM's regions")]
    Stray(u64),
}

/// How serving a microVM ended.
#[derive(Debug, Clone)]
pub enum VmmEnd {
    /// The microVM closed its connection (it exited).
    Exited,
    /// Its pages could no longer be served; it was killed (`killed`) or left alone.
    Lost {
        /// Why.
        why: VmmLost,
        /// Whether `SIGKILL` was sent to it.
        killed: bool,
    },
}

/// Counters of one microVM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmmStats {
    /// Page faults read.
    pub faults: u64,
    /// Faults filled with `UFFDIO_ZEROPAGE` (zero pages of the image, removed pages).
    pub zero_fills: u64,
    /// Pages copied in (from the cache, the network or the local file).
    pub copies: u64,
    /// Copies that found the page present (`EEXIST`).
    pub already_present: u64,
    /// `UFFD_EVENT_REMOVE` events, and the pages they covered.
    pub removes: u64,
    /// Pages removed by a balloon.
    pub removed_pages: u64,
    /// Pages installed ahead of any fault: found in the host cache (pushed, or brought by
    /// another microVM or host) while the microVM had not touched them yet.
    pub ahead: u64,
}

struct State {
    removed: PageBitmap,
    /// Pages installed (or found present) in this microVM.
    installed: PageBitmap,
    pending: HashMap<u64, (Instant, Instant)>,
    failure: Option<VmmLost>,
    stats: VmmStats,
}

pub(super) struct Vmm {
    uffd: Uffd,
    regions: Vec<Region>,
    page_size: usize,
    zero: Option<Arc<PageBitmap>>,
    state: Mutex<State>,
}

impl Vmm {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, r: io::Result<Install>, addr: u64) {
        match r {
            Ok(Install::Done) => self.lock().stats.copies += 1,
            Ok(Install::AlreadyPresent) => {
                self.lock().stats.already_present += 1;
                // A fault may have raced the earlier install: wake it.
                let _ = self.uffd.wake(addr as usize, self.page_size);
            }
            // The microVM's memory is gone (it exited): its connection end will say so.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ESRCH) | Some(libc::ENOENT)) => {}
            Err(e) => self.fail(VmmLost::Uffd(Arc::new(e))),
        }
    }

    fn zero_fill(&self, addr: u64) {
        match self.uffd.zeropage(addr as usize, self.page_size) {
            Ok(Install::Done) => self.lock().stats.zero_fills += 1,
            other => self.record(other, addr),
        }
    }

    /// Installs page `pfn` at every address that holds it (zero if a balloon removed it).
    fn install(&self, pfn: u64, page: CachedPage<'_>) {
        let removed = {
            let mut st = self.lock();
            st.pending.remove(&pfn);
            if pfn < st.installed.len() {
                st.installed.set(pfn);
            }
            st.removed.get(pfn)
        };
        for addr in self.regions.iter().filter_map(|r| r.addr_of(pfn)) {
            if removed {
                self.zero_fill(addr);
                continue;
            }
            let r = match page {
                CachedPage::Bytes(b) => self.uffd.copy(addr as usize, b),
                CachedPage::Mapped { map, offset, len } => {
                    self.uffd.copy_from_map(addr as usize, map, offset, len)
                }
            };
            self.record(r, addr);
        }
    }

    fn fail(&self, why: VmmLost) {
        let mut st = self.lock();
        if st.failure.is_none() {
            st.failure = Some(why);
        }
    }
}

struct Target(Arc<Vmm>);

impl ExternalTarget for Target {
    fn page(&self, pfn: u64, page: CachedPage<'_>) {
        self.0.install(pfn, page);
    }
    fn lost(&self, why: &CacheFailure) {
        self.0.fail(VmmLost::Session(why.clone()));
    }
}

/// A microVM being served.
pub struct ServedVmm {
    pid: i32,
    vmm: Arc<Vmm>,
    thread: Option<JoinHandle<VmmEnd>>,
}

impl std::fmt::Debug for ServedVmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedVmm").field("pid", &self.pid).finish()
    }
}

impl ServedVmm {
    /// The microVM's pid (`SO_PEERCRED`).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The regions served.
    pub fn regions(&self) -> &[Region] {
        &self.vmm.regions
    }

    /// Its counters.
    pub fn stats(&self) -> VmmStats {
        self.vmm.lock().stats.clone()
    }

    /// Whether serving it has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Waits until serving it ends.
    pub fn wait(mut self) -> VmmEnd {
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(end)) => end,
            _ => VmmEnd::Exited,
        }
    }
}

const TOKEN_UFFD: u32 = 0;
const TOKEN_CONN: u32 = 1;
/// The fault thread's longest sleep (checks for failures and due requests).
const TICK: Duration = Duration::from_millis(20);

pub(super) fn start(
    backend: Backend,
    cfg: HandlerConfig,
    regions: Vec<Region>,
    uffd: Uffd,
    conn: UnixStream,
    pid: i32,
) -> io::Result<ServedVmm> {
    let pages = regions
        .iter()
        .map(|r| (r.offset + r.size) / r.page_size)
        .max()
        .unwrap_or(0);
    let zero = match &backend {
        Backend::Host { zero, .. } => Some(zero.clone()),
        Backend::Local(_) => None,
    };
    let vmm = Arc::new(Vmm {
        uffd,
        page_size: regions.first().map_or(4096, |r| r.page_size as usize),
        regions,
        zero,
        state: Mutex::new(State {
            removed: PageBitmap::new(pages),
            installed: PageBitmap::new(pages),
            pending: HashMap::new(),
            failure: None,
            stats: VmmStats::default(),
        }),
    });
    let poll = PollContext::new().map_err(io::Error::from)?;
    poll.add(&vmm.uffd.fd(), TOKEN_UFFD)
        .map_err(io::Error::from)?;
    poll.add(&conn, TOKEN_CONN).map_err(io::Error::from)?;
    conn.set_nonblocking(true)?;
    let thread = {
        let vmm = vmm.clone();
        std::thread::Builder::new()
            .name("mcdist-fc-uffd".into())
            .spawn(move || {
                let slot = match &backend {
                    Backend::Host { cache, .. } => {
                        Some(cache.attach_external(Arc::new(Target(vmm.clone()))))
                    }
                    Backend::Local(_) => None,
                };
                let end = run(&vmm, &backend, slot.as_ref(), &cfg, &poll, &conn);
                finish(&end, pid, cfg.on_loss)
            })?
    };
    Ok(ServedVmm {
        pid,
        vmm,
        thread: Some(thread),
    })
}

/// Fails closed: kills the microVM or logs that it is no longer served.
fn finish(end: &Result<(), VmmLost>, pid: i32, on_loss: OnLoss) -> VmmEnd {
    let Err(why) = end else {
        tracing::info!(pid, "the microVM closed its connection");
        return VmmEnd::Exited;
    };
    let killed = on_loss == OnLoss::KillVmm && pid > 0 && {
        use nix::sys::signal::{kill, Signal};
        kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).is_ok()
    };
    if killed {
        tracing::error!(
            pid,
            "killed the microVM: its memory can no longer be served: {why}"
        );
    } else {
        tracing::error!(pid, "stopped serving the microVM: {why}");
    }
    VmmEnd::Lost {
        why: why.clone(),
        killed,
    }
}

fn run(
    vmm: &Vmm,
    backend: &Backend,
    slot: Option<&ExternalSlot>,
    cfg: &HandlerConfig,
    poll: &PollContext<u32>,
    conn: &UnixStream,
) -> Result<(), VmmLost> {
    let mut buf = vec![0u8; vmm.page_size];
    let mut cursor = 0u64;
    loop {
        let events = poll
            .wait_timeout(TICK)
            .map_err(|e| VmmLost::Uffd(Arc::new(io::Error::from(e))))?;
        let conn_ready = events.iter_readable().any(|e| e.token() == TOKEN_CONN)
            || events.iter_hungup().any(|e| e.token() == TOKEN_CONN);
        // Drain events first: a balloon's madvise waits until its REMOVE event is read.
        while let Some(ev) = read_event(&vmm.uffd).map_err(|e| VmmLost::Uffd(Arc::new(e)))? {
            match ev {
                UffdEvent::Fault(addr) => fault(vmm, backend, slot, addr, &mut buf)?,
                UffdEvent::Remove { start, end } => remove(vmm, start, end),
                UffdEvent::Other(kind) => tracing::debug!(kind, "ignoring a userfaultfd event"),
            }
        }
        if conn_ready && peer_closed(conn) {
            return Ok(());
        }
        if let Some(why) = vmm.lock().failure.clone() {
            return Err(why);
        }
        if let (Some(slot), Backend::Host { cache, .. }) = (slot, backend) {
            due(vmm, slot, cfg)?;
            if events.iter_readable().next().is_none() {
                cursor = ahead(vmm, cache, slot, cursor);
            }
        }
    }
}

/// Most pages looked at per idle tick for installing ahead of faults.
const AHEAD_SCAN: u64 = 16 * 1024;
/// Most pages installed ahead per idle tick (faults wait while they are copied).
const AHEAD_INSTALL: u64 = 256;

/// Installs pages the host cache holds and this microVM has not touched yet (pushed pages,
/// pages another microVM of the host or another host asked for), so that touching them later
/// costs no fault at all; scans from `cursor` and returns where to go on. Only cached pages
/// are taken: this never asks the network for anything.
fn ahead(vmm: &Vmm, cache: &HostCache, slot: &ExternalSlot, cursor: u64) -> u64 {
    let pages = vmm.lock().installed.len();
    if pages == 0 {
        return 0;
    }
    let mut pfn = cursor % pages;
    let mut installed = 0;
    for _ in 0..AHEAD_SCAN.min(pages) {
        if cache.is_cached(pfn) {
            let want = {
                let st = vmm.lock();
                !st.installed.get(pfn) && !st.removed.get(pfn) && !st.pending.contains_key(&pfn)
            };
            if want && vmm.regions.iter().any(|r| r.addr_of(pfn).is_some()) {
                slot.request(pfn);
                vmm.lock().stats.ahead += 1;
                installed += 1;
                if installed >= AHEAD_INSTALL {
                    return pfn + 1;
                }
            }
        }
        pfn = (pfn + 1) % pages;
    }
    pfn
}

/// Whether the microVM closed its end (it sends nothing after the handshake; stray bytes are
/// read and dropped).
fn peer_closed(conn: &UnixStream) -> bool {
    use std::io::Read;
    let mut b = [0u8; 256];
    let mut c: &UnixStream = conn;
    loop {
        match c.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
}

fn fault(
    vmm: &Vmm,
    backend: &Backend,
    slot: Option<&ExternalSlot>,
    addr: u64,
    buf: &mut [u8],
) -> Result<(), VmmLost> {
    let Some((pfn, page_addr)) = vmm.regions.iter().find_map(|r| r.page_of(addr)) else {
        return Err(VmmLost::Stray(addr));
    };
    let zero = {
        let mut st = vmm.lock();
        st.stats.faults += 1;
        st.removed.get(pfn) || vmm.zero.as_ref().is_some_and(|z| z.get(pfn))
    };
    if zero {
        vmm.zero_fill(page_addr);
        return Ok(());
    }
    match (backend, slot) {
        (Backend::Local(src), _) => {
            src.read_page(pfn, buf).map_err(|e| VmmLost::Read {
                pfn,
                source: Arc::new(e),
            })?;
            vmm.install(pfn, CachedPage::Bytes(buf));
        }
        (Backend::Host { .. }, Some(slot)) => {
            let now = Instant::now();
            let first = {
                let mut st = vmm.lock();
                let first = !st.pending.contains_key(&pfn);
                st.pending.entry(pfn).or_insert((now, now));
                first
            };
            if first {
                slot.request(pfn);
            }
        }
        (Backend::Host { .. }, None) => {}
    }
    Ok(())
}

/// A balloon removed `[start, end)`: later faults there get zero pages.
fn remove(vmm: &Vmm, start: u64, end: u64) {
    let ps = vmm.page_size as u64;
    let mut st = vmm.lock();
    st.stats.removes += 1;
    let mut a = start / ps * ps;
    while a < end {
        if let Some((pfn, _)) = vmm.regions.iter().find_map(|r| r.page_of(a)) {
            if !st.removed.get(pfn) {
                st.removed.set(pfn);
                st.installed.clear(pfn);
                st.stats.removed_pages += 1;
            }
        }
        a += ps;
    }
}

/// Asks again for pages still awaited; a page awaited past the fetch timeout is a lost
/// session.
fn due(vmm: &Vmm, slot: &ExternalSlot, cfg: &HandlerConfig) -> Result<(), VmmLost> {
    let now = Instant::now();
    let again: Vec<u64> = {
        let mut st = vmm.lock();
        let mut again = Vec::new();
        for (&pfn, (first, last)) in st.pending.iter_mut() {
            if now.duration_since(*first) >= cfg.fetch_timeout {
                return Err(VmmLost::FetchTimeout {
                    pfn,
                    timeout: cfg.fetch_timeout,
                });
            }
            if now.duration_since(*last) >= cfg.rerequest_interval {
                *last = now;
                again.push(pfn);
            }
        }
        again
    };
    for pfn in again {
        slot.request(pfn);
    }
    Ok(())
}
