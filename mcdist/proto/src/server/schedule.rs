//! Which page goes next.
//!
//! Rules owned here: jobs are taken in priority order — demand, then group
//! repairs taking turns with unicast answers (one queue per receiver, served
//! round-robin, each bounded), then the recorded working-set replay, the neighbour
//! push (its streams take turns, see `push`), and the sweep; FEC repair symbols of closed
//! blocks go between the answers and the working set (see [`Server::poll_transmit`]).
//! The sent log kept here is what the lockstep window, the end game and the
//! "not sent yet" skips of push and sweep read.

use super::stats::PageKind;
use super::Server;
use crate::bitmap::PageBitmap;
use crate::wire::{Data, DataFlags};
use crate::Dest;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Most unicast answers queued for one receiver.
const MAX_QUEUED_PER_PEER: usize = 1024;
/// Most unicast answers queued in all.
const MAX_QUEUED_UNICAST: usize = 65_536;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Target {
    Group,
    Peer(SocketAddr),
}

/// One page to send, to the group or to one receiver.
#[derive(Debug, Clone, Copy)]
pub(super) struct Job {
    pub(super) pfn: u64,
    pub(super) target: Target,
    /// `Data` flags: why the page is sent.
    pub(super) flags: DataFlags,
    /// Pushed by the working-set replay.
    pub(super) ws: bool,
    /// Which fragments go: bit `i` for fragment `i` ([`ALL_FRAGMENTS`]: the whole page;
    /// fragments past bit 31 go whenever the mask is [`ALL_FRAGMENTS`]).
    pub(super) frags: u32,
}

/// A [`Job`]'s fragment mask for the whole page.
pub(super) const ALL_FRAGMENTS: u32 = u32::MAX;

impl Job {
    pub(super) fn group(pfn: u64, flags: DataFlags) -> Job {
        Job {
            pfn,
            target: Target::Group,
            flags,
            ws: false,
            frags: ALL_FRAGMENTS,
        }
    }

    /// Only some fragments of the page go (an answer to a [`wire::FragmentNack`]).
    ///
    /// [`wire::FragmentNack`]: crate::wire::FragmentNack
    pub(super) fn is_partial(&self) -> bool {
        self.frags != ALL_FRAGMENTS
    }

    /// The first fragment at or after `from` (of `count`) that this job sends, or `count`.
    pub(super) fn next_fragment(&self, from: u16, count: u16) -> u16 {
        (from..count)
            .find(|&i| i >= 32 || self.frags & (1 << i) != 0)
            .unwrap_or(count)
    }

    /// A zero page: the answer is a header without payload.
    pub(super) fn is_zero(&self) -> bool {
        self.flags.contains(Data::ZERO)
    }
}

/// What [`Queues::push_unicast`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Queued {
    /// A new answer waits.
    New,
    /// An answer of the page to that receiver was waiting already; it now carries the
    /// fragments asked too.
    Widened,
    /// The receiver's queue, or all of them, is full: dropped.
    Full,
}

/// Answers waiting: demand, group repairs and unicast answers.
#[derive(Debug, Default)]
pub(super) struct Queues {
    demand: VecDeque<Job>,
    repair: VecDeque<Job>,
    /// Fragment masks of partial group repairs in `repair`: a later NACK of other
    /// fragments of the same page widens the queued job instead of queueing another.
    repair_frags: HashMap<u64, u32>,
    /// Unicast answers, one queue per receiver, served round-robin so one
    /// receiver's backlog never delays another's repair.
    unicast: HashMap<SocketAddr, VecDeque<Job>>,
    /// Fragment masks of the unicast answers waiting, per receiver and page: a receiver
    /// asking again for a page whose answer has not gone out yet widens that answer
    /// instead of queueing another copy (its retry timer fired while the answer waited
    /// behind its backlog).
    unicast_frags: HashMap<(SocketAddr, u64), u32>,
    unicast_rr: VecDeque<SocketAddr>,
    unicast_len: usize,
    /// Alternates group repairs and unicast answers.
    repair_turn: bool,
}

impl Queues {
    /// Jobs waiting in all queues.
    pub(super) fn len(&self) -> usize {
        self.demand.len() + self.repair.len() + self.unicast_len
    }

    /// Some answer (demand, repair or unicast) waits.
    pub(super) fn answers_waiting(&self) -> bool {
        !self.demand.is_empty() || !self.repair.is_empty() || self.unicast_len > 0
    }

    /// Drop every waiting answer.
    pub(super) fn clear(&mut self) {
        self.demand.clear();
        self.repair.clear();
        self.repair_frags.clear();
        self.unicast.clear();
        self.unicast_frags.clear();
        self.unicast_rr.clear();
        self.unicast_len = 0;
    }

    pub(super) fn push_demand(&mut self, job: Job) {
        self.demand.push_back(job);
    }

    pub(super) fn push_repair(&mut self, job: Job) {
        if job.is_partial() {
            self.repair_frags.insert(job.pfn, job.frags);
        }
        self.repair.push_back(job);
    }

    /// Widen the queued group repair of `pfn` by `frags`, if a partial one is queued (a
    /// whole-page job covers every fragment already).
    pub(super) fn widen_repair(&mut self, pfn: u64, frags: u32) {
        if let Some(m) = self.repair_frags.get_mut(&pfn) {
            *m |= frags;
        }
    }

    /// Queue a unicast answer to `to`, within the per-receiver and total bounds. An
    /// answer of the same page to `to` still waiting is widened by `frags` instead,
    /// unless `again` (a deliberate second copy).
    pub(super) fn push_unicast(
        &mut self,
        to: SocketAddr,
        pfn: u64,
        flags: DataFlags,
        frags: u32,
        again: bool,
    ) -> Queued {
        if let Some(m) = self.unicast_frags.get_mut(&(to, pfn)) {
            if !again {
                *m |= frags;
                return Queued::Widened;
            }
        }
        let q = self.unicast.entry(to).or_default();
        if q.len() >= MAX_QUEUED_PER_PEER || self.unicast_len >= MAX_QUEUED_UNICAST {
            return Queued::Full;
        }
        if q.is_empty() {
            self.unicast_rr.push_back(to);
        }
        q.push_back(Job {
            pfn,
            target: Target::Peer(to),
            flags,
            ws: false,
            frags,
        });
        self.unicast_len += 1;
        *self.unicast_frags.entry((to, pfn)).or_insert(0) |= frags;
        Queued::New
    }

    /// The next group repair, with its fragment mask as widened while it waited.
    fn pop_repair(&mut self) -> Option<Job> {
        let mut j = self.repair.pop_front()?;
        if j.is_partial() {
            j.frags = self.repair_frags.remove(&j.pfn).unwrap_or(j.frags);
        }
        Some(j)
    }

    /// The next answer: demand first, then group repairs and unicast answers in turn.
    fn pop(&mut self) -> Option<Job> {
        if let Some(j) = self.demand.pop_front() {
            return Some(j);
        }
        self.repair_turn = !self.repair_turn;
        if self.repair_turn || self.unicast_len == 0 {
            if let Some(j) = self.pop_repair() {
                return Some(j);
            }
        }
        while let Some(peer) = self.unicast_rr.pop_front() {
            let Some(q) = self.unicast.get_mut(&peer) else {
                continue;
            };
            let Some(mut j) = q.pop_front() else {
                self.unicast.remove(&peer);
                continue;
            };
            self.unicast_len -= 1;
            // The first of a page's waiting copies carries every fragment asked since.
            if let Some(m) = self.unicast_frags.remove(&(peer, j.pfn)) {
                j.frags = m;
            }
            if q.is_empty() {
                self.unicast.remove(&peer);
            } else {
                self.unicast_rr.push_back(peer);
            }
            return Some(j);
        }
        self.pop_repair()
    }
}

/// What was sent, and what is queued for the group.
#[derive(Debug)]
pub(super) struct SentLog {
    /// Pages sent at least once.
    pub(super) ever: PageBitmap,
    /// Pages with a group job queued or in progress.
    pub(super) queued_group: PageBitmap,
    /// Last multicast of each page: nanoseconds since the server's base + 1 (0: never).
    last_group_send: Vec<u64>,
    /// Pages multicast so far.
    group_pages: u64,
    /// `group_pages` right after each page's last multicast (0: never).
    group_seq: Vec<u64>,
    /// The group sequence number of the last datagram of each page's last multicast
    /// (0: never, or fanned out by unicast).
    wire_seq: Vec<u64>,
    /// Pages whose last multicast answered a request or NACK (not a push or
    /// the sweep).
    pub(super) last_was_answer: PageBitmap,
    /// The fragments each page's last multicast carried ([`ALL_FRAGMENTS`] for a whole
    /// page).
    last_frags: Vec<u32>,
    /// The last receiver to re-ask for each page in the end game, and how many times the
    /// asker changed (bounded: forgotten past [`MAX_ENDGAME_REASKED`] pages).
    endgame_reasked: HashMap<u64, (SocketAddr, u32)>,
}

/// Most pages whose end-game re-asker is remembered.
const MAX_ENDGAME_REASKED: usize = 1 << 16;

impl SentLog {
    pub(super) fn new(page_count: u64) -> SentLog {
        SentLog {
            ever: PageBitmap::new(page_count),
            queued_group: PageBitmap::new(page_count),
            last_group_send: vec![0; usize::try_from(page_count).unwrap_or(0)],
            group_pages: 0,
            group_seq: vec![0; usize::try_from(page_count).unwrap_or(0)],
            wire_seq: vec![0; usize::try_from(page_count).unwrap_or(0)],
            last_was_answer: PageBitmap::new(page_count),
            last_frags: vec![ALL_FRAGMENTS; usize::try_from(page_count).unwrap_or(0)],
            endgame_reasked: HashMap::new(),
        }
    }

    /// `from` re-asked for `pfn` in the end game; returns how many times a receiver other
    /// than the one before re-asked for it (1 for the first).
    pub(super) fn note_endgame_reask(&mut self, pfn: u64, from: SocketAddr) -> u32 {
        if self.endgame_reasked.len() >= MAX_ENDGAME_REASKED {
            self.endgame_reasked.clear();
        }
        let e = self.endgame_reasked.entry(pfn).or_insert((from, 0));
        if e.1 == 0 || e.0 != from {
            *e = (from, e.1 + 1);
        }
        e.1
    }

    /// `pfn` was multicast less than `window` before `now`.
    pub(super) fn multicast_within(
        &self,
        pfn: u64,
        now: Instant,
        base: Instant,
        window: Duration,
    ) -> bool {
        let last = self.last_group_send[pfn as usize];
        last != 0 && now.saturating_duration_since(base + Duration::from_nanos(last - 1)) < window
    }

    /// The last multicast of `pfn` carried every fragment in `frags`.
    pub(super) fn last_multicast_covers(&self, pfn: u64, frags: u32) -> bool {
        self.last_frags
            .get(pfn as usize)
            .is_some_and(|&m| frags & !m == 0)
    }

    /// Fragments `frags` of `pfn` were multicast at `nanos` (since the base), the last
    /// of them in the group datagram numbered `seq` (0: fanned out by unicast).
    fn note_multicast(&mut self, pfn: u64, nanos: u64, frags: u32, seq: u64) {
        let i = pfn as usize;
        if let Some(m) = self.last_frags.get_mut(i) {
            *m = frags;
        }
        if let Some(s) = self.wire_seq.get_mut(i) {
            *s = seq;
        }
        self.group_pages += 1;
        if let (Some(t), Some(q)) = (self.last_group_send.get_mut(i), self.group_seq.get_mut(i)) {
            *t = nanos + 1;
            *q = self.group_pages;
        }
    }

    /// The group sequence number of the last datagram of `pfn`'s last multicast (0:
    /// never multicast, or fanned out by unicast).
    pub(super) fn multicast_seq(&self, pfn: u64) -> u64 {
        self.wire_seq.get(pfn as usize).copied().unwrap_or(0)
    }

    /// Pages multicast after `pfn`'s last multicast (`None`: never multicast).
    pub(super) fn multicast_pages_after(&self, pfn: u64) -> Option<u64> {
        match self.group_seq.get(pfn as usize) {
            Some(&q) if q > 0 => Some(self.group_pages - q),
            _ => None,
        }
    }

    /// `pfn` was multicast at or after `since` (nanoseconds since the base).
    pub(super) fn multicast_since(&self, pfn: u64, since: u64) -> bool {
        self.last_group_send
            .get(pfn as usize)
            // Stored as send time + 1 ns (0: never sent), so `>` is "at or after".
            .is_some_and(|&t| t > since)
    }
}

/// The sweep over the whole image, in sweep order (`pos` counts positions in it).
#[derive(Debug, Default)]
pub(super) struct Sweep {
    pub(super) pos: u64,
    end_announced: bool,
}

impl Server {
    /// Most non-zero pages have gone out once: retries go unicast.
    pub(super) fn in_endgame(&self) -> bool {
        self.nonzero_pages > 0
            && self.sent.ever.count_ones() as f64
                >= self.cfg.endgame_fraction * self.nonzero_pages as f64
    }

    fn sweeping(&self) -> bool {
        self.cfg.sweep && self.peers.len() >= self.cfg.sweep_min_clients
    }

    /// Something to send besides control messages.
    pub(super) fn has_data_work(&self) -> bool {
        !self.failed
            && (self.out.current.is_some()
                || self.queues.answers_waiting()
                || self.fec_pending()
                || (self.cfg.push_neighbors && self.push.active())
                || (self.cfg.working_set_push && self.working_set.active())
                || (self.sweeping() && self.sweep.pos < self.total_pages))
    }

    /// The first page in `from..end` that is not zero, not multicast since `since`
    /// (nanoseconds on the server's time base) and not queued; returns the position
    /// after it (or `end`) and the page.
    pub(super) fn next_unsent(&self, from: u64, end: u64, since: u64) -> (u64, Option<u64>) {
        let mut pfn = from;
        while pfn < end {
            let skip = self.info.zero_map.get(pfn)
                || self.sent.multicast_since(pfn, since)
                || self.sent.queued_group.get(pfn);
            pfn += 1;
            if !skip {
                return (pfn, Some(pfn - 1));
            }
        }
        (end.max(from), None)
    }

    /// The first page at or after position `from` of the sweep order
    /// ([`crate::integrity::HashLayout::sweep_order`]: each hash page before the pages it
    /// covers) that is not zero, not sent and not queued; returns the position after it
    /// (or the end) and the page.
    fn next_unswept(&self, from: u64) -> (u64, Option<u64>) {
        let mut pos = from;
        while pos < self.total_pages {
            let pfn = self.tree.layout().sweep_at(pos);
            pos += 1;
            let skip = self.info.zero_map.get(pfn)
                || self.sent.ever.get(pfn)
                || self.sent.queued_group.get(pfn);
            if !skip {
                return (pos, Some(pfn));
            }
        }
        (pos.max(from), None)
    }

    /// The data pages the sweep has passed: what the announce's sweep position says.
    pub(super) fn sweep_frontier(&self) -> u64 {
        self.tree.layout().sweep_data_before(self.sweep.pos)
    }

    /// The first hash page above data page `pfn` (top level first) neither sent nor
    /// queued: demand and push send it ahead of the page, so receivers can verify the page
    /// as it arrives.
    pub(super) fn unsent_hash_above(&self, pfn: u64) -> Option<u64> {
        if pfn >= self.page_count {
            return None;
        }
        self.tree
            .layout()
            .path(pfn)
            .ok()?
            .into_iter()
            .find(|&h| !self.sent.ever.get(h) && !self.sent.queued_group.get(h))
    }

    /// Queue-mark `pfn` and make a group job for it.
    pub(super) fn group_job(&mut self, pfn: u64, flags: DataFlags) -> Job {
        self.sent.queued_group.set(pfn);
        Job::group(pfn, flags)
    }

    /// The next job in priority order, or `None` when there is nothing to send.
    pub(super) fn next_job(&mut self) -> Option<Job> {
        if let Some(j) = self.queues.pop() {
            return Some(j);
        }
        if let Some(j) = self.next_working_set_job() {
            return Some(j);
        }
        if self.cfg.push_neighbors {
            if let Some(j) = self.next_push_job() {
                return Some(j);
            }
        }
        if self.sweeping() {
            let (next, found) = self.next_unswept(self.sweep.pos);
            self.sweep.pos = next;
            if let Some(pfn) = found {
                return Some(self.group_job(pfn, Data::SWEEP));
            }
            if self.fec_pending() {
                // The last block's repairs go before the end-of-sweep announce.
                return None;
            }
            if !self.sweep.end_announced {
                // Tell receivers at once that the sweep passed every page, so they
                // NACK their last gaps now instead of at the next periodic announce;
                // twice, so that one lost datagram does not cost a whole period.
                self.sweep.end_announced = true;
                self.queue_group_announce();
                self.queue_group_announce_copy();
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
        let sent = &self.sent;
        let pfn = self.working_set.next(|pfn, since| {
            zero_map.get(pfn) || sent.queued_group.get(pfn) || sent.multicast_since(pfn, since)
        })?;
        self.sent.queued_group.set(pfn);
        Some(Job {
            ws: true,
            ..Job::group(pfn, Data::PUSH)
        })
    }

    /// `job`'s page reached `dest` completely: count it and log the send.
    pub(super) fn page_sent(&mut self, now: Instant, job: Job, dest: Dest) {
        if job.is_zero() {
            self.stats.zero_replies += 1;
            return;
        }
        let unicast = matches!(dest, Dest::Peer(_));
        let kind = if job.is_partial() {
            // Part of a page the receivers hold in part: counted apart from whole pages.
            self.stats.fragment_answers += 1;
            PageKind::Repair
        } else {
            self.stats.count_page(job.flags, job.ws, unicast)
        };
        if kind == PageKind::Push
            && self.cfg.working_set_push
            && self.cfg.working_set_record_push
            && job.pfn < self.page_count
        {
            self.working_set.record(job.pfn);
        }
        if job.target == Target::Group {
            self.peers.note_group_page();
            let nanos = self.nanos(now);
            let seq = if dest == Dest::Group {
                self.out.seq_group
            } else {
                0
            };
            self.sent.note_multicast(job.pfn, nanos, job.frags, seq);
            if job.flags.intersects(Data::DEMAND | Data::REPAIR) {
                self.sent.last_was_answer.set(job.pfn);
            } else {
                self.sent.last_was_answer.clear(job.pfn);
            }
        }
        self.sent.ever.set(job.pfn);
    }
}
