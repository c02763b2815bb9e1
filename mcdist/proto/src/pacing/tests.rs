//! The token bucket and the rate controller, driven by made-up reports.

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
    c.report(10_000, 300, 0);
    assert!(c.update(t0 + Duration::from_millis(10)));
    assert!(c.rate() < 100_000);
    let low = c.rate();
    // Reports right after the cut still measure the old rate: they are
    // not judged while the change settles.
    for i in 1..RateController::SETTLE_INTERVALS {
        c.report(10_000, 300, 0);
        c.update(t0 + Duration::from_millis(10 + 10 * u64::from(i)));
        assert_eq!(c.rate(), low);
    }
    c.report(50_000, 0, 0);
    c.update(t0 + Duration::from_millis(10 + 10 * u64::from(RateController::SETTLE_INTERVALS)));
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
    // 5 % loss whatever the rate: a lossy link, not congestion. One back-off, a
    // settling pause, and the loss did not fall. Receivers may report less often
    // than the rate is updated (here in one interval of five): the intervals without
    // a report must not end the episode, or every back-off starts a new one.
    for (every, limit) in [(1u32, 1), (5, 2)] {
        let t0 = Instant::now();
        let mut c = RateController::new(t0, cfg_10ms());
        let start = c.rate();
        let mut t = t0;
        let mut cuts = 0;
        for i in 0.. {
            if c.baseline_loss_permille() != 0 || t >= t0 + Duration::from_secs(limit) {
                break;
            }
            t += Duration::from_millis(10);
            if i % every == 0 {
                c.report(c.rate(), 50, 0);
            }
            let before = c.rate();
            c.update(t);
            cuts += u32::from(c.rate() < before);
        }
        assert_eq!(cuts, RateController::PROBE_BACKOFFS - 1, "every {every}");
        assert_eq!(c.baseline_loss_permille(), 50, "every {every}");
        assert_eq!(
            c.rate(),
            start,
            "rate restored once the loss proved rate-independent (every {every})"
        );
        // The same loss no longer slows the sender down; it speeds up again.
        for _ in 0..20 {
            t += Duration::from_millis(10);
            c.report(c.rate(), 50, 0);
            c.update(t);
        }
        assert_eq!(c.rate(), 10_000_000, "every {every}");
    }
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
        c.report(r.min(capacity) as u64, loss, 0);
        c.update(t);
    }
    assert!(
        c.baseline_loss_permille() < cfg_10ms().loss_threshold_permille / 2,
        "congestion is not baseline loss (baseline {})",
        c.baseline_loss_permille()
    );
    assert!(
        c.rate() < 400_000,
        "rate {} stays near the receiver's capacity",
        c.rate()
    );
}

#[test]
fn overload_that_falls_with_the_rate_keeps_backing_off() {
    // A receiver that takes 200 kB/s and drops the rest itself.
    let t0 = Instant::now();
    let mut c = RateController::new(t0, cfg_10ms());
    let capacity = 200_000f64;
    let mut t = t0;
    for _ in 0..200 {
        t += Duration::from_millis(10);
        let r = c.rate() as f64;
        let drop = ((1.0 - capacity / r).max(0.0) * 1000.0) as u16;
        c.report(r.min(capacity) as u64, drop, drop);
        c.update(t);
    }
    assert!(c.baseline_overload_permille() < cfg_10ms().loss_threshold_permille);
    assert!(
        (c.rate() as f64) < 1.3 * capacity,
        "rate {} near the receiver's {capacity}",
        c.rate()
    );
}

#[test]
fn overload_that_does_not_follow_the_rate_becomes_the_baseline() {
    // Receivers descheduled now and then drop 8 % themselves at any rate.
    let t0 = Instant::now();
    let mut c = RateController::new(t0, cfg_10ms());
    let start = c.rate();
    let mut t = t0;
    let mut lowest = start;
    for _ in 0..40 {
        t += Duration::from_millis(10);
        c.report(c.rate() * 92 / 100, 80, 80);
        c.update(t);
        lowest = lowest.min(c.rate());
    }
    assert_eq!(c.baseline_overload_permille(), 80);
    assert_eq!(c.baseline_loss_permille(), 0);
    assert!(lowest < start, "it backed off first ({lowest})");
    assert!(
        c.rate() >= start,
        "and returned ({} against {start})",
        c.rate()
    );
    // More overload than the baseline's is answered again.
    let before = c.rate();
    let mut cut = false;
    for _ in 0..4 {
        t += Duration::from_millis(10);
        c.report(before / 2, 400, 400);
        c.update(t);
        cut |= c.rate() < before;
    }
    assert!(cut, "no back-off for 40 % overload above an 8 % baseline");
}

#[test]
fn path_loss_with_overload_separated_or_not() {
    let t0 = Instant::now();
    for separate in [true, false] {
        let cfg = RateConfig {
            separate_overload: separate,
            ..cfg_10ms()
        };
        let mut c = RateController::new(t0, cfg);
        // 5 % path loss and no overload: the same either way.
        c.report(950_000, 50, 0);
        assert!(c.update(t0 + Duration::from_millis(10)));
        assert!(c.rate() < 1_000_000);
        // Overload reported but not told apart: counted as path loss, and
        // probed like it (rate-independent: becomes the baseline).
        let mut c = RateController::new(t0, cfg);
        let mut t = t0;
        for _ in 0..10 {
            t += Duration::from_millis(10);
            c.report(c.rate(), 50, 50);
            c.update(t);
        }
        assert_eq!(c.baseline_loss_permille() == 50, !separate);
    }
}

#[test]
fn lagging_reports_do_not_make_a_bottleneck_look_like_a_lossy_link() {
    // A shared bottleneck of 200 KB/s; each report measures the rate of
    // two intervals before (the receivers' report interval and the trip).
    let t0 = Instant::now();
    let mut c = RateController::new(t0, cfg_10ms());
    let capacity = 200_000f64;
    let mut history = vec![c.rate(); 2];
    let mut t = t0;
    for _ in 0..200 {
        t += Duration::from_millis(10);
        let r = history[history.len() - 2] as f64;
        let loss = ((1.0 - capacity / r).max(0.0) * 1000.0) as u16;
        c.report(r.min(capacity) as u64, loss, 0);
        c.update(t);
        history.push(c.rate());
    }
    assert!(
        c.baseline_loss_permille() < 10,
        "baseline {}",
        c.baseline_loss_permille()
    );
    let late = &history[100..];
    let mean = late.iter().sum::<u64>() as f64 / late.len() as f64;
    assert!(
        mean < 1.3 * capacity && mean > 0.6 * capacity,
        "mean rate {mean} near the bottleneck's {capacity}"
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
            c.report(r, l, 0);
            c.update(t0 + Duration::from_millis(i as u64 + 1));
            prop_assert!(c.rate() >= 5000 && c.rate() <= 50_000_000);
        }
    }
}
