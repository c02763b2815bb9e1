//! Memtap: fills a clone domain's memory on demand from an mcdist client.
//!
//! Life of a clone's page:
//! 1. [`Memtap::setup`] enables paging and evicts every gfn of the image, so
//!    the domain starts with no memory present.
//! 2. A vCPU touches a paged-out gfn; the hypervisor pauses it and puts a
//!    `VM_EVENT_REASON_MEM_PAGING` request on the ring.
//! 3. [`Memtap::run`] takes the request. A zero page (from the session's or
//!    descriptor's zero map) is loaded locally and never requested. Otherwise
//!    the page is asked of the mcdist client once; further faults on the same
//!    gfn (other vCPUs) wait on that one request.
//! 4. The page arrives through the [`PageInbox`] (it is the client's
//!    `PageSink`); Memtap loads it (`xc_mem_paging_load`), answers every
//!    request waiting on it and notifies the event channel. Pages the server
//!    pushes before anyone faults on them are loaded ahead, so those faults
//!    never happen.
//! 5. [`Memtap::shutdown`] disables paging and releases the ring.

use crate::abi::{self, VmEvent};
use crate::hypervisor::{EvictOutcome, Hypervisor, HypervisorError, PageBuf};
use crate::ring::BackRing;
use std::os::fd::AsRawFd;

use crate::event::{self, EventFd, Readable};
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use mcdist::bitmap::PageBitmap;
use mcdist::node::SinkError;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Errors of Memtap. Every variant names the domain.
#[derive(Debug, Error)]
pub enum MemtapError {
    /// A hypervisor call failed.
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    /// The page source (the mcdist session) failed.
    #[error("domain {domid}: the page source failed: {source}")]
    SourceFailed {
        /// The domain.
        domid: u32,
        /// Why.
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    /// The hypervisor asked for a gfn outside the image.
    #[error(
        "domain {domid}: paging request for gfn {gfn:#x} beyond the image ({page_count} pages)"
    )]
    GfnOutOfRange {
        /// The domain.
        domid: u32,
        /// The gfn.
        gfn: u64,
        /// Pages in the image.
        page_count: u64,
    },
    /// A delivered page had the wrong size.
    #[error("domain {domid}: page {gfn:#x} arrived with {len} bytes, expected {expected}")]
    BadPageSize {
        /// The domain.
        domid: u32,
        /// The gfn.
        gfn: u64,
        /// Bytes received.
        len: usize,
        /// Page size.
        expected: usize,
    },
    /// Local setup (eventfd, buffers, poll) failed.
    #[error("domain {domid}: {what}: {source}")]
    Local {
        /// The domain.
        domid: u32,
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `run` was called before `setup`.
    #[error("domain {domid}: memtap is not set up (call setup first)")]
    NotSetUp {
        /// The domain.
        domid: u32,
    },
}

/// Asks a page source for a page; the page comes back through [`PageInbox`].
pub trait PageFetcher: Send + Sync {
    /// Ask for `pfn`. Non-blocking; may be called again for the same page.
    fn request(&self, pfn: u64);
    /// Fetch every page in the background (demand still goes first). Default: nothing.
    fn fetch_all(&self) {}
}

impl PageFetcher for mcdist::node::ClientNode {
    fn request(&self, pfn: u64) {
        mcdist::node::ClientNode::request(self, pfn)
    }
    fn fetch_all(&self) {
        mcdist::node::ClientNode::fetch_all(self)
    }
}

impl<T: PageFetcher + ?Sized> PageFetcher for Arc<T> {
    fn request(&self, pfn: u64) {
        (**self).request(pfn)
    }
    fn fetch_all(&self) {
        (**self).fetch_all()
    }
}

/// Why a page could not be handed to Memtap.
#[derive(Debug, Error)]
pub enum InboxError {
    /// Memtap has stopped (its receiver is gone).
    #[error("memtap has stopped")]
    Stopped,
    /// Waking Memtap's loop failed.
    #[error("waking memtap: {0}")]
    Wake(#[source] std::io::Error),
}

/// Where pages arrive for Memtap: the mcdist client's `PageSink`.
///
/// The client's I/O thread hands each page over (a copy, through a channel)
/// and wakes Memtap's loop through an eventfd it polls next to the event channel.
pub struct PageInbox {
    tx: Sender<(u64, Vec<u8>)>,
    wake: EventFd,
    failure: Mutex<Option<Arc<dyn std::error::Error + Send + Sync>>>,
}

impl std::fmt::Debug for PageInbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageInbox")
            .field("queued", &self.tx.len())
            .finish()
    }
}

/// Memtap's end of a [`PageInbox`].
#[derive(Debug)]
pub struct InboxReceiver {
    inbox: Arc<PageInbox>,
    rx: Receiver<(u64, Vec<u8>)>,
}

impl PageInbox {
    /// A new inbox and the receiver to give [`Memtap::new`].
    pub fn new() -> std::io::Result<(Arc<PageInbox>, InboxReceiver)> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let inbox = Arc::new(PageInbox {
            tx,
            wake: event::event_fd()?,
            failure: Mutex::new(None),
        });
        Ok((inbox.clone(), InboxReceiver { inbox, rx }))
    }

    /// Hand page `pfn` to Memtap.
    pub fn deliver(&self, pfn: u64, data: &[u8]) -> Result<(), InboxError> {
        self.tx
            .send((pfn, data.to_vec()))
            .map_err(|_| InboxError::Stopped)?;
        event::signal(&self.wake).map_err(InboxError::Wake)
    }

    /// Tell Memtap the source failed; its loop returns [`MemtapError::SourceFailed`].
    pub fn fail(&self, why: impl Into<Box<dyn std::error::Error + Send + Sync>>) {
        let mut f = self.failure.lock().unwrap_or_else(PoisonError::into_inner);
        if f.is_none() {
            *f = Some(Arc::from(why.into()));
        }
        drop(f);
        let _ = event::signal(&self.wake);
    }
}

impl mcdist::node::PageSink for PageInbox {
    fn page_ready(&self, pfn: u64, data: &[u8]) -> Result<(), SinkError> {
        self.deliver(pfn, data).map_err(|e| match e {
            InboxError::Stopped => SinkError::Stopped,
            InboxError::Wake(source) => SinkError::Io {
                what: "waking memtap",
                source,
            },
        })
    }

    fn failed(&self, error: &mcdist::node::NodeError) {
        self.fail(error.clone())
    }
}

/// Memtap settings.
#[derive(Debug, Clone)]
pub struct MemtapConfig {
    /// Page size (Xen: 4096).
    pub page_size: usize,
    /// Pages in the image; gfns `0..page_count` are paged.
    pub page_count: u64,
    /// Set bit = all-zero page: filled locally, never requested.
    pub zero_map: PageBitmap,
    /// Return from [`Memtap::run`] once every data page is loaded (remaining
    /// zero pages are then filled locally).
    pub exit_when_complete: bool,
    /// Ask the page source for the whole image in the background as soon as
    /// [`Memtap::run`] starts, so the clone ends up fully populated.
    pub fetch_all: bool,
    /// Longest wait in one poll (bounds how late a stop request is seen).
    pub poll_interval: Duration,
}

impl MemtapConfig {
    /// Settings for an image of `page_count` pages of `page_size` bytes.
    pub fn new(page_size: usize, page_count: u64, zero_map: PageBitmap) -> MemtapConfig {
        MemtapConfig {
            page_size,
            page_count,
            zero_map,
            exit_when_complete: false,
            fetch_all: false,
            poll_interval: Duration::from_millis(50),
        }
    }
}

/// Counters of one Memtap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemtapStats {
    /// Pages evicted at setup.
    pub evicted: u64,
    /// Gfns the hypervisor refused to page at setup.
    pub not_pageable: u64,
    /// Paging requests taken from the ring.
    pub requests: u64,
    /// Requests for a gfn whose page was already being fetched (shared a fetch).
    pub shared_faults: u64,
    /// Requests for a gfn that was already loaded (e.g. pushed meanwhile).
    pub already_loaded: u64,
    /// Pages asked of the page source.
    pub fetches: u64,
    /// Zero pages loaded locally.
    pub zero_fills: u64,
    /// Pages loaded that a request was waiting for.
    pub loaded_on_demand: u64,
    /// Pages loaded before any fault on them (pushed).
    pub loaded_ahead: u64,
    /// Pages delivered twice (ignored).
    pub duplicate_pages: u64,
    /// `MEM_PAGING_DROP_PAGE` requests.
    pub dropped: u64,
    /// Requests of another reason or interface version (answered, not acted on).
    pub foreign_requests: u64,
    /// Responses put on the ring.
    pub responses: u64,
    /// Event-channel notifications sent.
    pub notifications: u64,
    /// Pages loaded in total (zero fills included).
    pub loaded: u64,
}

/// Fills one clone domain's memory from a page source, on demand.
pub struct Memtap<H: Hypervisor> {
    hv: H,
    cfg: MemtapConfig,
    fetcher: Arc<dyn PageFetcher>,
    inbox: InboxReceiver,
    ring: Option<BackRing>,
    enabled: bool,
    loaded: PageBitmap,
    requested: PageBitmap,
    waiting: HashMap<u64, Vec<VmEvent>>,
    buf: PageBuf,
    stats: MemtapStats,
    pending_responses: u64,
    data_left: u64,
}

impl<H: Hypervisor> std::fmt::Debug for Memtap<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memtap")
            .field("domid", &self.hv.domid())
            .field("stats", &self.stats)
            .finish()
    }
}

impl<H: Hypervisor> Memtap<H> {
    /// A Memtap for the domain behind `hv`. Pages are requested from `fetcher`
    /// and arrive through `inbox`.
    pub fn new(
        hv: H,
        cfg: MemtapConfig,
        fetcher: Arc<dyn PageFetcher>,
        inbox: InboxReceiver,
    ) -> Result<Memtap<H>, MemtapError> {
        let domid = hv.domid();
        let buf = PageBuf::new(cfg.page_size).map_err(|source| MemtapError::Local {
            domid,
            what: "allocating the load buffer",
            source,
        })?;
        Ok(Memtap {
            loaded: PageBitmap::new(cfg.page_count),
            requested: PageBitmap::new(cfg.page_count),
            hv,
            cfg,
            fetcher,
            inbox,
            ring: None,
            enabled: false,
            waiting: HashMap::new(),
            buf,
            stats: MemtapStats::default(),
            pending_responses: 0,
            data_left: 0,
        })
    }

    /// The domain.
    pub fn domid(&self) -> u32 {
        self.hv.domid()
    }

    /// Counters so far.
    pub fn stats(&self) -> &MemtapStats {
        &self.stats
    }

    /// The hypervisor backend.
    pub fn hypervisor(&self) -> &H {
        &self.hv
    }

    /// True once every page of the image that is not a zero page is loaded
    /// (zero pages need nothing from the network).
    pub fn is_complete(&self) -> bool {
        self.data_left == 0
    }

    /// Load every zero page still paged out (locally; nothing is requested).
    pub fn fill_zero_pages(&mut self) -> Result<u64, MemtapError> {
        let mut n = 0;
        let mut from = 0;
        while let Some(g) = self.loaded.next_clear(from) {
            from = g + 1;
            if self.cfg.zero_map.get(g) && !self.waiting.contains_key(&g) {
                self.load(g, None)?;
                self.stats.zero_fills += 1;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Enable paging, initialise the ring and evict every page of the image.
    pub fn setup(&mut self) -> Result<&MemtapStats, MemtapError> {
        let page = self.hv.enable_paging()?;
        self.enabled = true;
        page.shared_init();
        self.ring = Some(BackRing::new(page));
        for gfn in 0..self.cfg.page_count {
            match self.hv.evict(gfn)? {
                EvictOutcome::Evicted => self.stats.evicted += 1,
                EvictOutcome::NotPageable => {
                    self.stats.not_pageable += 1;
                    self.loaded.set(gfn);
                }
            }
        }
        self.data_left = (0..self.cfg.page_count)
            .filter(|g| !self.loaded.get(*g) && !self.cfg.zero_map.get(*g))
            .count() as u64;
        tracing::info!(
            domid = self.domid(),
            evicted = self.stats.evicted,
            not_pageable = self.stats.not_pageable,
            "memtap: domain memory paged out"
        );
        Ok(&self.stats)
    }

    /// Serve paging requests until `stop` is set (or, with
    /// `exit_when_complete`, every page is loaded).
    pub fn run(&mut self, stop: &AtomicBool) -> Result<MemtapStats, MemtapError> {
        let domid = self.domid();
        if self.ring.is_none() {
            return Err(MemtapError::NotSetUp { domid });
        }
        if self.cfg.fetch_all && !self.is_complete() {
            self.fetcher.fetch_all();
        }
        let timeout = self.cfg.poll_interval;
        let poll = Readable::new(&[self.hv.event_fd(), self.inbox.inbox.wake.as_raw_fd()])
            .map_err(|source| MemtapError::Local {
                domid,
                what: "polling the event channel",
                source,
            })?;
        while !stop.load(Ordering::Acquire) {
            if self.cfg.exit_when_complete && self.waiting.is_empty() && self.is_complete() {
                self.fill_zero_pages()?;
                // Answer faults that raced with the zero fill.
                self.step()?;
                if self.loaded.is_full() && self.waiting.is_empty() {
                    break;
                }
            }
            let ready = poll.wait(timeout).map_err(|source| MemtapError::Local {
                domid,
                what: "polling the event channel",
                source,
            })?;
            if ready & 1 != 0 {
                self.hv.ack_event()?;
            }
            if ready & 2 != 0 {
                event::drain(&self.inbox.inbox.wake).map_err(|source| MemtapError::Local {
                    domid,
                    what: "reading the inbox eventfd",
                    source,
                })?;
            }
            self.step()?;
        }
        Ok(self.stats.clone())
    }

    /// One pass without waiting: load arrived pages, serve ring requests,
    /// publish responses and notify. [`Memtap::run`] calls this after each wake-up.
    pub fn step(&mut self) -> Result<(), MemtapError> {
        let domid = self.domid();
        if let Some(source) = self
            .inbox
            .inbox
            .failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            return Err(MemtapError::SourceFailed { domid, source });
        }
        self.drain_inbox()?;
        loop {
            let Some(ring) = self.ring.as_mut() else {
                return Err(MemtapError::NotSetUp { domid });
            };
            let Some(req) = ring.take_request() else {
                break;
            };
            self.handle_request(req)?;
            // Pages that came in meanwhile answer waiters sooner.
            self.drain_inbox()?;
        }
        self.flush()
    }

    fn flush(&mut self) -> Result<(), MemtapError> {
        if self.pending_responses > 0 {
            if let Some(ring) = self.ring.as_mut() {
                ring.push_responses();
            }
            self.pending_responses = 0;
            self.hv.notify()?;
            self.stats.notifications += 1;
        }
        Ok(())
    }

    fn respond(&mut self, req: &VmEvent) {
        if let Some(ring) = self.ring.as_mut() {
            ring.put_response(&VmEvent::paging_response(req));
            self.stats.responses += 1;
            self.pending_responses += 1;
        }
    }

    fn drain_inbox(&mut self) -> Result<(), MemtapError> {
        loop {
            match self.inbox.rx.try_recv() {
                Ok((pfn, data)) => self.page_arrived(pfn, &data)?,
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => return Ok(()),
            }
        }
    }

    fn load(&mut self, gfn: u64, data: Option<&[u8]>) -> Result<(), MemtapError> {
        let out = self.buf.as_mut_slice();
        match data {
            Some(d) => out.copy_from_slice(d),
            None => out.fill(0),
        }
        self.hv.load(gfn, &mut self.buf)?;
        self.loaded.set(gfn);
        if !self.cfg.zero_map.get(gfn) {
            self.data_left = self.data_left.saturating_sub(1);
        }
        self.stats.loaded += 1;
        Ok(())
    }

    fn page_arrived(&mut self, pfn: u64, data: &[u8]) -> Result<(), MemtapError> {
        let domid = self.domid();
        if pfn >= self.cfg.page_count {
            tracing::debug!(domid, pfn, "memtap: page beyond the image ignored");
            return Ok(());
        }
        if data.len() != self.cfg.page_size {
            return Err(MemtapError::BadPageSize {
                domid,
                gfn: pfn,
                len: data.len(),
                expected: self.cfg.page_size,
            });
        }
        if self.loaded.get(pfn) {
            self.stats.duplicate_pages += 1;
            return Ok(());
        }
        self.load(pfn, Some(data))?;
        match self.waiting.remove(&pfn) {
            Some(reqs) => {
                self.stats.loaded_on_demand += 1;
                for r in &reqs {
                    self.respond(r);
                }
            }
            None => self.stats.loaded_ahead += 1,
        }
        Ok(())
    }

    fn handle_request(&mut self, req: VmEvent) -> Result<(), MemtapError> {
        let domid = self.domid();
        self.stats.requests += 1;
        if req.version != abi::VM_EVENT_INTERFACE_VERSION
            || req.reason != abi::VM_EVENT_REASON_MEM_PAGING
        {
            tracing::debug!(
                domid,
                version = req.version,
                reason = req.reason,
                "memtap: foreign vm_event request"
            );
            self.stats.foreign_requests += 1;
            self.respond(&req);
            return Ok(());
        }
        let gfn = req.u.mem_paging.gfn;
        if gfn >= self.cfg.page_count {
            return Err(MemtapError::GfnOutOfRange {
                domid,
                gfn,
                page_count: self.cfg.page_count,
            });
        }
        if req.u.mem_paging.flags & abi::MEM_PAGING_DROP_PAGE != 0 {
            // The guest gave the gfn back while it was paged out: nothing to load.
            self.stats.dropped += 1;
            if !self.loaded.get(gfn) {
                self.loaded.set(gfn);
                if !self.cfg.zero_map.get(gfn) {
                    self.data_left = self.data_left.saturating_sub(1);
                }
            }
            self.respond(&req);
            return Ok(());
        }
        if self.loaded.get(gfn) {
            self.stats.already_loaded += 1;
            self.respond(&req);
            return Ok(());
        }
        if self.cfg.zero_map.get(gfn) {
            self.load(gfn, None)?;
            self.stats.zero_fills += 1;
            self.respond(&req);
            return Ok(());
        }
        self.waiting.entry(gfn).or_default().push(req);
        if self.requested.get(gfn) {
            self.stats.shared_faults += 1;
        } else {
            self.requested.set(gfn);
            self.stats.fetches += 1;
            self.fetcher.request(gfn);
        }
        Ok(())
    }

    /// Disable paging and release the ring. Pages still paged out stay so;
    /// run with `exit_when_complete` first to leave a fully populated domain.
    pub fn shutdown(mut self) -> Result<MemtapStats, MemtapError> {
        self.disable()?;
        Ok(self.stats.clone())
    }

    fn disable(&mut self) -> Result<(), MemtapError> {
        if self.enabled {
            // Answer what can be answered before the ring goes away.
            self.flush()?;
            self.ring = None;
            self.enabled = false;
            self.hv.disable_paging()?;
        }
        Ok(())
    }

    /// Run until `stop` or completion, then shut down; the common embedding.
    pub fn run_to_end(mut self, stop: &AtomicBool) -> Result<MemtapStats, MemtapError> {
        let started = Instant::now();
        let res = self.run(stop);
        let down = self.disable();
        let stats = res?;
        down?;
        tracing::info!(domid = self.domid(), elapsed = ?started.elapsed(), ?stats, "memtap finished");
        Ok(stats)
    }
}

impl<H: Hypervisor> Drop for Memtap<H> {
    fn drop(&mut self) {
        if let Err(e) = self.disable() {
            tracing::warn!(error = %e, "memtap: disabling paging on drop failed");
        }
    }
}
