//! Send pacing: a token bucket and the receiver-driven rate controller.
//!
//! Both take time as a parameter and read no clock.

use std::time::{Duration, Instant};

/// A token bucket measured in bytes.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket refilling at `rate` bytes/s holding at most `burst` bytes.
    pub fn new(now: Instant, rate: u64, burst: u64) -> TokenBucket {
        TokenBucket {
            rate: rate.max(1),
            burst: burst.max(1),
            tokens: burst.max(1) as f64,
            last: now,
        }
    }

    /// Current rate in bytes/s.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Bucket depth in bytes.
    pub fn burst(&self) -> u64 {
        self.burst
    }

    /// Change the rate and depth; tokens already earned are kept (capped at the new depth).
    pub fn set_rate(&mut self, now: Instant, rate: u64, burst: u64) {
        self.refill(now);
        self.rate = rate.max(1);
        self.burst = burst.max(1);
        self.tokens = self.tokens.min(self.burst as f64);
    }

    fn refill(&mut self, now: Instant) {
        if now > self.last {
            let dt = now.duration_since(self.last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate as f64).min(self.burst as f64);
            self.last = now;
        }
    }

    /// Take `n` bytes if available now.
    pub fn try_take(&mut self, now: Instant, n: u64) -> bool {
        self.refill(now);
        // A datagram larger than the bucket may go once the bucket is full.
        let need = (n as f64).min(self.burst as f64);
        if self.tokens >= need {
            self.tokens -= n as f64;
            true
        } else {
            false
        }
    }

    /// When `n` bytes will be available (now if already).
    pub fn ready_at(&self, n: u64) -> Instant {
        let need = (n as f64).min(self.burst as f64);
        if self.tokens >= need {
            self.last
        } else {
            // Round up (and one nanosecond more) so that at the returned instant
            // `try_take` really succeeds; rounding down left callers spinning at
            // an instant where the bucket was a fraction of a byte short.
            let nanos = ((need - self.tokens) * 1e9 / self.rate as f64).ceil();
            let nanos = if nanos.is_finite() && nanos < u64::MAX as f64 {
                nanos as u64
            } else {
                u64::MAX / 2
            };
            self.last + Duration::from_nanos(nanos.saturating_add(1))
        }
    }
}

/// Rate-controller settings.
#[derive(Debug, Clone, Copy)]
pub struct RateConfig {
    /// Lowest rate, bytes/s.
    pub floor: u64,
    /// Highest rate, bytes/s.
    pub cap: u64,
    /// Starting rate, bytes/s.
    pub initial: u64,
    /// How often the rate is recomputed.
    pub interval: Duration,
    /// Loss (parts per thousand) above which the rate backs off.
    pub loss_threshold_permille: u16,
    /// How far behind its rate the sender may catch up at once: the token bucket's depth,
    /// as time at the current rate (at least 64 KiB). A sender that shares its CPU with
    /// other work is often not scheduled for a few milliseconds; with a shallow bucket the
    /// sending time it missed is lost for good. A deeper one lets it catch up with a burst
    /// that long at the link's speed, which receivers' socket buffers and switch queues
    /// must absorb.
    pub burst: Duration,
    /// Tell receivers' overload apart from loss on the path (on by default).
    /// Overload (datagrams a receiver's own socket dropped) above the threshold
    /// backs the rate off at once toward what the overloaded receivers take,
    /// and path loss toward what all take; each goes on backing it off while it
    /// falls with the rate (see [`RateController`]). Off, overload counts as
    /// path loss, as it did before receivers reported it.
    pub separate_overload: bool,
}

impl RateConfig {
    /// These settings with the highest rate `cap` bytes/s; the starting rate and the
    /// floor are lowered to it where they were above.
    pub fn capped(self, cap: u64) -> RateConfig {
        RateConfig {
            cap,
            initial: self.initial.min(cap),
            floor: self.floor.min(cap),
            ..self
        }
    }

    /// Token bucket depth in bytes at `rate` bytes/s: [`RateConfig::burst`] of traffic,
    /// at least 64 KiB.
    pub fn burst_bytes(&self, rate: u64) -> u64 {
        ((rate as f64 * self.burst.as_secs_f64()) as u64).max(64 * 1024)
    }
}

impl Default for RateConfig {
    fn default() -> Self {
        RateConfig {
            floor: 1 << 20,
            cap: 125_000_000,
            initial: 40_000_000,
            interval: Duration::from_millis(50),
            loss_threshold_permille: 20,
            burst: Duration::from_millis(8),
            separate_overload: true,
        }
    }
}

/// Follows receivers: multiplicative increase while no receiver reports loss,
/// back-off toward the weighted average of the receive rates they report when
/// they do. Always within `[floor, cap]`.
///
/// Receivers report two kinds of loss. **Overload** is what a receiver dropped
/// itself (its socket buffer overflowed); it backs the rate off at once,
/// toward the receive rates of the overloaded receivers. **Path loss** is the
/// rest: congestion somewhere on a shared path, or loss that has nothing to do
/// with the rate (a noisy link).
///
/// Each kind is probed for whether it follows the rate. Loss that does not
/// fall when the rate falls is not cured by sending slower: a lossy link, a
/// noisy wireless hop, or receivers that are descheduled now and then on
/// hosts whose cores other work shares (their sockets overflow during the
/// pause at any rate but a trickle). After [`RateController::PROBE_BACKOFFS`]
/// back-offs in a row (overload: one more) that left that kind of loss where it
/// was, the controller
/// takes it as that kind's baseline, returns to the rate it had before, and
/// from then on backs off only for loss above the baseline plus the threshold.
/// A baseline follows the loss measured while there is no excess, so it falls
/// again when the link gets cleaner or the receivers' hosts quieter. Overload
/// that falls with the rate (a receiver too slow for it) keeps the rate
/// falling.
#[derive(Debug, Clone)]
pub struct RateController {
    cfg: RateConfig,
    rate: u64,
    next_update: Instant,
    sum_rate_weighted: f64,
    sum_weight: f64,
    max_loss: u16,
    /// Highest overload reported in the interval, permille.
    max_overload: u16,
    /// Receive rates of the receivers reporting overload, weighted like the others.
    sum_overloaded_rate: f64,
    sum_overloaded_weight: f64,
    reports: u32,
    /// Path loss: its baseline and current back-off episode.
    path: Probe,
    /// Receivers' overload: the same.
    overload: Probe,
    /// No loss is judged before this (see [`RateController::update`]).
    settle_until: Instant,
    /// The rate at which congestion or overload last set in.
    ceiling: Option<u64>,
}

/// One kind of loss, judged for whether it follows the rate.
#[derive(Debug, Clone)]
struct Probe {
    kind: ProbeKind,
    /// Loss (permille) this kind shows whatever the rate.
    baseline: f64,
    /// Current run of back-offs: rate and loss before the first, count.
    episode: Option<(u64, u16, u32)>,
    /// Judged intervals in a row without excess, and the most loss among them.
    quiet: u32,
    quiet_max: u16,
}

/// How a [`Probe`] reads its kind of loss.
#[derive(Debug, Clone, Copy)]
struct ProbeKind {
    /// Judged intervals without excess that end an episode; the baseline
    /// follows the most loss of each such run.
    window: u32,
    /// Loss above `baseline × slack + threshold` is excess.
    slack: f64,
    /// Loss after a back-off at or above this share (percent) of the loss
    /// before it did not fall with the rate; `None`: loss that did not fall at
    /// least halfway to what a receiver too slow for the rate would show after
    /// it (`1 - (1 - loss) × before / now`).
    same_percent: Option<u32>,
    /// Back-offs in a row that left the loss unchanged before it is a baseline.
    backoffs: u32,
}

impl ProbeKind {
    /// Path loss is steady from one interval to the next, whether a lossy
    /// link's or a bottleneck's.
    const PATH: ProbeKind = ProbeKind {
        window: 1,
        slack: 1.0,
        same_percent: Some(85),
        backoffs: RateController::PROBE_BACKOFFS,
    };
    /// Overload comes in bursts when receivers are descheduled now and then:
    /// an interval between two bursts says nothing, and one receiver's burst
    /// drops more or less of the next report window. Overload that the rate
    /// causes falls steeply with it (a receiver taking `C` sent `1.25 C` drops
    /// 20 %, sent `C` nothing): it is judged against that. Readings are the
    /// worst receiver's, noisy on busy hosts, and overload taken for a baseline
    /// by mistake would be sent into at full rate: it takes one more back-off
    /// that leaves it unchanged.
    const OVERLOAD: ProbeKind = ProbeKind {
        window: 4,
        slack: 1.25,
        same_percent: None,
        backoffs: RateController::PROBE_BACKOFFS + 1,
    };

    /// Whether `loss` at `rate` is no fall from `first` at `before`.
    fn unchanged(&self, first: u16, before: u64, loss: u16, rate: u64) -> bool {
        match self.same_percent {
            Some(pct) => u32::from(loss) * 100 >= u32::from(first) * pct,
            None => {
                let kept = 1.0 - f64::from(first) / 1000.0;
                let slow = (1.0 - kept * before as f64 / rate.max(1) as f64).max(0.0) * 1000.0;
                f64::from(loss) > (f64::from(first) + slow) / 2.0
            }
        }
    }
}

/// What a [`Probe`] makes of one interval's loss.
enum Verdict {
    /// Within the baseline and the threshold.
    Within,
    /// Above it: back off.
    BackOff,
    /// Above it, but it did not fall when the rate did: it is the new
    /// baseline, and the rate returns to this one.
    Baseline(u64),
}

impl Probe {
    fn new(kind: ProbeKind) -> Probe {
        Probe {
            kind,
            baseline: 0.0,
            episode: None,
            quiet: 0,
            quiet_max: 0,
        }
    }

    fn judge(&mut self, loss: u16, threshold: u16, rate: u64) -> Verdict {
        let k = self.kind;
        if f64::from(loss) <= self.baseline * k.slack + f64::from(threshold) {
            self.quiet += 1;
            self.quiet_max = self.quiet_max.max(loss);
            if self.quiet >= k.window {
                // Reports without excess end an episode (an interval without reports
                // is not judged at all: ending it there too restarted the count at
                // every back-off whose reports came an interval late, and a path
                // losing 5 % at every rate drove the rate down to the floor).
                self.episode = None;
                // Follow the loss shown without excess, at 0.1 a judged interval.
                let follow = (0.1 * f64::from(k.window)).min(1.0);
                self.baseline += (f64::from(self.quiet_max) - self.baseline) * follow;
                self.quiet = 0;
                self.quiet_max = 0;
            }
            return Verdict::Within;
        }
        self.quiet = 0;
        self.quiet_max = 0;
        match self.episode {
            // Rate-independent loss stays near where it was.
            Some((before, first, n)) if k.unchanged(first, before, loss, rate) => {
                if n + 1 >= k.backoffs {
                    self.baseline = f64::from(loss.min(RateController::MAX_BASELINE_PERMILLE));
                    self.episode = None;
                    return Verdict::Baseline(before);
                }
                self.episode = Some((before, first, n + 1));
            }
            // The first back-off, or the loss fell with the rate (congestion):
            // start over from here.
            _ => self.episode = Some((rate, loss, 1)),
        }
        Verdict::BackOff
    }
}

impl RateController {
    /// A controller at `cfg.initial`.
    pub fn new(now: Instant, cfg: RateConfig) -> RateController {
        let rate = cfg.initial.clamp(cfg.floor, cfg.cap.max(cfg.floor));
        RateController {
            cfg,
            rate,
            next_update: now + cfg.interval,
            sum_rate_weighted: 0.0,
            sum_weight: 0.0,
            max_loss: 0,
            max_overload: 0,
            sum_overloaded_rate: 0.0,
            sum_overloaded_weight: 0.0,
            reports: 0,
            path: Probe::new(ProbeKind::PATH),
            overload: Probe::new(ProbeKind::OVERLOAD),
            settle_until: now,
            ceiling: None,
        }
    }

    /// Back-offs in a row that must leave path loss unchanged before it counts
    /// as the path's baseline rather than congestion (overload: one more).
    pub const PROBE_BACKOFFS: u32 = 2;
    /// Update intervals after a rate cut during which loss is not judged:
    /// the receivers' next reports still measure the rate before it.
    pub const SETTLE_INTERVALS: u32 = 3;
    /// Growth per interval near the rate where congestion last set in (far
    /// from it: ×1.25).
    pub const GENTLE_GROWTH: f64 = 1.04;
    /// Highest loss taken as a baseline, permille: more is never taken for a
    /// property of the link or of the receivers' hosts.
    pub const MAX_BASELINE_PERMILLE: u16 = 300;

    /// Path loss (parts per thousand) currently taken as the link's baseline.
    pub fn baseline_loss_permille(&self) -> u16 {
        self.path.baseline as u16
    }

    /// Overload (parts per thousand) currently taken as the receivers'
    /// baseline: what they drop whatever the rate.
    pub fn baseline_overload_permille(&self) -> u16 {
        self.overload.baseline as u16
    }

    /// Current rate, bytes/s.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// When [`RateController::update`] next wants to run.
    pub fn next_update(&self) -> Instant {
        self.next_update
    }

    /// Record one receiver report: `loss_permille` is all it missed,
    /// `overload_permille` the part of that it dropped itself. Receivers that
    /// report loss weigh more, so the slow ones pull the average down.
    pub fn report(&mut self, rx_rate: u64, loss_permille: u16, overload_permille: u16) {
        let overload = overload_permille.min(loss_permille);
        let (path, overload) = if self.cfg.separate_overload {
            (loss_permille - overload, overload)
        } else {
            (loss_permille, 0)
        };
        if rx_rate > 0 {
            let w = 1.0 + f64::from(loss_permille) / 10.0;
            self.sum_rate_weighted += rx_rate as f64 * w;
            self.sum_weight += w;
            if overload > self.cfg.loss_threshold_permille {
                self.sum_overloaded_rate += rx_rate as f64 * w;
                self.sum_overloaded_weight += w;
            }
        }
        self.max_loss = self.max_loss.max(path);
        self.max_overload = self.max_overload.max(overload);
        self.reports += 1;
    }

    /// Back off from the current rate toward 0.9 × `avg` (at most ×0.8, at
    /// least ×0.4), and let the change settle before judging loss again.
    fn back_off(&mut self, now: Instant, avg: u64) {
        let cap = self.cfg.cap.max(self.cfg.floor);
        let backed = (self.rate as f64 * 0.8) as u64;
        // A little below what the receivers took, so queues on the way drain.
        let below = (avg as f64 * 0.9) as u64;
        self.ceiling = Some(self.rate);
        self.rate = backed.min(below.max(backed / 2)).clamp(self.cfg.floor, cap);
        self.settle_until = now + self.cfg.interval * Self::SETTLE_INTERVALS;
    }

    /// Return to `before`, the rate a probe found loss did not depend on.
    fn restore(&mut self, now: Instant, before: u64) {
        self.ceiling = None;
        self.rate = before.clamp(self.cfg.floor, self.cfg.cap.max(self.cfg.floor));
        self.settle_until = now + self.cfg.interval * Self::SETTLE_INTERVALS;
    }

    /// Weighted average receive rate of the receivers in `sum`/`weight` (the
    /// current rate without any).
    fn average(&self, sum: f64, weight: f64) -> u64 {
        if weight > 0.0 {
            (sum / weight) as u64
        } else {
            self.rate
        }
    }

    /// Recompute the rate if the interval elapsed; returns true when it changed.
    ///
    /// After a back-off (or a return from a probe) the controller lets
    /// [`RateController::SETTLE_INTERVALS`] intervals pass before it judges
    /// loss again: receivers measure over their report interval, so the
    /// reports that arrive right after a change still describe the rate
    /// before it (read as "the loss did not fall", that lag made a shared
    /// bottleneck look like a lossy link). Growth slows to
    /// [`RateController::GENTLE_GROWTH`] near the rate at which congestion
    /// last set in, so the sender does not overshoot it by the report delay.
    /// Overload is judged before path loss; a rate change for one kind ends
    /// the other's episode (the rate moved for another reason).
    pub fn update(&mut self, now: Instant) -> bool {
        if now < self.next_update {
            return false;
        }
        self.next_update = now + self.cfg.interval;
        if now < self.settle_until {
            self.reset_interval();
            return false;
        }
        let old = self.rate;
        let threshold = self.cfg.loss_threshold_permille;
        if self.reports > 0 {
            // Overload first: it is the surer sign of sending too fast.
            for overload in [true, false] {
                let (loss, sum, weight) = if overload {
                    let o = self.max_overload;
                    (o, self.sum_overloaded_rate, self.sum_overloaded_weight)
                } else {
                    (self.max_loss, self.sum_rate_weighted, self.sum_weight)
                };
                let kind = if overload { "overload" } else { "path loss" };
                let (probe, other) = if overload {
                    (&mut self.overload, &mut self.path)
                } else {
                    (&mut self.path, &mut self.overload)
                };
                let verdict = probe.judge(loss, threshold, old);
                let baseline = probe.baseline;
                match verdict {
                    Verdict::Within => continue,
                    // The rate moves for this kind: the other's episode is void.
                    Verdict::BackOff => {
                        other.episode = None;
                        let avg = self.average(sum, weight);
                        self.back_off(now, avg);
                        tracing::debug!(
                            from = old,
                            to = self.rate,
                            kind,
                            loss_permille = loss,
                            baseline_permille = baseline,
                            rx_rate = avg,
                            "rate: backing off"
                        );
                    }
                    Verdict::Baseline(before) => {
                        other.episode = None;
                        self.restore(now, before);
                        tracing::debug!(
                            from = old,
                            to = self.rate,
                            kind,
                            baseline_permille = baseline,
                            "rate: loss does not follow the rate, taken as a baseline"
                        );
                    }
                }
                return self.finish(old);
            }
        }
        let growth = match self.ceiling {
            Some(c) if self.rate as f64 >= c as f64 * 1.25 => {
                // Well past where congestion set in: the path changed.
                self.ceiling = None;
                1.25
            }
            Some(c) if self.rate as f64 * 1.25 >= c as f64 * 0.9 => Self::GENTLE_GROWTH,
            _ => 1.25,
        };
        let cap = self.cfg.cap.max(self.cfg.floor);
        self.rate = ((self.rate as f64 * growth) as u64).clamp(self.cfg.floor, cap);
        self.finish(old)
    }

    /// End an interval: its sums start again; true when the rate changed from `old`.
    fn finish(&mut self, old: u64) -> bool {
        self.reset_interval();
        self.rate != old
    }

    fn reset_interval(&mut self) {
        self.sum_rate_weighted = 0.0;
        self.sum_weight = 0.0;
        self.max_loss = 0;
        self.max_overload = 0;
        self.sum_overloaded_rate = 0.0;
        self.sum_overloaded_weight = 0.0;
        self.reports = 0;
    }
}

#[cfg(test)]
mod tests;
