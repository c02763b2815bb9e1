//! Which receivers the server isolates as slow (left out of pacing, repaired by
//! unicast): at most half, a receiver's own overload only while most are not
//! overloaded, path loss only as its loss less its own overload.

use super::tests::{addr, drain, nack_of, server, validate};
use super::Server;
use crate::Dest;
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

#[test]
fn a_slow_receiver_is_repaired_at_a_quarter_of_the_most_it_took_once_its_rate_falls() {
    let t0 = Instant::now();
    let (mut s, t1) = lossy_after_full_rate(t0);
    // Its repairs are paced to 100 MB/s (24,414 pages/s, a quarter second of them at
    // once), not to the 100 kB/s it reported last (256 pages/s, 64 at once).
    let granted: u64 = (0..8).map(|_| s.peers.allow(t1, &addr(1), 1_000)).sum();
    assert_eq!(
        granted,
        24_414 / 4,
        "pages of asks for 1,000 granted at once"
    );
}

#[test]
fn an_isolated_receiver_that_keeps_up_is_repaired_faster_each_interval() {
    let t0 = Instant::now();
    let (mut s, mut t) = lossy_after_full_rate(t0);
    // Isolated: a quarter of the most it took, 100 MB/s.
    let rate = |s: &Server| s.peers.repair_rate(&addr(1)).expect("a receiver");
    assert_eq!(rate(&s), 24_414);
    // Its reports show what it is sent, which says nothing of what it could take:
    // while they show no overload of its own, its repairs go a quarter faster each
    // interval.
    for want in [30_517, 38_146] {
        t += Duration::from_millis(100);
        lossy_again(&mut s, t, 0);
        assert_eq!(rate(&s), want);
    }
    // Overload of its own: back to what it takes, or a quarter of its most.
    t += Duration::from_millis(100);
    lossy_again(&mut s, t, 300);
    assert_eq!(rate(&s), 24_414);
}

/// Three receivers take 400 MB/s without loss; 100 ms later receiver 1 loses a third of
/// what it is sent and reports the little it gets ([`one_lossy`]): isolated then.
fn lossy_after_full_rate(t0: Instant) -> (Server, Instant) {
    let mut s = receivers(t0, 3);
    heartbeats(&mut s, t0, 1..=3, 400_000_000, 0);
    s.feed_rate_reports(t0);
    assert!(!s.is_slow_receiver(addr(1)));
    let t1 = t0 + Duration::from_millis(100);
    one_lossy(&mut s, t1);
    (s, t1)
}

/// Receiver 1 reports taking 100 kB/s and losing 30 % again, `overload` ‰ of it its own,
/// and stays isolated.
fn lossy_again(s: &mut Server, now: Instant, overload: u16) {
    s.note_report(now, addr(1), 100_000, 300, Some(overload));
    heartbeats(s, now, 2..=3, 400_000_000, 0);
    s.feed_rate_reports(now);
    assert!(s.is_slow_receiver(addr(1)));
}

#[test]
fn a_lone_retry_is_answered_while_a_large_nack_is_still_being_paid_for() {
    let t0 = Instant::now();
    let mut s = receivers(t0, 3);
    // Receiver 1 takes little and loses a third: isolated, its asks paced to 256
    // pages/s, 64 at once.
    one_lossy(&mut s, t0);
    // It NACKs 1,000 pages at once: 64 of them are answered now.
    s.handle_datagram(t0, addr(1), &nack(0, 1_000));
    drain(&mut s, t0);
    assert_eq!(s.stats().rate_trimmed, 1);
    assert_eq!(s.stats().rate_limited, 0);
    // Half a second later, a NACK of one page is answered: the large one left the
    // allowance empty, not 936 pages (3.7 s) in debt.
    let t1 = t0 + Duration::from_millis(500);
    s.handle_datagram(t1, addr(1), &nack(3, 1));
    let sent = drain(&mut s, t1);
    assert!(
        sent.iter()
            .any(|&(d, _, p)| d == Dest::Peer(addr(1)) && p.is_some_and(|(pfn, _)| pfn == 3)),
        "page 3 answered to its asker: {sent:?}"
    );
    assert_eq!(s.stats().rate_limited, 0);
}

/// A NACK of `len` pages from `start` by a receiver taking 100 kB/s and losing 30 %.
fn nack(start: u64, len: u32) -> Vec<u8> {
    nack_of(start, len, 100_000, 300)
}

#[test]
fn no_more_than_half_the_receivers_are_isolated() {
    let t0 = Instant::now();
    let mut s = receivers(t0, 3);
    // Receiver 1 loses a third of what it is sent while the others lose nothing.
    one_lossy(&mut s, t0);
    // Later receiver 2 does too, while receiver 1 (isolated, its report no longer
    // recent) and receiver 3 report nothing: alone it would be an outlier, but
    // two of three isolated is the group's trouble, so it stays in pacing.
    let t1 = t0 + Duration::from_secs(3);
    s.note_report(t1, addr(2), 100_000, 300, Some(0));
    s.note_report(t1, addr(3), 400_000_000, 0, Some(0));
    s.feed_rate_reports(t1);
    assert!(s.is_slow_receiver(addr(1)));
    assert!(!s.is_slow_receiver(addr(2)));
    assert_eq!(s.stats().slow_receivers, 1);
    assert_eq!(s.stats().isolation_refused, 1);
}

/// Receiver 1 takes 100 kB/s and loses 30 %, receivers 2 and 3 take 400 MB/s
/// without loss: receiver 1 is isolated.
fn one_lossy(s: &mut Server, now: Instant) {
    s.note_report(now, addr(1), 100_000, 300, Some(0));
    heartbeats(s, now, 2..=3, 400_000_000, 0);
    s.feed_rate_reports(now);
    assert!(s.is_slow_receiver(addr(1)));
}

/// Heartbeats at `now` from the receivers on `ports`, each taking `rx_rate` bytes/s and
/// losing `loss` ‰ on the path, none of it its own overload.
fn heartbeats(s: &mut Server, now: Instant, ports: RangeInclusive<u16>, rx_rate: u64, loss: u16) {
    for port in ports {
        s.note_report(now, addr(port), rx_rate, loss, Some(0));
    }
}

/// [`server`] with receivers on ports 1 to `n` validated, nothing left to send.
fn receivers(t0: Instant, n: u16) -> Server {
    let mut s = server(t0);
    drain(&mut s, t0);
    for port in 1..=n {
        validate(&mut s, t0, addr(port));
    }
    s
}

#[test]
fn overload_that_a_quarter_of_the_group_shares_isolates_no_one_for_path_loss() {
    let t0 = Instant::now();
    let mut s = receivers(t0, 8);
    // Receivers 1 to 3 drop 6 % themselves (descheduled on shared cores, say) and
    // lose 0.4 % on the path; receiver 4 loses 10 % on the path; the rest nothing.
    for port in 1..=3 {
        s.note_report(t0, addr(port), 100_000_000, 64, Some(60));
    }
    s.note_report(t0, addr(4), 100_000_000, 100, Some(0));
    heartbeats(&mut s, t0, 5..=8, 100_000_000, 0);
    s.feed_rate_reports(t0);
    // Three of eight overloaded is the group's trouble, for the rate controller: their
    // loss is overload, not path loss, so none of them stands out on the path either.
    for port in 1..=3 {
        assert!(!s.is_slow_receiver(addr(port)), "receiver {port}");
    }
    // Path loss far above the median's still does, in two reports in a row (one may
    // be a burst).
    assert!(!s.is_slow_receiver(addr(4)));
    let t1 = t0 + Duration::from_millis(50);
    s.note_report(t1, addr(4), 100_000_000, 100, Some(0));
    s.feed_rate_reports(t1);
    assert!(s.is_slow_receiver(addr(4)));
    assert_eq!(s.stats().slow_receivers, 1);
}

/// A receiver's own overload, below heavy loss, isolates it when two reports in a row
/// show it (one may be a burst: the host did not run for a few milliseconds);
/// heavy overload at once.
#[test]
fn own_overload_isolates_in_two_reports_in_a_row_or_heavy_in_one() {
    let t0 = Instant::now();
    let mut s = receivers(t0, 8);
    let ms = |n| t0 + Duration::from_millis(n);
    s.note_report(t0, addr(1), 50_000_000, 100, Some(100));
    heartbeats(&mut s, t0, 2..=8, 100_000_000, 0);
    s.feed_rate_reports(t0);
    assert!(!s.is_slow_receiver(addr(1)), "one report of overload");
    s.note_report(ms(100), addr(1), 100_000_000, 0, Some(0));
    s.feed_rate_reports(ms(100));
    s.note_report(ms(200), addr(1), 50_000_000, 100, Some(100));
    s.feed_rate_reports(ms(200));
    assert!(!s.is_slow_receiver(addr(1)), "overload in reports apart");
    s.note_report(ms(300), addr(1), 50_000_000, 100, Some(100));
    s.feed_rate_reports(ms(300));
    assert!(s.is_slow_receiver(addr(1)), "two reports in a row");
    s.note_report(ms(300), addr(2), 20_000_000, 300, Some(300));
    s.feed_rate_reports(ms(300));
    assert!(s.is_slow_receiver(addr(2)), "heavy overload in one report");
}

#[test]
fn path_loss_that_stands_out_once_isolates_no_one() {
    let t0 = Instant::now();
    let mut s = receivers(t0, 4);
    // Receiver 1 loses 6 % in one interval (a burst), then 1 % like the others.
    s.note_report(t0, addr(1), 50_000_000, 60, Some(0));
    heartbeats(&mut s, t0, 2..=4, 100_000_000, 10);
    s.feed_rate_reports(t0);
    let t1 = t0 + Duration::from_millis(50);
    heartbeats(&mut s, t1, 1..=4, 100_000_000, 10);
    s.feed_rate_reports(t1);
    // And once more later: two reports that stand out, but not in a row.
    let t2 = t1 + Duration::from_millis(50);
    s.note_report(t2, addr(1), 50_000_000, 60, Some(0));
    heartbeats(&mut s, t2, 2..=4, 100_000_000, 10);
    s.feed_rate_reports(t2);
    assert!(!s.is_slow_receiver(addr(1)));
    assert_eq!(s.stats().slow_receivers, 0);
}

#[test]
fn the_first_receivers_to_report_path_loss_are_judged_against_reports_not_silence() {
    let t0 = Instant::now();
    let mut s = receivers(t0, 8);
    // Every path loses 5 %; the first three receivers to NACK report it while the
    // other five have not measured theirs yet (too few datagrams before the sweep
    // reached them): they do not count as reporting none.
    for port in 1..=3 {
        s.note_report(t0, addr(port), 50_000_000, 50, None);
    }
    for port in 4..=8 {
        s.note_report(
            t0,
            addr(port),
            1_000_000,
            crate::wire::LOSS_UNMEASURED,
            Some(0),
        );
    }
    s.feed_rate_reports(t0);
    let t05 = t0 + Duration::from_millis(50);
    for port in 1..=3 {
        s.note_report(t05, addr(port), 50_000_000, 50, None);
    }
    s.feed_rate_reports(t05);
    for port in 1..=3 {
        assert!(!s.is_slow_receiver(addr(port)), "receiver {port}");
    }
    // Once more than half reported, path loss far above the median's stands out.
    let t1 = t0 + Duration::from_millis(100);
    s.note_report(t1, addr(1), 50_000_000, 300, Some(0));
    heartbeats(&mut s, t1, 2..=5, 100_000_000, 0);
    s.feed_rate_reports(t1);
    assert!(s.is_slow_receiver(addr(1)));
    assert_eq!(s.stats().slow_receivers, 1);
}

#[test]
fn a_loss_not_measured_yet_neither_slows_the_group_nor_isolates() {
    let t0 = Instant::now();
    let mut s = receivers(t0, 3);
    let start = s.rate.rate();
    // Heartbeats before the sweep reached them: no loss measured yet.
    for n in 1..=4u32 {
        let t = t0 + Duration::from_millis(50) * n;
        for port in 1..=3 {
            s.note_report(t, addr(port), 10_000, crate::wire::LOSS_UNMEASURED, Some(0));
        }
        s.rate.update(t);
        s.feed_rate_reports(t);
    }
    assert!(s.rate.rate() >= start, "{} < {start}", s.rate.rate());
    assert_eq!(s.stats().slow_receivers, 0);
}
