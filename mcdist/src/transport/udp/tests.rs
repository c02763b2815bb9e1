//! Tests of GSO run cutting, GRO splitting, receive-buffer drop counting, the
//! watched-descriptor wake-up and per-socket readiness.

use super::recv::{datagrams_dropped, datagrams_per_buffer, Gro, RawMsg};
use super::send::{gso_group, gso_runs, GsoRun, GSO_MAX_BYTES};
use super::*;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsFd;
use std::os::unix::net::UnixDatagram;
use std::time::Instant;

fn lo_client() -> Option<UdpTransport> {
    lo_client_with(3, 47_001, |_| {})
}

/// A client of group 239.255.77.`host`:`port` on loopback, its settings changed by `tune`
/// (`None`, said why, when this host has no loopback multicast).
fn lo_client_with(host: u8, port: u16, tune: impl FnOnce(&mut UdpConfig)) -> Option<UdpTransport> {
    let mut cfg = UdpConfig::new(SocketAddrV4::new(Ipv4Addr::new(239, 255, 77, host), port));
    cfg.iface = Some("lo".into());
    tune(&mut cfg);
    match UdpTransport::client(&cfg) {
        Ok(t) => Some(t),
        Err(e) => {
            eprintln!("skipping: no loopback multicast socket here: {e}");
            None
        }
    }
}

/// A plain socket on loopback and the address that reaches `t`'s unicast socket.
fn lo_sender(t: &UdpTransport) -> (std::net::UdpSocket, SocketAddr) {
    let to = SocketAddr::from((Ipv4Addr::LOCALHOST, t.local_addr().expect("local").port()));
    let sender = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    (sender, to)
}

fn tx(len: usize, to: u16) -> Transmit {
    Transmit {
        dest: if to == 0 {
            Dest::Group
        } else {
            Dest::Peer(SocketAddr::from((Ipv4Addr::LOCALHOST, to)))
        },
        len,
    }
}

fn runs_of(items: &[Transmit]) -> Vec<(usize, usize, usize)> {
    let group = SocketAddr::from((Ipv4Addr::new(239, 255, 0, 1), 1));
    let mut v = Vec::new();
    gso_runs(
        items,
        |d| match d {
            Dest::Group => group,
            Dest::Peer(p) => p,
        },
        &mut v,
    );
    v.iter().map(|r| (r.first, r.count, r.len)).collect()
}

#[test]
fn gso_runs_split_on_destination_size_and_short_tail() {
    let mut items = vec![tx(1400, 0); 5];
    items.push(tx(700, 0)); // short tail ends the run
    items.push(tx(1400, 0));
    items.push(tx(1400, 9)); // another destination
    items.push(tx(1400, 9));
    items.push(tx(1500, 9)); // longer: a new run
    assert_eq!(
        runs_of(&items),
        vec![(0, 6, 1400), (6, 1, 1400), (7, 2, 1400), (9, 1, 1500)]
    );
    // A run never passes 64 segments nor 64 KiB.
    let many = vec![tx(100, 0); 70];
    assert_eq!(runs_of(&many), vec![(0, 64, 100), (64, 6, 100)]);
    let big = vec![tx(1400, 0); 60];
    let r = runs_of(&big);
    assert_eq!(r[0].1, GSO_MAX_BYTES / 1400);
    assert_eq!(r.iter().map(|x| x.1).sum::<usize>(), 60);
}

#[test]
fn gso_groups_share_one_segment_size() {
    let to = SocketAddr::from((Ipv4Addr::LOCALHOST, 1));
    let run = |count, len| GsoRun {
        first: 0,
        count,
        len,
        to,
    };
    // Lone datagrams no longer than the segment size ride along.
    assert_eq!(
        gso_group(&[run(1, 300), run(4, 1400), run(1, 1400), run(3, 1400)]),
        (4, 1400)
    );
    // A run of another size starts a new group.
    assert_eq!(gso_group(&[run(4, 1400), run(2, 500)]), (1, 1400));
    // A lone datagram longer than the segment size too.
    assert_eq!(gso_group(&[run(2, 500), run(1, 600)]), (1, 500));
    // A lone datagram longer than a later run's size keeps it out.
    assert_eq!(gso_group(&[run(1, 900), run(2, 500)]), (1, 0));
    // Only lone datagrams: no control message.
    assert_eq!(gso_group(&[run(1, 900), run(1, 500)]), (2, 0));
}

#[test]
fn gro_split_cuts_at_the_segment_size() {
    let from = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 5)));
    let mut q = std::collections::VecDeque::new();
    let m = RawMsg {
        len: 1400 * 3 + 200,
        from,
        segment: 1400,
        drops: None,
    };
    assert!(Gro::split(&mut q, 100, &m));
    let got: Vec<(usize, usize)> = q.iter().map(|&(o, l, _)| (o, l)).collect();
    assert_eq!(
        got,
        vec![(100, 1400), (1500, 1400), (2900, 1400), (4300, 200)]
    );
    q.clear();
    let one = RawMsg {
        len: 800,
        from,
        segment: 1400,
        drops: None,
    };
    assert!(!Gro::split(&mut q, 0, &one));
    assert_eq!(q.len(), 1);
}

#[test]
fn watched_descriptor_ends_a_blocking_recv() {
    let Some(mut t) = lo_client() else { return };
    let (a, b) = UnixDatagram::pair().expect("socket pair");
    a.set_nonblocking(true).expect("non-blocking");
    t.watch_readable(a.as_fd()).expect("watch");
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        b.send(b"x").map(|_| b)
    });
    let mut buf = [0u8; 2048];
    let t0 = Instant::now();
    let limit = Duration::from_secs(30);
    let r = t.recv(&mut buf, Some(limit)).expect("recv");
    assert!(r.is_none(), "no datagram was sent");
    assert!(t0.elapsed() < limit, "recv waited for its timeout");
    let _b = writer.join().expect("writer").expect("write");
    let mut one = [0u8; 8];
    assert_eq!(a.recv(&mut one).expect("readable"), 1);
}

#[test]
fn datagrams_still_arrive_with_a_watched_descriptor() {
    let Some(mut t) = lo_client() else { return };
    let (a, _b) = UnixDatagram::pair().expect("socket pair");
    t.watch_readable(a.as_fd()).expect("watch");
    let (s, to) = lo_sender(&t);
    s.send_to(b"page", to).expect("send");
    let mut buf = [0u8; 2048];
    let r = t
        .recv(&mut buf, Some(Duration::from_secs(30)))
        .expect("recv")
        .expect("a datagram");
    assert_eq!(&buf[..r.len], b"page");
}

/// With GRO the kernel counts a dropped buffer as one drop: it stands for as many
/// datagrams as the buffers received with the count held, on average.
#[test]
fn a_dropped_gro_buffer_counts_as_the_datagrams_buffers_hold() {
    let msg = |len, segment| RawMsg {
        len,
        from: None,
        segment,
        drops: None,
    };
    assert_eq!(datagrams_per_buffer(&[]), 1);
    // Without GRO (no segment size) a buffer is one datagram.
    assert_eq!(datagrams_per_buffer(&[msg(1400, 0), msg(900, 0)]), 1);
    // 46 and 10 datagrams of 1400 bytes (the last of a buffer may be shorter).
    let big = msg(46 * 1400, 1400);
    let small = msg(9 * 1400 + 700, 1400);
    assert_eq!(datagrams_per_buffer(&[big, small]), 28);
    // A buffer of one datagram shorter than the segment size.
    assert_eq!(datagrams_per_buffer(&[msg(100, 1400)]), 1);
}

/// A client of group 239.255.77.`host`:`port` whose socket buffer holds a few datagrams.
fn small_buffer_client(host: u8, port: u16, gro: bool) -> Option<UdpTransport> {
    lo_client_with(host, port, |c| {
        c.buffer_bytes = 4096;
        c.gro = gro;
    })
}

/// Takes every datagram `t` holds now; how many.
fn drain(t: &mut UdpTransport) -> u64 {
    let mut buf = vec![0u8; 2048 * 64];
    let mut out = Vec::new();
    let mut taken = 0;
    for _ in 0..100 {
        out.clear();
        match t
            .recv_batch(&mut buf, 2048, &mut out, Some(Duration::ZERO))
            .unwrap()
        {
            0 => break,
            n => taken += n as u64,
        }
    }
    taken
}

/// Waits (up to 100 receives of 50 ms) for the next datagrams `t` takes; how many came
/// in that receive (0: none came).
fn receive_next(t: &mut UdpTransport) -> usize {
    let mut buf = vec![0u8; 2048 * 64];
    let mut out = Vec::new();
    for _ in 0..100 {
        out.clear();
        let n = t
            .recv_batch(&mut buf, 2048, &mut out, Some(Duration::from_millis(50)))
            .unwrap();
        if n > 0 {
            return n;
        }
    }
    0
}

/// A receiver that does not read while datagrams pour in drops some in its
/// full socket buffer; the kernel's count (`SO_RXQ_OVFL`) reaches
/// `rx_dropped` with the next datagram taken, with GRO on or off.
#[test]
fn receive_buffer_drops_are_counted() {
    for gro in [false, true] {
        let Some(mut t) = small_buffer_client(4, 47_011, gro) else {
            return;
        };
        let (sender, to) = lo_sender(&t);
        let payload = [7u8; 1000];
        // Far more than a 4 KiB buffer (the kernel doubles it, and keeps a
        // minimum of a few KiB) holds.
        for _ in 0..200 {
            sender.send_to(&payload, to).unwrap();
        }
        assert_eq!(t.rx_dropped(), 0, "nothing counted before a receive");
        // Drain what the buffer held (those arrived before any drop), then
        // one more datagram brings the count.
        drain(&mut t);
        sender.send_to(&payload, to).unwrap();
        assert!(receive_next(&mut t) > 0, "the last datagram arrives");
        let dropped = t.rx_dropped();
        assert!(
            dropped > 0 && dropped < 200,
            "gro {gro}: {dropped} drops counted"
        );
    }
}

/// The datagrams of the buffers dropped between two received ones are the group
/// sequence numbers between them, within what that many buffers hold; without two
/// numbers of one session, the average of the buffers received.
#[test]
fn dropped_buffers_are_counted_by_the_sequence_numbers_they_took() {
    let s = |seq| Some((9, seq));
    // Three buffers dropped between datagram 10 and datagram 71: 60 datagrams.
    assert_eq!(datagrams_dropped(3, s(10), s(71), 5), 60);
    // Numbers that say fewer than the buffers dropped, or more than they hold.
    assert_eq!(datagrams_dropped(3, s(10), s(12), 5), 3);
    assert_eq!(datagrams_dropped(1, s(10), s(10_000), 5), 128);
    // Another session, numbers that go back, or one unknown: the average.
    assert_eq!(datagrams_dropped(3, Some((8, 10)), s(71), 5), 15);
    assert_eq!(datagrams_dropped(3, s(71), s(10), 5), 15);
    assert_eq!(datagrams_dropped(3, None, s(71), 5), 15);
}

/// A GRO receiver whose buffer overflows while GSO buffers of 20 datagrams pour in
/// counts every datagram those buffers held, though the kernel counts each dropped
/// buffer as one drop and the buffer that brings the count holds one datagram.
#[test]
fn dropped_gro_buffers_count_every_datagram_they_held() {
    use mcdist_proto::wire::{Header, HeaderFlags, Kind};
    use nix::sys::socket::{setsockopt, sockopt::UdpGsoSegment};
    let Some(mut t) = small_buffer_client(6, 47_031, true) else {
        return;
    };
    let (sender, to) = lo_sender(&t);
    const SEG: usize = 1000;
    if let Err(e) = setsockopt(&sender, UdpGsoSegment, &(SEG as i32)) {
        eprintln!("skipping: no UDP GSO here: {e}");
        return;
    }
    // Datagrams numbered from 1, `n` per send: one GSO buffer of `n` segments.
    let mut next = 1u64;
    let mut send = |n: usize| {
        let mut buf = vec![0u8; n * SEG];
        for d in buf.chunks_mut(SEG) {
            let h = Header {
                kind: Kind::Data,
                flags: HeaderFlags::empty(),
                session: 7,
                seq: next,
            };
            h.emit(d).expect("room for a header");
            next += 1;
        }
        sender.send_to(&buf, to).expect("send");
    };
    for _ in 0..30 {
        send(20);
    }
    let received = drain(&mut t);
    assert!(received < 600, "the buffer held everything: {received}");
    send(1);
    assert_eq!(receive_next(&mut t), 1, "the last datagram arrives alone");
    assert_eq!(t.rx_dropped(), 600 - received);
}

/// Readiness is tracked per socket: a socket that a receive found empty is
/// skipped until the poll reports a datagram on it. A datagram that comes
/// after an empty receive is still taken by the next non-blocking receive,
/// in every receive form and with GRO on or off.
#[test]
fn a_socket_found_empty_is_read_again_once_a_datagram_comes() {
    for gro in [false, true] {
        let Some(mut t) = lo_client_with(5, 47_021, |c| c.gro = gro) else {
            return;
        };
        let (sender, to) = lo_sender(&t);
        let mut buf = vec![0u8; 2048 * 4];
        let zero = Some(Duration::ZERO);
        for round in 0..3u8 {
            // Empty: every socket found empty.
            assert!(t.recv(&mut buf, zero).unwrap().is_none());
            sender.send_to(&[round], to).unwrap();
            // Loopback delivers within the send; the next receive must see it.
            let got = match round {
                0 => t
                    .recv(&mut buf, zero)
                    .unwrap()
                    .map(|r| buf[..r.len].to_vec()),
                1 => {
                    let mut out = Vec::new();
                    t.recv_batch(&mut buf, 2048, &mut out, zero).unwrap();
                    out.first().map(|r| buf[..r.len].to_vec())
                }
                _ => {
                    let mut seen = None;
                    t.recv_in_place(&mut buf, 2048, zero, &mut |_, d| seen = Some(d.to_vec()))
                        .unwrap();
                    seen
                }
            };
            assert_eq!(got, Some(vec![round]), "gro {gro}, round {round}");
        }
    }
}

/// `take_watched_ready` says whether a watched descriptor was reported
/// readable since it was last asked: once per edge.
#[test]
fn watched_readiness_is_reported_once_per_edge() {
    let Some(mut t) = lo_client() else { return };
    let (a, b) = UnixDatagram::pair().expect("socket pair");
    a.set_nonblocking(true).expect("non-blocking");
    t.watch_readable(a.as_fd()).expect("watch");
    let mut buf = [0u8; 2048];
    assert!(t.take_watched_ready(), "unknown at first: ready");
    assert!(t.recv(&mut buf, Some(Duration::ZERO)).unwrap().is_none());
    assert!(!t.take_watched_ready(), "nothing happened");
    b.send(b"x").expect("write");
    assert!(t.recv(&mut buf, Some(Duration::ZERO)).unwrap().is_none());
    assert!(t.take_watched_ready(), "the write was reported");
    assert!(!t.take_watched_ready(), "and only once");
    let mut one = [0u8; 8];
    assert_eq!(a.recv(&mut one).expect("readable"), 1);
}
