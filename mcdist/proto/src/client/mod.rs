//! The sans-IO mcdist client.
//!
//! The client joins a session, learns its parameters and zero-page map, asks
//! for pages its embedder faults on ([`Client::request_page`]; concurrent
//! requests for one page make one request), retries with exponential backoff
//! and jitter, NACKs gaps it detects in a whole-image fetch, accepts pages it
//! did not ask for (pushed by the server) and reports its receive rate and loss
//! so the server can pace itself. Every page that becomes present is reported
//! exactly once as [`ClientEvent::PageReady`], and only after it was verified against
//! the image's BLAKE3 root ([`crate::integrity`]; the hash pages it needs are fetched
//! with it and never reported).
//!
//! Zero pages listed in the session's zero map are never requested by a
//! whole-image fetch; they count as present without data (the embedder fills
//! them locally) once each verifies as zero. A zero page asked for explicitly is answered by a header-only
//! datagram and reported as a zero-filled `PageReady`.
//!
//! ## One rule per module
//! | rule | module |
//! |---|---|
//! | settings and defaults | `config` |
//! | events, failures, counters | `stats` |
//! | join, announce, zero map, server restart, image change, end, leave | `session` |
//! | coalescing, retry with backoff and jitter, RTT, request datagrams | `requests` |
//! | whole-image fetch: gaps behind the sweep become NACKs | `gaps` |
//! | pages arriving (whole, fragments, zero replies), present once, completion | `pages` |
//! | FEC repair symbols, block decoding, NACK hold-back | `fec_rx` |
//! | every page verified against the root; hash pages, held pages, failures | `verify` |
//! | receive rate, loss, heartbeats, server liveness | `meter` |
//! | the timers, the entry points and their order | this file |
//!
//! ## Polling order
//! 1. Feed input: [`Client::handle_datagram_slice`] (or [`Client::handle_datagram`], which
//!    calls it) for each received datagram, local requests ([`Client::request_page`],
//!    [`Client::fetch_all`], [`Client::leave`]), and [`Client::handle_timeout`] once
//!    `now >= poll_timeout()`.
//! 2. Drain [`Client::poll_transmit`] until it returns `None`: a pending leave first, then
//!    a due join, then requests (demand, retry, NACK, NACK retry), then a due heartbeat.
//! 3. Drain [`Client::poll_event`]; a `PageReady`'s data may be handed back with
//!    [`Client::recycle_page`] once stored.
//! 4. Sleep until [`Client::poll_timeout`] (the earliest armed timer; `None` when
//!    nothing is armed or the session failed) or the next input.
//!
//! ## Copies of a page inside the client
//! From the datagram the client is given to the `PageReady` event's data:
//! - a page that fits in one datagram is copied **once** (from the datagram into the
//!   event's buffer); [`Client::handle_datagram_borrowed`] copies it **zero** times: the
//!   caller's sink borrows it where it lies in the datagram (with FEC on, once more into
//!   the FEC cache);
//! - a fragmented page is copied **once**: each fragment into its place in a (pooled)
//!   page buffer, which the event then carries without another copy.
//!
//! [`Client::handle_datagram`] takes its datagram as `Bytes` but runs the same path (it
//! lends it to [`Client::handle_datagram_slice`]), so the counts above hold for it too. A
//! page recovered by FEC decoding is built by the decoder (not counted above).
//!
//! The shipped drivers (`mcdist::node`'s client thread, mcdist-kvm's inline fault
//! thread), the simulator, the fuzz target and the benches' pair all feed datagrams
//! through [`Client::handle_datagram_borrowed`], where the transport lends them
//! (`Transport::recv_in_place`: the receive slot, or the UDP GRO buffer the kernel
//! filled). A page that arrived whole so takes two copies from the kernel to its
//! destination: the kernel's into the receive buffer, then `UFFDIO_COPY` (or the sink's
//! file write).

mod config;
mod fec_rx;
mod gaps;
mod meter;
mod pages;
mod requests;
mod session;
mod stats;
mod verify;

pub use config::ClientConfig;
pub use stats::{ClientError, ClientEvent, ClientStats};

use crate::bitmap::PageBitmap;
use crate::reassembly::Reassembler;
use crate::timer::{TimerKind, TimerTable};
use crate::wire::{self, Body, HeaderFlags, Message};
use crate::{Dest, SessionInfo, Transmit};
use bytes::Bytes;
use fec_rx::FecState;
use gaps::Gaps;
use meter::Meter;
use pages::PageSinkFn;
use requests::{Requests, Want};
use session::{Leave, Session};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use verify::Integrity;

/// The client's timers; [`Client::poll_timeout`] is the earliest armed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    /// Next join: armed until the session is known and (if asked for) the zero map verified.
    Join,
    /// Next rate report and heartbeat: armed once the session is known.
    Report,
    /// Next whole-image scan for gaps: armed during a whole-image fetch until complete.
    Scan,
    /// Earliest retransmission deadline of an outstanding page.
    Retry,
    /// When the server's silence fails the session: armed while pages are awaited.
    Idle,
    /// Next leave datagram: armed while leave datagrams remain to be sent.
    Leave,
    /// Decode the block whose repair symbols stopped coming: armed after each one.
    FecDecode,
}

impl TimerKind for Timer {
    const ALL: &'static [Self] = &[
        Timer::Join,
        Timer::Report,
        Timer::Scan,
        Timer::Retry,
        Timer::Idle,
        Timer::Leave,
        Timer::FecDecode,
    ];
    fn index(self) -> usize {
        self as usize
    }
}

/// The sans-IO mcdist client. See the module docs.
pub struct Client {
    cfg: ClientConfig,
    session: Session,
    requests: Requests,
    gaps: Gaps,
    meter: Meter,
    fec: FecState,
    integrity: Integrity,
    timers: TimerTable<Timer>,
    /// Pages present (received, or known zero), and hash pages verified (numbered after
    /// the data pages).
    present: PageBitmap,
    reasm: Reassembler,
    events: VecDeque<ClientEvent>,
    stats: ClientStats,
    complete: bool,
    failed: bool,
    leave: Option<Leave>,
    seq: u64,
    zero_page: Bytes,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("session", &self.session.info)
            .field("stats", &self.stats)
            .finish()
    }
}

impl Client {
    /// A client that will join the session served at `cfg.server`.
    pub fn new(cfg: ClientConfig, now: Instant) -> Client {
        let mut timers = TimerTable::new();
        timers.set(Timer::Join, now);
        Client {
            session: Session::new(cfg.join_interval),
            requests: Requests::new(cfg.seed),
            gaps: Gaps::default(),
            meter: Meter::new(now, cfg.heartbeat_interval),
            fec: FecState::new(cfg.fec_max_blocks, cfg.fec_cache_pages, cfg.fec_max_bytes),
            integrity: Integrity::default(),
            timers,
            present: PageBitmap::new(0),
            reasm: Reassembler::with_budget(4096, cfg.max_partial_pages, cfg.max_partial_bytes),
            events: VecDeque::new(),
            stats: ClientStats::default(),
            complete: false,
            failed: false,
            leave: None,
            seq: 0,
            zero_page: Bytes::new(),
            cfg,
        }
    }

    /// The session, once announced.
    pub fn session(&self) -> Option<&SessionInfo> {
        self.session.info.as_ref()
    }

    /// Counters.
    pub fn stats(&self) -> &ClientStats {
        &self.stats
    }

    /// Bytes held for pages not yet complete: reassembly buffers and what FEC receiving
    /// keeps. At most `max_partial_bytes` + half of `fec_max_bytes`, whatever arrives
    /// (decoding a block may take the other half for a moment).
    pub fn buffered_bytes(&self) -> usize {
        self.reasm.held_bytes() + self.fec.rx.held_bytes()
    }

    /// The zero-page map (empty until received).
    pub fn zero_map(&self) -> &PageBitmap {
        &self.session.zero
    }

    /// True once the zero map was received and verified.
    pub fn zero_map_complete(&self) -> bool {
        self.session.zero_map_complete
    }

    /// True when page `pfn` is present (received, or a known zero page).
    pub fn has_page(&self, pfn: u64) -> bool {
        self.present.get(pfn)
    }

    /// Pages present, zero pages included (hash pages not counted).
    pub fn pages_present(&self) -> u64 {
        self.present.count_ones() - self.integrity.verified_hash_pages()
    }

    /// Pages held until the hash page above them arrives.
    pub fn pages_held(&self) -> usize {
        self.integrity.held()
    }

    /// Pages still awaited.
    pub fn outstanding(&self) -> usize {
        self.requests.len()
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
        self.gaps.fetch_all = true;
        if !self.complete {
            self.timers.set(Timer::Scan, now);
        }
        self.arm_idle_timer();
    }

    /// Tell the server this client is done (`ok`) or gave up; sent three times.
    pub fn leave(&mut self, now: Instant, ok: bool) {
        self.leave = Some(Leave {
            reason: u8::from(!ok),
            remaining: 3,
        });
        self.timers.set(Timer::Leave, now);
    }

    /// True once every leave datagram was handed out.
    pub fn leave_sent(&self) -> bool {
        matches!(self.leave, Some(Leave { remaining: 0, .. }))
    }

    /// Ask for page `pfn`. A page already present or already asked for makes no new request.
    pub fn request_page(&mut self, now: Instant, pfn: u64) {
        let _ = now;
        if self.failed {
            return;
        }
        let Some(s) = self.session.info else {
            self.session.ask_early(pfn);
            return;
        };
        if pfn >= s.page_count {
            self.stats.out_of_range += 1;
            return;
        }
        if self.present.get(pfn) {
            return;
        }
        let zero = self.zero_page_bytes();
        if self.session.zero_map_complete
            && self.session.zero.get(pfn)
            && self.verdict(pfn, &zero) == verify::Verdict::Ok
        {
            self.deliver_zero(pfn);
            return;
        }
        if self.requests.contains(pfn) {
            self.stats.coalesced += 1;
            return;
        }
        self.requests.ask(pfn, Want::Demand);
        if self.is_held(pfn) {
            // It arrived and waits for the hash pages above it: asked again only if it
            // fails verification once they are in.
            self.requests.park(pfn);
        }
        // The hash pages it needs ride in the same datagram.
        self.ask_hash_pages(pfn, Want::Demand);
        self.arm_idle_timer();
    }

    /// A working-set hint: reported (pages not present, in range) unless refused or past
    /// the session's bound of one image's worth of hinted pages.
    fn on_hint(&mut self, q: wire::Request<'_>, page_count: u64) {
        let listed = q.ranges.total_pages();
        if !self.cfg.accept_hints || self.stats.hint_pages.saturating_add(listed) > page_count {
            self.stats.hints_refused += 1;
            return;
        }
        self.stats.hint_pages += listed;
        let mut pages: Vec<u64> = q
            .ranges
            .iter()
            .flat_map(|r| r.start..r.end().min(page_count))
            .filter(|&p| !self.present.get(p))
            .collect();
        // The server sends ranges in page order; anyone else's need not be.
        pages.sort_unstable();
        pages.dedup();
        if !pages.is_empty() {
            self.events.push_back(ClientEvent::WorkingSetHint(pages));
        }
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
        self.requests.clear();
        // Only leave datagrams may still go out.
        let leave = self.timers.get(Timer::Leave);
        self.timers.stop_all();
        if let Some(at) = leave {
            self.timers.set(Timer::Leave, at);
        }
        self.events.push_back(ClientEvent::Failed(e));
    }

    /// Feed one received datagram. The same as [`Client::handle_datagram_slice`]: what the
    /// client keeps of it is copied (see the module docs).
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: Bytes) {
        self.handle_datagram_slice(now, from, &datagram);
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

    /// Like [`Client::handle_datagram_slice`], but a page that arrived whole in this
    /// datagram is lent to `sink` as `(pfn, bytes)` where it lies in `datagram` (no copy)
    /// instead of being reported as [`ClientEvent::PageReady`]. Every other page (fragmented,
    /// zero, FEC-decoded) still comes as `PageReady`; each page is handed out exactly once,
    /// by one of the two. `sink` runs before the events this datagram queues (such as
    /// [`ClientEvent::Complete`]) are polled.
    pub fn handle_datagram_borrowed(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        sink: &mut dyn FnMut(u64, &[u8]),
    ) {
        self.handle(now, from, datagram, Some(sink));
    }

    fn handle(&mut self, now: Instant, from: SocketAddr, datagram: &[u8], sink: PageSinkFn<'_>) {
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
            if self
                .session
                .info
                .is_some_and(|s| s.session_id == msg.session)
            {
                self.meter.sequenced(msg.seq);
            }
            self.arm_idle_timer();
            return;
        }
        let Some(s) = self.session.info else {
            self.stats.foreign += 1;
            return;
        };
        if msg.session != s.session_id {
            self.stats.foreign += 1;
            tracing::debug!(%from, session = msg.session, "dropping datagram of another session");
            return;
        }
        self.stats.datagrams_received += 1;
        self.stats.bytes_received += datagram.len() as u64;
        self.meter.datagram(now, datagram.len(), msg.seq);
        self.fec_burst_end(now, Some(&msg.body));
        match msg.body {
            Body::Data(d) => self.on_data(now, d, sink),
            Body::Repair(r) => self.on_repair(now, r),
            Body::ZeroMap(z) => self.on_zero_map(now, z),
            Body::End(_) => self.on_end(s),
            Body::Hint(q) => self.on_hint(q, s.page_count),
            _ => {
                self.stats.foreign += 1;
            }
        }
        self.arm_idle_timer();
    }

    /// Advance timers: retries, liveness, NACK scans, rate reports.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.failed {
            return;
        }
        if !self.expire_requests(now) || !self.check_liveness(now) {
            return;
        }
        if self.timers.is_expired(Timer::FecDecode, now) {
            self.fec_burst_end(now, None);
        }
        if self.gaps.fetch_all && self.timers.is_expired(Timer::Scan, now) {
            self.timers.set(Timer::Scan, now + Duration::from_millis(5));
            self.scan_for_gaps(now);
        }
        self.measure(now);
        self.arm_idle_timer();
    }

    /// When [`Client::handle_timeout`] should run next: the earliest armed timer, or `None`
    /// when nothing is armed or the session failed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.failed {
            return None;
        }
        self.timers.next_timeout()
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Write a datagram to the server into `buf`: this session's header with sequence
    /// number `seq` (from [`Client::next_seq`]) and `body`.
    fn to_server(&self, seq: u64, body: Body<'_>, buf: &mut [u8]) -> Option<Transmit> {
        let m = Message {
            session: self.session.info.map_or(0, |s| s.session_id),
            seq,
            flags: HeaderFlags::empty(),
            body,
        };
        let len = m.emit(buf).ok()?;
        Some(Transmit {
            dest: Dest::Peer(self.cfg.server),
            len,
        })
    }

    /// Write the next datagram to send into `buf`.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        if let Some(t) = self.emit_leave(now, buf) {
            return t;
        }
        if self.failed {
            return None;
        }
        if let Some(t) = self.emit_join(now, buf) {
            return t;
        }
        self.session.info?;
        // The heartbeat that closes a measured interval goes before the requests that
        // follow it: they carry its loss but not its overload, which the server
        // would otherwise take from the interval before and count as path loss.
        if let Some(t) = self.emit_due_heartbeat(now, buf) {
            return t;
        }
        for want in Want::ORDER {
            if let Some(t) = self.emit_requests(now, want, buf) {
                return Some(t);
            }
        }
        None
    }

    /// Report completion in heartbeats from now on (after the embedder verified the image).
    pub fn completion_heartbeat(&mut self, buf: &mut [u8]) -> Option<Transmit> {
        self.heartbeat(wire::Heartbeat::COMPLETE, buf)
    }
}

#[cfg(test)]
mod frag_tests;
#[cfg(test)]
mod tests;
