//! Asking for pages: coalescing, retry with backoff and jitter, and the request datagrams.
//!
//! Rule owned here: a page is outstanding at most once (a second ask for it is coalesced);
//! each outstanding page has one retransmission deadline, an RTO from the smoothed round
//! trip (RFC 6298 style) doubled per retry up to `max_rto`, with ±25 % seeded jitter; a page
//! unanswered after `max_retries` fails the session. Pages waiting to be sent sit in six
//! queues drained in priority order (demand, retry, NACK, fragment NACK, and the retries of
//! both NACKs), each datagram taking as many pages as its ranges fit. A NACKed page the
//! receiver holds in part (some fragments in reassembly) goes in a fragment NACK, which
//! names the missing fragments (`wire::FragmentNack`): the server resends only those.

use super::{Client, ClientConfig, ClientError, Timer};
use crate::bitmap::coalesce;
use crate::wire::{self, Body};
use crate::Transmit;
use rand::{Rng, SeedableRng};
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::time::{Duration, Instant};

/// Retries after which a page held in part is NACKed whole.
const FRAGMENT_NACK_RETRIES: u32 = 8;

/// One outstanding page.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pending {
    first_sent: Option<Instant>,
    deadline: Option<Instant>,
    retries: u32,
    nack: bool,
    /// NACKed by its missing fragments (held in part when last asked for).
    frag: bool,
    /// It arrived and waits for a hash page above it: no retries meanwhile.
    parked: bool,
}

/// Which queue a page waits in before it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Want {
    Demand,
    Retry,
    Nack,
    /// A NACKed page held in part: its missing fragments are NACKed.
    FragNack,
    /// A NACKed page whose repair did not arrive: asked again with the retry flag.
    NackRetry,
    /// The same for a page held in part.
    FragNackRetry,
}

impl Want {
    /// Every queue, in the order `poll_transmit` drains them.
    pub(super) const ORDER: [Want; 6] = [
        Want::Demand,
        Want::Retry,
        Want::Nack,
        Want::FragNack,
        Want::NackRetry,
        Want::FragNackRetry,
    ];

    fn slot(self) -> usize {
        self as usize
    }

    /// NACKed by fragments: one entry per page, not ranges.
    pub(super) fn by_fragments(self) -> bool {
        matches!(self, Want::FragNack | Want::FragNackRetry)
    }

    /// The NACK queue for a page, fresh or retried, held in part or not.
    fn nack(retry: bool, partial: bool) -> Want {
        match (retry, partial) {
            (false, false) => Want::Nack,
            (false, true) => Want::FragNack,
            (true, false) => Want::NackRetry,
            (true, true) => Want::FragNackRetry,
        }
    }
}

/// Outstanding pages, their deadlines and the round-trip estimate.
pub(super) struct Requests {
    rng: rand::rngs::SmallRng,
    pending: HashMap<u64, Pending>,
    /// Retransmission deadlines, earliest first. Entries of pages answered or re-sent since
    /// are left in place and skipped when they come up.
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    want: [BTreeSet<u64>; 6],
    srtt: Option<Duration>,
    rttvar: Duration,
    range_buf: Vec<u8>,
}

impl Requests {
    pub(super) fn new(seed: u64) -> Requests {
        Requests {
            rng: rand::rngs::SmallRng::seed_from_u64(seed),
            pending: HashMap::new(),
            deadlines: BinaryHeap::new(),
            want: Default::default(),
            srtt: None,
            rttvar: Duration::ZERO,
            range_buf: Vec::new(),
        }
    }

    /// Pages outstanding.
    pub(super) fn len(&self) -> usize {
        self.pending.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    pub(super) fn contains(&self, pfn: u64) -> bool {
        self.pending.contains_key(&pfn)
    }

    /// Outstanding pages, in no order.
    pub(super) fn pfns(&self) -> Vec<u64> {
        self.pending.keys().copied().collect()
    }

    /// Make `pfn` outstanding and queue it in `want` (`Demand`, `Nack` or `FragNack`).
    pub(super) fn ask(&mut self, pfn: u64, want: Want) {
        self.pending.insert(
            pfn,
            Pending {
                first_sent: None,
                deadline: None,
                retries: 0,
                nack: matches!(want, Want::Nack | Want::FragNack),
                frag: want.by_fragments(),
                parked: false,
            },
        );
        self.want[want.slot()].insert(pfn);
    }

    /// `pfn` arrived (or turned out to be zero): it is no longer outstanding. Returns its
    /// round-trip time when it was answered on its first send and `now` is given.
    pub(super) fn settle(&mut self, pfn: u64, now: Option<Instant>) -> Option<Duration> {
        let p = self.pending.remove(&pfn)?;
        self.want.iter_mut().for_each(|w| {
            w.remove(&pfn);
        });
        match (p.first_sent, p.retries, now) {
            (Some(t0), 0, Some(now)) => Some(now.saturating_duration_since(t0)),
            _ => None,
        }
    }

    /// A zero reply answered `pfn`: it is no longer outstanding. A copy still queued stays
    /// there (it may ride along in the ranges of a later datagram).
    pub(super) fn answered_zero(&mut self, pfn: u64) {
        self.pending.remove(&pfn);
    }

    /// `pfn` arrived but waits for a hash page above it: no retry until it is settled or
    /// [`Requests::unpark`]ed.
    pub(super) fn park(&mut self, pfn: u64) {
        if let Some(p) = self.pending.get_mut(&pfn) {
            p.parked = true;
            p.deadline = None;
            self.want.iter_mut().for_each(|w| {
                w.remove(&pfn);
            });
        }
    }

    /// A parked page failed verification: ask for it again now.
    pub(super) fn unpark(&mut self, pfn: u64) {
        if let Some(p) = self.pending.get_mut(&pfn) {
            if std::mem::take(&mut p.parked) {
                let want = if p.nack {
                    Want::nack(true, p.frag)
                } else {
                    Want::Retry
                };
                self.want[want.slot()].insert(pfn);
            }
        }
    }

    /// Forget every outstanding page (the session failed).
    pub(super) fn clear(&mut self) {
        self.pending.clear();
        self.want.iter_mut().for_each(BTreeSet::clear);
        self.deadlines.clear();
    }

    /// The server restarted: every outstanding page is asked again (with the retry flag).
    pub(super) fn resend_all(&mut self) {
        for (&pfn, p) in self.pending.iter_mut() {
            p.deadline = None;
            self.want[Want::Retry.slot()].insert(pfn);
        }
    }

    /// The earliest retransmission deadline (possibly of a page since settled).
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.peek().map(|Reverse((t, _))| *t)
    }

    /// Take one page whose deadline passed at `now` and count its retry: `Ok(None)` when
    /// none is left, `Err` when the page ran out of retries.
    /// A NACKed page for which `fresh_nack` holds is asked again as a first NACK
    /// (the server answers it with repair symbols of its block), otherwise with the
    /// retry flag; by its missing fragments when `partial` holds for it.
    fn expire_one(
        &mut self,
        now: Instant,
        max_retries: u32,
        fresh_nack: impl Fn(u64) -> bool,
        partial: impl Fn(u64) -> bool,
    ) -> Result<Option<()>, ClientError> {
        while let Some(Reverse((t, pfn))) = self.deadlines.peek().copied() {
            if t > now {
                break;
            }
            self.deadlines.pop();
            let Some(p) = self.pending.get_mut(&pfn) else {
                continue;
            };
            if p.deadline != Some(t) {
                continue;
            }
            p.deadline = None;
            p.retries += 1;
            let (retries, nack) = (p.retries, p.nack);
            if retries > max_retries {
                return Err(ClientError::PageUnavailable { pfn, retries });
            }
            let want = if nack {
                // A fragment NACK unanswered again and again (a server that does not
                // know them drops them) gives way to a whole-page NACK.
                p.frag = retries <= FRAGMENT_NACK_RETRIES && partial(pfn);
                Want::nack(!fresh_nack(pfn), p.frag)
            } else {
                Want::Retry
            };
            self.want[want.slot()].insert(pfn);
            return Ok(Some(()));
        }
        Ok(None)
    }

    pub(super) fn rtt_sample(&mut self, r: Duration) -> Option<Duration> {
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
        self.srtt
    }

    fn rto(&mut self, cfg: &ClientConfig, retries: u32) -> Duration {
        let base = match self.srtt {
            Some(s) => (s + self.rttvar * 4).clamp(cfg.min_rto, cfg.max_rto),
            None => cfg.initial_rto,
        };
        let backed = base
            .saturating_mul(1u32 << retries.min(16))
            .min(cfg.max_rto);
        let jitter = self.rng.random_range(0.75..1.25);
        backed.mul_f64(jitter).max(Duration::from_micros(100))
    }

    /// Take the first pages of queue `want` that fit `max_ranges` ranges (entries, for a
    /// fragment NACK: one a page), give each a fresh deadline, and encode them; `missing`
    /// gives a page's missing fragments for a fragment NACK. Returns how many data pages,
    /// or `None` when none of them is outstanding any more.
    fn take(
        &mut self,
        cfg: &ClientConfig,
        now: Instant,
        want: Want,
        max_ranges: usize,
        data_pages: u64,
        missing: impl Fn(u64) -> u32,
    ) -> Option<u64> {
        let set = &mut self.want[want.slot()];
        if set.is_empty() {
            return None;
        }
        let mut taken = Vec::new();
        let mut ranges = 0usize;
        let mut last: Option<u64> = None;
        while let Some(&p) = set.iter().next() {
            let new_range = want.by_fragments() || last.is_none_or(|l| p != l + 1);
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
            let Some(retries) = self.pending.get(&p).map(|x| x.retries) else {
                continue;
            };
            let rto = self.rto(cfg, retries);
            if let Some(x) = self.pending.get_mut(&p) {
                if x.first_sent.is_none() {
                    x.first_sent = Some(now);
                }
                let d = now + rto;
                x.deadline = Some(d);
                self.deadlines.push(Reverse((d, p)));
                sent_any = true;
            }
        }
        if !sent_any {
            return None;
        }
        if want.by_fragments() {
            let entries: Vec<_> = taken
                .iter()
                .map(|&pfn| wire::PageFragments {
                    pfn,
                    missing: missing(pfn),
                })
                .collect();
            wire::encode_fragment_entries(&entries, &mut self.range_buf);
        } else {
            let list = coalesce(taken.iter().copied());
            wire::encode_ranges(&list, &mut self.range_buf);
        }
        // Hash pages (numbered after the data pages) ride along uncounted.
        Some(taken.iter().filter(|&&p| p < data_pages).count() as u64)
    }
}

impl Client {
    /// Pages whose deadline passed: queue them again, or fail the session when one ran out
    /// of retries. Returns false when the session failed.
    pub(super) fn expire_requests(&mut self, now: Instant) -> bool {
        // A page of an FEC block still being decoded is NACKed afresh: more
        // repair symbols of the block serve it (and every sibling missing some).
        let (fec, reasm, by_frags) = (&self.fec.rx, &self.reasm, self.cfg.fragment_nacks);
        loop {
            match self.requests.expire_one(
                now,
                self.cfg.max_retries,
                |p| fec.in_open_block(p),
                |p| by_frags && reasm.missing(p).is_some(),
            ) {
                Ok(Some(())) => self.stats.retries += 1,
                Ok(None) => break,
                Err(e) => {
                    self.fail(e);
                    return false;
                }
            }
        }
        self.arm_retry_timer();
        true
    }

    /// The retry timer follows the earliest retransmission deadline.
    pub(super) fn arm_retry_timer(&mut self) {
        match self.requests.next_deadline() {
            Some(t) => self.timers.set(Timer::Retry, t),
            None => self.timers.stop(Timer::Retry),
        }
    }

    pub(super) fn rtt_sample(&mut self, r: Duration) {
        let srtt = self.requests.rtt_sample(r);
        self.stats.srtt_us = srtt.map_or(0, |s| s.as_micros() as u64);
    }

    /// One request or NACK datagram from queue `want`, if it holds a page still outstanding.
    pub(super) fn emit_requests(
        &mut self,
        now: Instant,
        want: Want,
        buf: &mut [u8],
    ) -> Option<Transmit> {
        let max_ranges = wire::Request::max_ranges(
            self.cfg.max_datagram.min(buf.len()),
            self.cfg.trailer_reserve,
        )
        .max(1);
        let data_pages = self.data_pages();
        let reasm = &self.reasm;
        // A page no longer held in part (evicted, or whole meanwhile) is NACKed whole.
        let missing = |p| reasm.missing(p).unwrap_or(u32::MAX);
        let n = self
            .requests
            .take(&self.cfg, now, want, max_ranges, data_pages, missing)?;
        self.arm_retry_timer();
        let (body_flags, is_nack) = match want {
            Want::Demand => {
                self.stats.requests_sent += 1;
                self.stats.pages_requested += n;
                (wire::RequestFlags::empty(), false)
            }
            Want::Retry => {
                self.stats.requests_sent += 1;
                (wire::Request::RETRY, false)
            }
            Want::Nack | Want::FragNack => {
                self.stats.nacks_sent += 1;
                self.stats.nack_pages += n;
                (wire::RequestFlags::empty(), true)
            }
            Want::NackRetry | Want::FragNackRetry => {
                self.stats.nacks_sent += 1;
                (wire::Request::RETRY, true)
            }
        };
        if want == Want::FragNack {
            self.stats.fragment_nack_pages += n;
        }
        let seq = self.next_seq();
        let req = wire::Request {
            rx_rate: self.meter.rx_rate,
            loss_permille: self.meter.loss_permille,
            flags: body_flags,
            heard_seq: self.meter.heard_seq(),
            ranges: wire::ranges_from_encoded(&self.requests.range_buf),
        };
        let body = match (is_nack, want.by_fragments()) {
            (true, true) => Body::FragmentNack(wire::FragmentNack {
                rx_rate: req.rx_rate,
                loss_permille: req.loss_permille,
                flags: req.flags,
                heard_seq: req.heard_seq,
                entries: wire::fragment_entries_from_encoded(&self.requests.range_buf),
            }),
            (true, false) => Body::Nack(req),
            (false, _) => Body::Request(req),
        };
        self.to_server(seq, body, buf)
    }
}
