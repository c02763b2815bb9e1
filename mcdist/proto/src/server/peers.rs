//! The receiver table: who is listening, and what they report.
//!
//! Rules owned here: a receiver is tracked once its address is validated (its
//! token echoed, see `validate`; up to `max_clients`) until it leaves or stays
//! silent for `client_timeout`; each has
//! its own request rate limit; its rate, loss and overload reports feed the rate
//! controller once per interval, except a receiver that cannot keep up (overload,
//! loss or re-asks far above the median's), which is marked slow, left out of
//! pacing and repaired by unicast at the rate it reports, or a quarter of the most it
//! ever reported once that is more (after the sweep it receives only its own
//! repairs, and its rate falls with them). At most half the receivers are
//! marked slow, the worst first. Path loss is what a receiver reports lost
//! less its own overload; it is judged against the median of the receivers that
//! reported (none until more than half did), and below heavy loss a receiver is
//! marked slow for it only when two reports in a row stand out (the first keeps it
//! out of rate control until the next). Completion is counted once per receiver.

use super::{Server, ServerEvent};
use crate::pacing::TokenBucket;
use crate::wire;
use std::cmp::Reverse;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// A report older than this no longer speaks for the receiver.
const REPORT_RECENT: Duration = Duration::from_secs(2);
/// Zero-map requests from one receiver closer together than this are answered once.
const ZERO_MAP_REPEAT: Duration = Duration::from_millis(100);
/// Loss (permille) from which a receiver's own reports count as heavy.
const HEAVY_LOSS_PERMILLE: u16 = 250;

/// A receiver's probation for standing out: it counts when its report before stood out
/// too (`before`, set to this report's `stands_out` for the next), or at once when
/// `heavy`.
fn twice_in_a_row(before: &mut bool, stands_out: bool, heavy: bool) -> bool {
    let twice = stands_out && (*before || heavy);
    *before = stands_out;
    twice
}

/// A receiver's latest rate and loss report.
#[derive(Debug, Clone, Copy)]
struct Report {
    rx_rate: u64,
    loss_permille: u16,
    /// The part of the loss the receiver dropped itself (heartbeats only;
    /// requests keep the last heartbeat's).
    overload_permille: u16,
    at: Instant,
}

impl Report {
    /// The loss less the part the receiver dropped itself: the loss of the path to it.
    fn path_loss(&self) -> u16 {
        self.loss_permille.saturating_sub(self.overload_permille)
    }

    /// The loss a receiver is judged an outlier of the path by: its path loss with
    /// overload told apart (`separate`), else all of it.
    fn judged_loss(&self, separate: bool) -> u16 {
        if separate {
            self.path_loss()
        } else {
            self.loss_permille
        }
    }
}

#[derive(Debug)]
struct Peer {
    last_seen: Instant,
    /// When it joined, on the server's time base (nanoseconds).
    joined: u64,
    last_zero_map: Option<Instant>,
    complete: bool,
    tokens: TokenBucket,
    report: Option<Report>,
    /// The report arrived since the last rate update.
    fresh: bool,
    /// Pages asked for again (NACKs, retries) since the last rate update.
    nacked: u64,
    /// Reports loss while most receivers do not: left out of rate control and
    /// repaired by unicast at a rate it can take.
    slow: bool,
    /// Its last fresh report stood out for path loss (below heavy loss, one report
    /// that stands out does not isolate a receiver; two in a row do).
    stood_out: bool,
    /// Its last fresh report showed overload of its own above the threshold (the same
    /// probation: one such report may be a burst).
    was_overloaded: bool,
    /// Highest receive rate it reported, bytes/s: what it took while the group was sent
    /// at full rate, which its latest report no longer shows once it receives only its
    /// own repairs.
    peak_rx_rate: u64,
}

impl Peer {
    fn new(now: Instant, joined: u64, page_rate: u64) -> Peer {
        Peer {
            last_seen: now,
            joined,
            last_zero_map: None,
            complete: false,
            tokens: TokenBucket::new(now, page_rate, Peer::request_burst(page_rate)),
            report: None,
            fresh: false,
            nacked: 0,
            slow: false,
            stood_out: false,
            was_overloaded: false,
            peak_rx_rate: 0,
        }
    }

    /// A receiver that keeps up may ask for a quarter second of pages at once.
    fn request_burst(page_rate: u64) -> u64 {
        (page_rate / 4).max(4096)
    }

    /// The latest report if it is recent.
    fn recent(&self, now: Instant) -> Option<Report> {
        self.report
            .filter(|r| now.saturating_duration_since(r.at) <= REPORT_RECENT)
    }

    /// Overload of the latest report if it is recent, else 0.
    fn recent_overload(&self, now: Instant) -> u16 {
        self.recent(now).map_or(0, |r| r.overload_permille)
    }

    /// Loss of the latest report if it is recent; a receiver with no recent
    /// report has not complained and counts as loss-free.
    fn recent_loss(&self, now: Instant) -> u16 {
        self.recent(now).map_or(0, |r| r.loss_permille)
    }

    /// [`Report::path_loss`] of the latest report if it is recent, else 0.
    fn recent_path_loss(&self, now: Instant) -> u16 {
        self.recent(now).map_or(0, |r| r.path_loss())
    }
}

/// Every receiver the server tracks.
#[derive(Debug, Default)]
pub(super) struct Peers {
    table: HashMap<SocketAddr, Peer>,
    /// Pages multicast since the last rate update (what a slow receiver missed).
    group_pages: u64,
}

impl Peers {
    pub(super) fn len(&self) -> usize {
        self.table.len()
    }

    pub(super) fn contains(&self, addr: &SocketAddr) -> bool {
        self.table.contains_key(addr)
    }

    /// The pages per second `addr`'s asks are answered at.
    #[cfg(test)]
    pub(super) fn repair_rate(&self, addr: &SocketAddr) -> Option<u64> {
        self.table.get(addr).map(|p| p.tokens.rate())
    }

    /// Receivers that reported completion.
    pub(super) fn completed(&self) -> usize {
        self.table.values().filter(|p| p.complete).count()
    }

    /// Every tracked receiver, in table order.
    pub(super) fn addrs(&self) -> Vec<SocketAddr> {
        self.table.keys().copied().collect()
    }

    /// When `addr` joined (nanoseconds on the server's time base; 0 if unknown).
    pub(super) fn joined(&self, addr: &SocketAddr) -> u64 {
        self.table.get(addr).map_or(0, |p| p.joined)
    }

    /// `addr` is marked slow.
    pub(super) fn is_slow(&self, addr: &SocketAddr) -> bool {
        self.table.get(addr).is_some_and(|p| p.slow)
    }

    /// `addr` reports heavy loss of its own.
    pub(super) fn is_lossy(&self, addr: &SocketAddr) -> bool {
        self.table
            .get(addr)
            .and_then(|p| p.report)
            .is_some_and(|r| r.loss_permille >= HEAVY_LOSS_PERMILLE)
    }

    /// Take up to `pages` from `addr`'s request allowance: how many of them it may
    /// be answered now (0: over its rate, or not tracked). An ask larger than the
    /// allowance is answered in part, the rest asked again later, rather than whole
    /// with the allowance in debt: a debt shut out every ask after it, a lone retry
    /// of one lost page too, for as long as a large NACK took to pay for.
    pub(super) fn allow(&mut self, now: Instant, addr: &SocketAddr, pages: u64) -> u64 {
        self.table
            .get_mut(addr)
            .map_or(0, |p| p.tokens.take_up_to(now, pages))
    }

    /// `addr` asked again for `pages` pages.
    pub(super) fn note_reask(&mut self, addr: &SocketAddr, pages: u64) {
        if let Some(p) = self.table.get_mut(addr) {
            p.nacked = p.nacked.saturating_add(pages);
        }
    }

    /// One page went to the group.
    pub(super) fn note_group_page(&mut self) {
        self.group_pages += 1;
    }

    /// The lower `num/den` quantile of `f` over every tracked receiver (0
    /// with none): `1, 2` is the lower median.
    fn quantile<T: Ord + Copy + Default>(
        &self,
        num: usize,
        den: usize,
        f: impl Fn(&Peer) -> T,
    ) -> T {
        let [q] = self.quantiles([(num, den)], f);
        q
    }

    /// Several quantiles of `f` (each as in [`Peers::quantile`]) from one
    /// pass and one sort over the receivers.
    fn quantiles<T: Ord + Copy + Default, const N: usize>(
        &self,
        at: [(usize, usize); N],
        f: impl Fn(&Peer) -> T,
    ) -> [T; N] {
        let mut v: Vec<T> = self.table.values().map(f).collect();
        v.sort_unstable();
        at.map(|(num, den)| {
            let i = v.len().saturating_sub(1) * num / den.max(1);
            v.get(i).copied().unwrap_or_default()
        })
    }

    /// The 90th percentile of the path loss (reported loss less their own
    /// overload) of receivers still fetching at the group's pace, parts per
    /// thousand, and how many they are.
    pub(super) fn loss_p90(&self, now: Instant) -> (u16, usize) {
        let mut v: Vec<u16> = self
            .table
            .values()
            .filter(|p| !p.complete && !p.slow)
            .map(|p| p.recent_path_loss(now))
            .collect();
        v.sort_unstable();
        let p90 = v
            .get((v.len() * 9 / 10).min(v.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0);
        (p90, v.len())
    }
}

impl Server {
    /// Record that the validated address `from` is alive; false if it cannot be
    /// tracked (table full). Only called once `from` proved it receives there.
    pub(super) fn touch_peer(&mut self, now: Instant, from: SocketAddr) -> bool {
        if let Some(p) = self.peers.table.get_mut(&from) {
            p.last_seen = now;
            return true;
        }
        if self.peers.len() >= self.cfg.max_clients {
            self.stats.rate_limited += 1;
            return false;
        }
        let rate = self.cfg.per_source_page_rate.max(1);
        let joined = self.nanos(now);
        self.peers.table.insert(from, Peer::new(now, joined, rate));
        self.events.push_back(ServerEvent::ClientJoined(from));
        if self.cfg.working_set_push {
            self.working_set.joined(joined);
            if self.cfg.working_set_hints
                && self.working_set.latest_generation_replayed()
                && !self.working_set.is_empty()
            {
                self.queue_hint(from);
            }
        }
        true
    }

    /// A receiver joins: it gets the announce (with its token); once the join
    /// echoes the token, it is tracked and gets the zero map when it asks (at
    /// most once per [`ZERO_MAP_REPEAT`]).
    pub(super) fn on_join(&mut self, now: Instant, from: SocketAddr, join: wire::Join, len: usize) {
        if !self.token_valid(from, &join.token) {
            self.answer_unvalidated_join(from, len);
            return;
        }
        if !self.touch_peer(now, from) {
            return;
        }
        self.queue_announce_to(from);
        if join.flags.contains(wire::Join::WANT_ZERO_MAP) {
            let due = self.peers.table.get_mut(&from).is_none_or(|p| {
                let due = p
                    .last_zero_map
                    .is_none_or(|t| now.duration_since(t) >= ZERO_MAP_REPEAT);
                if due {
                    p.last_zero_map = Some(now);
                }
                due
            });
            if due {
                self.queue_zero_map(from);
            }
        }
    }

    /// A heartbeat carries a report and, at the end, the completion flag.
    pub(super) fn on_heartbeat(&mut self, now: Instant, from: SocketAddr, h: wire::Heartbeat) {
        if !self.token_valid(from, &h.token) {
            self.drop_unvalidated(from, "heartbeat");
            return;
        }
        if !self.touch_peer(now, from) {
            return;
        }
        self.note_report(
            now,
            from,
            h.rx_rate,
            h.loss_permille,
            Some(h.overload_permille),
        );
        if h.flags.contains(wire::Heartbeat::COMPLETE) {
            self.mark_complete(from);
        }
    }

    /// A leave with reason 0 means "done"; any other reason forgets the receiver.
    pub(super) fn on_leave(&mut self, now: Instant, from: SocketAddr, leave: wire::Leave) {
        if !self.token_valid(from, &leave.token) {
            self.drop_unvalidated(from, "leave");
            return;
        }
        if leave.reason == 0 {
            if self.touch_peer(now, from) {
                self.mark_complete(from);
            }
        } else if self.peers.table.remove(&from).is_some() {
            self.events.push_back(ServerEvent::ClientLeft(from));
        }
    }

    fn mark_complete(&mut self, from: SocketAddr) {
        if let Some(p) = self.peers.table.get_mut(&from) {
            if !p.complete {
                p.complete = true;
                self.stats.clients_completed += 1;
                self.events.push_back(ServerEvent::ClientCompleted(from));
            }
        }
    }

    pub(super) fn note_report(
        &mut self,
        now: Instant,
        from: SocketAddr,
        rx_rate: u64,
        loss_permille: u16,
        overload_permille: Option<u16>,
    ) {
        if wire::loss_unmeasured(loss_permille) {
            // The receiver has not said anything about its loss yet, so it does not
            // count as reporting none.
            return;
        }
        let mut path_loss = loss_permille;
        if let Some(p) = self.peers.table.get_mut(&from) {
            let overload_permille = overload_permille
                .or(p.report.map(|r| r.overload_permille))
                .unwrap_or(0)
                .min(loss_permille);
            path_loss = loss_permille - overload_permille;
            tracing::debug!(%from, loss_permille, overload_permille, rx_rate, "report");
            p.peak_rx_rate = p.peak_rx_rate.max(rx_rate);
            p.report = Some(Report {
                rx_rate,
                loss_permille,
                overload_permille,
                at: now,
            });
            p.fresh = true;
        }
        if path_loss > 0 && path_loss < HEAVY_LOSS_PERMILLE {
            self.fec_first_loss(path_loss);
        }
    }

    /// Forget receivers silent for longer than `client_timeout`.
    pub(super) fn expire_peers(&mut self, now: Instant) {
        let timeout = self.cfg.client_timeout;
        let gone: Vec<SocketAddr> = self
            .peers
            .table
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.last_seen) > timeout)
            .map(|(a, _)| *a)
            .collect();
        for a in gone {
            // A receiver that completed and went quiet has left (its leave kept it
            // in the table, or was lost): forgotten without an event.
            if self.peers.table.remove(&a).is_some_and(|p| !p.complete) {
                self.events.push_back(ServerEvent::ClientTimedOut(a));
            }
        }
    }

    /// Hand one report per receiver to the rate controller, leaving out
    /// receivers that report loss (or overload of their own) while the median
    /// receiver does not: one slow
    /// receiver must not pace everyone down. Such a receiver is marked slow; its
    /// repairs go by unicast, limited to the rate it reports.
    pub(super) fn feed_rate_reports(&mut self, now: Instant) {
        let threshold = self.cfg.rate.loss_threshold_permille;
        self.fec_note_loss(now);
        // The median over every receiver heard from recently, finished ones
        // included: they are evidence of what the network delivers.
        // A receiver with no recent report has not complained: it counts as
        // loss-free, so one early complainer is not taken for the majority.
        if self.peers.table.is_empty() {
            return;
        }
        // The lower median: up to half the receivers (a slow one, or one
        // reporting false loss) cannot pace everyone down.
        let [median, p90] = self
            .peers
            .quantiles([(1, 2), (9, 10)], |p| p.recent_loss(now));
        // The loss handed to the rate controller is at most the 90th
        // percentile beyond 32 receivers (up to 32, the maximum): the largest
        // of many noisy loss estimates grows with the receiver count, the loss
        // of a shared bottleneck does not.
        let high = if self.peers.len() > 32 { p90 } else { u16::MAX };
        let separate = self.cfg.rate.separate_overload;
        // Told apart, a receiver stands out for path loss by its loss less its
        // own overload, against the median receiver's of the same. Only against
        // receivers that reported it: a silent receiver's loss is unknown, and
        // NACKs carry reports before the first heartbeats do, so at the start the
        // first receivers to ask would stand out against the silence of the rest.
        // (`None` sorts first: the lower median is a report once more than half
        // the receivers sent one.)
        let median_path = self
            .peers
            .quantile(1, 2, |p| p.recent(now).map(|r| r.judged_loss(separate)));
        // Overload that a quarter of the receivers or more report is the
        // group's problem (receivers sharing their CPUs, say): the rate
        // controller slows down for it rather than isolating them all.
        let overload_q3 = self.peers.quantile(3, 4, |p| p.recent_overload(now));
        // Loss reports come with heartbeats; repair volume shows a receiver
        // that cannot keep up sooner: one asking again for far more pages than
        // the median receiver is an outlier too.
        let median_nacked = self.peers.quantile(1, 2, |p| p.nacked);
        let many = self.peers.len() > 1;
        // Isolation is for a minority: while half the receivers or more would
        // be isolated, the trouble is the group's (a sender host short of CPU
        // drops datagrams for everyone), and repairing each by unicast would
        // send the image once per receiver. Those receivers pace the group.
        let mut isolated = self.peers.table.values().filter(|p| p.slow).count();
        let receivers = self.peers.len();
        let completed = self.peers.completed();
        let page_size = self.geo.page_size as u64;
        // Only a receiver missing most of what was multicast in the interval
        // counts: a lossy link alone does not make a receiver slow.
        let sent = std::mem::take(&mut self.peers.group_pages);
        // The worst first (fresh loss, then re-asks), so the cap above leaves
        // out the receivers furthest behind; address order breaks ties, so a
        // run does not depend on the table's hashing.
        let mut order: Vec<(Reverse<u16>, Reverse<u64>, SocketAddr)> = self
            .peers
            .table
            .iter()
            .map(|(a, p)| {
                let loss = p.report.filter(|_| p.fresh).map_or(0, |r| r.loss_permille);
                (Reverse(loss), Reverse(p.nacked), *a)
            })
            .collect();
        order.sort_unstable();
        for (_, _, addr) in order {
            let Some(p) = self.peers.table.get_mut(&addr) else {
                continue;
            };
            // Nothing multicast (the end game answers by unicast): re-asks
            // then show which receivers are last, not which are slow.
            let nack_outlier = many
                && sent > 0
                && p.nacked > (8 * median_nacked).max(64)
                && p.nacked * 2 > sent
                // Loss all receivers share (a bottleneck before them) makes the
                // first to ask look like an outlier: its own report must show
                // more loss than the median receiver's, if it sent one.
                && p.report.is_none_or(|r| r.loss_permille > median.saturating_add(threshold));
            p.nacked = 0;
            let fresh = p.report.filter(|_| p.fresh);
            p.fresh = false;
            // Told apart (`separate`): a receiver is slow for its own overload
            // while most are not overloaded, even where every receiver's path
            // loses datagrams; for path loss only when it stands far above the
            // median's (loss that a shared bottleneck deals out to everyone
            // makes no receiver slow). Not told apart, overload is path loss.
            let own_overload = separate
                && many
                && fresh
                    .is_some_and(|r| r.overload_permille > threshold && overload_q3 <= threshold);
            // As with path loss below, overload that shows in one report, below heavy
            // loss, may be a burst (a host that did not run for a few milliseconds):
            // it isolates a receiver when two fresh reports in a row show it.
            let own_overload = fresh.map_or(own_overload, |r| {
                twice_in_a_row(
                    &mut p.was_overloaded,
                    own_overload,
                    r.overload_permille >= HEAVY_LOSS_PERMILLE,
                )
            });
            // Overload is not path loss: a receiver whose loss is its own
            // overload while a quarter of the group is overloaded too (the group's
            // trouble, which pacing answers) is no outlier of the path either.
            let path = fresh.map(|r| r.judged_loss(separate));
            let path_outlier = many
                && path.is_some_and(|loss| {
                    median_path.is_some_and(|m| {
                        loss > threshold
                            && m <= threshold
                            && (!separate
                                || u32::from(loss) > 2 * u32::from(m) + u32::from(threshold))
                    })
                });
            // Loss that stands out once, below heavy loss, may be a burst (a receiver
            // host that did not run for a few milliseconds loses what its interface
            // ring could not hold, which its socket never saw): path loss isolates a
            // receiver when two reports in a row stand out. Until the next report
            // tells, its loss is not the group's: the rate controller does not hear it.
            let probation = path_outlier;
            let path_outlier = path.map_or(path_outlier, |loss| {
                twice_in_a_row(&mut p.stood_out, path_outlier, loss >= HEAVY_LOSS_PERMILLE)
            });
            let loss_outlier = own_overload || path_outlier;
            // Once half the receivers are done the median is theirs, loss-free by
            // now, and anyone still repairing would stand out: path loss makes a
            // receiver slow only while most receivers still take the sweep.
            let late = 2 * completed >= receivers;
            let newly = !p.slow && (nack_outlier || own_overload || (path_outlier && !late));
            if newly && 2 * (isolated + 1) > receivers {
                self.stats.isolation_refused += 1;
            } else if newly || p.slow && (nack_outlier || loss_outlier || fresh.is_none()) {
                let (rx_rate, loss, overload) = p.report.map_or((0, 0, 0), |r| {
                    (r.rx_rate, r.loss_permille, r.overload_permille)
                });
                let was_slow = p.slow;
                if !p.slow {
                    p.slow = true;
                    isolated += 1;
                    self.stats.slow_receivers += 1;
                    // Why, as the checks above found it (for logs and benches that
                    // check no receiver is isolated for another's trouble).
                    let reason = if own_overload {
                        "overload"
                    } else if path_outlier {
                        "path loss"
                    } else {
                        "repair volume"
                    };
                    tracing::warn!(peer = %addr, reason = %reason, loss_permille = loss, overload_permille = overload, rx_rate, "receiver cannot keep up; left out of pacing, repaired by unicast");
                }
                // What it reports taking now, or a quarter of the most it ever took: after
                // the sweep a slow receiver gets only its own repairs, so its rate
                // falls with what it is sent, and repairs paced to it would crawl.
                // For the same reason, one that keeps up with its repairs (a fresh
                // report without overload of its own) gets a quarter more each
                // interval: what it reports taking never shows what it could take.
                let keeps_up = was_slow && fresh.is_some_and(|r| r.overload_permille <= threshold);
                let probe = if keeps_up {
                    p.tokens.rate().saturating_mul(5) / 4
                } else {
                    0
                };
                let pages = (rx_rate.max(p.peak_rx_rate / 4) / page_size)
                    .max(probe)
                    .clamp(256, self.cfg.per_source_page_rate.max(256));
                p.tokens.set_rate(now, pages, (pages / 4).max(64));
                continue;
            }
            let Some(r) = fresh else {
                continue;
            };
            if p.slow {
                p.slow = false;
                isolated -= 1;
                let rate = self.cfg.per_source_page_rate.max(1);
                p.tokens.set_rate(now, rate, Peer::request_burst(rate));
            }
            if !p.complete && !probation {
                self.rate
                    .report(r.rx_rate, r.loss_permille.min(high), r.overload_permille);
            }
        }
    }
}
