//! Per-host sharing: one mcdist client and one page cache for every clone of a parent that
//! runs on this host (in this process).
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
//! **Memory.** The cache is a private anonymous mapping of the image size with
//! `MAP_NORESERVE`, so it only costs the pages actually received (at most the image's
//! non-zero pages) plus one bit per page for the presence map. Each clone still holds its
//! own copy of the pages it touched (its guest memory is private, it writes to it), so the
//! host holds one extra copy of each received page, against one copy per clone per received
//! page without sharing (each client installs every multicast page into its clone).
//!
//! **Scope.** Clones share a cache when they are threads of one process ([`HostCache`] is
//! shared through an `Arc`). Clone processes (`mcdist-clone`) each still run their own
//! client; a per-host cache process serving them over a unix socket with the cache in shared
//! memory is not implemented.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use mcdist::node::{ClientNode, NodeError, PageSink};
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
}

impl HostCacheStats {
    /// Pages installed into clones from this cache (on arrival or from the cache).
    pub fn pages_installed(&self) -> u64 {
        self.waiter_installs + self.cache_hits
    }
}

struct State {
    present: PageBitmap,
    /// Clones waiting for a page, by clone slot.
    waiters: HashMap<u64, Vec<u64>>,
    /// Attached clones by slot.
    clones: HashMap<u64, LazyHandle>,
    next_slot: u64,
    stats: HostCacheStats,
    failure: Option<String>,
}

struct Cache {
    map: AnonMap,
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
    fn arrived(&self, pfn: u64, data: &[u8]) -> Result<(), String> {
        if pfn >= self.pages || data.len() != self.page_size {
            return Err(format!(
                "page {pfn} of {} bytes does not fit a cache of {} pages of {} bytes",
                data.len(),
                self.pages,
                self.page_size
            ));
        }
        if self.lock().present.get(pfn) {
            return Ok(());
        }
        // Only the client thread writes, once per page, before the page is marked present;
        // readers copy a page out only after seeing it present under the lock.
        self.map
            .write(pfn as usize * self.page_size, data)
            .map_err(|e| format!("storing page {pfn}: {e}"))?;
        self.resident
            .fetch_add(self.page_size as u64, Ordering::Relaxed);
        let targets: Vec<LazyHandle> = {
            let mut st = self.lock();
            st.present.set(pfn);
            st.stats.network_pages += 1;
            let slots = st.waiters.remove(&pfn).unwrap_or_default();
            let targets: Vec<LazyHandle> = slots
                .iter()
                .filter_map(|s| st.clones.get(s).cloned())
                .collect();
            st.stats.waiter_installs += targets.len() as u64;
            targets
        };
        for h in targets {
            h.install(pfn, data);
        }
        Ok(())
    }

    fn failed(&self, why: String) {
        let clones: Vec<LazyHandle> = {
            let mut st = self.lock();
            if st.failure.is_none() {
                st.failure = Some(why.clone());
            }
            st.waiters.clear();
            st.clones.values().cloned().collect()
        };
        for h in clones {
            h.fail(why.clone());
        }
    }
}

struct Sink(Arc<Cache>);

impl PageSink for Sink {
    fn page_ready(&self, pfn: u64, data: &[u8]) -> Result<(), String> {
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
        let map = AnonMap::new(size)
            .map_err(|e| RemoteError::Transport(format!("cannot map the page cache: {e}")))?;
        let cache = Arc::new(Cache {
            map,
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
        let failure = {
            let mut st = self.cache.lock();
            let slot = st.next_slot;
            st.next_slot += 1;
            st.stats.clones_attached += 1;
            match st.failure.clone() {
                Some(f) => Err((slot, f)),
                None if handle.page_count() != self.cache.pages => Err((
                    slot,
                    format!(
                        "clone memory has {} pages, the host cache {}",
                        handle.page_count(),
                        self.cache.pages
                    ),
                )),
                None => {
                    st.clones.insert(slot, handle.clone());
                    Ok(slot)
                }
            }
        };
        let slot = match failure {
            Ok(slot) => slot,
            Err((slot, why)) => {
                handle.fail(why);
                slot
            }
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
        if pfn >= cache.pages {
            return;
        }
        enum Next {
            FromCache,
            Ask,
            Wait,
        }
        let next = {
            let mut st = cache.lock();
            if st.failure.is_some() || !st.clones.contains_key(&self.slot) {
                return;
            }
            if st.present.get(pfn) {
                st.stats.cache_hits += 1;
                Next::FromCache
            } else {
                let w = st.waiters.entry(pfn).or_default();
                if w.is_empty() {
                    w.push(self.slot);
                    st.stats.host_requests += 1;
                    Next::Ask
                } else if w.contains(&self.slot) {
                    st.stats.rerequests += 1;
                    Next::Ask
                } else {
                    w.push(self.slot);
                    st.stats.joined_waits += 1;
                    Next::Wait
                }
            }
        };
        match next {
            Next::FromCache => {
                let mut buf = vec![0u8; cache.page_size];
                match cache.map.read(pfn as usize * cache.page_size, &mut buf) {
                    Ok(()) => self.handle.install(pfn, &buf),
                    Err(e) => self.handle.fail(format!("reading cached page {pfn}: {e}")),
                }
            }
            Next::Ask => self.host.client.request(pfn),
            Next::Wait => {}
        }
    }
}

impl Drop for HostFetcher {
    fn drop(&mut self) {
        let mut st = self.host.cache.lock();
        st.clones.remove(&self.slot);
        let slot = self.slot;
        st.waiters.retain(|_, w| {
            w.retain(|&s| s != slot);
            !w.is_empty()
        });
    }
}
