//! FEC on the receive side: repair symbols, block decoding and the NACK hold-back.
//!
//! Rule owned here: while the server sends FEC, a repair symbol that fits the session is
//! kept until its block decodes (recovering the missing pages, reported like received ones)
//! or is given up; and a sweep frontier takes effect for gap NACKs only `fec_nack_delay`
//! after it was first seen, so repair symbols get a chance before NACKs are sent.
//!
//! A block is decoded once per burst of its repair symbols: when a datagram other than
//! the next repair symbol of that block arrives, or [`FEC_DECODE_WAIT`] after its last
//! repair symbol. The server sends a block's repairs back to back, so the decoder gets
//! every symbol of the burst: the sparse code needs a few beyond the lost symbols, and
//! one attempt with all of them costs less than several with fewer.

use super::verify::How;
use super::{Client, Timer};
use crate::fec::{FecRx, Have, RepairOutcome};
use crate::wire::{self, Announce};
use bytes::Bytes;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Longest a block whose repair symbols stopped coming waits to be decoded.
pub(super) const FEC_DECODE_WAIT: Duration = Duration::from_millis(1);

/// Receive-side FEC state.
pub(super) struct FecState {
    /// Blocks being decoded and the cache of received pages they may need.
    pub(super) rx: FecRx,
    /// Sweep frontiers seen, with when, waiting out `fec_nack_delay`.
    frontiers: VecDeque<(Instant, u64)>,
    held_frontier: u64,
    last_repair: Option<Instant>,
    given_up: u64,
    /// The block whose burst of repair symbols is arriving, to decode when it ends.
    pending: Option<u64>,
}

impl FecState {
    pub(super) fn new(max_blocks: usize, cache_pages: usize, max_bytes: usize) -> FecState {
        FecState {
            rx: FecRx::new(max_blocks, cache_pages, max_bytes),
            frontiers: VecDeque::new(),
            held_frontier: 0,
            last_repair: None,
            given_up: 0,
            pending: None,
        }
    }
}

impl Client {
    /// The server announces that it sends FEC.
    pub(super) fn fec_active(&self) -> bool {
        self.session
            .announce
            .is_some_and(|a| a.flags.contains(Announce::FLAG_FEC))
    }

    /// One FEC repair symbol: check it against the session, keep it, and decode
    /// its block once enough symbols are in hand.
    pub(super) fn on_repair(&mut self, now: Instant, r: wire::Repair<'_>) {
        let (Some(s), Some(a)) = (self.session.info, self.session.announce) else {
            return;
        };
        let spp = r.symbols_per_page;
        // The symbol is the announced fragment size: this pins the block's
        // geometry (and bounds its symbol count) to what the server sends.
        let fits = r.symbol_size == a.frag_payload
            && crate::fec::symbol_size(s.page_size, spp) == usize::from(r.symbol_size)
            && crate::reassembly::fragment_slot(s.page_size, spp, spp - 1).is_some()
            && r.first_pfn.saturating_add(u64::from(r.span)) <= self.integrity.total_pages();
        if !fits {
            self.stats.fec_repairs_refused += 1;
            tracing::debug!(first = r.first_pfn, "FEC repair does not fit the session");
            return;
        }
        let first = r.first_pfn;
        self.fec.last_repair = Some(now);
        if self.fec.rx.is_done(first) {
            self.stats.fec_repairs_unneeded += 1;
            return;
        }
        if r.member_pfns().all(|p| self.present.get(p)) {
            self.fec.rx.finish(first);
            self.fec.rx.forget(r.member_pfns());
            self.recycle_released();
            self.stats.fec_repairs_unneeded += 1;
            return;
        }
        let symbol = Bytes::copy_from_slice(r.symbol);
        match self.fec.rx.add(&r, symbol) {
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
        self.stats.fec_blocks_dropped = self.fec.rx.evicted + self.fec.given_up;
        self.fec.pending = Some(first);
        self.timers.set(Timer::FecDecode, now + FEC_DECODE_WAIT);
    }

    /// Decodes the block whose repair symbols were arriving, unless `datagram` is one
    /// more of them (`None`: decode now, the burst is over or its time is up).
    pub(super) fn fec_burst_end(&mut self, now: Instant, datagram: Option<&wire::Body<'_>>) {
        let Some(first) = self.fec.pending else {
            return;
        };
        if let Some(wire::Body::Repair(r)) = datagram {
            if r.first_pfn == first {
                return;
            }
        }
        self.fec.pending = None;
        self.timers.stop(Timer::FecDecode);
        self.fec_decode(now, first);
    }

    /// A page that arrived `how` is kept for decoding, while the server sends FEC, if
    /// the server marked it to be kept ([`Data::KEEP`]: it does so from the first path
    /// loss anyone reports), or while this receiver sees path loss itself (in its last
    /// measured interval, or before the first). A receiver that loses nothing on the
    /// path decodes nothing, and one that drops datagrams for want of CPU should not
    /// spend more on pages it will not need: keeping every page cost a sixth of a
    /// loss-free run's CPU.
    ///
    /// [`Data::KEEP`]: crate::wire::Data::KEEP
    pub(super) fn fec_caching(&self, how: How) -> bool {
        how.remember && self.fec_active() && (how.keep || self.meter.sees_path_loss())
    }

    /// Keep a received page in the FEC cache for decoding the blocks it belongs to.
    pub(super) fn fec_remember(&mut self, pfn: u64, page: &Bytes) {
        self.fec.rx.remember(pfn, page);
        self.recycle_released();
    }

    /// Hand the pages the FEC cache let go of to the reassembler: its pool reuses the
    /// buffers no one else holds (held by the cache, a page could not be recycled when
    /// its user handed it back).
    fn recycle_released(&mut self) {
        for page in self.fec.rx.released() {
            self.reasm.recycle(page);
        }
    }

    /// Tries to decode block `first` with every symbol in hand.
    fn fec_decode(&mut self, now: Instant, first: u64) {
        let Some(s) = self.session.info else {
            return;
        };
        let Some(spp) = self.fec.rx.symbols_per_page(first) else {
            return;
        };
        let (present, reasm, integrity) = (&self.present, &self.reasm, &self.integrity);
        let res = self.fec.rx.try_decode(first, s.page_size, |pfn| {
            // A page held for its hash page is in the FEC cache too: it helps decode
            // (whatever is decoded is verified before it counts).
            if present.get(pfn) || integrity.is_held(pfn) {
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
                    self.receive(now, pfn, page, How::default());
                }
            }
            Ok(None) => {}
            Err(()) => {
                // Given up: its pages, in no open block now, are NACKed again with the
                // retry flag, which the server answers with the pages themselves.
                self.fec.rx.finish(first);
                self.fec.given_up += 1;
            }
        }
        self.stats.fec_blocks_dropped = self.fec.rx.evicted + self.fec.given_up;
        self.recycle_released();
    }

    /// With FEC, a sweep frontier takes effect only `fec_nack_delay` after it
    /// was first seen: the repair symbols of the blocks behind it come first.
    pub(super) fn fec_hold(&mut self, now: Instant, frontier: u64) -> u64 {
        // Only while repair symbols actually come: the server sends none while
        // nobody reports loss, or when loss is beyond what FEC can cover.
        let repairs_coming = self
            .fec
            .last_repair
            .is_some_and(|t| now.saturating_duration_since(t) <= Duration::from_secs(1));
        let active = self.fec_active();
        let f = &mut self.fec;
        if !active || !repairs_coming {
            f.frontiers.clear();
            f.held_frontier = frontier;
            return frontier;
        }
        if f.frontiers.back().is_none_or(|&(_, x)| x != frontier) {
            f.frontiers.push_back((now, frontier));
        }
        while let Some(&(t, x)) = f.frontiers.front() {
            if now.saturating_duration_since(t) < self.cfg.fec_nack_delay {
                break;
            }
            f.held_frontier = f.held_frontier.max(x);
            f.frontiers.pop_front();
        }
        frontier.min(f.held_frontier)
    }
}
