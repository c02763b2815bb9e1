//! Neighbour push: the pages just past a fresh fault, sent before they are asked for.
//!
//! Rule owned here: the server follows up to [`STREAMS`] regions at once, a stream
//! each. A fresh fault continues the stream aimed last when it lies in the window
//! behind that stream's cursor, any other stream only when it lies right at its cursor
//! (where its push stopped), and doubles that stream's window, up to the configured
//! maximum; any other fault starts a stream at the minimum window, in place of the
//! stream aimed longest ago when all are in use. Of the streams followed fewer than
//! twice, only the one aimed last pushes. Streams with pages left take turns, a page
//! each. Clones that fault in the same pages in lockstep share one stream; clones that
//! each read their own region (their share of a table) keep a stream each, where one
//! stream re-aimed by every fault went back to the smallest window at each; faults at
//! random pages push about one window after the latest, as that one stream did.

use super::schedule::Job;
use super::Server;
use crate::wire::Data;

/// Regions followed at once.
pub(super) const STREAMS: usize = 16;
/// A stream whose window grew this many times over the smallest (faults followed it
/// twice) goes on pushing while faults elsewhere start other streams.
const ESTABLISHED: u64 = 4;

/// One region's push.
#[derive(Debug, Clone, Copy)]
struct Stream {
    /// Next page to push.
    cursor: u64,
    /// Pages left to push (positions, skipped ones included).
    remaining: u64,
    window: u64,
    /// Join time of the receiver whose fault aimed the stream last: pages multicast
    /// since then are not pushed again (it has them, or NACKs them).
    since: u64,
    /// When it was last aimed, in aims.
    aimed: u64,
}

impl Stream {
    /// A fault on `pfn` continues this stream: anywhere in the window behind its cursor
    /// for the stream aimed last (`latest`), right at the cursor for the others. A
    /// reader the others push for faults where its push stopped; a looser rule let
    /// faults at random pages continue (and grow) whichever of many streams they
    /// landed behind.
    fn follows(&self, pfn: u64, latest: bool) -> bool {
        let back = if latest { self.window } else { 1 };
        pfn >= self.cursor.saturating_sub(back) && pfn <= self.cursor + 1
    }
}

/// The push streams.
#[derive(Debug, Default)]
pub(super) struct Push {
    streams: Vec<Stream>,
    /// Stream whose turn it is.
    turn: usize,
    aims: u64,
}

impl Push {
    /// Pages left to push in some stream.
    pub(super) fn active(&self) -> bool {
        self.streams.iter().any(|s| s.remaining > 0)
    }

    /// A fresh fault on `pfn` by a receiver that joined at `since`: aim the stream it
    /// continues just past it, doubling that stream's window (up to `max`), or start a
    /// stream there at `min`.
    pub(super) fn aim(&mut self, pfn: u64, since: u64, (min, max): (u64, u64)) {
        self.aims += 1;
        let (min, max) = (min.max(1), max.max(1));
        let latest = self.streams.iter().map(|s| s.aimed).max().unwrap_or(0);
        let at = match self
            .streams
            .iter()
            .position(|s| s.follows(pfn, s.aimed == latest))
        {
            Some(at) => {
                let s = &mut self.streams[at];
                s.window = (s.window * 2).min(max);
                at
            }
            None => {
                let fresh = Stream {
                    cursor: 0,
                    remaining: 0,
                    window: min,
                    since,
                    aimed: 0,
                };
                if self.streams.len() < STREAMS {
                    self.streams.push(fresh);
                    self.streams.len() - 1
                } else {
                    let (at, _) = self
                        .streams
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, s)| s.aimed)
                        .unwrap_or((0, &fresh));
                    self.streams[at] = fresh;
                    at
                }
            }
        };
        // Of the streams that faults followed fewer than twice, only the one aimed now
        // pushes; the others stop where they are (their cursors stay, so a fault that
        // follows one later still grows it). Faults at random pages, which land next to
        // some stream now and then, push about as much as a single stream did; regions
        // read in order keep their streams from their third fault on.
        for (i, s) in self.streams.iter_mut().enumerate() {
            if i != at && s.window < ESTABLISHED * min {
                s.remaining = 0;
            }
        }
        let s = &mut self.streams[at];
        s.cursor = pfn + 1;
        s.remaining = s.window;
        s.since = since;
        s.aimed = self.aims;
    }
}

impl Server {
    /// The next pushed page (or a hash page above it, which goes first), the streams
    /// with pages left taking turns.
    pub(super) fn next_push_job(&mut self) -> Option<Job> {
        let n = self.push.streams.len();
        for k in 0..n {
            let i = (self.push.turn + k) % n;
            let s = self.push.streams[i];
            if s.remaining == 0 {
                continue;
            }
            let end = s.cursor.saturating_add(s.remaining).min(self.page_count);
            let (next, found) = self.next_unsent(s.cursor, end, s.since);
            let hash = found.and_then(|p| self.unsent_hash_above(p));
            let st = &mut self.push.streams[i];
            if let Some(h) = hash {
                // The hash pages above the page go first; the page comes next time.
                st.remaining = st.remaining.saturating_sub(next - 1 - st.cursor);
                st.cursor = next - 1;
                self.push.turn = (i + 1) % n;
                return Some(self.group_job(h, Data::PUSH));
            }
            st.remaining = st.remaining.saturating_sub(next - st.cursor);
            st.cursor = next;
            match found {
                Some(pfn) => {
                    self.push.turn = (i + 1) % n;
                    return Some(self.group_job(pfn, Data::PUSH));
                }
                None => st.remaining = 0,
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (cursor, remaining, window) of each stream.
    fn shape(p: &Push) -> Vec<(u64, u64, u64)> {
        p.streams
            .iter()
            .map(|s| (s.cursor, s.remaining, s.window))
            .collect()
    }

    #[test]
    fn a_fault_next_to_a_stream_grows_it_and_a_fault_elsewhere_starts_another() {
        let w = (16, 64);
        let mut p = Push::default();
        assert!(!p.active());
        p.aim(100, 0, w);
        assert_eq!(shape(&p), [(101, 16, 16)]);
        // The stream aimed last is followed anywhere in the window behind its cursor.
        p.aim(95, 0, w);
        assert_eq!(shape(&p), [(96, 32, 32)]);
        // Far away: a second stream. The first, followed once, stops where it is.
        p.aim(5000, 0, w);
        assert_eq!(shape(&p), [(96, 0, 32), (5001, 16, 16)]);
        // Another stream is followed only right at its cursor; it grows and pushes,
        // and now the second stops.
        p.aim(96, 0, w);
        assert_eq!(shape(&p), [(97, 64, 64), (5001, 0, 16)]);
        // The first, followed twice, goes on while the second is followed again.
        p.aim(5001, 0, w);
        assert_eq!(shape(&p), [(97, 64, 64), (5002, 32, 32)]);
        // Behind the first's cursor is not following it (it is not the one aimed last):
        // a third stream, and the second stops.
        p.aim(90, 0, w);
        assert_eq!(shape(&p), [(97, 64, 64), (5002, 0, 32), (91, 16, 16)]);
        // At most the largest window.
        p.aim(97, 0, w);
        assert_eq!(shape(&p)[0], (98, 64, 64));
        assert!(p.active());
    }

    #[test]
    fn all_streams_in_use_a_new_region_takes_the_one_aimed_longest_ago() {
        let mut p = Push::default();
        for r in 0..STREAMS as u64 {
            p.aim(r * 10_000, 0, (16, 1024));
        }
        // Region 0 is aimed again, so region 1 is now the one aimed longest ago.
        p.aim(1, 0, (16, 1024));
        p.aim(999_999, 0, (16, 1024));
        let cursors: Vec<u64> = p.streams.iter().map(|s| s.cursor).collect();
        assert_eq!(cursors.len(), STREAMS);
        assert!(cursors.contains(&2) && cursors.contains(&1_000_000));
        assert!(!cursors.contains(&10_001), "{cursors:?}");
    }
}
