//! The sans-IO mcdist client.
//!
//! The client joins a session, learns its parameters and zero-page map, asks
//! for pages its embedder faults on ([`Client::request_page`]; concurrent
//! requests for one page make one request), retries with exponential backoff
//! and jitter, NACKs gaps it detects in a whole-image fetch, accepts pages it
//! did not ask for (pushed by the server) and reports its receive rate and loss
//! so the server can pace itself. Every page that becomes present is reported
//! exactly once as [`ClientEvent::PageReady`].
//!
//! Zero pages listed in the session's zero map are never requested by a
//! whole-image fetch; they count as present without data (the embedder fills
//! them locally). A zero page asked for explicitly is answered by a header-only
//! datagram and reported as a zero-filled `PageReady`.

use crate::bitmap::{coalesce, PageBitmap};
use crate::fec::{FecRx, Have, RepairOutcome};
use crate::reassembly::Reassembler;
use crate::wire::{self, Announce, Body, Data, HeaderFlags, Message};
use crate::{Dest, SessionInfo, Transmit};
use bytes::Bytes;
use rand::{Rng, SeedableRng};
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The server's unicast request address.
    pub server: SocketAddr,
    /// Largest datagram to send.
    pub max_datagram: usize,
    /// Bytes per datagram left free for an authentication trailer.
    pub trailer_reserve: usize,
    /// Retransmission timeout before any round trip was measured.
    pub initial_rto: Duration,
    /// Smallest retransmission timeout.
    pub min_rto: Duration,
    /// Largest retransmission timeout (backoff cap).
    pub max_rto: Duration,
    /// Most retries of one page before the session fails.
    pub max_retries: u32,
    /// Server silence (no datagram at all) after which waiting requests fail the session.
    pub give_up_after: Duration,
    /// Period of join attempts before the session is known.
    pub join_interval: Duration,
    /// Period of heartbeats (receive-rate reports).
    pub heartbeat_interval: Duration,
    /// Pages behind the sweep frontier tolerated as reordering before they are NACKed.
    pub nack_slack_pages: u64,
    /// Most pages outstanding at once in a whole-image fetch.
    pub max_outstanding: usize,
    /// Ask for the zero-page map when joining.
    pub want_zero_map: bool,
    /// Refuse sessions serving an image with another digest.
    pub expected_digest: Option<[u8; 32]>,
    /// Most fragmented pages in reassembly at once.
    pub max_partial_pages: usize,
    /// Largest image (in pages) the client accepts; an announce of a larger one is dropped.
    pub max_image_pages: u64,
    /// Seed for retry jitter.
    pub seed: u64,
    /// Accept only datagrams authenticated under this pre-shared key, and seal
    /// what is sent. Applied by the drivers ([`crate::node::ClientNode`]);
    /// `None` runs an unauthenticated session.
    pub security: Option<crate::secure::Security>,
    /// Most FEC blocks being decoded at once (the oldest is dropped).
    pub fec_max_blocks: usize,
    /// Received pages kept for decoding FEC blocks (only while the server sends FEC).
    pub fec_cache_pages: usize,
    /// While the server sends FEC, gaps are NACKed only once the sweep
    /// frontier passed them this long ago, so repair symbols get a chance first.
    pub fec_nack_delay: Duration,
}

impl ClientConfig {
    /// Defaults for a server at `server`.
    pub fn new(server: SocketAddr) -> ClientConfig {
        ClientConfig {
            server,
            max_datagram: 65_507,
            trailer_reserve: 0,
            initial_rto: Duration::from_millis(50),
            min_rto: Duration::from_millis(10),
            max_rto: Duration::from_secs(1),
            max_retries: 40,
            give_up_after: Duration::from_secs(5),
            join_interval: Duration::from_millis(100),
            heartbeat_interval: Duration::from_millis(100),
            nack_slack_pages: 64,
            max_outstanding: 8192,
            want_zero_map: true,
            expected_digest: None,
            max_partial_pages: 4096,
            max_image_pages: 1 << 28,
            seed: 0x636c_6965_6e74,
            security: None,
            fec_max_blocks: 64,
            fec_cache_pages: 4096,
            fec_nack_delay: Duration::from_millis(30),
        }
    }
}

/// Why a session failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ClientError {
    /// Nothing heard from the server for too long while pages were outstanding.
    #[error("server {server} silent for {silent_ms} ms with {outstanding} page(s) outstanding")]
    ServerUnresponsive {
        /// Server address.
        server: SocketAddr,
        /// How long it was silent.
        silent_ms: u64,
        /// Pages still awaited.
        outstanding: usize,
    },
    /// One page went unanswered through every retry.
    #[error("page {pfn} unanswered after {retries} retries")]
    PageUnavailable {
        /// The page.
        pfn: u64,
        /// Retries made.
        retries: u32,
    },
    /// The server now serves a different image.
    #[error("the server's image changed (digest {old} -> {new}); refusing to mix pages")]
    ImageChanged {
        /// Digest of the image being fetched.
        old: String,
        /// Digest now announced.
        new: String,
    },
    /// The session's image is not the one expected.
    #[error("session serves image {got}, expected {expected}")]
    WrongImage {
        /// Expected digest.
        expected: String,
        /// Announced digest.
        got: String,
    },
    /// The server ended the session before the client had what it needed.
    #[error("the server ended the session with {missing} page(s) missing")]
    ServerEnded {
        /// Pages not received.
        missing: u64,
    },
}

/// What the client tells its embedder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// The session's parameters are known.
    SessionStarted(SessionInfo),
    /// The server restarted with the same image; outstanding requests were re-sent.
    SessionResumed(SessionInfo),
    /// A page became present (exactly once per page).
    PageReady {
        /// Page number.
        pfn: u64,
        /// Its bytes (`page_size` long).
        data: Bytes,
    },
    /// Every page is present (zero pages included).
    Complete,
    /// The session failed; no more pages will arrive.
    Failed(ClientError),
}

/// Client counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Unique pages received with data.
    pub pages_received: u64,
    /// ... of which answered our or a sibling's demand.
    pub demand_pages: u64,
    /// ... pushed next to faults.
    pub push_pages: u64,
    /// ... from the sweep.
    pub sweep_pages: u64,
    /// ... repairs.
    pub repair_pages: u64,
    /// Zero pages answered by the server (header only).
    pub zero_replies: u64,
    /// Pages received that were already present.
    pub duplicates: u64,
    /// Datagrams received (valid, this session).
    pub datagrams_received: u64,
    /// Bytes received (valid datagrams, this session).
    pub bytes_received: u64,
    /// Request datagrams sent.
    pub requests_sent: u64,
    /// Pages asked for in first requests.
    pub pages_requested: u64,
    /// Page re-requests after a timeout.
    pub retries: u64,
    /// NACK datagrams sent.
    pub nacks_sent: u64,
    /// Pages NACKed.
    pub nack_pages: u64,
    /// Requests coalesced into one already outstanding.
    pub coalesced: u64,
    /// Datagrams that failed to parse or were refused.
    pub malformed: u64,
    /// Datagrams of another session or kind.
    pub foreign: u64,
    /// Page numbers outside the image.
    pub out_of_range: u64,
    /// Fragmented pages evicted from reassembly.
    pub fragments_evicted: u64,
    /// Times the server restarted with the same image.
    pub resumes: u64,
    /// Smoothed round-trip time of demand requests, microseconds.
    pub srtt_us: u64,
    /// FEC repair symbols received and kept for decoding.
    pub fec_repairs: u64,
    /// FEC repair symbols that came after their block was decoded or complete.
    pub fec_repairs_unneeded: u64,
    /// FEC repair symbols refused: inconsistent with the session or their block.
    pub fec_repairs_refused: u64,
    /// Pages recovered by FEC decoding (also counted in `pages_received`).
    pub fec_pages: u64,
    /// FEC blocks decoded.
    pub fec_blocks_decoded: u64,
    /// FEC blocks given up (evicted to bound memory, or a member page no longer cached).
    pub fec_blocks_dropped: u64,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    first_sent: Option<Instant>,
    deadline: Option<Instant>,
    retries: u32,
    nack: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Demand,
    Retry,
    Nack,
    /// A NACKed page whose repair did not arrive: asked again with the retry flag.
    NackRetry,
}

/// The sans-IO mcdist client. See the module docs.
pub struct Client {
    cfg: ClientConfig,
    rng: rand::rngs::SmallRng,
    session: Option<SessionInfo>,
    announce: Option<Announce>,
    present: PageBitmap,
    zero: PageBitmap,
    zero_chunks: PageBitmap,
    zero_map_complete: bool,
    reasm: Reassembler,
    pending: HashMap<u64, Pending>,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    want_demand: BTreeSet<u64>,
    want_retry: BTreeSet<u64>,
    want_nack: BTreeSet<u64>,
    want_nack_retry: BTreeSet<u64>,
    early: Vec<u64>,
    fetch_all: bool,
    scan_pos: u64,
    highest_sweep: Option<u64>,
    srtt: Option<Duration>,
    rttvar: Duration,
    next_join: Instant,
    join_backoff: Duration,
    next_heartbeat: Instant,
    next_scan: Instant,
    interval_start: Instant,
    interval_bytes: u64,
    interval_group_pkts: u64,
    interval_seq_start: Option<u64>,
    max_group_seq: Option<u64>,
    rx_rate: u64,
    loss_permille: u16,
    last_server_packet: Instant,
    events: VecDeque<ClientEvent>,
    stats: ClientStats,
    complete: bool,
    failed: bool,
    leave: Option<(u8, u8, Instant)>,
    seq: u64,
    range_buf: Vec<u8>,
    zero_page: Bytes,
    fec: FecRx,
    /// Sweep frontiers seen, with when, waiting out `fec_nack_delay`.
    fec_frontiers: VecDeque<(Instant, u64)>,
    fec_held_frontier: u64,
    fec_last_repair: Option<Instant>,
    fec_given_up: u64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("session", &self.session)
            .field("stats", &self.stats)
            .finish()
    }
}

impl Client {
    /// A client that will join the session served at `cfg.server`.
    pub fn new(cfg: ClientConfig, now: Instant) -> Client {
        Client {
            rng: rand::rngs::SmallRng::seed_from_u64(cfg.seed),
            session: None,
            announce: None,
            present: PageBitmap::new(0),
            zero: PageBitmap::new(0),
            zero_chunks: PageBitmap::new(0),
            zero_map_complete: false,
            reasm: Reassembler::new(4096, cfg.max_partial_pages),
            pending: HashMap::new(),
            timers: BinaryHeap::new(),
            want_demand: BTreeSet::new(),
            want_retry: BTreeSet::new(),
            want_nack: BTreeSet::new(),
            want_nack_retry: BTreeSet::new(),
            early: Vec::new(),
            fetch_all: false,
            scan_pos: 0,
            highest_sweep: None,
            srtt: None,
            rttvar: Duration::ZERO,
            next_join: now,
            // The first join is retried quickly (a lost join must not make a
            // late joiner), then backs off to one a second.
            join_backoff: (cfg.join_interval / 4).max(Duration::from_millis(1)),
            next_heartbeat: now + cfg.heartbeat_interval,
            next_scan: now,
            interval_start: now,
            interval_bytes: 0,
            interval_group_pkts: 0,
            interval_seq_start: None,
            max_group_seq: None,
            rx_rate: 0,
            loss_permille: 0,
            last_server_packet: now,
            events: VecDeque::new(),
            stats: ClientStats::default(),
            complete: false,
            failed: false,
            leave: None,
            seq: 0,
            range_buf: Vec::new(),
            zero_page: Bytes::new(),
            fec: FecRx::new(cfg.fec_max_blocks, cfg.fec_cache_pages),
            fec_frontiers: VecDeque::new(),
            fec_held_frontier: 0,
            fec_last_repair: None,
            fec_given_up: 0,
            cfg,
        }
    }

    /// The session, once announced.
    pub fn session(&self) -> Option<&SessionInfo> {
        self.session.as_ref()
    }

    /// Counters.
    pub fn stats(&self) -> &ClientStats {
        &self.stats
    }

    /// The zero-page map (empty until received).
    pub fn zero_map(&self) -> &PageBitmap {
        &self.zero
    }

    /// True once the zero map was received and verified.
    pub fn zero_map_complete(&self) -> bool {
        self.zero_map_complete
    }

    /// True when page `pfn` is present (received, or a known zero page).
    pub fn has_page(&self, pfn: u64) -> bool {
        self.present.get(pfn)
    }

    /// Pages present, zero pages included.
    pub fn pages_present(&self) -> u64 {
        self.present.count_ones()
    }

    /// Pages still awaited.
    pub fn outstanding(&self) -> usize {
        self.pending.len()
    }

    /// True when the session failed.
    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// True when every page is present.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// Fetch the whole image: NACK gaps behind the server's sweep, or request
    /// every missing page when the server does not sweep.
    pub fn fetch_all(&mut self, now: Instant) {
        self.fetch_all = true;
        self.next_scan = now;
    }

    /// Tell the server this client is done (`ok`) or gave up; sent three times.
    pub fn leave(&mut self, now: Instant, ok: bool) {
        self.leave = Some((u8::from(!ok), 3, now));
    }

    /// True once every leave datagram was handed out.
    pub fn leave_sent(&self) -> bool {
        matches!(self.leave, Some((_, 0, _)))
    }

    /// Ask for page `pfn`. A page already present or already asked for makes no new request.
    pub fn request_page(&mut self, now: Instant, pfn: u64) {
        let _ = now;
        if self.failed {
            return;
        }
        let Some(s) = self.session else {
            if self.early.len() < 65536 {
                self.early.push(pfn);
            }
            return;
        };
        if pfn >= s.page_count {
            self.stats.out_of_range += 1;
            return;
        }
        if self.present.get(pfn) {
            return;
        }
        if self.zero_map_complete && self.zero.get(pfn) {
            self.deliver_zero(pfn);
            return;
        }
        if self.pending.contains_key(&pfn) {
            self.stats.coalesced += 1;
            return;
        }
        self.pending.insert(
            pfn,
            Pending {
                first_sent: None,
                deadline: None,
                retries: 0,
                nack: false,
            },
        );
        self.want_demand.insert(pfn);
    }

    fn deliver_zero(&mut self, pfn: u64) {
        if self.present.set(pfn) {
            if self.zero_page.len() != self.page_size() {
                self.zero_page = Bytes::from(vec![0u8; self.page_size()]);
            }
            self.events.push_back(ClientEvent::PageReady {
                pfn,
                data: self.zero_page.clone(),
            });
        }
    }

    fn page_size(&self) -> usize {
        self.session.map_or(4096, |s| s.page_size)
    }

    /// Next event.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    fn fail(&mut self, e: ClientError) {
        if self.failed {
            return;
        }
        tracing::warn!(error = %e, "mcdist session failed");
        self.failed = true;
        self.pending.clear();
        self.want_demand.clear();
        self.want_retry.clear();
        self.want_nack.clear();
        self.want_nack_retry.clear();
        self.timers.clear();
        self.events.push_back(ClientEvent::Failed(e));
    }

    fn rto(&mut self, retries: u32) -> Duration {
        let base = match self.srtt {
            Some(s) => (s + self.rttvar * 4).clamp(self.cfg.min_rto, self.cfg.max_rto),
            None => self.cfg.initial_rto,
        };
        let backed = base
            .saturating_mul(1u32 << retries.min(16))
            .min(self.cfg.max_rto);
        let jitter = self.rng.random_range(0.75..1.25);
        backed.mul_f64(jitter).max(Duration::from_micros(100))
    }

    /// Feed one received datagram.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: Bytes) {
        self.handle(now, from, &datagram, Some(&datagram));
    }

    /// Hands back the data of a [`ClientEvent::PageReady`] once the caller is done with it
    /// (optional): the buffer of a reassembled page then serves a later page instead of a
    /// fresh allocation.
    pub fn recycle_page(&mut self, data: Bytes) {
        self.reasm.recycle(data);
    }

    /// Feed one received datagram held in the caller's buffer (a batch receive buffer that
    /// is reused). Only what the client keeps is copied: a page that arrived whole, or a
    /// repair symbol; a fragment goes straight into its page.
    pub fn handle_datagram_slice(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        self.handle(now, from, datagram, None);
    }

    /// `owned`, when the caller has one, is `datagram` as `Bytes`: kept parts are sliced
    /// from it instead of copied.
    fn handle(&mut self, now: Instant, from: SocketAddr, datagram: &[u8], owned: Option<&Bytes>) {
        let msg = match Message::parse(datagram) {
            Ok(m) => m,
            Err(e) => {
                self.stats.malformed += 1;
                tracing::debug!(%from, error = %e, "dropping malformed datagram");
                return;
            }
        };
        if let Body::Announce(a) = msg.body {
            self.on_announce(now, msg.session, a);
            return;
        }
        let Some(s) = self.session else {
            self.stats.foreign += 1;
            return;
        };
        if msg.session != s.session_id {
            self.stats.foreign += 1;
            tracing::debug!(%from, session = msg.session, "dropping datagram of another session");
            return;
        }
        self.last_server_packet = now;
        self.stats.datagrams_received += 1;
        self.stats.bytes_received += datagram.len() as u64;
        self.interval_bytes += datagram.len() as u64;
        if msg.seq & wire::SEQ_UNICAST_BIT == 0 {
            self.interval_group_pkts += 1;
            if self.interval_seq_start.is_none() {
                self.interval_seq_start = Some(msg.seq.saturating_sub(1));
            }
            self.max_group_seq = Some(self.max_group_seq.map_or(msg.seq, |m| m.max(msg.seq)));
        }
        match msg.body {
            Body::Data(d) => self.on_data(now, owned, d),
            Body::Repair(r) => self.on_repair(now, owned, r),
            Body::ZeroMap(z) => self.on_zero_map(now, z),
            Body::End(_) => {
                let missing = if self.fetch_all {
                    s.page_count.saturating_sub(self.pages_present())
                } else {
                    self.pending.len() as u64
                };
                if !self.complete && missing > 0 && !self.failed {
                    self.fail(ClientError::ServerEnded { missing });
                }
            }
            _ => {
                self.stats.foreign += 1;
            }
        }
    }

    fn on_announce(&mut self, now: Instant, session_id: u64, a: Announce) {
        // The announce sizes what the client allocates (page bitmaps, zero-map
        // chunk set): refuse sizes beyond the configured bound, and chunk counts
        // no server would use for this many pages.
        if a.page_count > self.cfg.max_image_pages
            || u64::from(a.zero_map_chunks) > a.page_count.div_ceil(64) + 1
        {
            self.stats.malformed += 1;
            tracing::debug!(
                pages = a.page_count,
                chunks = a.zero_map_chunks,
                "dropping announce of an implausible size"
            );
            return;
        }
        let info = SessionInfo {
            session_id,
            image_size: a.image_size,
            page_size: a.page_size as usize,
            page_count: a.page_count,
            digest: a.digest,
            zero_count: a.zero_count,
        };
        match self.session {
            None => {
                if let Some(exp) = self.cfg.expected_digest {
                    if exp != a.digest {
                        self.fail(ClientError::WrongImage {
                            expected: crate::hex(&exp),
                            got: crate::hex(&a.digest),
                        });
                        return;
                    }
                }
                self.session = Some(info);
                self.announce = Some(a);
                self.present = PageBitmap::new(a.page_count);
                self.zero = PageBitmap::new(a.page_count);
                self.zero_chunks = PageBitmap::new(u64::from(a.zero_map_chunks));
                self.zero_map_complete = a.zero_map_chunks == 0 && a.zero_count == 0;
                self.reasm = Reassembler::new(info.page_size, self.cfg.max_partial_pages);
                self.last_server_packet = now;
                self.events.push_back(ClientEvent::SessionStarted(info));
                for pfn in std::mem::take(&mut self.early) {
                    self.request_page(now, pfn);
                }
                if self.cfg.want_zero_map && !self.zero_map_complete {
                    self.next_join = now + self.cfg.join_interval;
                }
            }
            Some(old) if old.session_id == session_id => {
                self.last_server_packet = now;
                self.announce = Some(a);
            }
            Some(old) => {
                if old.digest == a.digest
                    && old.image_size == a.image_size
                    && old.page_size == info.page_size
                {
                    tracing::info!(
                        old = old.session_id,
                        new = session_id,
                        "server restarted with the same image; resuming"
                    );
                    self.stats.resumes += 1;
                    self.session = Some(info);
                    self.announce = Some(a);
                    self.last_server_packet = now;
                    self.interval_seq_start = None;
                    self.max_group_seq = None;
                    let pending: Vec<u64> = self.pending.keys().copied().collect();
                    for pfn in pending {
                        if let Some(p) = self.pending.get_mut(&pfn) {
                            p.deadline = None;
                            self.want_retry.insert(pfn);
                        }
                    }
                    self.events.push_back(ClientEvent::SessionResumed(info));
                } else {
                    self.fail(ClientError::ImageChanged {
                        old: crate::hex(&old.digest),
                        new: crate::hex(&a.digest),
                    });
                }
            }
        }
    }

    fn on_zero_map(&mut self, now: Instant, z: wire::ZeroMap<'_>) {
        let Some(a) = self.announce else { return };
        if self.zero_map_complete || z.chunk_count != a.zero_map_chunks {
            return;
        }
        if !self.zero_chunks.set(u64::from(z.chunk)) {
            return;
        }
        self.zero.or_bytes_at(z.start_page, z.bits);
        if self.zero_chunks.is_full() {
            let digest = *blake3::hash(&self.zero.to_bytes()).as_bytes();
            if digest == a.zero_map_digest && self.zero.count_ones() == a.zero_count {
                self.zero_map_complete = true;
                // Pages asked for that turn out to be zero are satisfied locally.
                let zeros: Vec<u64> = self
                    .pending
                    .keys()
                    .copied()
                    .filter(|&p| self.zero.get(p))
                    .collect();
                for pfn in zeros {
                    self.pending.remove(&pfn);
                    self.want_demand.remove(&pfn);
                    self.want_retry.remove(&pfn);
                    self.want_nack.remove(&pfn);
                    self.want_nack_retry.remove(&pfn);
                    self.deliver_zero(pfn);
                }
                self.present.union_with(&self.zero);
                self.check_complete();
            } else {
                tracing::debug!("zero map failed verification; asking again");
                self.stats.malformed += 1;
                self.zero = PageBitmap::new(self.zero.len());
                self.zero_chunks = PageBitmap::new(self.zero_chunks.len());
                self.next_join = now;
            }
        }
    }

    fn on_data(&mut self, now: Instant, owned: Option<&Bytes>, d: Data<'_>) {
        let Some(s) = self.session else { return };
        if d.pfn >= s.page_count {
            self.stats.out_of_range += 1;
            return;
        }
        if d.flags & Data::ZERO != 0 {
            if self.present.get(d.pfn) {
                self.stats.duplicates += 1;
                return;
            }
            self.stats.zero_replies += 1;
            self.pending.remove(&d.pfn);
            self.deliver_zero(d.pfn);
            self.check_complete();
            return;
        }
        if self.present.get(d.pfn) {
            self.stats.duplicates += 1;
            return;
        }
        let page = if d.frag_count == 1 {
            if d.payload.len() != s.page_size {
                self.stats.malformed += 1;
                return;
            }
            // Zero-copy when the datagram is owned: slice the page out of it.
            keep(owned, d.payload)
        } else {
            match self
                .reasm
                .insert(d.pfn, d.frag_index, d.frag_count, d.payload)
            {
                Ok(Some(p)) => p,
                Ok(None) => {
                    self.stats.fragments_evicted = self.reasm.evicted();
                    return;
                }
                Err(e) => {
                    self.stats.malformed += 1;
                    tracing::debug!(error = %e, pfn = d.pfn, "bad fragment");
                    return;
                }
            }
        };
        match d.flags {
            f if f & Data::DEMAND != 0 => self.stats.demand_pages += 1,
            f if f & Data::PUSH != 0 => self.stats.push_pages += 1,
            f if f & Data::SWEEP != 0 => {
                self.stats.sweep_pages += 1;
                self.highest_sweep = Some(self.highest_sweep.map_or(d.pfn, |h| h.max(d.pfn)));
            }
            _ => self.stats.repair_pages += 1,
        }
        if self.fec_active() {
            self.fec.remember(d.pfn, &page);
        }
        self.accept_page(now, d.pfn, page, true);
    }

    /// A page became present (received or decoded): report it once, settle its request.
    fn accept_page(&mut self, now: Instant, pfn: u64, page: Bytes, rtt_sample: bool) {
        self.present.set(pfn);
        self.stats.pages_received += 1;
        if let Some(p) = self.pending.remove(&pfn) {
            self.want_demand.remove(&pfn);
            self.want_retry.remove(&pfn);
            self.want_nack.remove(&pfn);
            self.want_nack_retry.remove(&pfn);
            if let (Some(t0), 0, true) = (p.first_sent, p.retries, rtt_sample) {
                self.rtt_sample(now.saturating_duration_since(t0));
            }
        }
        self.events
            .push_back(ClientEvent::PageReady { pfn, data: page });
        self.check_complete();
    }

    fn fec_active(&self) -> bool {
        self.announce
            .is_some_and(|a| a.flags & Announce::FLAG_FEC != 0)
    }

    /// One FEC repair symbol: check it against the session, keep it, and decode
    /// its block once enough symbols are in hand.
    fn on_repair(&mut self, now: Instant, owned: Option<&Bytes>, r: wire::Repair<'_>) {
        let (Some(s), Some(a)) = (self.session, self.announce) else {
            return;
        };
        let spp = r.symbols_per_page;
        // The symbol is the announced fragment size: this pins the block's
        // geometry (and bounds its symbol count) to what the server sends.
        let fits = r.symbol_size == a.frag_payload
            && crate::fec::symbol_size(s.page_size, spp) == usize::from(r.symbol_size)
            && crate::reassembly::fragment_slot(s.page_size, spp, spp - 1).is_some()
            && r.first_pfn.saturating_add(u64::from(r.span)) <= s.page_count;
        if !fits {
            self.stats.fec_repairs_refused += 1;
            tracing::debug!(first = r.first_pfn, "FEC repair does not fit the session");
            return;
        }
        let first = r.first_pfn;
        self.fec_last_repair = Some(now);
        if self.fec.is_done(first) {
            self.stats.fec_repairs_unneeded += 1;
            return;
        }
        if r.member_pfns().all(|p| self.present.get(p)) {
            self.fec.finish(first);
            self.stats.fec_repairs_unneeded += 1;
            return;
        }
        let symbol = keep(owned, r.symbol);
        match self.fec.add(&r, symbol) {
            RepairOutcome::Stored => self.stats.fec_repairs += 1,
            RepairOutcome::Late | RepairOutcome::Duplicate => {
                self.stats.fec_repairs_unneeded += 1;
                return;
            }
            RepairOutcome::Refused => {
                self.stats.fec_repairs_refused += 1;
                return;
            }
        }
        let (present, reasm) = (&self.present, &self.reasm);
        let res = self.fec.try_decode(first, s.page_size, |pfn| {
            if present.get(pfn) {
                return Have::Present;
            }
            match reasm.fragments(pfn) {
                Some((count, it)) if count == spp => Have::Fragments(Box::new(it)),
                _ => Have::Nothing,
            }
        });
        match res {
            Ok(Some(pages)) => {
                self.stats.fec_blocks_decoded += 1;
                for (pfn, page) in pages {
                    if self.present.get(pfn) {
                        continue;
                    }
                    self.reasm.forget(pfn);
                    self.stats.fec_pages += 1;
                    self.accept_page(now, pfn, page, false);
                }
            }
            Ok(None) => {}
            Err(()) => {
                self.fec.finish(first);
                self.fec_given_up += 1;
            }
        }
        self.stats.fec_blocks_dropped = self.fec.evicted + self.fec_given_up;
    }

    fn rtt_sample(&mut self, r: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(r);
                self.rttvar = r / 2;
            }
            Some(s) => {
                let diff = s.abs_diff(r);
                self.rttvar = (self.rttvar * 3 + diff) / 4;
                self.srtt = Some((s * 7 + r) / 8);
            }
        }
        self.stats.srtt_us = self.srtt.map_or(0, |s| s.as_micros() as u64);
    }

    fn check_complete(&mut self) {
        if self.complete || !self.zero_map_complete {
            return;
        }
        let Some(s) = self.session else { return };
        if self.pages_present() >= s.page_count {
            self.complete = true;
            self.events.push_back(ClientEvent::Complete);
        }
    }

    /// Advance timers: retries, NACK scans, rate reports, liveness.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.failed {
            return;
        }
        // Retries.
        while let Some(Reverse((t, pfn))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(p) = self.pending.get_mut(&pfn) else {
                continue;
            };
            if p.deadline != Some(t) {
                continue;
            }
            p.deadline = None;
            p.retries += 1;
            let (retries, nack) = (p.retries, p.nack);
            if retries > self.cfg.max_retries {
                self.fail(ClientError::PageUnavailable { pfn, retries });
                return;
            }
            self.stats.retries += 1;
            if nack {
                self.want_nack_retry.insert(pfn);
            } else {
                self.want_retry.insert(pfn);
            }
        }
        // Liveness.
        let silent = now.saturating_duration_since(self.last_server_packet);
        let waiting = !self.pending.is_empty() || (self.fetch_all && !self.complete);
        if self.session.is_some() && waiting && silent > self.cfg.give_up_after {
            self.fail(ClientError::ServerUnresponsive {
                server: self.cfg.server,
                silent_ms: silent.as_millis() as u64,
                outstanding: self.pending.len(),
            });
            return;
        }
        // Whole-image scan.
        if self.fetch_all && now >= self.next_scan {
            self.next_scan = now + Duration::from_millis(5);
            self.scan_for_gaps(now);
        }
        // Rate report.
        if now >= self.next_heartbeat {
            let dt = now
                .saturating_duration_since(self.interval_start)
                .as_secs_f64();
            if dt > 0.0 {
                self.rx_rate = (self.interval_bytes as f64 / dt) as u64;
            }
            if let (Some(start), Some(max)) = (self.interval_seq_start, self.max_group_seq) {
                let expected = max.saturating_sub(start);
                if expected > 0 {
                    let got = self.interval_group_pkts.min(expected);
                    self.loss_permille = (((expected - got) * 1000) / expected) as u16;
                }
            }
            self.interval_start = now;
            self.interval_bytes = 0;
            self.interval_group_pkts = 0;
            self.interval_seq_start = self.max_group_seq;
        }
    }

    fn scan_for_gaps(&mut self, now: Instant) {
        let (Some(s), Some(a)) = (self.session, self.announce) else {
            return;
        };
        if !self.zero_map_complete {
            return;
        }
        let sweeping =
            a.sweep_pos != Announce::SWEEP_NONE && a.flags & Announce::FLAG_SWEEP_DONE == 0;
        let frontier = if sweeping {
            let seen = self
                .highest_sweep
                .map_or(0, |h| h.saturating_sub(self.cfg.nack_slack_pages));
            a.sweep_pos
                .saturating_sub(self.cfg.nack_slack_pages)
                .max(seen)
        } else {
            s.page_count
        }
        .min(s.page_count);
        let frontier = if sweeping || a.sweep_pos != Announce::SWEEP_NONE {
            self.fec_hold(now, frontier)
        } else {
            frontier
        };
        let mut budget = self.cfg.max_outstanding.saturating_sub(self.pending.len());
        let mut pos = self.scan_pos;
        while budget > 0 && pos < frontier {
            let Some(p) = self.present.next_clear(pos) else {
                pos = s.page_count;
                break;
            };
            if p >= frontier {
                pos = frontier;
                break;
            }
            pos = p + 1;
            if self.zero.get(p) || self.pending.contains_key(&p) {
                continue;
            }
            self.pending.insert(
                p,
                Pending {
                    first_sent: None,
                    deadline: None,
                    retries: 0,
                    nack: true,
                },
            );
            self.want_nack.insert(p);
            budget -= 1;
        }
        self.scan_pos = pos;
        if self.scan_pos >= s.page_count && !self.complete && self.pending.is_empty() {
            // Wrapped: anything still missing gets another pass.
            self.scan_pos = 0;
        }
    }

    /// With FEC, a sweep frontier takes effect only `fec_nack_delay` after it
    /// was first seen: the repair symbols of the blocks behind it come first.
    fn fec_hold(&mut self, now: Instant, frontier: u64) -> u64 {
        // Only while repair symbols actually come: the server sends none while
        // nobody reports loss, or when loss is beyond what FEC can cover.
        let repairs_coming = self
            .fec_last_repair
            .is_some_and(|t| now.saturating_duration_since(t) <= Duration::from_secs(1));
        if !self.fec_active() || !repairs_coming {
            self.fec_frontiers.clear();
            self.fec_held_frontier = frontier;
            return frontier;
        }
        if self
            .fec_frontiers
            .back()
            .is_none_or(|&(_, f)| f != frontier)
        {
            self.fec_frontiers.push_back((now, frontier));
        }
        while let Some(&(t, f)) = self.fec_frontiers.front() {
            if now.saturating_duration_since(t) < self.cfg.fec_nack_delay {
                break;
            }
            self.fec_held_frontier = self.fec_held_frontier.max(f);
            self.fec_frontiers.pop_front();
        }
        frontier.min(self.fec_held_frontier)
    }

    /// When [`Client::handle_timeout`] should run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.failed {
            return None;
        }
        // Heartbeats go out only once the session is known; before that the
        // join timer rules (a past heartbeat deadline would make drivers spin).
        let mut t = if self.session.is_some() {
            self.next_heartbeat
        } else {
            self.next_join
        };
        if let Some(Reverse((d, _))) = self.timers.peek() {
            t = t.min(*d);
        }
        if self.session.is_none() || (self.cfg.want_zero_map && !self.zero_map_complete) {
            t = t.min(self.next_join);
        }
        if self.fetch_all && !self.complete {
            t = t.min(self.next_scan);
        }
        if let Some((_, n, at)) = self.leave {
            if n > 0 {
                t = t.min(at);
            }
        }
        if self.session.is_some() && (!self.pending.is_empty() || self.fetch_all) {
            t = t.min(self.last_server_packet + self.cfg.give_up_after + Duration::from_millis(1));
        }
        Some(t)
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn session_id(&self) -> u64 {
        self.session.map_or(0, |s| s.session_id)
    }

    /// Write the next datagram to send into `buf`.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        let dest = Dest::Peer(self.cfg.server);
        if let Some((reason, n, at)) = self.leave {
            if n > 0 && now >= at {
                self.leave = Some((reason, n - 1, now + Duration::from_millis(5)));
                let seq = self.next_seq();
                let m = Message {
                    session: self.session_id(),
                    seq,
                    flags: HeaderFlags(0),
                    body: Body::Leave(wire::Leave { reason }),
                };
                let len = m.emit(buf).ok()?;
                return Some(Transmit { dest, len });
            }
        }
        if self.failed {
            return None;
        }
        let need_join =
            self.session.is_none() || (self.cfg.want_zero_map && !self.zero_map_complete);
        if need_join && now >= self.next_join {
            if self.session.is_none() {
                self.next_join = now + self.join_backoff;
                self.join_backoff = (self.join_backoff * 2).min(Duration::from_secs(1));
            } else {
                self.next_join = now + Duration::from_millis(250);
            }
            let seq = self.next_seq();
            let m = Message {
                session: self.session_id(),
                seq,
                flags: HeaderFlags(0),
                body: Body::Join(wire::Join {
                    flags: if self.cfg.want_zero_map {
                        wire::Join::WANT_ZERO_MAP
                    } else {
                        0
                    },
                }),
            };
            let len = m.emit(buf).ok()?;
            return Some(Transmit { dest, len });
        }
        self.session?;
        for want in [Want::Demand, Want::Retry, Want::Nack, Want::NackRetry] {
            if let Some(t) = self.emit_requests(now, want, buf) {
                return Some(t);
            }
        }
        if now >= self.next_heartbeat {
            self.next_heartbeat = now + self.cfg.heartbeat_interval;
            return self.heartbeat(0, buf);
        }
        None
    }

    fn emit_requests(&mut self, now: Instant, want: Want, buf: &mut [u8]) -> Option<Transmit> {
        let set = match want {
            Want::Demand => &mut self.want_demand,
            Want::Retry => &mut self.want_retry,
            Want::Nack => &mut self.want_nack,
            Want::NackRetry => &mut self.want_nack_retry,
        };
        if set.is_empty() {
            return None;
        }
        let max_ranges = wire::Request::max_ranges(
            self.cfg.max_datagram.min(buf.len()),
            self.cfg.trailer_reserve,
        )
        .max(1);
        // Take pages until the ranges fill one datagram.
        let mut taken = Vec::new();
        let mut ranges = 0usize;
        let mut last: Option<u64> = None;
        while let Some(&p) = set.iter().next() {
            let new_range = last.is_none_or(|l| p != l + 1);
            if new_range && ranges == max_ranges {
                break;
            }
            if new_range {
                ranges += 1;
            }
            set.remove(&p);
            taken.push(p);
            last = Some(p);
        }
        let mut sent_any = false;
        for &p in &taken {
            let rto_retries = self.pending.get(&p).map(|x| x.retries);
            let Some(retries) = rto_retries else { continue };
            let rto = self.rto(retries);
            if let Some(x) = self.pending.get_mut(&p) {
                if x.first_sent.is_none() {
                    x.first_sent = Some(now);
                }
                let d = now + rto;
                x.deadline = Some(d);
                self.timers.push(Reverse((d, p)));
                sent_any = true;
            }
        }
        if !sent_any {
            return None;
        }
        let list = coalesce(taken.iter().copied());
        wire::encode_ranges(&list, &mut self.range_buf);
        let n = taken.len() as u64;
        let (body_flags, is_nack) = match want {
            Want::Demand => {
                self.stats.requests_sent += 1;
                self.stats.pages_requested += n;
                (0, false)
            }
            Want::Retry => {
                self.stats.requests_sent += 1;
                (wire::Request::RETRY, false)
            }
            Want::Nack => {
                self.stats.nacks_sent += 1;
                self.stats.nack_pages += n;
                (0, true)
            }
            Want::NackRetry => {
                self.stats.nacks_sent += 1;
                (wire::Request::RETRY, true)
            }
        };
        let seq = self.next_seq();
        let req = wire::Request {
            rx_rate: self.rx_rate,
            loss_permille: self.loss_permille,
            flags: body_flags,
            ranges: wire::ranges_from_encoded(&self.range_buf),
        };
        let m = Message {
            session: self.session_id(),
            seq,
            flags: HeaderFlags(0),
            body: if is_nack {
                Body::Nack(req)
            } else {
                Body::Request(req)
            },
        };
        let len = m.emit(buf).ok()?;
        Some(Transmit {
            dest: Dest::Peer(self.cfg.server),
            len,
        })
    }

    /// Report completion in heartbeats from now on (after the embedder verified the image).
    pub fn completion_heartbeat(&mut self, buf: &mut [u8]) -> Option<Transmit> {
        self.heartbeat(wire::Heartbeat::COMPLETE, buf)
    }

    fn heartbeat(&mut self, flags: u8, buf: &mut [u8]) -> Option<Transmit> {
        let seq = self.next_seq();
        let m = Message {
            session: self.session_id(),
            seq,
            flags: HeaderFlags(0),
            body: Body::Heartbeat(wire::Heartbeat {
                rx_rate: self.rx_rate,
                loss_permille: self.loss_permille,
                have_pages: self.pages_present(),
                flags,
            }),
        };
        let len = m.emit(buf).ok()?;
        Some(Transmit {
            dest: Dest::Peer(self.cfg.server),
            len,
        })
    }
}

/// `part` of a received datagram as `Bytes`: a slice of `owned` (the datagram) when there is
/// one, else a copy.
fn keep(owned: Option<&Bytes>, part: &[u8]) -> Bytes {
    match owned {
        Some(b) => b.slice_ref(part),
        None => Bytes::copy_from_slice(part),
    }
}
