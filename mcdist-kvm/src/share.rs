//! Per-host sharing: one mcdist client and one page cache for every clone of a parent that
//! runs on this host (threads of this process, or clone processes attached over a unix
//! socket).
//!
//! Without sharing, K clones on one host run K clients: K sockets joined to the group, K
//! receivers at the server, every multicast page received K times, and a page the clones
//! all touch is requested up to K times (the server suppresses the repeats). A
//! [`HostCache`] runs one client ([`ClientNode`], on its own I/O thread) for the host and
//! keeps every page that arrives, demanded by a local clone, by a clone on another host, or
//! pushed, in a page-indexed cache:
//!
//! ```text
//!  clone A fault p ─► HostFetcher::request(p) ─┬─ p cached?  → UFFDIO_COPY from the cache now
//!  clone B fault p ─►          (same)          └─ else wait on p; the first waiter asks the
//!                                                 host client, later ones only wait
//!  page p arrives (demand, push, sweep) ─► cache[p] once ─► UFFDIO_COPY into each waiting clone
//! ```
//!
//! A page nobody waits for stays in the cache until a clone faults on it, which then costs
//! a copy from local memory and no network traffic.
//!
//! **Memory.** The cache is a memfd of the image size mapped shared: sparse, so it only
//! costs the pages actually received (at most the image's non-zero pages) plus one bit per
//! page for the presence map. Each clone still holds its own copy of the pages it touched
//! (its guest memory is private, it writes to it), so the host holds one extra copy of each
//! received page, against one copy per clone per received page without sharing (each client
//! installs every multicast page into its clone).
//!
//! **Scope.** Clones that are threads of this process attach with [`HostCache::fetcher`].
//! Clone processes attach over a unix socket ([`HostCache::serve_unix`], the
//! `mcdist-host-cache` binary; [`connect_host_cache`] on the clone side): the cache process
//! hands each clone the memfd (`SCM_RIGHTS`) and the clone maps it read-only. The memfd
//! holds the pages (page `p` at `p × page size`) followed by a presence bitmap (one bit per
//! page, 64-bit words, set atomically after the page is written). A clone that finds a
//! page's bit set installs it with `UFFDIO_COPY` straight from the shared mapping, without
//! asking; otherwise it asks with a 16-byte frame and installs the page, again straight from
//! the mapping, when the cache says it is there.
//!
//! ```text
//! hello   cache → clone  56 bytes + memfd: "MDHC", version u32 (1), pages u64,
//!                        page size u64, image digest [32]
//! frames  16 bytes each: kind u32, reserved u32, value u64 (little-endian)
//!         1 Request(pfn)  clone → cache
//!         2 Ready(pfn)    cache → clone: page pfn is in the shared mapping
//!         3 Failed        cache → clone: the host's session failed
//! ```
//!
//! Malformed frames (unknown kind, page out of range) are dropped and counted. The socket is
//! created with mode 0600: whoever can connect gets the memory image. A clone process that
//! stops reading its frames for a second is cut off (its connection is shut down and it
//! fails) rather than stalling the host's client.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use mcdist::node::{ClientNode, NodeError, PageSink, SinkError};
use mcdist::{ClientConfig, ClientStats};

use crate::clone::{CloneLauncher, CloneOptions, ThreadLauncher};
use crate::descriptor::Descriptor;
use crate::lazy::{LazyHandle, PageFetcher};
use crate::remote::RemoteError;
use crate::source::PageBitmap;
use crate::sys::AnonMap;

/// Counters of a [`HostCache`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostCacheStats {
    /// Clones attached so far.
    pub clones_attached: u64,
    /// Pages that arrived from the network and were stored (each at most once).
    pub network_pages: u64,
    /// Distinct pages the host client was asked for (first clone to wait on a page).
    pub host_requests: u64,
    /// Repeated requests for pages still on their way, passed to the client (it coalesces).
    pub rerequests: u64,
    /// Clone faults answered from the cache, without network traffic.
    pub cache_hits: u64,
    /// Clone faults that joined a page another clone of this host was already waiting for.
    pub joined_waits: u64,
    /// Pages installed into waiting clones when they arrived.
    pub waiter_installs: u64,
    /// Requests for pages this cache had already handed to the asking clone (a repeated
    /// request that crossed the delivery): answered again, not counted as hits.
    pub stale_requests: u64,
    /// Frames from clone processes that were dropped (unknown kind, page out of range).
    pub malformed_frames: u64,
}

impl HostCacheStats {
    /// Pages installed into clones from this cache (on arrival or from the cache).
    pub fn pages_installed(&self) -> u64 {
        self.waiter_installs + self.cache_hits
    }
}

/// One attached clone and the pages the cache has handed it (installed on arrival or
/// announced from the cache), so that a repeated request is told apart from a hit.
struct Slot {
    clone: Arc<dyn Attached>,
    served: PageBitmap,
}

struct State {
    present: PageBitmap,
    /// Clones waiting for a page, by clone slot.
    waiters: HashMap<u64, Vec<u64>>,
    /// Attached clones by slot.
    clones: HashMap<u64, Slot>,
    next_slot: u64,
    stats: HostCacheStats,
    failure: Option<String>,
}

/// A clone attached to the cache: a lazy memory of this process, or a clone process.
trait Attached: Send + Sync + 'static {
    /// Page `pfn` just arrived with `data` (also in the cache).
    fn arrived(&self, cache: &Cache, pfn: u64, data: &[u8]);
    /// Page `pfn` was already in the cache when the clone asked.
    fn cached(&self, cache: &Cache, pfn: u64);
    /// No more pages will come.
    fn fail(&self, why: &str);
}

impl Attached for LazyHandle {
    fn arrived(&self, _cache: &Cache, pfn: u64, data: &[u8]) {
        self.install(pfn, data);
    }
    fn cached(&self, cache: &Cache, pfn: u64) {
        let mut buf = vec![0u8; cache.page_size];
        match cache.map.read(pfn as usize * cache.page_size, &mut buf) {
            Ok(()) => self.install(pfn, &buf),
            Err(e) => LazyHandle::fail(self, format!("reading cached page {pfn}: {e}")),
        }
    }
    fn fail(&self, why: &str) {
        LazyHandle::fail(self, why.to_string());
    }
}

/// What a clone's request for a page leads to.
enum Next {
    /// The page is in the cache: deliver it now.
    FromCache,
    /// Ask the host client (first waiter, or a repeated request).
    Ask,
    /// Another clone of the host already asked: wait.
    Wait,
    /// Detached, failed, or out of range: nothing.
    Nothing,
}

/// Where the presence bitmap starts in the cache's memfd, and its size in bytes.
fn bitmap_layout(pages: u64, page_size: usize) -> (usize, usize) {
    (pages as usize * page_size, pages.div_ceil(64) as usize * 8)
}

struct Cache {
    /// Pages, then the shared presence bitmap ([`bitmap_layout`]).
    map: AnonMap,
    memfd: OwnedFd,
    digest: [u8; 32],
    page_size: usize,
    pages: u64,
    state: Mutex<State>,
    resident: AtomicU64,
}

impl Cache {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is plain maps and counters; a panic elsewhere leaves it usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A page arrived: store it once, then install it into every clone waiting for it.
    fn arrived(&self, pfn: u64, data: &[u8]) -> Result<(), SinkError> {
        if pfn >= self.pages || data.len() != self.page_size {
            return Err(SinkError::DoesNotFit {
                pfn,
                len: data.len(),
                pages: self.pages,
                page_size: self.page_size,
            });
        }
        if self.lock().present.get(pfn) {
            return Ok(());
        }
        // Only the client thread writes, once per page, before the page is marked present;
        // readers copy a page out only after seeing it present under the lock.
        self.map
            .write(pfn as usize * self.page_size, data)
            .map_err(|source| SinkError::Io {
                what: "writing the page to the cache",
                source,
            })?;
        self.resident
            .fetch_add(self.page_size as u64, Ordering::Relaxed);
        // Clone processes may now take the page without asking.
        let (bits, _) = bitmap_layout(self.pages, self.page_size);
        self.map
            .or_u64_release(bits + (pfn / 64) as usize * 8, 1 << (pfn % 64))
            .map_err(|source| SinkError::Io {
                what: "marking the page present",
                source,
            })?;
        let targets: Vec<Arc<dyn Attached>> = {
            let mut st = self.lock();
            st.present.set(pfn);
            st.stats.network_pages += 1;
            let slots = st.waiters.remove(&pfn).unwrap_or_default();
            let targets: Vec<Arc<dyn Attached>> = slots
                .iter()
                .filter_map(|s| {
                    let slot = st.clones.get_mut(s)?;
                    slot.served.set(pfn);
                    Some(slot.clone.clone())
                })
                .collect();
            st.stats.waiter_installs += targets.len() as u64;
            targets
        };
        for t in targets {
            t.arrived(self, pfn, data);
        }
        Ok(())
    }

    /// Attaches a clone; fails it at once if the session already failed.
    fn attach(&self, clone: Arc<dyn Attached>) -> u64 {
        let failure = {
            let mut st = self.lock();
            let slot = st.next_slot;
            st.next_slot += 1;
            st.stats.clones_attached += 1;
            match st.failure.clone() {
                Some(f) => Err((slot, f)),
                None => {
                    st.clones.insert(
                        slot,
                        Slot {
                            clone: clone.clone(),
                            served: PageBitmap::new(self.pages),
                        },
                    );
                    Ok(slot)
                }
            }
        };
        match failure {
            Ok(slot) => slot,
            Err((slot, why)) => {
                clone.fail(&why);
                slot
            }
        }
    }

    fn detach(&self, slot: u64) {
        let mut st = self.lock();
        st.clones.remove(&slot);
        st.waiters.retain(|_, w| {
            w.retain(|&s| s != slot);
            !w.is_empty()
        });
    }

    /// Clone `slot` asks for page `pfn`.
    fn request(&self, slot: u64, pfn: u64) -> Next {
        if pfn >= self.pages {
            return Next::Nothing;
        }
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.failure.is_some() {
            return Next::Nothing;
        }
        let Some(clone) = st.clones.get_mut(&slot) else {
            return Next::Nothing;
        };
        if clone.served.get(pfn) {
            // The clone asked again while the page was on its way to it: answer again
            // (requests stay idempotent) without counting a second delivery.
            st.stats.stale_requests += 1;
            return Next::FromCache;
        }
        if st.present.get(pfn) {
            clone.served.set(pfn);
            st.stats.cache_hits += 1;
            return Next::FromCache;
        }
        let w = st.waiters.entry(pfn).or_default();
        if w.is_empty() {
            w.push(slot);
            st.stats.host_requests += 1;
            Next::Ask
        } else if w.contains(&slot) {
            st.stats.rerequests += 1;
            Next::Ask
        } else {
            w.push(slot);
            st.stats.joined_waits += 1;
            Next::Wait
        }
    }

    fn failed(&self, why: String) {
        let clones: Vec<Arc<dyn Attached>> = {
            let mut st = self.lock();
            if st.failure.is_none() {
                st.failure = Some(why.clone());
            }
            st.waiters.clear();
            st.clones.values().map(|s| s.clone.clone()).collect()
        };
        for c in clones {
            c.fail(&why);
        }
    }
}

struct Sink(Arc<Cache>);

impl PageSink for Sink {
    fn page_ready(&self, pfn: u64, data: &[u8]) -> Result<(), SinkError> {
        self.0.arrived(pfn, data)
    }
    fn failed(&self, error: &NodeError) {
        self.0
            .failed(format!("the host's mcdist session failed: {error}"));
    }
}

/// One mcdist client and page cache shared by the clones of one parent on this host.
///
/// Built with [`HostCache::connect`]; each clone gets its fetcher from
/// [`HostCache::fetcher`] (or clones are started by [`HostCache::launcher`]).
pub struct HostCache {
    cache: Arc<Cache>,
    client: ClientNode,
}

impl std::fmt::Debug for HostCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCache")
            .field("pages", &self.cache.pages)
            .field("client", &self.client)
            .finish()
    }
}

impl HostCache {
    /// Joins the session named in `desc` over UDP multicast on `iface` (one socket, one
    /// receiver at the server) and waits up to `join_timeout` for the server's announce.
    /// `tune` adjusts the client configuration. The cache is reserved, not filled: it costs
    /// memory only for pages that arrive.
    pub fn connect(
        desc: &Descriptor,
        iface: Option<&str>,
        join_timeout: Duration,
        tune: impl FnOnce(&mut ClientConfig),
    ) -> Result<Arc<Self>, RemoteError> {
        let page_size = desc.page_size as usize;
        let pages = desc.page_count();
        let size = desc.mem_size as usize;
        let (_, bitmap_bytes) = bitmap_layout(pages, page_size);
        let (map, memfd) = AnonMap::memfd("mcdist-host-cache", size + bitmap_bytes)
            .map_err(|e| RemoteError::Transport(format!("cannot map the page cache: {e}")))?;
        let cache = Arc::new(Cache {
            map,
            memfd,
            digest: desc.digest,
            page_size,
            pages,
            state: Mutex::new(State {
                present: PageBitmap::new(pages),
                waiters: HashMap::new(),
                clones: HashMap::new(),
                next_slot: 0,
                stats: HostCacheStats::default(),
                failure: None,
            }),
            resident: AtomicU64::new(0),
        });
        let (transport, cfg) = crate::remote::client_setup(desc, iface, tune)?;
        let client = ClientNode::start(cfg, transport, Arc::new(Sink(cache.clone())))?;
        let info = client.wait_session(join_timeout)?;
        if info.page_count != pages {
            return Err(RemoteError::ImageMismatch {
                served: info.page_count,
                described: pages,
            });
        }
        Ok(Arc::new(Self { cache, client }))
    }

    /// Attaches a clone's lazy memory: the returned fetcher serves its faults from the cache
    /// or through the host's client. The clone is detached when the fetcher is dropped (when
    /// its memory stops). A clone attached after the session failed fails at once.
    pub fn fetcher(self: &Arc<Self>, handle: LazyHandle) -> Arc<dyn PageFetcher> {
        let slot = if handle.page_count() == self.cache.pages {
            self.cache.attach(Arc::new(handle.clone()))
        } else {
            handle.fail(format!(
                "clone memory has {} pages, the host cache {}",
                handle.page_count(),
                self.cache.pages
            ));
            u64::MAX
        };
        Arc::new(HostFetcher {
            host: self.clone(),
            slot,
            handle,
        })
    }

    /// A launcher that starts clones as threads of this process, all fed by this cache.
    pub fn launcher(self: &Arc<Self>, opts: CloneOptions) -> impl CloneLauncher {
        let host = self.clone();
        ThreadLauncher {
            make_fetcher: Arc::new(move |_id: u32, _desc: &Descriptor, h: LazyHandle| {
                Ok(host.fetcher(h))
            }),
            opts,
        }
    }

    /// The cache's counters.
    pub fn stats(&self) -> HostCacheStats {
        self.cache.lock().stats.clone()
    }

    /// The host client's counters (its socket's traffic: what this host received and sent).
    pub fn client_stats(&self) -> ClientStats {
        self.client.stats()
    }

    /// Bytes of page data held by the cache (pages received × page size).
    pub fn resident_bytes(&self) -> u64 {
        self.cache.resident.load(Ordering::Relaxed)
    }

    /// The host client's unicast address (how the server sees this host).
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.client.local_addr()
    }

    /// Whether page `pfn` is in the cache.
    pub fn is_cached(&self, pfn: u64) -> bool {
        self.cache.lock().present.get(pfn)
    }
}

/// One clone's view of a [`HostCache`].
struct HostFetcher {
    host: Arc<HostCache>,
    slot: u64,
    handle: LazyHandle,
}

impl PageFetcher for HostFetcher {
    fn request(&self, pfn: u64) {
        let cache = &*self.host.cache;
        match cache.request(self.slot, pfn) {
            Next::FromCache => self.handle.cached(cache, pfn),
            Next::Ask => self.host.client.request(pfn),
            Next::Wait | Next::Nothing => {}
        }
    }
}

impl Drop for HostFetcher {
    fn drop(&mut self) {
        self.host.cache.detach(self.slot);
    }
}

// ---------------------------------------------------------------- clone processes

const HELLO_MAGIC: &[u8; 4] = b"MDHC";
const HELLO_VERSION: u32 = 1;
const HELLO_LEN: usize = 56;
const FRAME_LEN: usize = 16;
const KIND_REQUEST: u32 = 1;
const KIND_READY: u32 = 2;
const KIND_FAILED: u32 = 3;

fn frame(kind: u32, value: u64) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0..4].copy_from_slice(&kind.to_le_bytes());
    f[8..16].copy_from_slice(&value.to_le_bytes());
    f
}

fn parse_frame(f: &[u8; FRAME_LEN]) -> (u32, u64) {
    let mut k = [0u8; 4];
    k.copy_from_slice(&f[0..4]);
    let mut v = [0u8; 8];
    v.copy_from_slice(&f[8..16]);
    (u32::from_le_bytes(k), u64::from_le_bytes(v))
}

/// How long a frame to a clone process may wait for room in its socket.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// A clone process attached over a unix socket: told which pages are ready.
struct ProcessClone {
    out: Mutex<UnixStream>,
    dead: AtomicBool,
}

impl ProcessClone {
    fn send(&self, kind: u32, value: u64) {
        if self.dead.load(Ordering::SeqCst) {
            return;
        }
        let mut s = self.out.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = s.write_all(&frame(kind, value)) {
            // Gone, or not reading: cut it off so that it fails instead of waiting, and so
            // that its reader sees the end and detaches it.
            tracing::debug!(error = %e, "clone process connection lost");
            self.dead.store(true, Ordering::SeqCst);
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Attached for ProcessClone {
    fn arrived(&self, _cache: &Cache, pfn: u64, _data: &[u8]) {
        self.send(KIND_READY, pfn);
    }
    fn cached(&self, _cache: &Cache, pfn: u64) {
        self.send(KIND_READY, pfn);
    }
    fn fail(&self, _why: &str) {
        self.send(KIND_FAILED, 0);
    }
}

/// A [`HostCache`] serving clone processes on a unix socket; stops (and removes the socket)
/// when dropped.
#[derive(Debug)]
pub struct CacheServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl CacheServer {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for CacheServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl HostCache {
    /// Serves clone processes of this host on a unix socket at `path` (replacing a stale
    /// socket file). Each connection gets the cache's memfd and is attached as one clone.
    pub fn serve_unix(self: &Arc<Self>, path: &Path) -> io::Result<CacheServer> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        // Whoever can connect gets the memory image: the owner only.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let stop = Arc::new(AtomicBool::new(false));
        let host = self.clone();
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("mcdist-host-cache".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop2.load(Ordering::SeqCst) {
                        return;
                    }
                    match conn {
                        Ok(c) => {
                            let host = host.clone();
                            let spawned = std::thread::Builder::new()
                                .name("mcdist-host-clone".into())
                                .spawn(move || host.serve_clone(c));
                            if let Err(e) = spawned {
                                tracing::warn!(error = %e, "cannot serve a clone process");
                            }
                        }
                        Err(e) => tracing::debug!(error = %e, "accept failed"),
                    }
                }
            })?;
        Ok(CacheServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    /// One clone process: hello with the memfd, then its requests until it hangs up.
    fn serve_clone(&self, conn: UnixStream) {
        let cache = &*self.cache;
        let mut hello = [0u8; HELLO_LEN];
        hello[0..4].copy_from_slice(HELLO_MAGIC);
        hello[4..8].copy_from_slice(&HELLO_VERSION.to_le_bytes());
        hello[8..16].copy_from_slice(&cache.pages.to_le_bytes());
        hello[16..24].copy_from_slice(&(cache.page_size as u64).to_le_bytes());
        hello[24..56].copy_from_slice(&cache.digest);
        let out = match conn.try_clone() {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %e, "cannot serve a clone process");
                return;
            }
        };
        if let Err(e) = crate::sys::send_with_fd(&conn, &hello, cache.memfd.as_fd()) {
            tracing::debug!(error = %e, "clone process left before the hello");
            return;
        }
        if let Err(e) = out.set_write_timeout(Some(SEND_TIMEOUT)) {
            tracing::warn!(error = %e, "cannot serve a clone process");
            return;
        }
        let clone = Arc::new(ProcessClone {
            out: Mutex::new(out),
            dead: AtomicBool::new(false),
        });
        let slot = cache.attach(clone.clone());
        let mut conn = conn;
        let mut f = [0u8; FRAME_LEN];
        while conn.read_exact(&mut f).is_ok() {
            match parse_frame(&f) {
                (KIND_REQUEST, pfn) if pfn < cache.pages => match cache.request(slot, pfn) {
                    Next::FromCache => clone.cached(cache, pfn),
                    Next::Ask => self.client.request(pfn),
                    Next::Wait | Next::Nothing => {}
                },
                (kind, value) => {
                    tracing::debug!(kind, value, "dropping a malformed frame from a clone");
                    cache.lock().stats.malformed_frames += 1;
                }
            }
        }
        cache.detach(slot);
    }
}

/// Errors attaching a clone process to its host's cache.
#[derive(Debug, thiserror::Error)]
pub enum HostCacheError {
    /// The socket could not be reached or broke during the hello.
    #[error("host cache socket: {0}")]
    Io(#[from] io::Error),
    /// The hello was not what this version expects.
    #[error("host cache hello: {0}")]
    Hello(String),
    /// The cache serves another image.
    #[error("the host cache serves another image than the descriptor describes")]
    ImageMismatch,
}

/// A clone process's fetcher: requests go to the host cache process, pages are installed
/// straight from the shared mapping when the cache says they are there.
struct ProcessFetcher {
    out: Mutex<UnixStream>,
    map: Arc<AnonMap>,
    pages: u64,
    page_size: usize,
    handle: LazyHandle,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

/// Installs page `pfn` into `handle` straight from the shared mapping.
fn install_shared(map: &AnonMap, page_size: usize, pfn: u64, handle: &LazyHandle) {
    let r = map.with_slice(pfn as usize * page_size, page_size, |page| {
        handle.install(pfn, page)
    });
    if let Err(e) = r {
        handle.fail(format!("shared page {pfn}: {e}"));
    }
}

impl PageFetcher for ProcessFetcher {
    fn request(&self, pfn: u64) {
        if pfn >= self.pages {
            return;
        }
        let (bits, _) = bitmap_layout(self.pages, self.page_size);
        let word = self.map.load_u64_acquire(bits + (pfn / 64) as usize * 8);
        if word.is_ok_and(|w| w & (1 << (pfn % 64)) != 0) {
            // Already in the host cache: no need to ask.
            install_shared(&self.map, self.page_size, pfn, &self.handle);
            return;
        }
        let mut s = self.out.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = s.write_all(&frame(KIND_REQUEST, pfn)) {
            self.handle
                .fail(format!("the host cache connection broke: {e}"));
        }
    }
}

impl Drop for ProcessFetcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self
            .out
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
    }
}

/// Attaches this process's clone memory (`handle`, started from `desc`) to the host cache
/// process listening at `path`: a clone process's counterpart of [`HostCache::fetcher`].
pub fn connect_host_cache(
    path: &Path,
    desc: &Descriptor,
    handle: LazyHandle,
) -> Result<Arc<dyn PageFetcher>, HostCacheError> {
    let conn = UnixStream::connect(path)?;
    let mut hello = [0u8; HELLO_LEN];
    let fd = crate::sys::recv_with_fd(&conn, &mut hello)?
        .ok_or_else(|| HostCacheError::Hello("no shared memory came with it".into()))?;
    if &hello[0..4] != HELLO_MAGIC {
        return Err(HostCacheError::Hello("bad magic".into()));
    }
    let mut u4 = [0u8; 4];
    u4.copy_from_slice(&hello[4..8]);
    let version = u32::from_le_bytes(u4);
    if version != HELLO_VERSION {
        return Err(HostCacheError::Hello(format!("version {version}")));
    }
    let mut u8s = [0u8; 8];
    u8s.copy_from_slice(&hello[8..16]);
    let pages = u64::from_le_bytes(u8s);
    u8s.copy_from_slice(&hello[16..24]);
    let page_size = u64::from_le_bytes(u8s);
    if pages != desc.page_count()
        || page_size != u64::from(desc.page_size)
        || hello[24..56] != desc.digest
        || handle.page_count() != pages
    {
        return Err(HostCacheError::ImageMismatch);
    }
    let (bits, bitmap_bytes) = bitmap_layout(pages, page_size as usize);
    let map = Arc::new(AnonMap::map_shared(fd.as_fd(), bits + bitmap_bytes, false)?);
    drop(fd);
    let out = conn.try_clone()?;
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, handle, map) = (stop.clone(), handle.clone(), map.clone());
        let ps = page_size as usize;
        let mut conn = conn;
        std::thread::Builder::new()
            .name("mcdist-cache-rx".into())
            .spawn(move || {
                let mut f = [0u8; FRAME_LEN];
                loop {
                    if conn.read_exact(&mut f).is_err() {
                        if !stop.load(Ordering::SeqCst) {
                            handle.fail("the host cache closed the connection");
                        }
                        return;
                    }
                    match parse_frame(&f) {
                        (KIND_READY, pfn) if pfn < pages => install_shared(&map, ps, pfn, &handle),
                        (KIND_FAILED, _) => handle.fail("the host's mcdist session failed"),
                        (kind, value) => {
                            tracing::debug!(
                                kind,
                                value,
                                "dropping a malformed frame from the host cache"
                            )
                        }
                    }
                }
            })?
    };
    Ok(Arc::new(ProcessFetcher {
        out: Mutex::new(out),
        map,
        pages,
        page_size: page_size as usize,
        handle,
        stop,
        reader: Some(reader),
    }))
}

/// A running `mcdist-host-cache` process (for launchers, tests and the demo).
#[derive(Debug)]
pub struct HostCacheProcess {
    child: std::process::Child,
    out: io::BufReader<std::process::ChildStdout>,
    socket: PathBuf,
}

impl HostCacheProcess {
    /// Starts the `mcdist-host-cache` binary `exe` inside network namespace `netns` (with
    /// `ip netns exec`), joining the session of the descriptor file `descriptor` on `iface`
    /// and serving clone processes on `socket`; returns once it serves.
    pub fn start(
        exe: &Path,
        netns: &str,
        descriptor: &Path,
        socket: PathBuf,
        iface: &str,
    ) -> Result<Self, HostCacheError> {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(exe)
            .arg("--descriptor")
            .arg(descriptor)
            .arg("--socket")
            .arg(&socket)
            .args(["--iface", iface])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| HostCacheError::Hello("no standard output".into()))?;
        let mut out = io::BufReader::new(stdout);
        let mut line = String::new();
        out.read_line(&mut line)?;
        if !line.starts_with("MCDIST-HOST-CACHE ready") {
            let _ = child.kill();
            let _ = child.wait();
            return Err(HostCacheError::Hello(format!(
                "mcdist-host-cache did not start: {:?}",
                line.trim()
            )));
        }
        Ok(Self { child, out, socket })
    }

    /// The socket clone processes attach to (`mcdist-clone --host-cache`).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Closes the process's standard input, which stops it, and returns the counters it
    /// prints on the way out (`clones`, `network_pages`, `host_requests`, `cache_hits`,
    /// `joined`, `waiter_installs`, `stale_requests`, `malformed`, `bytes_received`, `duplicates`,
    /// `requests_sent`).
    pub fn finish(mut self) -> Result<HashMap<String, u64>, HostCacheError> {
        use std::io::BufRead;
        drop(self.child.stdin.take());
        let mut line = String::new();
        self.out.read_line(&mut line)?;
        let status = self.child.wait()?;
        let counters = line
            .trim()
            .strip_prefix("MCDIST-HOST-CACHE ")
            .filter(|_| status.success())
            .ok_or_else(|| {
                HostCacheError::Hello(format!("mcdist-host-cache ended with {status}: {line:?}"))
            })?;
        Ok(counters
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
            .collect())
    }
}
