//! What the client measures and reports: receive rate, loss, heartbeats and server liveness.
//!
//! Rule owned here: every heartbeat interval the client measures its receive rate (bytes
//! of valid datagrams per second), its multicast loss (gaps in the group sequence
//! numbers) and the part of that loss that was its own overload (datagrams its socket
//! buffer dropped, counted by the driver from `SO_RXQ_OVFL` and handed in with
//! [`Client::note_socket_drops`]), and tells the server in every request (loss) and in a
//! heartbeat (loss and overload), so the server can slow down for a receiver that cannot
//! keep up without slowing down for loss on the path. A server silent for
//! `give_up_after` while pages are awaited fails the session.

use super::{Client, ClientError, Timer};
use crate::wire::{self, Body};
use crate::Transmit;
use std::time::{Duration, Instant};

/// Silence after which the receive rate is measured afresh: the server had
/// nothing to send (a paced sender's datagrams are microseconds apart).
const RATE_IDLE_GAP: Duration = Duration::from_millis(10);

/// Group datagrams that a loss measurement spans at least: an interval with fewer says
/// little (one lost of the 16 announces before a sweep reads as 6 %), so the loss is
/// measured over as many intervals as it takes and the last measure stands till then
/// ([`wire::LOSS_UNMEASURED`] before the first).
const MIN_LOSS_SAMPLE: u64 = 128;

/// Rate and loss measurement over the current report interval.
pub(super) struct Meter {
    /// When the first report is due (heartbeats start once the session is known).
    pub(super) first_report: Instant,
    interval_start: Instant,
    interval_bytes: u64,
    interval_group_pkts: u64,
    interval_seq_start: Option<u64>,
    max_group_seq: Option<u64>,
    /// Receive rate of the last interval, bytes per second.
    pub(super) rx_rate: u64,
    /// Multicast loss of the last measure, per mille ([`wire::LOSS_UNMEASURED`] before
    /// the first).
    pub(super) loss_permille: u16,
    /// The part of the last interval's loss the receiver dropped itself, per mille.
    pub(super) overload_permille: u16,
    /// Datagrams the socket dropped in this interval.
    interval_drops: u64,
    /// The driver's running count of socket drops, as last handed in.
    drops_total: Option<u64>,
    /// When the server was last heard from.
    pub(super) last_server_packet: Instant,
}

impl Meter {
    pub(super) fn new(now: Instant, heartbeat_interval: Duration) -> Meter {
        Meter {
            first_report: now + heartbeat_interval,
            interval_start: now,
            interval_bytes: 0,
            interval_group_pkts: 0,
            interval_seq_start: None,
            max_group_seq: None,
            rx_rate: 0,
            loss_permille: wire::LOSS_UNMEASURED,
            overload_permille: 0,
            interval_drops: 0,
            drops_total: None,
            last_server_packet: now,
        }
    }

    /// One valid datagram of this session, `len` bytes, sequence number `seq`.
    pub(super) fn datagram(&mut self, now: Instant, len: usize, seq: u64) {
        let idle = now.saturating_duration_since(self.last_server_packet) >= RATE_IDLE_GAP;
        self.last_server_packet = now;
        if self.interval_bytes == 0 || idle {
            // The rate is what the receiver took while data flowed: an interval
            // that began idle (before the sweep started, or while the server
            // had nothing to send), or went idle for a while (the announces of
            // a join, then the sweep), is measured from the first datagram
            // after the silence.
            self.interval_start = now;
            self.interval_bytes = 0;
        }
        self.interval_bytes += len as u64;
        self.sequenced(seq);
    }

    /// A datagram of this session numbered `seq` taken in: a group one counts in the
    /// loss measure and the heard sequence number. Announces count here alone (not in
    /// the rate): they are group datagrams too, and one not counted reads as one lost.
    pub(super) fn sequenced(&mut self, seq: u64) {
        if seq & wire::SEQ_UNICAST_BIT == 0 {
            self.interval_group_pkts += 1;
            if self.interval_seq_start.is_none() {
                self.interval_seq_start = Some(seq.saturating_sub(1));
            }
            self.max_group_seq = Some(self.max_group_seq.map_or(seq, |m| m.max(seq)));
        }
    }

    /// The driver's running count of datagrams its sockets dropped for want of
    /// buffer space is `total`.
    fn socket_drops(&mut self, total: u64) {
        if let Some(prev) = self.drops_total {
            self.interval_drops += total.saturating_sub(prev);
        }
        self.drops_total = Some(total);
    }

    /// The last interval measured lost datagrams on the path (more than the socket
    /// dropped), or none was measured yet.
    pub(super) fn sees_path_loss(&self) -> bool {
        wire::loss_unmeasured(self.loss_permille) || self.loss_permille > self.overload_permille
    }

    /// The highest group sequence number taken in this session (0: none yet): what a
    /// request says it heard, so the server can tell an answer still on its way to us.
    pub(super) fn heard_seq(&self) -> u64 {
        self.max_group_seq.unwrap_or(0)
    }

    /// The server restarted: its sequence numbers start over.
    pub(super) fn server_restarted(&mut self) {
        self.interval_seq_start = None;
        self.max_group_seq = None;
        self.interval_group_pkts = 0;
    }

    /// Close the interval at `now`: measure its rate and loss and start the next one.
    fn report(&mut self, now: Instant) {
        let dt = now
            .saturating_duration_since(self.interval_start)
            .as_secs_f64();
        if dt > 0.0 {
            self.rx_rate = (self.interval_bytes as f64 / dt) as u64;
        }
        let drops = std::mem::take(&mut self.interval_drops);
        let mut expected = 0;
        let mut measured = false;
        if let (Some(start), Some(max)) = (self.interval_seq_start, self.max_group_seq) {
            expected = max.saturating_sub(start);
            if expected >= MIN_LOSS_SAMPLE {
                let got = self.interval_group_pkts.min(expected);
                self.loss_permille = (((expected - got) * 1000) / expected) as u16;
                measured = true;
            }
        }
        // Drops the group sequence numbers cannot see yet (the socket dropped
        // everything after the last datagram taken) still count: they are
        // datagrams the receiver was sent.
        let seen = expected.max(self.interval_group_pkts + drops);
        self.overload_permille = if drops == 0 || seen == 0 {
            0
        } else {
            let own = ((drops.min(seen) * 1000) / seen) as u16;
            self.loss_permille = match self.loss_permille {
                l if wire::loss_unmeasured(l) => own,
                l => l.max(own),
            };
            own
        };
        self.interval_start = now;
        self.interval_bytes = 0;
        if measured || self.interval_seq_start.is_none() {
            self.interval_group_pkts = 0;
            self.interval_seq_start = self.max_group_seq;
        }
    }
}

impl Client {
    /// The transport's running count of datagrams dropped because the receive
    /// socket's buffer was full (`SO_RXQ_OVFL` on Linux) is `total`: the
    /// receiver did not keep up. Drivers call this after each receive turn;
    /// the first call sets the starting point. The drops of each report
    /// interval go to the server as overload, apart from loss on the path.
    pub fn note_socket_drops(&mut self, total: u64) {
        self.meter.socket_drops(total);
    }

    /// Fail the session when the server has been silent too long while pages are awaited.
    /// Returns false when the session failed.
    pub(super) fn check_liveness(&mut self, now: Instant) -> bool {
        let silent = now.saturating_duration_since(self.meter.last_server_packet);
        let waiting = !self.requests.is_empty() || (self.gaps.fetch_all && !self.complete);
        if self.session.info.is_some() && waiting && silent > self.cfg.give_up_after {
            self.fail(ClientError::ServerUnresponsive {
                server: self.cfg.server,
                silent_ms: silent.as_millis() as u64,
                outstanding: self.requests.len(),
            });
            return false;
        }
        true
    }

    /// The liveness timer: armed while the session is known and pages are awaited, at the
    /// moment the server's silence becomes too long.
    pub(super) fn arm_idle_timer(&mut self) {
        let waiting = !self.requests.is_empty() || self.gaps.fetch_all;
        if !self.failed && self.session.info.is_some() && waiting {
            let at =
                self.meter.last_server_packet + self.cfg.give_up_after + Duration::from_millis(1);
            self.timers.set(Timer::Idle, at);
        } else {
            self.timers.stop(Timer::Idle);
        }
    }

    /// Measure the interval when a report is due. The heartbeat itself goes out from
    /// `poll_transmit`, which re-arms the timer.
    pub(super) fn measure(&mut self, now: Instant) {
        let due = if self.session.info.is_some() {
            self.timers.is_expired(Timer::Report, now)
        } else {
            // Before the session is known no report is sent; once the first report was
            // due, the interval restarts at every timeout so the first report covers only
            // the time since.
            now >= self.meter.first_report
        };
        if due {
            self.meter.report(now);
        }
    }

    /// A heartbeat, when one is due (`Some(None)`: due, but `buf` too small).
    pub(super) fn emit_due_heartbeat(
        &mut self,
        now: Instant,
        buf: &mut [u8],
    ) -> Option<Option<Transmit>> {
        if !self.timers.is_expired(Timer::Report, now) {
            return None;
        }
        self.timers
            .set(Timer::Report, now + self.cfg.heartbeat_interval);
        Some(self.heartbeat(wire::HeartbeatFlags::empty(), buf))
    }

    pub(super) fn heartbeat(
        &mut self,
        flags: wire::HeartbeatFlags,
        buf: &mut [u8],
    ) -> Option<Transmit> {
        let seq = self.next_seq();
        let body = Body::Heartbeat(wire::Heartbeat {
            rx_rate: self.meter.rx_rate,
            loss_permille: self.meter.loss_permille,
            overload_permille: self.meter.overload_permille,
            have_pages: self.pages_present(),
            flags,
            token: self.session.token,
        });
        self.to_server(seq, body, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::Meter;
    use std::time::{Duration, Instant};

    #[test]
    fn socket_drops_are_overload_and_part_of_the_loss() {
        let t0 = Instant::now();
        let mut m = Meter::new(t0, Duration::from_millis(100));
        // The starting point: drops before the session.
        m.socket_drops(7);
        // Group datagrams 3..=201 sent (the first one seen is 3): every tenth lost on
        // the path (20), 11, 12, 21, 22 ... 192 dropped by the receiver's own socket
        // (38), the other 141 taken.
        for i in 3..=200u64 {
            if i % 10 > 2 {
                m.datagram(t0, 1000, i);
            }
        }
        m.datagram(t0, 1000, 201);
        m.socket_drops(7 + 38);
        m.report(t0 + Duration::from_millis(100));
        assert_eq!(m.overload_permille, 38 * 1000 / 199);
        assert_eq!(m.loss_permille, 58 * 1000 / 199);
        // The next interval without drops reports none.
        for i in 202..=400 {
            m.datagram(t0, 1000, i);
        }
        m.report(t0 + Duration::from_millis(200));
        assert_eq!(m.overload_permille, 0);
        assert_eq!(m.loss_permille, 0);
    }

    #[test]
    fn loss_is_measured_over_enough_datagrams() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut m = Meter::new(t0, ms(50));
        // 16 announces before the sweep, one lost: too few to say 6 %.
        for i in (1..=17u64).filter(|&i| i != 9) {
            m.datagram(t0, 200, i);
        }
        m.report(t0 + ms(50));
        assert_eq!(m.loss_permille, crate::wire::LOSS_UNMEASURED);
        // The sweep: 150 more, 2 lost. The loss spans both intervals.
        for i in (18..=167u64).filter(|&i| i % 100 != 50) {
            m.datagram(t0 + ms(60), 1000, i);
        }
        m.report(t0 + ms(100));
        assert_eq!(m.loss_permille, (3 * 1000 / 167) as u16);
    }

    /// The rate is measured while data flows: the join's announce before the
    /// sweep and the silence after it do not dilute it.
    #[test]
    fn receive_rate_is_measured_from_the_first_datagram_after_a_silence() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut m = Meter::new(t0, ms(100));
        m.datagram(t0 + ms(1), 200, crate::wire::SEQ_UNICAST_BIT | 1);
        let mut seq = 0;
        // 1,000 bytes every `every` ms from `from` to `to`, then a report at `at`.
        let mut flow = |m: &mut Meter, from: u64, to: u64, every: usize, at: u64| {
            for t in (from..=to).step_by(every) {
                seq += 1;
                m.datagram(t0 + ms(t), 1000, seq);
            }
            m.report(t0 + ms(at));
            m.rx_rate
        };
        // Silence from 1 ms to 40 ms: the rate is that of 40..=100 ms.
        let rate = flow(&mut m, 40, 100, 1, 100);
        assert!((990_000..=1_020_000).contains(&rate), "{rate} B/s");
        // 61 group datagrams: too few to measure the loss.
        assert_eq!(m.loss_permille, crate::wire::LOSS_UNMEASURED);
        // Without a silence, the whole interval counts.
        let rate = flow(&mut m, 101, 200, 2, 201);
        assert!((480_000..=520_000).contains(&rate), "{rate} B/s");
    }
}
