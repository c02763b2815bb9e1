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
}

impl RateConfig {
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
        }
    }
}

/// Follows receivers: multiplicative increase while no receiver reports loss,
/// back-off toward the weighted average of the receive rates they report when
/// they do. Always within `[floor, cap]`.
///
/// Loss that does not fall when the rate falls is not congestion (a lossy
/// link, a noisy wireless hop): after [`RateController::PROBE_BACKOFFS`]
/// back-offs in a row that left the loss where it was, the controller takes
/// that loss as the link's baseline, returns to the rate it had before, and
/// from then on backs off only on loss above the baseline plus the threshold.
/// The baseline follows the loss measured while there is no congestion, so it
/// falls again when the link gets cleaner.
#[derive(Debug, Clone)]
pub struct RateController {
    cfg: RateConfig,
    rate: u64,
    next_update: Instant,
    sum_rate_weighted: f64,
    sum_weight: f64,
    max_loss: u16,
    reports: u32,
    /// Loss (permille) the link shows whatever the rate.
    baseline_loss: f64,
    /// Current run of back-offs: rate and loss before the first, count.
    episode: Option<(u64, u16, u32)>,
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
            reports: 0,
            baseline_loss: 0.0,
            episode: None,
        }
    }

    /// Back-offs in a row that must leave the loss unchanged before the loss
    /// counts as the link's baseline rather than congestion.
    pub const PROBE_BACKOFFS: u32 = 4;

    /// Loss (parts per thousand) currently taken as the link's baseline.
    pub fn baseline_loss_permille(&self) -> u16 {
        self.baseline_loss as u16
    }

    /// Current rate, bytes/s.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// When [`RateController::update`] next wants to run.
    pub fn next_update(&self) -> Instant {
        self.next_update
    }

    /// Record one receiver report. Receivers that report loss weigh more, so
    /// the slow ones pull the average down.
    pub fn report(&mut self, rx_rate: u64, loss_permille: u16) {
        if rx_rate > 0 {
            let w = 1.0 + f64::from(loss_permille) / 10.0;
            self.sum_rate_weighted += rx_rate as f64 * w;
            self.sum_weight += w;
        }
        self.max_loss = self.max_loss.max(loss_permille);
        self.reports += 1;
    }

    /// Recompute the rate if the interval elapsed; returns true when it changed.
    pub fn update(&mut self, now: Instant) -> bool {
        if now < self.next_update {
            return false;
        }
        self.next_update = now + self.cfg.interval;
        let old = self.rate;
        let cap = self.cfg.cap.max(self.cfg.floor);
        let loss = self.max_loss;
        let congested = self.reports > 0
            && f64::from(loss) > self.baseline_loss + f64::from(self.cfg.loss_threshold_permille);
        if congested {
            match self.episode {
                None => self.episode = Some((self.rate, loss, 1)),
                Some((before, first_loss, n)) => {
                    // Rate-independent loss stays within 15 % of where it was.
                    if u32::from(loss) * 100 >= u32::from(first_loss) * 85 {
                        if n + 1 >= Self::PROBE_BACKOFFS {
                            self.baseline_loss = f64::from(loss);
                            self.episode = None;
                            self.rate = before.clamp(self.cfg.floor, cap);
                            self.reset_interval();
                            return self.rate != old;
                        }
                        self.episode = Some((before, first_loss, n + 1));
                    } else {
                        // The loss fell with the rate: congestion. Start over
                        // from here.
                        self.episode = Some((self.rate, loss, 1));
                    }
                }
            }
            let avg = if self.sum_weight > 0.0 {
                (self.sum_rate_weighted / self.sum_weight) as u64
            } else {
                self.rate
            };
            let backed = (self.rate as f64 * 0.8) as u64;
            self.rate = backed.min(avg.max(backed / 2)).clamp(self.cfg.floor, cap);
        } else {
            self.episode = None;
            if self.reports > 0 {
                // Follow the loss the link shows without congestion.
                self.baseline_loss += (f64::from(loss) - self.baseline_loss) * 0.1;
            }
            if self.reports > 0 || self.sum_weight == 0.0 {
                self.rate = ((self.rate as f64 * 1.25) as u64).clamp(self.cfg.floor, cap);
            }
        }
        self.reset_interval();
        self.rate != old
    }

    fn reset_interval(&mut self) {
        self.sum_rate_weighted = 0.0;
        self.sum_weight = 0.0;
        self.max_loss = 0;
        self.reports = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bucket_paces() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(t0, 1000, 100);
        assert!(b.try_take(t0, 100));
        assert!(!b.try_take(t0, 50));
        let ready = b.ready_at(50);
        let wait = ready - t0;
        assert!(wait >= Duration::from_millis(50) && wait <= Duration::from_micros(50_001));
        assert!(b.try_take(ready, 50));
    }

    #[test]
    fn controller_backs_off_and_recovers() {
        let t0 = Instant::now();
        let cfg = RateConfig {
            floor: 1000,
            cap: 1_000_000,
            initial: 100_000,
            interval: Duration::from_millis(10),
            loss_threshold_permille: 20,
            ..RateConfig::default()
        };
        let mut c = RateController::new(t0, cfg);
        c.report(10_000, 300);
        assert!(c.update(t0 + Duration::from_millis(10)));
        assert!(c.rate() < 100_000);
        let low = c.rate();
        c.report(50_000, 0);
        c.update(t0 + Duration::from_millis(20));
        assert!(c.rate() > low);
    }

    fn cfg_10ms() -> RateConfig {
        RateConfig {
            floor: 1000,
            cap: 10_000_000,
            initial: 1_000_000,
            interval: Duration::from_millis(10),
            loss_threshold_permille: 20,
            ..RateConfig::default()
        }
    }

    #[test]
    fn rate_independent_loss_becomes_the_baseline() {
        let t0 = Instant::now();
        let mut c = RateController::new(t0, cfg_10ms());
        let start = c.rate();
        let mut t = t0;
        // 5 % loss whatever the rate: a lossy link, not congestion.
        for _ in 0..RateController::PROBE_BACKOFFS {
            t += Duration::from_millis(10);
            c.report(c.rate(), 50);
            c.update(t);
        }
        assert_eq!(c.baseline_loss_permille(), 50);
        assert_eq!(
            c.rate(),
            start,
            "rate restored once the loss proved rate-independent"
        );
        // The same loss no longer slows the sender down; it speeds up again.
        for _ in 0..20 {
            t += Duration::from_millis(10);
            c.report(c.rate(), 50);
            c.update(t);
        }
        assert_eq!(c.rate(), 10_000_000);
    }

    #[test]
    fn loss_that_falls_with_the_rate_keeps_backing_off() {
        let t0 = Instant::now();
        let mut c = RateController::new(t0, cfg_10ms());
        let capacity = 200_000f64;
        let mut t = t0;
        for _ in 0..40 {
            t += Duration::from_millis(10);
            // A receiver that takes at most `capacity`: the loss is what exceeds it.
            let r = c.rate() as f64;
            let loss = ((1.0 - capacity / r).max(0.0) * 1000.0) as u16;
            c.report(r.min(capacity) as u64, loss);
            c.update(t);
        }
        assert_eq!(
            c.baseline_loss_permille(),
            0,
            "congestion is not baseline loss"
        );
        assert!(
            c.rate() < 400_000,
            "rate {} stays near the receiver's capacity",
            c.rate()
        );
    }

    proptest! {
        #[test]
        fn bucket_never_exceeds_rate(rate in 1_000u64..10_000_000, burst in 1u64..100_000,
                                     steps in proptest::collection::vec((0u64..5_000, 1u64..20_000), 1..200)) {
            let t0 = Instant::now();
            let mut b = TokenBucket::new(t0, rate, burst);
            let mut t = t0;
            let mut sent = 0u64;
            for (dt_us, n) in steps {
                t += Duration::from_micros(dt_us);
                if b.try_take(t, n) { sent += n; }
            }
            let elapsed = t.duration_since(t0).as_secs_f64();
            // Tokens spent never exceed the initial bucket plus what the rate earned,
            // plus at most one oversized datagram.
            let bound = burst as f64 + elapsed * rate as f64 + 20_000.0;
            prop_assert!((sent as f64) <= bound);
        }

        #[test]
        fn ready_at_is_never_early(rate in 1u64..10_000_000_000, burst in 1u64..1_000_000,
                                   take in 1u64..100_000, n in 1u64..100_000, dt_ns in 0u64..10_000_000) {
            // Regression: ready_at once rounded down, so try_take failed at the
            // instant it named and drivers spun without time advancing.
            let t0 = Instant::now();
            let mut b = TokenBucket::new(t0, rate, burst);
            let _ = b.try_take(t0, take);
            let t1 = t0 + Duration::from_nanos(dt_ns);
            let _ = b.try_take(t1, take);
            let at = b.ready_at(n);
            prop_assert!(b.try_take(at.max(t1), n));
        }

        #[test]
        fn controller_stays_in_bounds(reports in proptest::collection::vec((0u64..1_000_000_000, 0u16..1000), 0..100)) {
            let t0 = Instant::now();
            let cfg = RateConfig { floor: 5000, cap: 50_000_000, initial: 1_000_000, interval: Duration::from_millis(1), loss_threshold_permille: 20, ..RateConfig::default() };
            let mut c = RateController::new(t0, cfg);
            for (i, (r, l)) in reports.into_iter().enumerate() {
                c.report(r, l);
                c.update(t0 + Duration::from_millis(i as u64 + 1));
                prop_assert!(c.rate() >= 5000 && c.rate() <= 50_000_000);
            }
        }
    }
}
