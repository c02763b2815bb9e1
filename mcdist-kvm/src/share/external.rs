//! Page consumers of a [`HostCache`] that are not clone memories of this crate's lazy module:
//! the Firecracker handler's microVMs ([`crate::fcuffd`]), whose memory lives in another
//! process and is reached through a userfaultfd it sent. They are told when a page they asked
//! for is there, as bytes or as a page of the cache's mapping.

use std::sync::Arc;

use super::{Attached, Cache, CacheFailure, HostCache, Next};
use crate::sys::AnonMap;

/// A page handed to an [`ExternalTarget`].
#[derive(Clone, Copy)]
pub(crate) enum CachedPage<'a> {
    /// The page's bytes, as they arrived.
    Bytes(&'a [u8]),
    /// `len` bytes at `offset` of the cache's mapping (written before it was marked present).
    Mapped {
        /// The cache's mapping.
        map: &'a AnonMap,
        /// Where the page starts.
        offset: usize,
        /// Its length.
        len: usize,
    },
}

/// A consumer of pages from a [`HostCache`].
pub(crate) trait ExternalTarget: Send + Sync + 'static {
    /// Page `pfn`, which this consumer asked for, is here.
    fn page(&self, pfn: u64, page: CachedPage<'_>);
    /// No more pages will come.
    fn lost(&self, why: &CacheFailure);
}

struct Adapter(Arc<dyn ExternalTarget>);

impl Attached for Adapter {
    fn arrived(&self, _cache: &Cache, pfn: u64, data: &[u8]) {
        self.0.page(pfn, CachedPage::Bytes(data));
    }
    fn cached(&self, cache: &Cache, pfn: u64) {
        self.0.page(pfn, mapped(cache, pfn));
    }
    fn fail(&self, why: &CacheFailure) {
        self.0.lost(why);
    }
}

fn mapped(cache: &Cache, pfn: u64) -> CachedPage<'_> {
    CachedPage::Mapped {
        map: &cache.map,
        offset: pfn as usize * cache.page_size,
        len: cache.page_size,
    }
}

/// An attached [`ExternalTarget`]; detached when dropped.
pub(crate) struct ExternalSlot {
    host: Arc<HostCache>,
    slot: u64,
    target: Arc<dyn ExternalTarget>,
}

impl ExternalSlot {
    /// Asks for page `pfn`: handed over at once if cached, otherwise when it arrives.
    pub(crate) fn request(&self, pfn: u64) {
        let cache = &*self.host.cache;
        match cache.request(self.slot, pfn) {
            Next::FromCache => self.target.page(pfn, mapped(cache, pfn)),
            Next::Ask => self.host.client.request(pfn),
            Next::Wait | Next::Nothing => {}
        }
    }
}

impl Drop for ExternalSlot {
    fn drop(&mut self) {
        self.host.cache.detach(self.slot);
    }
}

impl HostCache {
    /// Attaches `target` (fails it at once if the session already failed).
    pub(crate) fn attach_external(
        self: &Arc<Self>,
        target: Arc<dyn ExternalTarget>,
    ) -> ExternalSlot {
        let slot = self.cache.attach(Arc::new(Adapter(target.clone())));
        ExternalSlot {
            host: self.clone(),
            slot,
            target,
        }
    }

    /// Pages of the cached image.
    pub fn page_count(&self) -> u64 {
        self.cache.pages
    }

    /// Page size of the cached image in bytes.
    pub fn page_size(&self) -> usize {
        self.cache.page_size
    }
}
