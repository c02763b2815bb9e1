//! What the server tells its embedder: events and counters.
//!
//! Rule owned here: every datagram and page sent is counted once, under one
//! kind (demand, push, sweep, working-set push, repair); embedders learn of
//! receivers joining, completing, leaving or timing out through [`ServerEvent`].

use crate::wire::Data;
use std::net::SocketAddr;

/// Things the embedder may want to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    /// A receiver joined.
    ClientJoined(SocketAddr),
    /// A receiver reported it holds the whole image.
    ClientCompleted(SocketAddr),
    /// A receiver left.
    ClientLeft(SocketAddr),
    /// A receiver went silent before it completed and was forgotten (one that
    /// completed is forgotten without an event).
    ClientTimedOut(SocketAddr),
    /// The page source failed or changed; the server stopped sending data.
    SourceFailed(SourceFailure),
}

/// Why the page source stopped serving: the error its driver or a page read reported.
#[derive(Debug, Clone, thiserror::Error)]
#[error("page source failed: {0}")]
pub struct SourceFailure(#[source] pub std::sync::Arc<std::io::Error>);

impl PartialEq for SourceFailure {
    /// The same failure (one error shared by every copy of the event).
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for SourceFailure {}

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
    /// Answers to fragment NACKs sent: some fragments of a page, not all (not counted in
    /// `pages_sent`; their fragments are in `fragments_resent`).
    pub fragment_answers: u64,
    /// Fragments sent in those answers.
    pub fragments_resent: u64,
    /// Fragment NACK datagrams received.
    pub fragment_nacks: u64,
    /// Working-set hint datagrams sent (each to one receiver).
    pub hint_datagrams: u64,
    /// Pages listed in working-set hints.
    pub hint_pages: u64,
    /// Pages sent by unicast (end game, fan-out).
    pub unicast_pages: u64,
    /// Second copies of end-game answers to re-asks (up to 64 receivers; counted in
    /// `pages_sent` too once sent).
    pub reask_doubles: u64,
    /// End-game re-asks of a page another receiver re-asked for too: multicast, not
    /// unicast.
    pub shared_reasks: u64,
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
    /// Page requests ignored, past the lockstep window, because the page was multicast
    /// after the last group datagram the asker had taken in: the answer was on its way.
    pub suppressed_in_flight: u64,
    /// Page requests merged into a page already queued.
    pub suppressed_queued: u64,
    /// Datagrams dropped by the per-source rate limit.
    pub rate_limited: u64,
    /// Asks answered in part: more pages than the asker's allowance held (the
    /// rest it asks again for later).
    pub rate_trimmed: u64,
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
    /// Times a receiver would have been marked slow while half the receivers
    /// or more already were (or would then be): it stays in pacing instead.
    pub isolation_refused: u64,
    /// Unicast answers or control messages refused because a queue was full.
    pub queue_full: u64,
    /// Asks for a page whose unicast answer to the same receiver was still waiting: that
    /// answer took the fragments asked, and no second copy was queued.
    pub unicast_widened: u64,
    /// Datagrams dropped because their source address was not validated (or
    /// their token did not match it), and joins too short to answer.
    pub unvalidated: u64,
    /// FEC blocks closed with repair symbols.
    pub fec_blocks: u64,
    /// FEC repair symbols sent (one datagram each).
    pub fec_repairs: u64,
    /// NACKed pages answered with repair symbols of their block instead of the page.
    pub fec_nacked_pages: u64,
    /// NACKs answered with the pages, to the asker alone, instead of a round of repair
    /// symbols: the asker lost more of the block than a receiver keeps repair symbols of.
    pub fec_nacks_plain: u64,
    /// Rounds of repair symbols queued for NACKed blocks (NACKs for a block
    /// within one round window share a round).
    pub fec_nack_rounds: u64,
}

/// Why a (non-zero) page went out, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PageKind {
    WorkingSet,
    Demand,
    Push,
    Sweep,
    Repair,
}

impl ServerStats {
    /// Count one datagram of `len` bytes carrying `payload` page bytes.
    pub(super) fn count_datagram(&mut self, len: usize, payload: usize) {
        self.datagrams_sent += 1;
        self.bytes_sent += len as u64;
        self.payload_bytes_sent += payload as u64;
    }

    /// Count one non-zero page sent completely to one destination; its kind.
    pub(super) fn count_page(
        &mut self,
        flags: crate::wire::DataFlags,
        ws: bool,
        unicast: bool,
    ) -> PageKind {
        self.pages_sent += 1;
        let kind = match flags {
            _ if ws => PageKind::WorkingSet,
            f if f.contains(Data::DEMAND) => PageKind::Demand,
            f if f.contains(Data::PUSH) => PageKind::Push,
            f if f.contains(Data::SWEEP) => PageKind::Sweep,
            _ => PageKind::Repair,
        };
        *match kind {
            PageKind::WorkingSet => &mut self.ws_push_pages,
            PageKind::Demand => &mut self.demand_pages,
            PageKind::Push => &mut self.push_pages,
            PageKind::Sweep => &mut self.sweep_pages,
            PageKind::Repair => &mut self.repair_pages,
        } += 1;
        if unicast {
            self.unicast_pages += 1;
        }
        kind
    }
}
