//! The sans-IO memory server.
//!
//! The server answers demand requests by multicast (so the first request for a
//! page prefetches it for every sibling), suppresses duplicate requests within a
//! lockstep window, pushes pages next to recent faults (and optionally sweeps the
//! whole image), paces itself with a token bucket whose rate follows receivers'
//! reports, and answers retries by unicast once most pages have been sent.
//!
//! Priorities in [`Server::poll_transmit`]: control (announce, zero map) → demand
//! → repair (NACKs) → FEC repair symbols of closed blocks ([`crate::fec`]) →
//! recorded working-set push ([`crate::workingset`]) → push next to faults → sweep. A page in progress (its
//! remaining fragments) finishes first; demand pre-empts push at each page.
//!
//! # Polling order
//! 1. [`Server::handle_datagram`] for each received datagram, and
//!    [`Server::handle_timeout`] once `now >= poll_timeout()`;
//! 2. [`Server::poll_transmit`] until it returns `None`, sending each datagram;
//! 3. [`Server::poll_event`] until it returns `None`;
//! 4. sleep until [`Server::poll_timeout`] (`None`: until the next datagram) or
//!    the next datagram.
//!
//! # Rooms
//! One module per rule: `config` (settings, validation, datagram geometry),
//! `peers` (receiver table, reports, slow receivers, completion), `requests`
//! (what a request or NACK makes the server do), `schedule` (job priority, push
//! window, sweep, sent log, end game), `emit` (fragments, control messages,
//! announce), `fec` (FEC blocks and repair symbols), `validate` (address
//! tokens, the 3× limit, control pacing), `stats` (counters and events). This file holds the [`Server`], its public API and its timers.

mod config;
mod emit;
mod fec;
mod peers;
mod push;
mod requests;
mod schedule;
mod stats;
mod validate;

pub use config::{ConfigError, Delivery, ServerConfig};
pub use stats::{ServerEvent, ServerStats, SourceFailure};

use crate::integrity::HashTree;
use crate::pacing::{RateController, TokenBucket};
use crate::source::{ImageInfo, PageSource};
use crate::timer::{TimerKind, TimerTable};
use crate::wire::{Body, Message};
use crate::workingset::WorkingSet;
use crate::Transmit;
use config::Geometry;
use emit::Outbox;
use fec::FecState;
use peers::Peers;
use push::Push;
use rand::{Rng, RngCore, SeedableRng};
use schedule::{Queues, SentLog, Sweep};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use validate::Validator;

/// The server's timers. Sending is not a timer: [`Server::poll_timeout`] adds
/// the instant the token bucket lets the next datagram out whenever one waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerTimer {
    /// Periodic group announce (queued by [`Server::poll_transmit`]).
    Announce,
    /// Receiver timeouts and the source check.
    Housekeeping,
    /// The rate controller's next update (mirrors [`RateController::next_update`]).
    RateUpdate,
}

impl TimerKind for ServerTimer {
    const ALL: &'static [Self] = &[
        ServerTimer::Announce,
        ServerTimer::Housekeeping,
        ServerTimer::RateUpdate,
    ];
    fn index(self) -> usize {
        self as usize
    }
}

/// Period of the housekeeping timer.
const HOUSEKEEPING_PERIOD: Duration = Duration::from_millis(250);

/// The sans-IO mcdist server. See the module docs.
pub struct Server {
    cfg: ServerConfig,
    /// The image: page bytes, digest and zero map, and how pages are cut.
    source: Arc<dyn PageSource>,
    info: ImageInfo,
    geo: Geometry,
    /// Data pages; hash pages are numbered from here (see [`crate::integrity`]).
    page_count: u64,
    /// The image's hash pages, served from memory as pages `page_count..total_pages`.
    tree: Arc<HashTree>,
    /// Data pages plus hash pages.
    total_pages: u64,
    nonzero_pages: u64,
    session: u64,
    /// The instant the server was built; sent-page times count from it.
    base: Instant,
    timers: TimerTable<ServerTimer>,
    /// Receivers (`peers`).
    peers: Peers,
    /// Pacing: the bucket every data datagram takes from, at the controller's rate.
    bucket: TokenBucket,
    /// Control datagrams' own bucket (`validate`).
    control_bucket: TokenBucket,
    /// Address tokens (`validate`).
    validator: Validator,
    rate: RateController,
    /// What to send next (`schedule`).
    queues: Queues,
    sent: SentLog,
    push: Push,
    sweep: Sweep,
    working_set: WorkingSet,
    /// Control messages and the page in progress (`emit`).
    out: Outbox,
    fec: Option<FecState>,
    events: VecDeque<ServerEvent>,
    stats: ServerStats,
    /// The source failed: no more data is sent.
    failed: bool,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("session", &self.session)
            .field("page_count", &self.page_count)
            .field("stats", &self.stats)
            .finish()
    }
}

impl Server {
    /// Build a server from an [`ImageInfo`] the driver computed before (with
    /// [`crate::source::scan`], or from a descriptor). The state machine reads no
    /// image itself except the pages it sends, through the source.
    /// When `info` carries no hash tree (or one of another image), the hash pages are
    /// built from `source` (one read of the image), and their root must be `info.digest`.
    pub fn with_info(
        cfg: ServerConfig,
        source: Arc<dyn PageSource>,
        mut info: ImageInfo,
        now: Instant,
    ) -> Result<Server, ConfigError> {
        let geo = Geometry::new(&cfg, source.page_size())?;
        let page_count = source.page_count();
        let tree = match info.hash_tree.take() {
            Some(t)
                if t.layout().image_size() == source.image_size()
                    && t.layout().page_size() == geo.page_size =>
            {
                t
            }
            _ => Arc::new(crate::source::hash_tree(source.as_ref())?),
        };
        if tree.root() != info.digest {
            return Err(ConfigError::DigestMismatch { root: tree.root() });
        }
        info.hash_tree = Some(tree.clone());
        let total_pages = tree.layout().total_pages();
        // Session id and token secret: from the OS RNG unless a test seeds them.
        let mut rng = match cfg.seed {
            Some(seed) => rand::rngs::StdRng::seed_from_u64(seed),
            None => rand::rngs::StdRng::from_os_rng(),
        };
        let session = cfg.session_id.unwrap_or_else(|| rng.random::<u64>() | 1);
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        let rate = RateController::new(now, cfg.rate);
        let bucket = TokenBucket::new(now, rate.rate(), cfg.rate.burst_bytes(rate.rate()));
        let (ctl_rate, ctl_burst) = Server::control_rate(&cfg, rate.rate());
        let control_bucket = TokenBucket::new(now, ctl_rate, ctl_burst);
        let mut timers = TimerTable::new();
        timers.set(ServerTimer::Announce, now);
        timers.set(ServerTimer::Housekeeping, now + HOUSEKEEPING_PERIOD);
        timers.set(ServerTimer::RateUpdate, rate.next_update());
        Ok(Server {
            source,
            geo,
            page_count,
            tree,
            total_pages,
            nonzero_pages: total_pages - info.zero_map.count_ones(),
            session,
            base: now,
            timers,
            peers: Peers::default(),
            bucket,
            control_bucket,
            validator: Validator::new(secret),
            rate,
            queues: Queues::default(),
            sent: SentLog::new(total_pages),
            push: Push::default(),
            sweep: Sweep::default(),
            working_set: WorkingSet::new(
                page_count,
                cfg.working_set_max_pages,
                u64::try_from(cfg.working_set_generation_gap.as_nanos()).unwrap_or(u64::MAX),
            ),
            out: Outbox::new(&cfg, &info.zero_map, geo.page_size),
            fec: FecState::new(&cfg, &geo),
            events: VecDeque::new(),
            stats: ServerStats::default(),
            failed: false,
            info,
            cfg,
        })
    }

    /// Session id.
    pub fn session_id(&self) -> u64 {
        self.session
    }

    /// The image's digest, size and zero map.
    pub fn image_info(&self) -> &ImageInfo {
        &self.info
    }

    /// Counters.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Current paced rate, bytes/s.
    pub fn rate(&self) -> u64 {
        self.bucket.rate()
    }

    /// The receiver at `addr` is currently marked slow: left out of pacing and
    /// repaired by unicast.
    pub fn is_slow_receiver(&self, addr: SocketAddr) -> bool {
        self.peers.is_slow(&addr)
    }

    /// Number of receivers tracked.
    pub fn client_count(&self) -> usize {
        self.peers.len()
    }

    /// Receivers that reported completion and are still tracked.
    pub fn completed_clients(&self) -> usize {
        self.peers.completed()
    }

    /// Jobs waiting in the demand and repair queues.
    pub fn queued_jobs(&self) -> usize {
        self.queues.len()
    }

    /// Pages sent at least once.
    pub fn pages_ever_sent(&self) -> u64 {
        self.sent.ever.count_ones()
    }

    /// The recorded working set (order of first demand requests).
    pub fn working_set(&self) -> &WorkingSet {
        &self.working_set
    }

    /// Announce the end of the session (sent with the next transmits) and stop
    /// every timer: once the end is sent, [`Server::poll_timeout`] returns
    /// `None` until a receiver asks for something again.
    pub fn close(&mut self) {
        for _ in 0..3 {
            self.queue_end();
        }
        self.timers.stop_all();
    }

    /// Next event for the embedder.
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }

    /// Feed one received datagram.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        let msg = match Message::parse(datagram) {
            Ok(m) => m,
            Err(e) => {
                self.stats.malformed += 1;
                tracing::debug!(%from, error = %e, "dropping malformed datagram");
                return;
            }
        };
        if msg.session != self.session && !matches!(msg.body, Body::Join(_)) {
            self.stats.foreign += 1;
            tracing::debug!(%from, session = msg.session, "dropping datagram for another session");
            return;
        }
        match msg.body {
            Body::Join(j) => self.on_join(now, from, j, datagram.len()),
            Body::Request(q) => self.on_request(now, from, q, false),
            Body::Nack(q) => self.on_request(now, from, q, true),
            Body::FragmentNack(f) => self.on_fragment_nack(now, from, f),
            Body::Heartbeat(h) => self.on_heartbeat(now, from, h),
            Body::Leave(l) => self.on_leave(now, from, l),
            Body::Announce(_)
            | Body::Data(_)
            | Body::ZeroMap(_)
            | Body::End(_)
            | Body::Repair(_)
            | Body::Hint(_) => {
                self.stats.foreign += 1;
                tracing::debug!(%from, kind = ?msg.body.kind(), "server ignores server-side message");
            }
        }
    }

    /// Advance timers: rate updates, receiver timeouts, source checks.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.timers.is_expired(ServerTimer::RateUpdate, now) {
            self.feed_rate_reports(now);
            if self.rate.update(now) {
                let r = self.rate.rate();
                self.bucket.set_rate(now, r, self.cfg.rate.burst_bytes(r));
                let (cr, cb) = Server::control_rate(&self.cfg, r);
                self.control_bucket.set_rate(now, cr, cb);
            }
            self.timers
                .set(ServerTimer::RateUpdate, self.rate.next_update());
        }
        if self.timers.is_expired(ServerTimer::Housekeeping, now) {
            self.timers
                .set(ServerTimer::Housekeeping, now + HOUSEKEEPING_PERIOD);
            self.expire_peers(now);
        }
    }

    /// When the server next needs [`Server::handle_timeout`] or can send again;
    /// `None` when no timer is armed and nothing waits to be sent.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let control = self
            .out
            .control
            .front()
            .map(|c| self.control_bucket.ready_at(self.control_len(c)));
        let data = self.has_data_work().then(|| {
            // A repair datagram may be a little longer than a fragment.
            let need = self
                .geo
                .data_len()
                .max(self.fec_repair_ready().unwrap_or(0));
            self.bucket.ready_at(need as u64)
        });
        [self.timers.next_timeout(), control, data]
            .into_iter()
            .flatten()
            .min()
    }

    /// Write the next datagram to send into `buf` (at least `max_datagram` bytes).
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        if self.timers.is_expired(ServerTimer::Announce, now) {
            self.timers
                .set(ServerTimer::Announce, now + self.cfg.announce_interval);
            self.queue_group_announce();
        }
        while let Some(c) = self.out.control.front() {
            // Control is paced by its own bucket; data may go while it waits.
            if !self.control_bucket.try_take(now, self.control_len(c)) {
                break;
            }
            let Some(c) = self.out.control.pop_front() else {
                break;
            };
            if let Some(t) = self.emit_control(c, buf) {
                return Some(t);
            }
        }
        if self.failed {
            return None;
        }
        loop {
            if self.out.current.is_none() {
                if self.fec_block_expired(now) {
                    self.fec_close();
                }
                if let Some(len) = self.fec_repair_ready() {
                    if !self.bucket.try_take(now, len as u64) {
                        return None;
                    }
                    if let Some(t) = self.emit_repair(buf) {
                        return Some(t);
                    }
                    continue;
                }
                let Some(job) = self.next_job() else {
                    if self.fec_close() {
                        continue;
                    }
                    return None;
                };
                if let Err(e) = self.load(now, job) {
                    self.fail_source(e);
                    return None;
                }
            }
            let zero = self.out.current.as_ref().is_some_and(|c| c.is_zero());
            let need = if zero { 64 } else { self.geo.data_len() as u64 };
            if !self.bucket.try_take(now, need) {
                return None;
            }
            if let Some(t) = self.emit_fragment(now, buf) {
                return Some(t);
            }
        }
    }

    /// Nanoseconds since the server was built.
    fn nanos(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.base).as_nanos() as u64
    }

    /// The source failed or changed: drop every waiting answer and the page in
    /// progress, tell the embedder, end the session.
    /// The driver found the page source broken or changed (for example a file that
    /// changed size under the server; the state machine itself never touches the
    /// source's backing store except through [`PageSource::read_pages`]): stop
    /// sending data, report [`ServerEvent::SourceFailed`] and close.
    pub fn source_failed(&mut self, error: std::io::Error) {
        if !self.failed {
            self.fail_source(error);
        }
    }

    fn fail_source(&mut self, error: std::io::Error) {
        tracing::error!(%error, "page source failed; no more data will be sent");
        self.stats.source_errors += 1;
        self.failed = true;
        self.queues.clear();
        self.out.current = None;
        self.events
            .push_back(ServerEvent::SourceFailed(SourceFailure(Arc::new(error))));
        self.close();
    }
}

#[cfg(test)]
mod fec_tests;
#[cfg(test)]
mod frag_tests;
#[cfg(test)]
mod isolation_tests;
#[cfg(test)]
mod tests;
