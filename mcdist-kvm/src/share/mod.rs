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
//! hands each clone the memfd (`SCM_RIGHTS`) and the clone maps it read-only; the memfd is
//! sealed (no write, no resize, no new writable mapping, seals fixed), so a compromised clone
//! can neither change pages or presence bits for its siblings nor truncate the cache under
//! them, and the socket is the owner's only (see [`HostCache::serve_unix`]). The memfd
//! holds the pages (page `p` at `p × page size`) followed by a presence bitmap (one bit per
//! page, 64-bit words, set atomically after the page is written). A clone that finds a
//! page's bit set installs it with `UFFDIO_COPY` straight from the shared mapping, without
//! asking; otherwise it asks with a 16-byte frame and installs the page, again straight from
//! the mapping, when the cache says it is there.
//!
//! The clone-process side and its socket protocol are in [`process`].

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use mcdist::node::{ClientNode, NodeError, PageSink, SinkError};
use mcdist::ClientStats;

use crate::clone::{CloneLauncher, CloneOptions, ThreadLauncher};
use crate::descriptor::Descriptor;
use crate::lazy::{LazyHandle, PageFetcher};
use crate::session::{check_session, client_setup, ClientSetup, SessionError};
use crate::source::PageBitmap;
use crate::sys::AnonMap;

pub(crate) mod external;
pub mod process;

pub use process::{connect_host_cache, CacheServer, HostCacheError, HostCacheProcess};

/// Why a host cache stopped serving its clones.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheFailure {
    /// The host's mcdist session failed.
    #[error("the host's mcdist session failed: {0}")]
    Session(#[source] NodeError),
    /// The host's client followed another session than the descriptor's (a restarted
    /// server): its pages are not the descriptor's image.
    #[error("the server announces session {announced:#x}, the descriptor names {described:#x}")]
    OtherSession {
        /// Session id announced.
        announced: u64,
        /// Session id in the descriptor.
        described: u64,
    },
    /// A clone's memory does not have as many pages as the cached image.
    #[error("clone memory has {clone} pages, the host cache {cache}")]
    PageCount {
        /// Pages of the clone's memory.
        clone: u64,
        /// Pages of the cache.
        cache: u64,
    },
}

/// A page the client delivered could not be stored in the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheStoreError {
    /// The page does not fit the cache.
    #[error(
        "page {pfn} of {len} bytes does not fit a cache of {pages} pages of {page_size} bytes"
    )]
    Misfit {
        /// The page.
        pfn: u64,
        /// Its length.
        len: usize,
        /// Pages of the cache.
        pages: u64,
        /// Page size of the cache.
        page_size: usize,
    },
    /// Writing the page or its presence bit failed.
    #[error("storing page {pfn}: {source}")]
    Store {
        /// The page.
        pfn: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

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
    /// Clones waiting for a page, by clone slot.
    waiters: HashMap<u64, Vec<u64>>,
    /// Attached clones by slot.
    clones: HashMap<u64, Slot>,
    next_slot: u64,
    stats: HostCacheStats,
    failure: Option<CacheFailure>,
}

/// A clone attached to the cache: a lazy memory of this process, or a clone process.
trait Attached: Send + Sync + 'static {
    /// Page `pfn` just arrived with `data` (also in the cache).
    fn arrived(&self, cache: &Cache, pfn: u64, data: &[u8]);
    /// Page `pfn` was already in the cache when the clone asked.
    fn cached(&self, cache: &Cache, pfn: u64);
    /// No more pages will come.
    fn fail(&self, why: &CacheFailure);
}

impl Attached for LazyHandle {
    fn arrived(&self, _cache: &Cache, pfn: u64, data: &[u8]) {
        self.install(pfn, data);
    }
    fn cached(&self, cache: &Cache, pfn: u64) {
        // Straight from the cache: it was written before it was marked present.
        self.install_mapped(
            pfn,
            &cache.map,
            pfn as usize * cache.page_size,
            cache.page_size,
        );
    }
    fn fail(&self, why: &CacheFailure) {
        LazyHandle::fail(self, why.clone());
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

/// Offset of the presence word of page `pfn` in the cache's memfd, and its bit.
fn presence_bit(pages: u64, page_size: usize, pfn: u64) -> (usize, u64) {
    let (bits, _) = bitmap_layout(pages, page_size);
    (bits + (pfn / 64) as usize * 8, 1 << (pfn % 64))
}

/// Whether page `pfn` is in the cache mapped at `map`: the presence bitmap in the memfd is the
/// one record of it, for the cache process and the clone processes alike (acquire: the page's
/// bytes, written before the bit, are visible once the bit is).
fn is_present(map: &AnonMap, pages: u64, page_size: usize, pfn: u64) -> bool {
    let (word, bit) = presence_bit(pages, page_size, pfn);
    map.load_u64_acquire(word).is_ok_and(|w| w & bit != 0)
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

    fn is_present(&self, pfn: u64) -> bool {
        is_present(&self.map, self.pages, self.page_size, pfn)
    }

    /// A page arrived: store it once, then install it into every clone waiting for it.
    fn arrived(&self, pfn: u64, data: &[u8]) -> Result<(), CacheStoreError> {
        if pfn >= self.pages || data.len() != self.page_size {
            return Err(CacheStoreError::Misfit {
                pfn,
                len: data.len(),
                pages: self.pages,
                page_size: self.page_size,
            });
        }
        if self.is_present(pfn) || self.lock().failure.is_some() {
            // Fail closed: after a failure nothing enters the cache.
            return Ok(());
        }
        // Only the client thread writes, once per page, before the page is marked present;
        // readers copy a page out only after seeing its presence bit.
        self.map
            .write(pfn as usize * self.page_size, data)
            .map_err(|source| CacheStoreError::Store { pfn, source })?;
        self.resident
            .fetch_add(self.page_size as u64, Ordering::Relaxed);
        // Clone processes may now take the page without asking.
        let (word, bit) = presence_bit(self.pages, self.page_size, pfn);
        self.map
            .or_u64_release(word, bit)
            .map_err(|source| CacheStoreError::Store { pfn, source })?;
        let targets: Vec<Arc<dyn Attached>> = {
            let mut st = self.lock();
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
        if self.is_present(pfn) {
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

    fn failed(&self, why: CacheFailure) {
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

/// The host client's sink: pages into the cache; a session other than the descriptor's
/// (`1`) fails the cache before any of its pages arrives.
struct Sink(Arc<Cache>, Option<u64>);

impl PageSink for Sink {
    fn session_started(&self, info: &mcdist::SessionInfo) {
        if let Some(pin) = self.1.filter(|p| *p != info.session_id) {
            self.0.failed(CacheFailure::OtherSession {
                announced: info.session_id,
                described: pin,
            });
        }
    }
    fn page_ready(&self, pfn: u64, data: &[u8]) -> Result<(), SinkError> {
        self.0.arrived(pfn, data).map_err(|e| match e {
            CacheStoreError::Misfit {
                pfn,
                len,
                pages,
                page_size,
            } => SinkError::DoesNotFit {
                pfn,
                len,
                pages,
                page_size,
            },
            CacheStoreError::Store { source, .. } => SinkError::Io {
                what: "storing a page in the host cache",
                source,
            },
        })
    }
    fn failed(&self, error: &NodeError) {
        self.0.failed(CacheFailure::Session(error.clone()));
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
        tune: impl FnOnce(&mut ClientSetup),
    ) -> Result<Arc<Self>, SessionError> {
        let page_size = desc.page_size as usize;
        let pages = desc.page_count();
        let size = desc.mem_size as usize;
        let (_, bitmap_bytes) = bitmap_layout(pages, page_size);
        let (map, memfd) = AnonMap::memfd("mcdist-host-cache", size + bitmap_bytes)
            .map_err(SessionError::CacheMap)?;
        let cache = Arc::new(Cache {
            map,
            memfd,
            digest: desc.digest,
            page_size,
            pages,
            state: Mutex::new(State {
                waiters: HashMap::new(),
                clones: HashMap::new(),
                next_slot: 0,
                stats: HostCacheStats::default(),
                failure: None,
            }),
            resident: AtomicU64::new(0),
        });
        let (transport, cfg) = client_setup(desc, iface, tune)?;
        let pin = desc.session.as_ref().map(|s| s.session_id);
        let client = ClientNode::start(cfg, transport, Arc::new(Sink(cache.clone(), pin)))?;
        let info = client.wait_session(join_timeout)?;
        check_session(desc, &info)?;
        Ok(Arc::new(Self { cache, client }))
    }

    /// Attaches a clone's lazy memory: the returned fetcher serves its faults from the cache
    /// or through the host's client. The clone is detached when the fetcher is dropped (when
    /// its memory stops). A clone attached after the session failed fails at once.
    pub fn fetcher(self: &Arc<Self>, handle: LazyHandle) -> Arc<dyn PageFetcher> {
        let slot = if handle.page_count() == self.cache.pages {
            self.cache.attach(Arc::new(handle.clone()))
        } else {
            handle.fail(CacheFailure::PageCount {
                clone: handle.page_count(),
                cache: self.cache.pages,
            });
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
        self.cache.is_present(pfn)
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
