//! Recorded working-set push.
//!
//! Clones of one parent tend to touch the same pages in the same order. The
//! server records the order of first demand requests of a session (retries and
//! NACKs excluded, each page once, bounded in size). When a receiver joins after
//! some order was recorded (a later generation of clones), the server replays
//! that order as pushes to the group, one page per free transmit slot after
//! demand and repairs, so the new clones find most of their working set already
//! present when they fault.
//!
//! **Generations.** Receivers that join less than a gap (`generation_gap`)
//! after the previous join belong to the same generation: clones started together
//! join milliseconds apart. The generation that was joining when nothing was
//! recorded yet is the one whose faults are being recorded; its later joiners
//! start no replay (they fault on the same pages as the rest of it, at the same
//! time, so demand and lockstep suppression serve them, and a replay of the few
//! pages recorded so far would only repeat what the group was just sent). A join
//! after a longer silence starts a new generation, which is replayed for.
//!
//! At most one replay runs at a time. A replay serves every receiver that joined
//! before it started; receivers of a replayed generation joining during a replay
//! start the next one once it ends. Each replay skips pages the group was sent after the earliest
//! receiver it serves joined (they already have those), which the server decides
//! through the `skip` callback of [`WorkingSet::next`].
//!
//! The type is pure state: no clock, no I/O. Times are nanoseconds on the
//! server's own time base.

use crate::bitmap::PageBitmap;
use crate::wire::{PageRange, MAX_RANGE_LEN};

/// Recorded fault order and the replay in progress.
#[derive(Debug, Clone)]
pub struct WorkingSet {
    order: Vec<u64>,
    seen: PageBitmap,
    max_pages: usize,
    replay: Option<Replay>,
    /// Earliest join time of receivers waiting for the next replay.
    pending_since: Option<u64>,
    replays: u64,
    /// Joins closer than this (nanoseconds) to the previous one are one generation.
    generation_gap: u64,
    /// The latest join.
    last_join: Option<u64>,
    /// The latest join's generation is replayed for (it began after something was recorded).
    generation_replayed: bool,
}

#[derive(Debug, Clone, Copy)]
struct Replay {
    pos: usize,
    end: usize,
    since: u64,
}

impl WorkingSet {
    /// An empty working set for an image of `page_count` pages, recording at most
    /// `max_pages` pages; joins less than `generation_gap` nanoseconds apart are one
    /// generation.
    pub fn new(page_count: u64, max_pages: usize, generation_gap: u64) -> WorkingSet {
        WorkingSet {
            order: Vec::new(),
            seen: PageBitmap::new(page_count),
            max_pages,
            replay: None,
            pending_since: None,
            replays: 0,
            generation_gap,
            last_join: None,
            generation_replayed: false,
        }
    }

    /// Record a first demand request for `pfn`. Returns whether it was added
    /// (false: already recorded, out of range, or the set is full).
    pub fn record(&mut self, pfn: u64) -> bool {
        if self.order.len() >= self.max_pages || pfn >= self.seen.len() || self.seen.get(pfn) {
            return false;
        }
        self.seen.set(pfn);
        self.order.push(pfn);
        true
    }

    /// The recorded order.
    pub fn order(&self) -> &[u64] {
        &self.order
    }

    /// Pages recorded.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Nothing recorded yet.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Whether the latest join belongs to a generation that is replayed for (it began
    /// after something was recorded).
    pub fn latest_generation_replayed(&self) -> bool {
        self.generation_replayed
    }

    /// The recorded pages from `start` on, in page order, as at most `max_ranges` ranges;
    /// and where to go on from, if more follow.
    pub fn ranges_from(&self, start: u64, max_ranges: usize) -> (Vec<PageRange>, Option<u64>) {
        let mut out = Vec::new();
        let mut at = start;
        while let Some(first) = self.seen.next_set(at) {
            if out.len() == max_ranges {
                return (out, Some(first));
            }
            let end = self
                .seen
                .next_clear(first)
                .unwrap_or(self.seen.len())
                .min(first + u64::from(MAX_RANGE_LEN));
            out.push(PageRange {
                start: first,
                len: (end - first) as u32,
            });
            at = end;
        }
        (out, None)
    }

    /// Replays started so far.
    pub fn replays_started(&self) -> u64 {
        self.replays
    }

    /// A replay is running or waiting to start.
    pub fn active(&self) -> bool {
        self.replay.is_some() || self.pending_since.is_some()
    }

    /// A receiver joined at `now` (nanoseconds on the server's time base). If it
    /// begins a generation and an order was recorded, or its generation is replayed
    /// for, the order will be replayed for it: at once if no replay is running, else
    /// after the running one.
    pub fn joined(&mut self, now: u64) {
        let same = self
            .last_join
            .is_some_and(|t| now.saturating_sub(t) < self.generation_gap);
        self.last_join = Some(now);
        if !same {
            self.generation_replayed = !self.order.is_empty();
        }
        if !self.generation_replayed {
            return;
        }
        if self.replay.is_none() {
            self.start(now);
        } else {
            self.pending_since = Some(self.pending_since.map_or(now, |s| s.min(now)));
        }
    }

    fn start(&mut self, since: u64) {
        self.replays += 1;
        self.replay = Some(Replay {
            pos: 0,
            end: self.order.len(),
            since,
        });
    }

    /// The next page to push, if a replay is running. `skip(pfn, since)` tells
    /// whether a page needs no push (a zero page, a page already queued, or one
    /// sent to the group after `since`, the earliest join time this replay
    /// serves).
    pub fn next(&mut self, mut skip: impl FnMut(u64, u64) -> bool) -> Option<u64> {
        loop {
            let r = self.replay.as_mut()?;
            while r.pos < r.end {
                let pfn = self.order[r.pos];
                r.pos += 1;
                if !skip(pfn, r.since) {
                    return Some(pfn);
                }
            }
            self.replay = None;
            let since = self.pending_since.take()?;
            self.start(since);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_first_requests_once_and_bounded() {
        let mut ws = WorkingSet::new(100, 3, GAP);
        assert!(ws.record(5));
        assert!(!ws.record(5));
        assert!(ws.record(1));
        assert!(!ws.record(100), "out of range");
        assert!(ws.record(7));
        assert!(!ws.record(8), "full");
        assert_eq!(ws.order(), &[5, 1, 7]);
    }

    const GAP: u64 = 1000;

    #[test]
    fn the_recorded_set_comes_out_as_ranges_in_page_order() {
        let mut ws = WorkingSet::new(100, 100, GAP);
        for p in [40, 3, 41, 4, 42, 99, 5, 7] {
            ws.record(p);
        }
        let r = |s: u64, l: u32| PageRange { start: s, len: l };
        let (all, more) = ws.ranges_from(0, 10);
        assert_eq!(all, vec![r(3, 3), r(7, 1), r(40, 3), r(99, 1)]);
        assert_eq!(more, None);
        let (first, more) = ws.ranges_from(0, 2);
        assert_eq!(first, vec![r(3, 3), r(7, 1)]);
        assert_eq!(more, Some(40));
        let (rest, more) = ws.ranges_from(40, 2);
        assert_eq!(rest, vec![r(40, 3), r(99, 1)]);
        assert_eq!(more, None);
        assert_eq!(ws.ranges_from(4, 1).0, vec![r(4, 2)], "from inside a range");
        assert_eq!(
            WorkingSet::new(10, 10, GAP).ranges_from(0, 4),
            (vec![], None)
        );
    }

    #[test]
    fn no_replay_without_a_recorded_order() {
        let mut ws = WorkingSet::new(10, 10, GAP);
        ws.joined(1);
        assert!(!ws.active());
        assert_eq!(ws.next(|_, _| false), None);
    }

    #[test]
    fn replays_in_order_skipping_and_chains_later_joiners() {
        let mut ws = WorkingSet::new(10, 10, GAP);
        for p in [3, 1, 4, 9, 2] {
            ws.record(p);
        }
        ws.joined(100);
        assert_eq!(ws.next(|_, s| s != 100), Some(3));
        // A page skipped by the caller is passed over.
        assert_eq!(ws.next(|p, _| p == 1), Some(4));
        // Two receivers join during the replay: one more replay, from the earliest.
        ws.joined(300);
        ws.joined(200);
        let mut served = Vec::new();
        while let Some(p) = ws.next(|_, s| s != 100 && s != 200) {
            served.push(p);
        }
        assert_eq!(served, vec![9, 2, 3, 1, 4, 9, 2]);
        assert_eq!(ws.replays_started(), 2);
        assert!(!ws.active());
    }

    #[test]
    fn the_recording_generation_is_not_replayed_for_a_later_one_is() {
        let mut ws = WorkingSet::new(10, 10, GAP);
        // Generation 1: joins 10 apart; its first faults are recorded between them.
        ws.joined(0);
        ws.record(4);
        ws.joined(10);
        ws.record(6);
        ws.joined(GAP + 9);
        assert!(
            !ws.active(),
            "a joiner of the recording generation set off a replay"
        );
        assert_eq!(ws.replays_started(), 0);
        // Generation 2 begins after a silence: replayed, and so is its later joiner.
        ws.joined(3 * GAP);
        assert!(ws.active());
        assert_eq!(ws.next(|_, s| s != 3 * GAP), Some(4));
        ws.joined(3 * GAP + 1);
        let mut served = Vec::new();
        while let Some(p) = ws.next(|_, _| false) {
            served.push(p);
        }
        assert_eq!(served, vec![6, 4, 6]);
        assert_eq!(ws.replays_started(), 2);
    }
}
