//! What a request or NACK makes the server do, one named policy per rule.
//!
//! Rules owned here, in the order a page request meets them:
//! 0. validated sources only — a request or NACK from an address that has not
//!    echoed its token (`validate`) is dropped: no group send, no answer;
//! 1. rate limit — each receiver may ask for `per_source_page_rate` pages per second;
//!    an ask larger than its allowance is answered in part (its first pages), never
//!    with the allowance in debt, so a large NACK does not shut out a lone retry;
//! 2. zero replies — a zero page is answered to the asker alone, header only;
//! 3. working-set recording and neighbour push — a first ask (a fault) is
//!    recorded for later generations and aims the push window just past it; a
//!    re-ask of a page never sent is recorded too (its first ask never arrived);
//! 4. NACK handling and end game — with FEC, a first NACK of a swept or pushed
//!    page is answered with repair symbols of its block (`fec`); a retry goes unicast to a slow receiver or in
//!    unicast fan-out; in the end game a re-ask (or a heavily lossy receiver's
//!    NACK) goes unicast too; otherwise a NACK is multicast, since siblings
//!    likely lost the same page;
//! 5. lockstep suppression — a page already queued for the group, or multicast
//!    within `lockstep_window`, is not queued again.
//!
//! A fragment NACK ([`wire::FragmentNack`]) names pages with the fragments missing; it
//! meets the same rules, and its answer carries those fragments only: a later fragment
//! NACK of the same page widens a queued answer, and the lockstep window suppresses it
//! only when the last multicast carried every fragment it names.

use super::fec::FecNack;
use super::schedule::{Job, Queued, ALL_FRAGMENTS};
use super::{Delivery, Server};
use crate::wire::{self, Data};
use std::net::SocketAddr;
use std::time::Instant;

/// How a page was asked for.
#[derive(Debug, Clone, Copy)]
struct Ask {
    /// In a NACK (a gap the receiver detected) rather than a request.
    nack: bool,
    /// Asked before: the answer did not reach the receiver.
    reask: bool,
    /// The highest group sequence number the asker had taken in when it asked.
    heard_seq: u64,
}

impl Ask {
    /// A NACK or a re-ask: the page was sent and lost.
    fn retry(self) -> bool {
        self.nack || self.reask
    }
}

/// Up to this many receivers, an end-game re-ask is answered twice.
const DOUBLE_REASK_MAX_PEERS: usize = 64;

impl Server {
    /// The checks every request, NACK or fragment NACK passes before its pages are
    /// looked at: a validated source, its report, the rate limit for `pages` pages.
    /// `None`: dropped; else how it was asked and how many of its pages (the first
    /// ones, at most `max_pages_per_request`) its allowance lets through.
    fn admit_ask(
        &mut self,
        now: Instant,
        from: SocketAddr,
        (rx_rate, loss_permille, flags, heard_seq): (u64, u16, wire::RequestFlags, u64),
        pages: u64,
        nack: bool,
    ) -> Option<(Ask, u64)> {
        if !self.peers.contains(&from) {
            self.drop_unvalidated(from, "request");
            return None;
        }
        if !self.touch_peer(now, from) {
            return None;
        }
        self.note_report(now, from, rx_rate, loss_permille, None);
        let pages = pages.min(self.cfg.max_pages_per_request);
        let granted = self.peers.allow(now, &from, pages.max(1));
        if granted == 0 {
            self.stats.rate_limited += 1;
            tracing::debug!(%from, pages, "request over the per-source rate limit");
            return None;
        }
        if granted < pages {
            self.stats.rate_trimmed += 1;
        }
        let ask = Ask {
            nack,
            reask: flags.contains(wire::Request::RETRY),
            heard_seq,
        };
        if ask.retry() {
            self.peers.note_reask(&from, granted);
        }
        Some((ask, granted))
    }

    /// A request (`nack` false) or NACK datagram: rate-limit it, then walk its
    /// ranges, at most `max_pages_per_request` pages.
    pub(super) fn on_request(
        &mut self,
        now: Instant,
        from: SocketAddr,
        q: wire::Request<'_>,
        nack: bool,
    ) {
        if nack {
            self.stats.nacks += 1;
        } else {
            self.stats.requests += 1;
        }
        let head = (q.rx_rate, q.loss_permille, q.flags, q.heard_seq);
        let Some((ask, mut budget)) = self.admit_ask(now, from, head, q.ranges.total_pages(), nack)
        else {
            return;
        };
        for r in q.ranges.iter() {
            if budget == 0 {
                break;
            }
            // Data pages and hash pages.
            let end = r.end().min(self.total_pages);
            if r.end() > self.total_pages {
                self.stats.out_of_range += 1;
            }
            let mut pfn = r.start;
            while pfn < end && budget > 0 {
                self.stats.pages_requested += 1;
                self.page_requested(now, from, pfn, ALL_FRAGMENTS, ask);
                pfn += 1;
                budget -= 1;
            }
        }
        self.fec_flush_nacks(now, from);
    }

    /// A fragment NACK: each page named is NACKed for the fragments its mask names (the
    /// whole page when the mask names them all, or the page is cut into more fragments
    /// than a mask holds), at most `max_pages_per_request` pages.
    pub(super) fn on_fragment_nack(
        &mut self,
        now: Instant,
        from: SocketAddr,
        f: wire::FragmentNack<'_>,
    ) {
        self.stats.nacks += 1;
        self.stats.fragment_nacks += 1;
        let head = (f.rx_rate, f.loss_permille, f.flags, f.heard_seq);
        let Some((ask, budget)) = self.admit_ask(now, from, head, f.entries.len() as u64, true)
        else {
            return;
        };
        let count = self.geo.frag_count;
        let all = match count {
            1..=31 => (1u32 << count) - 1,
            _ => ALL_FRAGMENTS,
        };
        let budget = usize::try_from(budget).unwrap_or(usize::MAX);
        for e in f.entries.iter().take(budget) {
            let frags = if count > wire::MAX_NACK_FRAGMENTS {
                all
            } else {
                e.missing & all
            };
            if e.pfn >= self.total_pages || frags == 0 {
                self.stats.out_of_range += 1;
                continue;
            }
            self.stats.pages_requested += 1;
            let frags = if frags == all { ALL_FRAGMENTS } else { frags };
            self.page_requested(now, from, e.pfn, frags, ask);
        }
        self.fec_flush_nacks(now, from);
    }

    /// One page asked for: fragments `frags` of it ([`ALL_FRAGMENTS`]: the whole page).
    fn page_requested(&mut self, now: Instant, from: SocketAddr, pfn: u64, frags: u32, ask: Ask) {
        if self.info.zero_map.get(pfn) {
            self.queue_unicast(from, pfn, Data::ZERO, ALL_FRAGMENTS);
            return;
        }
        let data = pfn < self.page_count;
        if !ask.retry() && data {
            self.record_fault(pfn);
            self.aim_push(pfn, from);
        } else if ask.reask && !ask.nack && data && !self.sent.ever.get(pfn) {
            // A re-ask of a page never sent: its first ask did not get here (sent before
            // the address was validated, or lost), so this is the first the server sees.
            self.record_fault(pfn);
        }
        if self.repair_by_block(from, ask) {
            match self.fec_nack(pfn, frags) {
                // The hash pages above it are in blocks of their own, NACKed with it.
                FecNack::Symbols => return,
                FecNack::Spent => {
                    self.queue_unicast(from, pfn, Data::REPAIR, frags);
                    return;
                }
                FecNack::Plain => {}
            }
        }
        if self.repair_by_unicast(from, ask) && !self.shared_reask(from, pfn, ask) {
            let queued = self.queue_unicast(from, pfn, Data::REPAIR, frags);
            if queued
                && ask.reask
                && self.peers.len() <= DOUBLE_REASK_MAX_PEERS
                && !self.peers.is_slow(&from)
            {
                // Asked again in the end game: the answer was lost once already,
                // and the asker's next retry is a backed-off timeout away. A second
                // copy makes losing the page again much less likely than losing one
                // datagram, for one page's bytes. With many receivers the end game's
                // unicast is most of what the server sends, and doubling it delays
                // everyone. (An answer still waiting was not lost: no second copy.)
                self.push_unicast(from, pfn, Data::REPAIR, frags, true);
                self.stats.reask_doubles += 1;
            }
            return;
        }
        if self.suppressed(now, from, pfn, frags, ask) {
            return;
        }
        // The hash pages above a data page travel ahead of it.
        while let Some(h) = self.unsent_hash_above(pfn) {
            self.queue_group_answer(h, ALL_FRAGMENTS, ask);
        }
        self.queue_group_answer(pfn, frags, ask);
    }

    /// Working-set recording: first asks, in order, for later generations.
    fn record_fault(&mut self, pfn: u64) {
        if self.cfg.working_set_push {
            self.working_set.record(pfn);
        }
    }

    /// Neighbour push: a fresh fault aims the push just past it, for pages the
    /// group was not sent since the asker joined.
    fn aim_push(&mut self, pfn: u64, from: SocketAddr) {
        if self.cfg.push_neighbors {
            let since = self.peers.joined(&from);
            self.push.aim(pfn, since, self.cfg.push_window);
        }
    }

    /// NACK repair by block (`fec`): a first NACK from a receiver that keeps
    /// up and is not heavily lossy is answered with repair symbols of the block.
    fn repair_by_block(&self, from: SocketAddr, ask: Ask) -> bool {
        ask.nack
            && !ask.reask
            && self.fec.is_some()
            && !self.peers.is_slow(&from)
            && !self.peers.is_lossy(&from)
    }

    /// NACK handling and end game: whether a retry goes to the asker alone.
    fn repair_by_unicast(&self, from: SocketAddr, ask: Ask) -> bool {
        let slow = self.peers.is_slow(&from);
        // A receiver reporting heavy loss of its own is unlikely to share its gaps
        // with siblings: in the end game its first NACKs go unicast too.
        let lossy = self.peers.is_lossy(&from);
        ask.retry() && (slow || self.cfg.delivery == Delivery::UnicastFanout)
            || (ask.reask || (ask.nack && lossy)) && self.in_endgame()
    }

    /// A re-ask in the end game of a page half the receivers (at least two) re-asked for:
    /// their losses are shared (a congested queue on the way drops a datagram for all of
    /// them), so the answer is multicast, once for all, instead of unicast to each.
    /// Losses of a few receivers at a time stay unicast.
    fn shared_reask(&mut self, from: SocketAddr, pfn: u64, ask: Ask) -> bool {
        if !ask.reask || !self.in_endgame() {
            return false;
        }
        let askers = self.sent.note_endgame_reask(pfn, from) as usize;
        let shared = askers >= (self.peers.len() / 2).max(2);
        self.stats.shared_reasks += u64::from(shared);
        shared
    }

    /// Lockstep suppression: the page is already queued for the group, or was
    /// multicast within the lockstep window, or after the last group datagram the
    /// asker had taken in when it asked (its `heard_seq`) and within an announce
    /// interval: that answer is still on its way to the asker, however late the ask
    /// arrives (a busy receiver, a queue on the way). An asker that heard no group
    /// datagram for an announce interval (every announce is one) is taken to have lost
    /// it, and so is one that asks again when nothing went to the group after the
    /// answer. A NACK names a page the receiver
    /// saw go by without it: a push or sweep send it missed is no answer in
    /// flight, so only an answer to another ask within the window suppresses it.
    /// Nor is a multicast from before the asker joined: that answer went out
    /// before the asker was there to take it. For some fragments of a page, a queued
    /// answer of other fragments is widened, and the last multicast suppresses only
    /// when it carried them all.
    fn suppressed(
        &mut self,
        now: Instant,
        from: SocketAddr,
        pfn: u64,
        frags: u32,
        ask: Ask,
    ) -> bool {
        if self.sent.queued_group.get(pfn) {
            // Queued whole (or in progress): it covers the fragments asked for.
            self.queues.widen_repair(pfn, frags);
            self.stats.suppressed_queued += 1;
            return true;
        }
        let answer_in_flight = (!ask.nack || self.sent.last_was_answer.get(pfn))
            && self.sent.multicast_since(pfn, self.peers.joined(&from));
        if !answer_in_flight || !self.sent.last_multicast_covers(pfn, frags) {
            return false;
        }
        let window = self.cfg.lockstep_window;
        if window.is_zero() {
            // Suppression off.
            return false;
        }
        if self.sent.multicast_within(pfn, now, self.base, window) {
            self.stats.suppressed_lockstep += 1;
            return true;
        }
        // The asker had not taken in the answer when it asked. A re-ask waited out the
        // asker's retransmission timer: its answer counts as on its way only while the
        // asker has not taken in what the group was sent after it either (the asker lags
        // behind); with nothing sent since, the answer may as well be lost, and a lost
        // answer costs the asker one timeout, never an announce interval.
        let last = self.sent.multicast_seq(pfn);
        let unheard = last > ask.heard_seq && (!ask.reask || self.out.seq_group > last);
        let bound = window.max(self.cfg.announce_interval);
        if unheard && self.sent.multicast_within(pfn, now, self.base, bound) {
            self.stats.suppressed_in_flight += 1;
            return true;
        }
        false
    }

    /// Multicast the answer: NACKed pages in the repair queue, the rest as demand.
    fn queue_group_answer(&mut self, pfn: u64, frags: u32, ask: Ask) {
        self.sent.queued_group.set(pfn);
        let flags = if ask.retry() {
            Data::REPAIR
        } else {
            Data::DEMAND
        };
        let job = Job {
            frags,
            ..Job::group(pfn, flags)
        };
        if ask.nack {
            self.queues.push_repair(job);
        } else {
            self.queues.push_demand(job);
        }
    }

    /// Queue a unicast answer to a tracked receiver, within the queue bounds:
    /// one source asking again and again cannot grow the queue without limit
    /// nor fill it for everyone else. An answer of the page to it that is still
    /// waiting takes `frags` instead. True when a new answer waits.
    pub(super) fn queue_unicast(
        &mut self,
        to: SocketAddr,
        pfn: u64,
        flags: wire::DataFlags,
        frags: u32,
    ) -> bool {
        self.push_unicast(to, pfn, flags, frags, false)
    }

    fn push_unicast(
        &mut self,
        to: SocketAddr,
        pfn: u64,
        flags: wire::DataFlags,
        frags: u32,
        again: bool,
    ) -> bool {
        if !self.peers.contains(&to) {
            return false;
        }
        match self.queues.push_unicast(to, pfn, flags, frags, again) {
            Queued::New => true,
            Queued::Widened => {
                self.stats.unicast_widened += 1;
                false
            }
            Queued::Full => {
                self.stats.queue_full += 1;
                false
            }
        }
    }
}
