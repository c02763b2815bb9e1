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

use crate::bitmap::PageBitmap;
use crate::fec::{BlockBuilder, Burst};
use crate::pacing::{RateConfig, RateController, TokenBucket};
use crate::source::{scan, ImageInfo, PageSource};
use crate::wire::{self, Announce, Body, Data, Header, HeaderFlags, Kind, Message};
use crate::workingset::WorkingSet;
use crate::{Dest, Transmit};
use rand::{Rng, SeedableRng};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;

/// How group traffic reaches receivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// One datagram to the multicast group.
    Multicast,
    /// One datagram per known receiver (networks without multicast; also the
    /// baseline mcdist is compared against).
    UnicastFanout,
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Session id; `None` draws a random one.
    pub session_id: Option<u64>,
    /// Largest datagram to send (UDP payload bytes). Pages larger than what fits are fragmented.
    pub max_datagram: usize,
    /// Bytes at the end of each datagram left free for an authentication trailer.
    pub trailer_reserve: usize,
    /// Requests for a page multicast less than this long ago are ignored.
    pub lockstep_window: Duration,
    /// Push the pages that follow a fault.
    pub push_neighbors: bool,
    /// Smallest and largest push window (pages); the window doubles while faults stay sequential.
    pub push_window: (u64, u64),
    /// Sweep the whole image in order after demand and push (whole-image distribution).
    pub sweep: bool,
    /// Record the order of first demand requests and replay it as pushes to
    /// receivers that join later (later generations of clones). Off by
    /// default: with it on, a receiver gets pages it did not ask for even with
    /// `push_neighbors` off.
    pub working_set_push: bool,
    /// Most pages the recorded working set holds.
    pub working_set_max_pages: usize,
    /// Also record pages pushed next to faults, in the order sent. A clone that
    /// finds a pushed page present never faults on it, so without this the
    /// pages a generation got from that push are missing from its recorded
    /// working set (later generations then fault on them).
    pub working_set_record_push: bool,
    /// The sweep starts only once this many receivers have joined.
    pub sweep_min_clients: usize,
    /// Multicast or unicast fan-out.
    pub delivery: Delivery,
    /// Pacing.
    pub rate: RateConfig,
    /// Fraction of non-zero pages sent at least once after which retries go unicast.
    pub endgame_fraction: f64,
    /// A receiver silent this long is forgotten.
    pub client_timeout: Duration,
    /// Period of the group announce.
    pub announce_interval: Duration,
    /// Most receivers tracked at once.
    pub max_clients: usize,
    /// Pages per second one source address may request (token bucket; burst = 1/4 s).
    pub per_source_page_rate: u64,
    /// Most pages one request datagram may make the server consider.
    pub max_pages_per_request: u64,
    /// Seed for the server's randomness (session id).
    pub seed: u64,
    /// Authenticate (and by default encrypt) every datagram under a pre-shared
    /// key. Applied by the drivers ([`crate::node::ServerNode`]), which then
    /// draw a random session id; `None` runs an unauthenticated session.
    pub security: Option<crate::secure::Security>,
    /// Follow pushed and swept pages with RaptorQ repair symbols
    /// ([`crate::fec`]); multicast delivery only. Off by default.
    pub fec: bool,
    /// Most pages in one FEC block.
    pub fec_block_pages: usize,
    /// Repair symbols per source symbol sent even while no receiver reports loss.
    pub fec_min_overhead: f64,
    /// Most repair symbols per source symbol.
    pub fec_max_overhead: f64,
    /// The repair fraction is this times the 90th-percentile reported loss ...
    pub fec_loss_factor: f64,
    /// ... plus this, while any receiver reports loss.
    pub fec_margin: f64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            session_id: None,
            max_datagram: 65_507,
            trailer_reserve: 0,
            lockstep_window: Duration::from_millis(5),
            push_neighbors: true,
            push_window: (16, 1024),
            sweep: false,
            working_set_push: false,
            working_set_max_pages: 1 << 20,
            working_set_record_push: true,
            sweep_min_clients: 0,
            delivery: Delivery::Multicast,
            rate: RateConfig::default(),
            endgame_fraction: 0.95,
            client_timeout: Duration::from_secs(10),
            announce_interval: Duration::from_millis(200),
            max_clients: 4096,
            per_source_page_rate: 400_000,
            max_pages_per_request: 8192,
            seed: 0x6d63_6469_7374,
            security: None,
            fec: false,
            fec_block_pages: 64,
            fec_min_overhead: 0.0,
            fec_max_overhead: 0.5,
            fec_loss_factor: 2.0,
            fec_margin: 0.02,
        }
    }
}

/// Invalid server configuration or image.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The datagram size leaves no room for page data.
    #[error("max datagram of {0} bytes is too small (need at least 128)")]
    DatagramTooSmall(usize),
    /// A page would need more fragments than the wire allows.
    #[error("page size {page} needs {frags} fragments at this datagram size (max {max})")]
    TooManyFragments {
        /// Page size.
        page: usize,
        /// Fragments needed.
        frags: usize,
        /// Allowed.
        max: u16,
    },
    /// Page size is not a power of two.
    #[error("page size {0} is not a power of two between 512 and 2 MiB")]
    BadPageSize(usize),
    /// Reading the image failed.
    #[error("reading the image: {0}")]
    Source(#[from] io::Error),
}

/// Things the embedder may want to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    /// A receiver joined.
    ClientJoined(SocketAddr),
    /// A receiver reported it holds the whole image.
    ClientCompleted(SocketAddr),
    /// A receiver left.
    ClientLeft(SocketAddr),
    /// A receiver went silent and was forgotten.
    ClientTimedOut(SocketAddr),
    /// The page source failed or changed; the server stopped sending data.
    SourceFailed(String),
}

/// Server counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Pages transmitted completely (each fan-out copy counts).
    pub pages_sent: u64,
    /// Pages sent to answer demand.
    pub demand_pages: u64,
    /// Pages pushed next to faults.
    pub push_pages: u64,
    /// Pages sent by the sweep.
    pub sweep_pages: u64,
    /// Pages pushed by replaying the recorded working set.
    pub ws_push_pages: u64,
    /// Pages resent in answer to NACKs or retries.
    pub repair_pages: u64,
    /// Pages sent by unicast (end game, fan-out).
    pub unicast_pages: u64,
    /// Zero-page answers (header only, no payload).
    pub zero_replies: u64,
    /// Datagrams sent.
    pub datagrams_sent: u64,
    /// Bytes sent (whole datagrams).
    pub bytes_sent: u64,
    /// Bytes of page payload sent.
    pub payload_bytes_sent: u64,
    /// Request datagrams received.
    pub requests: u64,
    /// NACK datagrams received.
    pub nacks: u64,
    /// Pages asked for in requests and NACKs.
    pub pages_requested: u64,
    /// Page requests ignored because the page was multicast within the lockstep window.
    pub suppressed_lockstep: u64,
    /// Page requests merged into a page already queued.
    pub suppressed_queued: u64,
    /// Datagrams dropped by the per-source rate limit.
    pub rate_limited: u64,
    /// Datagrams that failed to parse.
    pub malformed: u64,
    /// Datagrams for another session, or of a kind a server does not take.
    pub foreign: u64,
    /// Page numbers past the end of the image.
    pub out_of_range: u64,
    /// Receivers that reported completion.
    pub clients_completed: u64,
    /// Errors reading the page source.
    pub source_errors: u64,
    /// Receivers marked slow (loss while most receivers had none): left out of
    /// pacing and repaired by unicast.
    pub slow_receivers: u64,
    /// Unicast answers refused because the receiver's or the server's queue was full.
    pub queue_full: u64,
    /// FEC blocks closed with repair symbols.
    pub fec_blocks: u64,
    /// FEC repair symbols sent (one datagram each).
    pub fec_repairs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Group,
    Peer(SocketAddr),
}

#[derive(Debug, Clone, Copy)]
struct Job {
    pfn: u64,
    target: Target,
    flags: u8,
    /// Pushed by the working-set replay.
    ws: bool,
}

#[derive(Debug)]
struct Current {
    job: Job,
    /// Unicast fan-out destinations still to serve (last is current).
    fanout: Vec<SocketAddr>,
    next_frag: u16,
    /// The page goes in one datagram to one destination: it is read from the
    /// source straight into the datagram, not through `page_buf`.
    direct: bool,
    /// Member index in the open FEC block.
    fec_slot: Option<usize>,
}

/// Longest an FEC block stays open before its repairs are sent.
const FEC_MAX_BLOCK_AGE: Duration = Duration::from_millis(20);

#[derive(Debug)]
struct FecState {
    builder: BlockBuilder,
    bursts: VecDeque<Burst>,
    /// 90th-percentile loss receivers report, parts per thousand.
    loss_p90: u16,
}

#[derive(Debug)]
struct Peer {
    last_seen: Instant,
    last_zero_map: Option<Instant>,
    complete: bool,
    tokens: TokenBucket,
    /// Latest receive-rate report: rate, loss, when.
    report: Option<(u64, u16, Instant)>,
    /// The report arrived since the last rate update.
    fresh: bool,
    /// Pages asked for again (NACKs, retries) since the last rate update.
    nacked: u64,
    /// Reports loss while most receivers do not: left out of rate control and
    /// repaired by unicast at a rate it can take.
    slow: bool,
}

#[derive(Debug)]
enum Control {
    Announce(Dest),
    ZeroMapChunk(SocketAddr, u32),
    End,
}

/// The sans-IO mcdist server. See the module docs.
pub struct Server {
    cfg: ServerConfig,
    source: Arc<dyn PageSource>,
    info: ImageInfo,
    zero_bytes: Vec<u8>,
    zero_map_digest: [u8; 32],
    zero_chunk_bytes: usize,
    zero_chunks: u32,
    session: u64,
    page_size: usize,
    page_count: u64,
    nonzero_pages: u64,
    frag_payload: usize,
    frag_count: u16,
    base: Instant,
    last_group_send: Vec<u64>,
    ever_sent: PageBitmap,
    queued_group: PageBitmap,
    demand: VecDeque<Job>,
    repair: VecDeque<Job>,
    /// Unicast answers, one queue per receiver, served round-robin so one
    /// receiver's backlog never delays another's repair.
    unicast: HashMap<SocketAddr, VecDeque<Job>>,
    unicast_rr: VecDeque<SocketAddr>,
    unicast_len: usize,
    current: Option<Current>,
    page_buf: Vec<u8>,
    push_cursor: u64,
    push_remaining: u64,
    push_window: u64,
    sweep_pos: u64,
    sweep_end_announced: bool,
    working_set: WorkingSet,
    /// Pages multicast since the last rate update.
    interval_group_pages: u64,
    /// Alternates group repairs and unicast answers.
    repair_turn: bool,
    peers: HashMap<SocketAddr, Peer>,
    control: VecDeque<Control>,
    next_announce: Instant,
    next_housekeeping: Instant,
    bucket: TokenBucket,
    rate: RateController,
    seq_group: u64,
    seq_unicast: u64,
    events: VecDeque<ServerEvent>,
    stats: ServerStats,
    failed: bool,
    fec: Option<FecState>,
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
    /// Scan `source` (digest and zero map) and build a server.
    pub fn new(
        cfg: ServerConfig,
        source: Arc<dyn PageSource>,
        now: Instant,
    ) -> Result<Server, ConfigError> {
        let info = scan(source.as_ref())?;
        Server::with_info(cfg, source, info, now)
    }

    /// Build a server from an already computed [`ImageInfo`] (e.g. from a descriptor).
    pub fn with_info(
        cfg: ServerConfig,
        source: Arc<dyn PageSource>,
        info: ImageInfo,
        now: Instant,
    ) -> Result<Server, ConfigError> {
        let page_size = source.page_size();
        if !page_size.is_power_of_two() || !(512..=(1 << 21)).contains(&page_size) {
            return Err(ConfigError::BadPageSize(page_size));
        }
        let room = cfg
            .max_datagram
            .saturating_sub(wire::HEADER_LEN + wire::DATA_FIXED_LEN + cfg.trailer_reserve);
        if cfg.max_datagram < 128 || room < 64 {
            return Err(ConfigError::DatagramTooSmall(cfg.max_datagram));
        }
        let frag_payload = room.min(page_size);
        let mut frags = page_size.div_ceil(frag_payload);
        let fec_on = cfg.fec && cfg.delivery == Delivery::Multicast;
        let fec_span =
            (cfg.fec_block_pages.max(1) * 2).clamp(64, usize::from(wire::MAX_FEC_SPAN)) as u16;
        if fec_on {
            // One repair symbol (a fragment's size) and its block header fit a datagram.
            while frags < usize::from(wire::MAX_FRAGMENTS)
                && page_size.div_ceil(frags)
                    + crate::fec::repair_overhead(fec_span)
                    + cfg.trailer_reserve
                    > cfg.max_datagram
            {
                frags += 1;
            }
        }
        if frags > usize::from(wire::MAX_FRAGMENTS) {
            return Err(ConfigError::TooManyFragments {
                page: page_size,
                frags,
                max: wire::MAX_FRAGMENTS,
            });
        }
        // Equalise fragment sizes so the last one is not tiny.
        let frag_payload = page_size.div_ceil(frags);
        let page_count = source.page_count();
        let zero_bytes = info.zero_map.to_bytes();
        let zero_map_digest = *blake3::hash(&zero_bytes).as_bytes();
        let zero_chunk_bytes = cfg
            .max_datagram
            .saturating_sub(wire::HEADER_LEN + wire::ZeroMap::FIXED_LEN + cfg.trailer_reserve)
            .max(8);
        let zero_chunks =
            u32::try_from(zero_bytes.len().div_ceil(zero_chunk_bytes)).unwrap_or(u32::MAX);
        let mut rng = rand::rngs::SmallRng::seed_from_u64(cfg.seed);
        let session = cfg.session_id.unwrap_or_else(|| rng.random::<u64>() | 1);
        let rate = RateController::new(now, cfg.rate);
        let bucket = TokenBucket::new(now, rate.rate(), cfg.rate.burst_bytes(rate.rate()));
        let nonzero_pages = page_count - info.zero_map.count_ones();
        Ok(Server {
            push_window: cfg.push_window.0.max(1),
            source,
            zero_bytes,
            zero_map_digest,
            zero_chunk_bytes,
            zero_chunks,
            session,
            page_size,
            page_count,
            nonzero_pages,
            frag_payload,
            frag_count: frags as u16,
            base: now,
            last_group_send: vec![0; usize::try_from(page_count).unwrap_or(0)],
            ever_sent: PageBitmap::new(page_count),
            queued_group: PageBitmap::new(page_count),
            demand: VecDeque::new(),
            repair: VecDeque::new(),
            unicast: HashMap::new(),
            unicast_rr: VecDeque::new(),
            unicast_len: 0,
            current: None,
            page_buf: vec![0; page_size],
            push_cursor: 0,
            push_remaining: 0,
            sweep_pos: 0,
            sweep_end_announced: false,
            working_set: WorkingSet::new(page_count, cfg.working_set_max_pages),
            interval_group_pages: 0,
            repair_turn: false,
            peers: HashMap::new(),
            control: VecDeque::new(),
            next_announce: now,
            next_housekeeping: now + Duration::from_millis(250),
            bucket,
            rate,
            seq_group: 0,
            seq_unicast: 0,
            events: VecDeque::new(),
            stats: ServerStats::default(),
            failed: false,
            fec: fec_on.then(|| FecState {
                builder: BlockBuilder::new(page_size, frags as u16, cfg.fec_block_pages, fec_span),
                bursts: VecDeque::new(),
                loss_p90: 0,
            }),
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

    /// Number of receivers tracked.
    pub fn client_count(&self) -> usize {
        self.peers.len()
    }

    /// Receivers that reported completion and are still tracked.
    pub fn completed_clients(&self) -> usize {
        self.peers.values().filter(|p| p.complete).count()
    }

    /// Jobs waiting in the demand and repair queues.
    pub fn queued_jobs(&self) -> usize {
        self.demand.len() + self.repair.len() + self.unicast_len
    }

    /// Pages sent at least once.
    pub fn pages_ever_sent(&self) -> u64 {
        self.ever_sent.count_ones()
    }

    /// The recorded working set (order of first demand requests).
    pub fn working_set(&self) -> &WorkingSet {
        &self.working_set
    }

    /// Announce the end of the session (sent with the next transmits).
    pub fn close(&mut self) {
        for _ in 0..3 {
            self.control.push_back(Control::End);
        }
    }

    /// Next event for the embedder.
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }

    fn in_endgame(&self) -> bool {
        self.nonzero_pages > 0
            && self.ever_sent.count_ones() as f64
                >= self.cfg.endgame_fraction * self.nonzero_pages as f64
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
            Body::Join(j) => {
                if !self.touch_peer(now, from) {
                    return;
                }
                self.control.push_back(Control::Announce(Dest::Peer(from)));
                if j.flags & wire::Join::WANT_ZERO_MAP != 0 {
                    let peer = self.peers.get_mut(&from);
                    let due = peer.as_ref().is_none_or(|p| {
                        p.last_zero_map
                            .is_none_or(|t| now.duration_since(t) >= Duration::from_millis(100))
                    });
                    if due {
                        if let Some(p) = peer {
                            p.last_zero_map = Some(now);
                        }
                        for c in 0..self.zero_chunks {
                            self.control.push_back(Control::ZeroMapChunk(from, c));
                        }
                    }
                }
            }
            Body::Request(q) | Body::Nack(q) => {
                let is_nack = msg.body.kind() == Kind::Nack;
                if is_nack {
                    self.stats.nacks += 1;
                } else {
                    self.stats.requests += 1;
                }
                if !self.touch_peer(now, from) {
                    return;
                }
                self.note_report(now, from, q.rx_rate, q.loss_permille);
                let pages = q.ranges.total_pages().min(self.cfg.max_pages_per_request);
                let allowed = self
                    .peers
                    .get_mut(&from)
                    .is_some_and(|p| p.tokens.try_take(now, pages.max(1)));
                if !allowed {
                    self.stats.rate_limited += 1;
                    tracing::debug!(%from, pages, "request over the per-source rate limit");
                    return;
                }
                // A re-ask: this receiver asked for these pages before and the answer
                // did not reach it. Only re-asks go unicast in the end game; a first
                // NACK is multicast, since siblings likely lost the same page.
                let reask = q.flags & wire::Request::RETRY != 0;
                let retry = is_nack || reask;
                if retry {
                    if let Some(p) = self.peers.get_mut(&from) {
                        p.nacked = p.nacked.saturating_add(pages);
                    }
                }
                let mut budget = self.cfg.max_pages_per_request;
                for r in q.ranges.iter() {
                    if budget == 0 {
                        break;
                    }
                    let end = r.end().min(self.page_count);
                    if r.end() > self.page_count {
                        self.stats.out_of_range += 1;
                    }
                    let mut pfn = r.start;
                    while pfn < end && budget > 0 {
                        self.stats.pages_requested += 1;
                        self.page_requested(now, from, pfn, retry, is_nack, reask);
                        pfn += 1;
                        budget -= 1;
                    }
                }
            }
            Body::Heartbeat(h) => {
                if !self.touch_peer(now, from) {
                    return;
                }
                self.note_report(now, from, h.rx_rate, h.loss_permille);
                if h.flags & wire::Heartbeat::COMPLETE != 0 {
                    self.mark_complete(from);
                }
            }
            Body::Leave(l) => {
                if l.reason == 0 {
                    if self.touch_peer(now, from) {
                        self.mark_complete(from);
                    }
                } else if self.peers.remove(&from).is_some() {
                    self.events.push_back(ServerEvent::ClientLeft(from));
                }
            }
            Body::Announce(_)
            | Body::Data(_)
            | Body::ZeroMap(_)
            | Body::End(_)
            | Body::Repair(_) => {
                self.stats.foreign += 1;
                tracing::debug!(%from, kind = ?msg.body.kind(), "server ignores server-side message");
            }
        }
    }

    fn mark_complete(&mut self, from: SocketAddr) {
        if let Some(p) = self.peers.get_mut(&from) {
            if !p.complete {
                p.complete = true;
                self.stats.clients_completed += 1;
                self.events.push_back(ServerEvent::ClientCompleted(from));
            }
        }
    }

    fn note_report(&mut self, now: Instant, from: SocketAddr, rx_rate: u64, loss_permille: u16) {
        if let Some(p) = self.peers.get_mut(&from) {
            p.report = Some((rx_rate, loss_permille, now));
            p.fresh = true;
        }
    }

    /// Hand one report per receiver to the rate controller, leaving out
    /// receivers that report loss while the median receiver does not: one slow
    /// receiver must not pace everyone down. Such a receiver is marked slow; its
    /// repairs go by unicast, limited to the rate it reports.
    fn feed_rate_reports(&mut self, now: Instant) {
        let threshold = self.cfg.rate.loss_threshold_permille;
        if let Some(fec) = self.fec.as_mut() {
            let recent = Duration::from_secs(2);
            let mut v: Vec<u16> = self
                .peers
                .values()
                .filter(|p| !p.complete && !p.slow)
                .map(|p| {
                    p.report
                        .filter(|r| now.saturating_duration_since(r.2) <= recent)
                        .map_or(0, |r| r.1)
                })
                .collect();
            v.sort_unstable();
            fec.loss_p90 = v
                .get((v.len() * 9 / 10).min(v.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0);
        }
        // The median over every receiver heard from recently, finished ones
        // included: they are evidence of what the network delivers.
        // A receiver with no recent report has not complained: it counts as
        // loss-free, so one early complainer is not taken for the majority.
        let recent = Duration::from_secs(2);
        let mut losses: Vec<u16> = self
            .peers
            .values()
            .map(|p| {
                p.report
                    .filter(|r| now.saturating_duration_since(r.2) <= recent)
                    .map_or(0, |r| r.1)
            })
            .collect();
        if losses.is_empty() {
            return;
        }
        losses.sort_unstable();
        // The lower median: up to half the receivers (a slow one, or one
        // reporting false loss) cannot pace everyone down.
        let median = losses[(losses.len() - 1) / 2];
        // Loss reports come with heartbeats; repair volume shows a receiver
        // that cannot keep up sooner: one asking again for far more pages than
        // the median receiver is an outlier too.
        let mut nacked: Vec<u64> = self.peers.values().map(|p| p.nacked).collect();
        nacked.sort_unstable();
        let median_nacked = nacked[(nacked.len() - 1) / 2];
        let many = losses.len() > 1;
        let page_size = self.page_size as u64;
        // Only a receiver missing most of what was multicast in the interval
        // counts: a lossy link alone does not make a receiver slow.
        let sent = std::mem::take(&mut self.interval_group_pages);
        for (addr, p) in self.peers.iter_mut() {
            let nack_outlier =
                many && p.nacked > (8 * median_nacked).max(64) && p.nacked * 2 > sent;
            p.nacked = 0;
            let fresh = p.report.filter(|_| p.fresh);
            p.fresh = false;
            let loss_outlier =
                fresh.is_some_and(|r| r.1 > threshold && median <= threshold && many);
            if nack_outlier || loss_outlier || (p.slow && fresh.is_none()) {
                let (rx_rate, loss) = p.report.map_or((0, 0), |r| (r.0, r.1));
                if !p.slow {
                    p.slow = true;
                    self.stats.slow_receivers += 1;
                    tracing::warn!(peer = %addr, loss_permille = loss, rx_rate, "receiver cannot keep up; left out of pacing, repaired by unicast");
                }
                let pages = (rx_rate / page_size).max(256);
                p.tokens.set_rate(now, pages, (pages / 4).max(64));
                continue;
            }
            let Some((rx_rate, loss, _)) = fresh else {
                continue;
            };
            if p.slow {
                p.slow = false;
                let rate = self.cfg.per_source_page_rate.max(1);
                p.tokens.set_rate(now, rate, (rate / 4).max(4096));
            }
            if !p.complete {
                self.rate.report(rx_rate, loss);
            }
        }
    }

    fn nanos(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.base).as_nanos() as u64
    }

    /// Record that `from` is alive; false if it cannot be tracked (table full).
    fn touch_peer(&mut self, now: Instant, from: SocketAddr) -> bool {
        if let Some(p) = self.peers.get_mut(&from) {
            p.last_seen = now;
            return true;
        }
        if self.peers.len() >= self.cfg.max_clients {
            self.stats.rate_limited += 1;
            return false;
        }
        let rate = self.cfg.per_source_page_rate.max(1);
        self.peers.insert(
            from,
            Peer {
                last_seen: now,
                last_zero_map: None,
                complete: false,
                tokens: TokenBucket::new(now, rate, (rate / 4).max(4096)),
                report: None,
                fresh: false,
                nacked: 0,
                slow: false,
            },
        );
        self.events.push_back(ServerEvent::ClientJoined(from));
        if self.cfg.working_set_push {
            self.working_set.joined(self.nanos(now));
        }
        true
    }

    /// Queue a unicast answer to `to`, within the per-receiver and total bounds:
    /// one source asking again and again cannot grow the queue without limit
    /// nor fill it for everyone else.
    fn queue_unicast(&mut self, to: SocketAddr, pfn: u64, flags: u8) {
        if !self.peers.contains_key(&to) {
            return;
        }
        let q = self.unicast.entry(to).or_default();
        if q.len() >= MAX_QUEUED_PER_PEER || self.unicast_len >= MAX_QUEUED_UNICAST {
            self.stats.queue_full += 1;
            return;
        }
        if q.is_empty() {
            self.unicast_rr.push_back(to);
        }
        q.push_back(Job {
            pfn,
            target: Target::Peer(to),
            flags,
            ws: false,
        });
        self.unicast_len += 1;
    }

    fn page_requested(
        &mut self,
        now: Instant,
        from: SocketAddr,
        pfn: u64,
        retry: bool,
        nack: bool,
        reask: bool,
    ) {
        if self.info.zero_map.get(pfn) {
            self.queue_unicast(from, pfn, Data::ZERO);
            return;
        }
        if !retry {
            if self.cfg.working_set_push {
                self.working_set.record(pfn);
            }
            // A fresh fault: aim the push just past it.
            if self.cfg.push_neighbors {
                let sequential = pfn >= self.push_cursor.saturating_sub(self.push_window)
                    && pfn <= self.push_cursor + 1;
                self.push_window = if sequential {
                    (self.push_window * 2).min(self.cfg.push_window.1.max(1))
                } else {
                    self.cfg.push_window.0.max(1)
                };
                self.push_cursor = pfn + 1;
                self.push_remaining = self.push_window;
            }
        }
        let slow = self.peers.get(&from).is_some_and(|p| p.slow);
        // A receiver reporting heavy loss of its own is unlikely to share its gaps
        // with siblings: in the end game its first NACKs go unicast too.
        let lossy = self
            .peers
            .get(&from)
            .and_then(|p| p.report)
            .is_some_and(|r| r.1 >= 250);
        if retry && (slow || self.cfg.delivery == Delivery::UnicastFanout)
            || (reask || (nack && lossy)) && self.in_endgame()
        {
            self.queue_unicast(from, pfn, Data::REPAIR);
            return;
        }
        if self.queued_group.get(pfn) {
            self.stats.suppressed_queued += 1;
            return;
        }
        let last = self.last_group_send[pfn as usize];
        if last != 0 {
            let sent_at = self.base + Duration::from_nanos(last - 1);
            if now.saturating_duration_since(sent_at) < self.cfg.lockstep_window {
                self.stats.suppressed_lockstep += 1;
                return;
            }
        }
        self.queued_group.set(pfn);
        let job = Job {
            pfn,
            target: Target::Group,
            flags: if nack || retry {
                Data::REPAIR
            } else {
                Data::DEMAND
            },
            ws: false,
        };
        if nack {
            self.repair.push_back(job);
        } else {
            self.demand.push_back(job);
        }
    }

    /// Advance timers: rate updates, receiver timeouts, source checks.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now >= self.rate.next_update() {
            self.feed_rate_reports(now);
        }
        if self.rate.update(now) {
            let r = self.rate.rate();
            self.bucket.set_rate(now, r, self.cfg.rate.burst_bytes(r));
        }
        if now >= self.next_housekeeping {
            self.next_housekeeping = now + Duration::from_millis(250);
            let timeout = self.cfg.client_timeout;
            let gone: Vec<SocketAddr> = self
                .peers
                .iter()
                .filter(|(_, p)| now.saturating_duration_since(p.last_seen) > timeout)
                .map(|(a, _)| *a)
                .collect();
            for a in gone {
                self.peers.remove(&a);
                self.events.push_back(ServerEvent::ClientTimedOut(a));
            }
            if !self.failed {
                if let Err(e) = self.source.check_unchanged() {
                    self.fail_source(e.to_string());
                }
            }
        }
    }

    fn fail_source(&mut self, msg: String) {
        tracing::error!(error = %msg, "page source failed; no more data will be sent");
        self.stats.source_errors += 1;
        self.failed = true;
        self.demand.clear();
        self.repair.clear();
        self.unicast.clear();
        self.unicast_rr.clear();
        self.unicast_len = 0;
        self.current = None;
        self.events.push_back(ServerEvent::SourceFailed(msg));
        self.close();
    }

    fn sweeping(&self) -> bool {
        self.cfg.sweep && self.peers.len() >= self.cfg.sweep_min_clients
    }

    fn has_data_work(&self) -> bool {
        !self.failed
            && (self.current.is_some()
                || !self.demand.is_empty()
                || !self.repair.is_empty()
                || self.unicast_len > 0
                || self
                    .fec
                    .as_ref()
                    .is_some_and(|f| f.builder.is_open() || !f.bursts.is_empty())
                || (self.cfg.push_neighbors && self.push_remaining > 0)
                || (self.cfg.working_set_push && self.working_set.active())
                || (self.sweeping() && self.sweep_pos < self.page_count))
    }

    /// When the server next needs [`Server::handle_timeout`] or can send again.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t = self
            .next_announce
            .min(self.next_housekeeping)
            .min(self.rate.next_update());
        if !self.control.is_empty() {
            t = t.min(self.base);
        }
        if self.has_data_work() {
            // A repair datagram may be a little longer than a fragment.
            let need = self.data_len().max(self.fec_repair_ready().unwrap_or(0));
            t = t.min(self.bucket.ready_at(need as u64));
        }
        Some(t)
    }

    fn data_len(&self) -> usize {
        wire::HEADER_LEN + wire::DATA_FIXED_LEN + self.frag_payload + self.cfg.trailer_reserve
    }

    fn next_seq(&mut self, group: bool) -> u64 {
        if group {
            self.seq_group += 1;
            self.seq_group
        } else {
            self.seq_unicast += 1;
            self.seq_unicast | wire::SEQ_UNICAST_BIT
        }
    }

    fn announce(&self) -> Announce {
        let sweep_done = self.sweep_pos >= self.page_count;
        Announce {
            image_size: self.info.image_size,
            page_size: self.page_size as u32,
            page_count: self.page_count,
            digest: self.info.digest,
            zero_count: self.info.zero_map.count_ones(),
            zero_map_digest: self.zero_map_digest,
            zero_map_chunks: self.zero_chunks,
            sweep_pos: if self.cfg.sweep {
                self.sweep_pos
            } else {
                Announce::SWEEP_NONE
            },
            rate: self.bucket.rate(),
            flags: (if self.cfg.push_neighbors {
                Announce::FLAG_PUSH
            } else {
                0
            }) | (if self.cfg.sweep {
                Announce::FLAG_SWEEP
            } else {
                0
            }) | (if self.cfg.sweep && sweep_done {
                Announce::FLAG_SWEEP_DONE
            } else {
                0
            }) | (if self.fec.is_some() {
                Announce::FLAG_FEC
            } else {
                0
            }),
            frag_payload: self.frag_payload as u16,
        }
    }

    fn emit_control(&mut self, c: Control, buf: &mut [u8]) -> Option<Transmit> {
        let (dest, body_owned);
        match c {
            Control::Announce(d) => {
                dest = d;
                body_owned = Body::Announce(self.announce());
            }
            Control::End => {
                dest = Dest::Group;
                body_owned = Body::End(wire::End {
                    reason: u8::from(self.failed),
                });
            }
            Control::ZeroMapChunk(peer, chunk) => {
                let start = chunk as usize * self.zero_chunk_bytes;
                let end = (start + self.zero_chunk_bytes).min(self.zero_bytes.len());
                let seq = self.next_seq(false);
                let m = Message {
                    session: self.session,
                    seq,
                    flags: HeaderFlags(0),
                    body: Body::ZeroMap(wire::ZeroMap {
                        chunk,
                        chunk_count: self.zero_chunks,
                        start_page: start as u64 * 8,
                        bits: self.zero_bytes.get(start..end).unwrap_or(&[]),
                    }),
                };
                let len = m.emit(buf).ok()?;
                self.count_sent(len, 0);
                return Some(Transmit {
                    dest: Dest::Peer(peer),
                    len,
                });
            }
        }
        let seq = self.next_seq(dest == Dest::Group);
        let m = Message {
            session: self.session,
            seq,
            flags: HeaderFlags(0),
            body: body_owned,
        };
        let len = m.emit(buf).ok()?;
        self.count_sent(len, 0);
        Some(Transmit { dest, len })
    }

    fn count_sent(&mut self, len: usize, payload: usize) {
        self.stats.datagrams_sent += 1;
        self.stats.bytes_sent += len as u64;
        self.stats.payload_bytes_sent += payload as u64;
    }

    /// The first page in `from..end` that is not zero, not sent and not queued;
    /// returns the position after it (or `end`) and the page.
    fn next_unsent(&self, from: u64, end: u64) -> (u64, Option<u64>) {
        let mut pfn = from;
        while pfn < end {
            let skip = self.info.zero_map.get(pfn)
                || self.ever_sent.get(pfn)
                || self.queued_group.get(pfn);
            pfn += 1;
            if !skip {
                return (pfn, Some(pfn - 1));
            }
        }
        (end.max(from), None)
    }

    /// Queue-mark `pfn` and make a group job for it.
    fn group_job(&mut self, pfn: u64, flags: u8) -> Job {
        self.queued_group.set(pfn);
        Job {
            pfn,
            target: Target::Group,
            flags,
            ws: false,
        }
    }

    fn next_job(&mut self) -> Option<Job> {
        if let Some(j) = self.demand.pop_front() {
            return Some(j);
        }
        // Group repairs and unicast answers take turns.
        self.repair_turn = !self.repair_turn;
        if self.repair_turn || self.unicast_len == 0 {
            if let Some(j) = self.repair.pop_front() {
                return Some(j);
            }
        }
        while let Some(peer) = self.unicast_rr.pop_front() {
            let Some(q) = self.unicast.get_mut(&peer) else {
                continue;
            };
            let Some(j) = q.pop_front() else {
                self.unicast.remove(&peer);
                continue;
            };
            self.unicast_len -= 1;
            if q.is_empty() {
                self.unicast.remove(&peer);
            } else {
                self.unicast_rr.push_back(peer);
            }
            return Some(j);
        }
        if let Some(j) = self.repair.pop_front() {
            return Some(j);
        }
        if let Some(j) = self.next_working_set_job() {
            return Some(j);
        }
        if self.cfg.push_neighbors {
            let end = self
                .push_cursor
                .saturating_add(self.push_remaining)
                .min(self.page_count);
            let (next, found) = self.next_unsent(self.push_cursor, end);
            self.push_remaining = self.push_remaining.saturating_sub(next - self.push_cursor);
            self.push_cursor = next;
            if let Some(pfn) = found {
                return Some(self.group_job(pfn, Data::PUSH));
            }
            self.push_remaining = 0;
        }
        if self.sweeping() {
            let (next, found) = self.next_unsent(self.sweep_pos, self.page_count);
            self.sweep_pos = next;
            if let Some(pfn) = found {
                return Some(self.group_job(pfn, Data::SWEEP));
            }
            if self
                .fec
                .as_ref()
                .is_some_and(|f| f.builder.is_open() || !f.bursts.is_empty())
            {
                // The last block's repairs go before the end-of-sweep announce.
                return None;
            }
            if !self.sweep_end_announced {
                // Tell receivers at once that the sweep passed every page, so they
                // NACK their last gaps now instead of at the next periodic announce;
                // twice, so that one lost datagram does not cost a whole period.
                self.sweep_end_announced = true;
                self.queue_group_announce();
                self.queue_group_announce();
            }
        }
        None
    }

    /// The next page of the working-set replay: not a zero page, not queued,
    /// not multicast since the earliest receiver the replay serves joined (at
    /// or after the instant the server took its join: a receiver joins the
    /// group before it sends its first datagram).
    fn next_working_set_job(&mut self) -> Option<Job> {
        if !self.cfg.working_set_push {
            return None;
        }
        let zero_map = &self.info.zero_map;
        let queued = &self.queued_group;
        let last = &self.last_group_send;
        let pfn = self.working_set.next(|pfn, since| {
            zero_map.get(pfn)
                || queued.get(pfn)
                || last
                    .get(pfn as usize)
                    // Stored as send time + 1 ns (0: never sent), so `>` is "at or after".
                    .is_some_and(|&t| t > since)
        })?;
        self.queued_group.set(pfn);
        Some(Job {
            pfn,
            target: Target::Group,
            flags: Data::PUSH,
            ws: true,
        })
    }

    fn queue_group_announce(&mut self) {
        match self.cfg.delivery {
            Delivery::Multicast => self.control.push_back(Control::Announce(Dest::Group)),
            Delivery::UnicastFanout => {
                let peers: Vec<SocketAddr> = self.peers.keys().copied().collect();
                for p in peers {
                    self.control.push_back(Control::Announce(Dest::Peer(p)));
                }
            }
        }
    }

    /// Write the next datagram to send into `buf` (at least `max_datagram` bytes).
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        if now >= self.next_announce {
            self.next_announce = now + self.cfg.announce_interval;
            self.queue_group_announce();
        }
        while let Some(c) = self.control.pop_front() {
            if let Some(t) = self.emit_control(c, buf) {
                return Some(t);
            }
        }
        if self.failed {
            return None;
        }
        loop {
            if self.current.is_none() {
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
                    self.fail_source(e.to_string());
                    return None;
                }
            }
            let frag_len = self.data_len();
            let zero = self
                .current
                .as_ref()
                .is_some_and(|c| c.job.flags & Data::ZERO != 0);
            let need = if zero { 64 } else { frag_len as u64 };
            if !self.bucket.try_take(now, need) {
                return None;
            }
            if let Some(t) = self.emit_fragment(now, buf) {
                return Some(t);
            }
        }
    }

    fn fec_block_expired(&self, now: Instant) -> bool {
        self.fec.as_ref().is_some_and(|f| {
            f.builder
                .opened_at()
                .is_some_and(|t| now.saturating_duration_since(t) >= FEC_MAX_BLOCK_AGE)
        })
    }

    /// Repair symbols per source symbol for the loss receivers report now.
    fn fec_fraction(&self) -> f64 {
        let Some(f) = self.fec.as_ref() else {
            return 0.0;
        };
        let p = f64::from(f.loss_p90) / 1000.0;
        let x = if p > 0.0 {
            p * self.cfg.fec_loss_factor + self.cfg.fec_margin
        } else {
            0.0
        };
        x.max(self.cfg.fec_min_overhead)
            .min(self.cfg.fec_max_overhead)
            .max(0.0)
    }

    /// Add a pushed or swept page to the open FEC block (opening one while
    /// repairs are due); its member index.
    fn fec_admit(&mut self, now: Instant, job: &Job) -> Option<usize> {
        let eligible = job.target == Target::Group
            && !job.ws
            && job.flags & (Data::PUSH | Data::SWEEP) != 0
            && job.flags & Data::ZERO == 0;
        if !eligible || self.fec.is_none() {
            return None;
        }
        if self.fec.as_ref().is_some_and(|f| !f.builder.fits(job.pfn)) {
            self.fec_close();
        }
        let frac = self.fec_fraction();
        let fec = self.fec.as_mut()?;
        if !fec.builder.is_open() && frac <= 0.0 {
            return None;
        }
        Some(fec.builder.admit(now, job.pfn))
    }

    /// Close the open FEC block and queue its repair symbols; true if any were queued.
    fn fec_close(&mut self) -> bool {
        let frac = self.fec_fraction();
        let Some(fec) = self.fec.as_mut() else {
            return false;
        };
        let k = fec.builder.source_symbols();
        let repairs = (k as f64 * frac).ceil() as u32;
        match fec.builder.close(repairs) {
            Some(b) => {
                fec.bursts.push_back(b);
                self.stats.fec_blocks += 1;
                true
            }
            None => false,
        }
    }

    /// Length of the next repair datagram, when one is due: repairs go after
    /// demand, NACK repairs and unicast answers, before further pushes.
    fn fec_repair_ready(&self) -> Option<usize> {
        if !self.demand.is_empty() || !self.repair.is_empty() || self.unicast_len > 0 {
            return None;
        }
        let fec = self.fec.as_ref()?;
        let b = fec.bursts.front()?;
        let (_, t) = fec.builder.geometry();
        Some(crate::fec::repair_overhead(b.span) + t + self.cfg.trailer_reserve)
    }

    fn emit_repair(&mut self, buf: &mut [u8]) -> Option<Transmit> {
        let seq = self.next_seq(true);
        let session = self.session;
        let fec = self.fec.as_mut()?;
        let (spp, t) = fec.builder.geometry();
        let b = fec.bursts.front_mut()?;
        let pkt = b.packets.pop_front();
        let res = pkt.and_then(|pkt| {
            Message {
                session,
                seq,
                flags: HeaderFlags(0),
                body: Body::Repair(wire::Repair {
                    first_pfn: b.first,
                    span: b.span,
                    symbols_per_page: spp,
                    symbol_size: t as u16,
                    esi: pkt.payload_id().encoding_symbol_id(),
                    members: &b.members,
                    symbol: pkt.data(),
                }),
            }
            .emit(buf)
            .ok()
        });
        if b.packets.is_empty() {
            fec.bursts.pop_front();
        }
        let len = res?;
        self.count_sent(len, 0);
        self.stats.fec_repairs += 1;
        Some(Transmit {
            dest: Dest::Group,
            len,
        })
    }

    fn load(&mut self, now: Instant, job: Job) -> io::Result<()> {
        let fanout = match (job.target, self.cfg.delivery) {
            (Target::Group, Delivery::UnicastFanout) => {
                let mut v: Vec<SocketAddr> = self.peers.keys().copied().collect();
                v.sort();
                v
            }
            _ => Vec::new(),
        };
        let zero = job.flags & Data::ZERO != 0;
        let direct = !zero && self.frag_count == 1 && fanout.is_empty();
        if !zero && !direct {
            self.source.read_page(job.pfn, &mut self.page_buf)?;
        }
        let fec_slot = if fanout.is_empty() {
            self.fec_admit(now, &job)
        } else {
            None
        };
        self.current = Some(Current {
            job,
            fanout,
            next_frag: 0,
            direct,
            fec_slot,
        });
        Ok(())
    }

    fn emit_fragment(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        let cur = self.current.as_mut()?;
        let job = cur.job;
        let direct = cur.direct;
        let fec_slot = cur.fec_slot;
        let dest = match (job.target, cur.fanout.last()) {
            (Target::Peer(p), _) => Dest::Peer(p),
            (Target::Group, Some(p)) => Dest::Peer(*p),
            (Target::Group, None) if self.cfg.delivery == Delivery::UnicastFanout => {
                // Nobody to fan out to: the page counts as not sent.
                self.queued_group.clear(job.pfn);
                self.current = None;
                return None;
            }
            (Target::Group, None) => Dest::Group,
        };
        let zero = job.flags & Data::ZERO != 0;
        let (frag_count, idx) = if zero {
            (1u16, 0u16)
        } else {
            (self.frag_count, cur.next_frag)
        };
        let start = usize::from(idx) * self.frag_payload;
        let end = if zero {
            start
        } else {
            (start + self.frag_payload).min(self.page_size)
        };
        let group = dest == Dest::Group;
        let seq = self.next_seq(group);
        let header = Header {
            kind: Kind::Data,
            flags: HeaderFlags(0),
            session: self.session,
            seq,
        };
        let off = wire::emit_data_header(
            buf,
            &header,
            job.pfn,
            idx,
            frag_count,
            job.flags,
            end - start,
        )
        .ok()?;
        if direct {
            // One copy, source to datagram.
            if let Err(e) = self
                .source
                .read_page(job.pfn, &mut buf[off..off + (end - start)])
            {
                self.fail_source(e.to_string());
                return None;
            }
        } else {
            buf[off..off + (end - start)].copy_from_slice(&self.page_buf[start..end]);
        }
        let len = off + (end - start);
        if let (Some(m), Some(fec)) = (fec_slot, self.fec.as_mut()) {
            fec.builder.put(m, idx, &buf[off..len]);
        }
        self.count_sent(len, end - start);
        // Advance.
        let cur = self.current.as_mut()?;
        cur.next_frag = idx + 1;
        if cur.next_frag >= frag_count {
            cur.next_frag = 0;
            let page_done_for_all = if cur.fanout.is_empty() {
                true
            } else {
                cur.fanout.pop();
                cur.fanout.is_empty()
            };
            self.page_sent(now, job, dest);
            if page_done_for_all {
                // A full FEC block's repairs go right after its last page.
                if fec_slot.is_some() && self.fec.as_ref().is_some_and(|f| f.builder.is_full()) {
                    self.fec_close();
                }
                self.current = None;
                if job.target == Target::Group {
                    self.queued_group.clear(job.pfn);
                }
            }
        }
        Some(Transmit { dest, len })
    }

    fn page_sent(&mut self, now: Instant, job: Job, dest: Dest) {
        if job.flags & Data::ZERO != 0 {
            self.stats.zero_replies += 1;
            return;
        }
        self.stats.pages_sent += 1;
        match job.flags {
            _ if job.ws => self.stats.ws_push_pages += 1,
            f if f & Data::DEMAND != 0 => self.stats.demand_pages += 1,
            f if f & Data::PUSH != 0 => {
                self.stats.push_pages += 1;
                if self.cfg.working_set_push && self.cfg.working_set_record_push {
                    self.working_set.record(job.pfn);
                }
            }
            f if f & Data::SWEEP != 0 => self.stats.sweep_pages += 1,
            _ => self.stats.repair_pages += 1,
        }
        if let Dest::Peer(_) = dest {
            self.stats.unicast_pages += 1;
        }
        if job.target == Target::Group {
            self.interval_group_pages += 1;
            let nanos = now.saturating_duration_since(self.base).as_nanos() as u64;
            self.last_group_send[job.pfn as usize] = nanos + 1;
        }
        self.ever_sent.set(job.pfn);
    }
}

/// Most unicast answers queued for one receiver.
const MAX_QUEUED_PER_PEER: usize = 1024;
/// Most unicast answers queued in all.
const MAX_QUEUED_UNICAST: usize = 65_536;
