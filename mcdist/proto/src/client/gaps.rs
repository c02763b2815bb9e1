//! Whole-image fetch: sequence gaps behind the server's sweep become NACKs.
//!
//! Rule owned here: in a whole-image fetch the client NACKs every missing, non-zero page
//! behind the sweep frontier (the server's announced sweep position, or the highest swept
//! page seen, less `nack_slack_pages` of tolerated reordering); when the server does not
//! sweep, every missing page is asked for. The hash pages a missing page needs (a listed
//! zero page needs nothing else) are NACKed with it. At most `max_outstanding` pages are outstanding;
//! the scan resumes where it stopped and wraps to catch pages lost again.

use super::requests::Want;
use super::Client;
use crate::wire::Announce;
use std::time::Instant;

/// Where the whole-image scan stands.
#[derive(Debug, Default)]
pub(super) struct Gaps {
    /// A whole-image fetch was asked for.
    pub(super) fetch_all: bool,
    /// Next page the scan looks at.
    scan_pos: u64,
    /// Highest page received from the sweep.
    highest_sweep: Option<u64>,
}

impl Gaps {
    /// A page arrived from the sweep.
    pub(super) fn swept(&mut self, pfn: u64) {
        self.highest_sweep = Some(self.highest_sweep.map_or(pfn, |h| h.max(pfn)));
    }
}

impl Client {
    /// How to NACK page `p`: a page held in part by its missing fragments (with
    /// `fragment_nacks`), any other whole.
    pub(super) fn nack_want(&self, p: u64) -> Want {
        match self.reasm.missing(p) {
            Some(_) if self.cfg.fragment_nacks => Want::FragNack,
            _ => Want::Nack,
        }
    }

    /// NACK (or request) the missing pages behind the frontier, within the budget.
    pub(super) fn scan_for_gaps(&mut self, now: Instant) {
        let (Some(s), Some(a)) = (self.session.info, self.session.announce) else {
            return;
        };
        if !self.session.zero_map_complete {
            return;
        }
        let sweeping =
            a.sweep_pos != Announce::SWEEP_NONE && !a.flags.contains(Announce::FLAG_SWEEP_DONE);
        let frontier = if sweeping {
            let seen = self
                .gaps
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
        let mut budget = self.cfg.max_outstanding.saturating_sub(self.requests.len());
        let mut pos = self.gaps.scan_pos;
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
            // A listed zero page, or a page held for its hash page, waits only for the
            // hash pages above it.
            if !self.session.zero.get(p) && !self.is_held(p) && !self.requests.contains(p) {
                let want = self.nack_want(p);
                self.requests.ask(p, want);
                budget -= 1;
            }
            let before = self.requests.len();
            self.ask_hash_pages(p, Want::Nack);
            budget = budget.saturating_sub(self.requests.len() - before);
        }
        self.gaps.scan_pos = pos;
        if self.gaps.scan_pos >= s.page_count && !self.complete && self.requests.is_empty() {
            // Wrapped: anything still missing gets another pass.
            self.gaps.scan_pos = 0;
        }
    }
}
