//! The page store behind the lazy file: the pages this host received, the FUSE reads waiting
//! for pages, and the rule that a read is answered with the image's bytes or with EIO, never
//! with anything else.

use fuser::{Errno, ReplyData};
use mcdist::bitmap::PageBitmap;
use mcdist::node::{NodeError, PageSink};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;

/// One FUSE READ waiting for pages.
struct ReadJob {
    reply: Option<ReplyData>,
    offset: u64,
    len: usize,
    missing: usize,
    started: Instant,
}

type Job = Arc<Mutex<ReadJob>>;
/// Puts an unasked page (byte offset, contents) into the page cache; true when stored.
type Storer = Box<dyn Fn(u64, &[u8]) -> bool + Send + Sync>;

#[derive(Default)]
struct Inner {
    pages: HashMap<u64, Arc<[u8]>>,
    waiting: HashMap<u64, Vec<Job>>,
    requested: std::collections::HashSet<u64>,
    lost: bool,
}

/// Counters of the lazy file, readable while it runs.
#[derive(Debug, Default)]
pub struct FuseCounters {
    /// READ requests.
    pub reads: AtomicU64,
    /// READ requests of exactly one page.
    pub page_reads: AtomicU64,
    /// Largest READ seen (bytes).
    pub max_read: AtomicU64,
    /// READs answered from the zero map alone.
    pub zero_reads: AtomicU64,
    /// READs that had to wait for the network.
    pub remote_reads: AtomicU64,
    /// Pages this host asked for.
    pub pages_requested: AtomicU64,
    /// Pages received from the server.
    pub pages_received: AtomicU64,
    /// Pages received that nobody asked for (pushes, sweeps).
    pub pages_unasked: AtomicU64,
    /// Unasked pages stored into the page cache.
    pub pages_stored: AtomicU64,
    /// READs answered with EIO.
    pub eio: AtomicU64,
    /// Pages received that the zero map lists (must stay 0: zero pages never cross).
    pub zero_pages_received: AtomicU64,
}

/// The per-host page store; it is the mcdist client's page sink.
pub struct PageStore {
    page_size: u64,
    image_size: u64,
    zero: PageBitmap,
    inner: Mutex<Inner>,
    /// Latency of reads that waited for the network (µs), in arrival order.
    latencies: Mutex<Vec<u32>>,
    /// Counters.
    pub counters: FuseCounters,
    requester: OnceLock<Box<dyn Fn(u64) + Send + Sync>>,
    storer: OnceLock<Storer>,
}

impl std::fmt::Debug for PageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageStore")
            .field("image_size", &self.image_size)
            .field("page_size", &self.page_size)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl PageStore {
    /// A store for an image of `image_size` bytes in pages of `page_size`, with its zero map.
    pub fn new(image_size: u64, page_size: usize, zero: PageBitmap) -> Self {
        Self {
            page_size: page_size as u64,
            image_size,
            zero,
            inner: Mutex::default(),
            latencies: Mutex::default(),
            counters: FuseCounters::default(),
            requester: OnceLock::new(),
            storer: OnceLock::new(),
        }
    }

    /// Image size in bytes.
    pub fn image_size(&self) -> u64 {
        self.image_size
    }

    /// Sets how a missing page is asked for (the mcdist client's `request`).
    pub fn set_requester(&self, f: impl Fn(u64) + Send + Sync + 'static) {
        let _ = self.requester.set(Box::new(f));
    }

    /// Sets how an unasked page is put into the page cache (FUSE `notify_store`); returns
    /// whether it was stored.
    pub fn set_storer(&self, f: impl Fn(u64, &[u8]) -> bool + Send + Sync + 'static) {
        let _ = self.storer.set(Box::new(f));
    }

    /// Latencies (µs) of reads that waited for the network.
    pub fn latencies(&self) -> Vec<u32> {
        lock(&self.latencies).clone()
    }

    /// Writes the whole image to `out` (zero pages as holes), once every other page is
    /// here: the bytes written. Every page in the store was verified against the image's
    /// root before it was stored; a page never received fails the copy.
    pub fn write_image(&self, out: &std::fs::File) -> std::io::Result<u64> {
        use std::os::unix::fs::FileExt;
        out.set_len(self.image_size)?;
        let inner = lock(&self.inner);
        let mut written = 0;
        for pfn in 0..self.image_size.div_ceil(self.page_size) {
            if self.zero.get(pfn) {
                continue;
            }
            let Some(page) = inner.pages.get(&pfn) else {
                return Err(std::io::Error::other(format!(
                    "page {pfn} was never received"
                )));
            };
            out.write_all_at(page, pfn * self.page_size)?;
            written += page.len() as u64;
        }
        Ok(written)
    }

    /// True once the session is lost (every later miss fails with EIO).
    pub fn is_lost(&self) -> bool {
        lock(&self.inner).lost
    }

    /// Answers READ(`offset`, `size`) now or once its pages arrived.
    pub fn read(&self, offset: u64, size: u32, reply: ReplyData) {
        let c = &self.counters;
        c.reads.fetch_add(1, Ordering::Relaxed);
        c.max_read.fetch_max(u64::from(size), Ordering::Relaxed);
        if u64::from(size) == self.page_size && offset % self.page_size == 0 {
            c.page_reads.fetch_add(1, Ordering::Relaxed);
        }
        let end = offset.saturating_add(u64::from(size)).min(self.image_size);
        if offset >= end {
            reply.data(&[]);
            return;
        }
        let first = offset / self.page_size;
        let last = (end - 1) / self.page_size;
        let mut to_request = Vec::new();
        {
            let mut inner = lock(&self.inner);
            let missing: Vec<u64> = (first..=last)
                .filter(|p| !self.zero.get(*p) && !inner.pages.contains_key(p))
                .collect();
            if missing.is_empty() {
                if (first..=last).all(|p| self.zero.get(p)) {
                    c.zero_reads.fetch_add(1, Ordering::Relaxed);
                }
                let buf = self.assemble(&inner, offset, (end - offset) as usize);
                drop(inner);
                reply.data(&buf);
                return;
            }
            if inner.lost {
                drop(inner);
                c.eio.fetch_add(1, Ordering::Relaxed);
                reply.error(Errno::EIO);
                return;
            }
            c.remote_reads.fetch_add(1, Ordering::Relaxed);
            let job = Arc::new(Mutex::new(ReadJob {
                reply: Some(reply),
                offset,
                len: (end - offset) as usize,
                missing: missing.len(),
                started: Instant::now(),
            }));
            for p in missing {
                inner.waiting.entry(p).or_default().push(job.clone());
                if inner.requested.insert(p) {
                    to_request.push(p);
                }
            }
        }
        if let Some(req) = self.requester.get() {
            for p in to_request {
                c.pages_requested.fetch_add(1, Ordering::Relaxed);
                req(p);
            }
        }
    }

    fn assemble(&self, inner: &Inner, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        let mut at = offset;
        while at < offset + len as u64 {
            let pfn = at / self.page_size;
            let in_page = (at % self.page_size) as usize;
            let take =
                ((self.page_size as usize) - in_page).min((offset + len as u64 - at) as usize);
            let dst = (at - offset) as usize;
            // Zero pages stay zero in `buf`; present pages are copied.
            if let Some(page) = inner.pages.get(&pfn) {
                let avail = page.len().saturating_sub(in_page).min(take);
                buf[dst..dst + avail].copy_from_slice(&page[in_page..in_page + avail]);
            }
            at += take as u64;
        }
        buf
    }

    fn finish(&self, job: &Job, inner: &Inner) {
        let mut j = lock(job);
        if let Some(reply) = j.reply.take() {
            let buf = self.assemble(inner, j.offset, j.len);
            let us = j.started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
            lock(&self.latencies).push(us);
            reply.data(&buf);
        }
    }

    fn fail_all(&self) {
        let jobs: Vec<Job> = {
            let mut inner = lock(&self.inner);
            inner.lost = true;
            inner.waiting.drain().flat_map(|(_, v)| v).collect()
        };
        for job in jobs {
            if let Some(reply) = lock(&job).reply.take() {
                self.counters.eio.fetch_add(1, Ordering::Relaxed);
                reply.error(Errno::EIO);
            }
        }
    }
}

impl PageSink for PageStore {
    fn page_ready(&self, pfn: u64, data: &[u8]) -> Result<(), mcdist::node::SinkError> {
        self.counters.pages_received.fetch_add(1, Ordering::Relaxed);
        if self.zero.get(pfn) {
            self.counters
                .zero_pages_received
                .fetch_add(1, Ordering::Relaxed);
        }
        let page: Arc<[u8]> = Arc::from(data);
        let asked = {
            let mut inner = lock(&self.inner);
            inner.pages.insert(pfn, page.clone());
            let asked = inner.requested.remove(&pfn);
            if let Some(jobs) = inner.waiting.remove(&pfn) {
                for job in jobs {
                    let done = {
                        let mut j = lock(&job);
                        j.missing = j.missing.saturating_sub(1);
                        j.missing == 0
                    };
                    if done {
                        self.finish(&job, &inner);
                    }
                }
            }
            asked
        };
        if !asked {
            self.counters.pages_unasked.fetch_add(1, Ordering::Relaxed);
            if let Some(store) = self.storer.get() {
                if store(pfn * self.page_size, &page) {
                    self.counters.pages_stored.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    fn failed(&self, error: &NodeError) {
        tracing::warn!("mcdist session lost: {error}; reads of missing pages now fail with EIO");
        self.fail_all();
    }
}

/// p50 and p99 of `v` (µs), if any.
pub fn percentiles(v: &[u32]) -> Option<(u32, u32)> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    let at = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize];
    Some((at(0.5), at(0.99)))
}
