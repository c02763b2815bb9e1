//! The server's request policies and its timer table, driven through the public API.

use super::{Server, ServerConfig, ServerEvent};
use crate::source::MemSource;
use crate::wire::{
    encode_ranges, ranges_from_encoded, Body, Data, DataFlags, HeaderFlags, Heartbeat, Join, Kind,
    Leave, Message, PageRange, Request, RequestFlags, Token,
};
use crate::Dest;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(super) const SESSION: u64 = 7;

/// One datagram sent: destination, kind, and for data its page and flags.
pub(super) type Sent = (Dest, Kind, Option<(u64, DataFlags)>);

/// Eight pages; page 5 is all zero.
pub(super) fn server(t0: Instant) -> Server {
    server_with(t0, ServerConfig::default().max_datagram)
}

/// [`server`] sending datagrams of at most `max_datagram` bytes.
fn server_with(t0: Instant, max_datagram: usize) -> Server {
    server_from(
        t0,
        ServerConfig {
            max_datagram,
            ..ServerConfig::default()
        },
    )
}

/// [`server`]'s image served with `cfg` (session [`SESSION`], no neighbour push).
pub(super) fn server_from(t0: Instant, cfg: ServerConfig) -> Server {
    let mut img: Vec<u8> = (0..8 * 4096).map(|i| (i % 251 + 1) as u8).collect();
    img[5 * 4096..6 * 4096].fill(0);
    let cfg = ServerConfig {
        session_id: Some(SESSION),
        push_neighbors: false,
        ..cfg
    };
    let source = Arc::new(MemSource::new(img, 4096));
    let info = crate::source::scan(source.as_ref()).expect("an in-memory image scans");
    Server::with_info(cfg, source, info, t0).unwrap()
}

pub(super) fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A NACK of `len` pages from `start`, reporting `rx_rate` and `loss_permille`.
pub(super) fn nack_of(start: u64, len: u32, rx_rate: u64, loss_permille: u16) -> Vec<u8> {
    let mut raw = Vec::new();
    encode_ranges(&[PageRange { start, len }], &mut raw);
    datagram(Body::Nack(Request {
        rx_rate,
        loss_permille,
        flags: RequestFlags::empty(),
        heard_seq: u64::MAX,
        ranges: ranges_from_encoded(&raw),
    }))
}

/// A request (or NACK) for one page from a receiver that took in every group datagram
/// sent so far.
pub(super) fn ask(kind: Kind, flags: RequestFlags, pfn: u64) -> Vec<u8> {
    ask_heard(kind, flags, pfn, u64::MAX)
}

/// A request (or NACK) for one page from a receiver that took in group datagrams up to
/// number `heard_seq`.
fn ask_heard(kind: Kind, flags: RequestFlags, pfn: u64, heard_seq: u64) -> Vec<u8> {
    let mut raw = Vec::new();
    encode_ranges(&[PageRange { start: pfn, len: 1 }], &mut raw);
    let q = Request {
        rx_rate: 0,
        loss_permille: 0,
        flags,
        heard_seq,
        ranges: ranges_from_encoded(&raw),
    };
    let m = Message {
        session: SESSION,
        seq: 1,
        flags: HeaderFlags::empty(),
        body: if kind == Kind::Nack {
            Body::Nack(q)
        } else {
            Body::Request(q)
        },
    };
    let mut buf = vec![0u8; m.buffer_len()];
    m.emit(&mut buf).unwrap();
    buf
}

/// Every datagram the server sends at `now`.
pub(super) fn drain(s: &mut Server, now: Instant) -> Vec<Sent> {
    drain_numbered(s, now).into_iter().map(|(d, _)| d).collect()
}

/// Every datagram the server sends at `now`, each with its header's sequence number.
fn drain_numbered(s: &mut Server, now: Instant) -> Vec<(Sent, u64)> {
    let mut buf = vec![0u8; 65_536];
    let mut out = Vec::new();
    for _ in 0..1000 {
        let Some(t) = s.poll_transmit(now, &mut buf) else {
            return out;
        };
        let m = Message::parse(&buf[..t.len]).unwrap();
        let data = match m.body {
            Body::Data(d) => Some((d.pfn, d.flags)),
            _ => None,
        };
        out.push(((t.dest, m.body.kind(), data), m.seq));
    }
    panic!("the server never ran out of datagrams");
}

/// A datagram with `body` of this session.
pub(super) fn datagram(body: Body<'_>) -> Vec<u8> {
    let m = Message {
        session: SESSION,
        seq: 1,
        flags: HeaderFlags::empty(),
        body,
    };
    let mut buf = vec![0u8; m.buffer_len()];
    let n = m.emit(&mut buf).unwrap();
    buf.truncate(n);
    buf
}

pub(super) fn join(token: Token) -> Vec<u8> {
    datagram(Body::Join(Join {
        flags: Join::WANT_ZERO_MAP,
        token,
    }))
}

/// Join from `from`, read the token of the announce reply, echo it: `from` is validated.
pub(super) fn validate(s: &mut Server, now: Instant, from: SocketAddr) -> Token {
    let token = token_for(s, now, from);
    s.handle_datagram(now, from, &join(token));
    drain(s, now);
    assert!(s.peers.contains(&from), "{from} validated");
    token
}

/// The token a join from `from` gets (everything else sent meanwhile is dropped).
pub(super) fn token_for(s: &mut Server, now: Instant, from: SocketAddr) -> Token {
    s.handle_datagram(now, from, &join([0; 16]));
    let mut buf = vec![0u8; 65_536];
    let mut token = None;
    while let Some(t) = s.poll_transmit(now, &mut buf) {
        if let (Dest::Peer(p), Ok(m)) = (t.dest, Message::parse(&buf[..t.len])) {
            if let (true, Body::Announce(a)) = (p == from, m.body) {
                token = Some(a.token);
            }
        }
    }
    token.expect("an announce with a token")
}

pub(super) fn data(sent: &[Sent]) -> Vec<(Dest, u64, DataFlags)> {
    sent.iter()
        .filter_map(|&(d, _, p)| p.map(|(pfn, f)| (d, pfn, f)))
        .collect()
}

#[test]
fn closed_server_reports_no_timeout_once_its_end_is_sent() {
    let t0 = Instant::now();
    let mut s = server(t0);
    assert!(s.poll_timeout().is_some());
    drain(&mut s, t0);
    // Idle but open: the announce and housekeeping timers stay armed.
    assert!(s.poll_timeout().is_some_and(|t| t > t0));
    s.close();
    assert_eq!(
        s.poll_timeout(),
        Some(t0),
        "the end messages are due at once"
    );
    let sent = drain(&mut s, t0 + Duration::from_secs(1));
    let kinds: Vec<Kind> = sent.iter().map(|x| x.1).collect();
    assert_eq!(kinds, vec![Kind::End; 3]);
    assert_eq!(s.poll_timeout(), None);
}

/// [`server`] with two validated receivers, `addr(1)` and `sibling`, after `addr(1)` asked
/// for page 2 (nothing sent yet).
fn page_2_asked(t0: Instant, sibling: SocketAddr) -> Server {
    let mut s = server(t0);
    drain(&mut s, t0);
    validate(&mut s, t0, addr(1));
    validate(&mut s, t0, sibling);
    s.handle_datagram(t0, addr(1), &ask(Kind::Request, RequestFlags::empty(), 2));
    s
}

#[test]
fn lockstep_window_suppresses_a_second_ask_then_lets_it_through() {
    let t0 = Instant::now();
    let mut s = page_2_asked(t0, addr(2));
    let first = data(&drain(&mut s, t0));
    // The hash page above it (page 8: the eight data pages have one) goes first.
    assert_eq!(
        first,
        vec![
            (Dest::Group, 8, Data::DEMAND),
            (Dest::Group, 2, Data::DEMAND)
        ]
    );
    // A sibling faulting on the same page a moment later gets the multicast already sent.
    s.handle_datagram(t0, addr(2), &ask(Kind::Request, RequestFlags::empty(), 2));
    assert!(data(&drain(&mut s, t0)).is_empty());
    assert_eq!(s.stats().suppressed_lockstep, 1);
    let later = t0 + ServerConfig::default().lockstep_window;
    s.handle_datagram(
        later,
        addr(2),
        &ask(Kind::Request, RequestFlags::empty(), 2),
    );
    assert_eq!(
        data(&drain(&mut s, later)),
        vec![(Dest::Group, 2, Data::DEMAND)]
    );
}

#[test]
fn a_nack_from_a_receiver_that_joined_after_the_answer_went_out_is_answered() {
    let t0 = Instant::now();
    let mut s = page_2_asked(t0, addr(3));
    assert!(data(&drain(&mut s, t0)).contains(&(Dest::Group, 2, Data::DEMAND)));
    // Within the lockstep window: a receiver that was there when the answer went
    // out has it in flight ...
    let t1 = t0 + Duration::from_millis(1);
    assert!(t1 - t0 < ServerConfig::default().lockstep_window);
    s.handle_datagram(t1, addr(3), &ask(Kind::Nack, RequestFlags::empty(), 2));
    assert!(data(&drain(&mut s, t1)).is_empty());
    assert_eq!(s.stats().suppressed_lockstep, 1);
    // ... one that joined after it went out does not: its NACK is answered.
    validate(&mut s, t1, addr(2));
    s.handle_datagram(t1, addr(2), &ask(Kind::Nack, RequestFlags::empty(), 2));
    assert_eq!(
        data(&drain(&mut s, t1)),
        vec![(Dest::Group, 2, Data::REPAIR)]
    );
    assert_eq!(s.stats().suppressed_lockstep, 1);
}

#[test]
fn an_ask_sent_before_its_answer_arrived_is_suppressed_however_late_it_comes() {
    /// Every data datagram sent at `now`, and the group sequence number of page 2's.
    fn sent(s: &mut Server, now: Instant) -> (Vec<(Dest, u64, DataFlags)>, Option<u64>) {
        let out = drain_numbered(s, now);
        let at = out.iter().rev().find(|(d, _)| matches!(d.2, Some((2, _))));
        let at = at.map(|&(_, seq)| seq);
        let sent: Vec<Sent> = out.into_iter().map(|(d, _)| d).collect();
        (data(&sent), at)
    }
    let t0 = Instant::now();
    let mut s = page_2_asked(t0, addr(2));
    let at = sent(&mut s, t0).1.expect("page 2 was multicast");
    let cfg = ServerConfig::default();
    let late = t0 + cfg.lockstep_window * 4;
    assert!(late < t0 + cfg.announce_interval);
    // A sibling's ask arrives past the lockstep window, but it had taken in only the
    // group datagrams before the answer: the answer is on its way to it.
    let before = ask_heard(Kind::Request, RequestFlags::empty(), 2, at - 1);
    s.handle_datagram(late, addr(2), &before);
    assert!(sent(&mut s, late).0.is_empty());
    assert_eq!(s.stats().suppressed_in_flight, 1);
    assert_eq!(s.stats().suppressed_lockstep, 0);
    // Asked again (its retransmission timer ran out) with nothing sent to the group
    // since the answer, the page may as well be lost: it goes out again.
    let retry = ask_heard(Kind::Request, RequestFlags::RETRY, 2, at - 1);
    s.handle_datagram(late, addr(2), &retry);
    let (pages, again) = sent(&mut s, late);
    assert_eq!(pages, vec![(Dest::Group, 2, Data::REPAIR)]);
    let again = again.expect("page 2 was multicast again");
    assert!(again > at);
    // Once the group was sent more (page 3) that the asker has not taken in either, it
    // lags behind the group: its retry's answer is on its way.
    s.handle_datagram(late, addr(1), &ask(Kind::Request, RequestFlags::empty(), 3));
    assert_eq!(sent(&mut s, late).0, vec![(Dest::Group, 3, Data::DEMAND)]);
    let lagging = ask_heard(Kind::Request, RequestFlags::RETRY, 2, again - 1);
    s.handle_datagram(late + cfg.lockstep_window, addr(2), &lagging);
    assert!(sent(&mut s, late + cfg.lockstep_window).0.is_empty());
    assert_eq!(s.stats().suppressed_in_flight, 2);
    // One that had taken in the answer's datagram lost the page: past the lockstep
    // window, it goes out again.
    let later = late + cfg.lockstep_window;
    let past = ask_heard(Kind::Request, RequestFlags::empty(), 2, again);
    s.handle_datagram(later, addr(2), &past);
    assert_eq!(sent(&mut s, later).0, vec![(Dest::Group, 2, Data::DEMAND)]);
    // An asker that heard nothing for an announce interval after the answer is taken
    // to have lost it.
    let idle = later + cfg.announce_interval;
    s.handle_datagram(idle, addr(1), &before);
    assert_eq!(sent(&mut s, idle).0, vec![(Dest::Group, 2, Data::DEMAND)]);
    assert_eq!(s.stats().suppressed_in_flight, 2);
}

#[test]
fn zero_pages_are_answered_to_the_asker_alone() {
    let t0 = Instant::now();
    let mut s = server(t0);
    drain(&mut s, t0);
    validate(&mut s, t0, addr(1));
    s.handle_datagram(t0, addr(1), &ask(Kind::Request, RequestFlags::empty(), 5));
    assert_eq!(
        data(&drain(&mut s, t0)),
        vec![(Dest::Peer(addr(1)), 5, Data::ZERO)]
    );
    assert_eq!(s.stats().zero_replies, 1);
    assert_eq!(s.stats().pages_sent, 0);
}

#[test]
fn in_the_end_game_a_reask_goes_unicast_and_a_first_nack_to_the_group() {
    let t0 = Instant::now();
    let mut s = server(t0);
    drain(&mut s, t0);
    let c = addr(1);
    validate(&mut s, t0, c);
    // Before the end game, a re-ask is multicast: siblings likely lost it too.
    s.handle_datagram(t0, c, &ask(Kind::Request, RequestFlags::empty(), 0));
    drain(&mut s, t0);
    let t1 = t0 + Duration::from_millis(10);
    s.handle_datagram(t1, c, &ask(Kind::Request, Request::RETRY, 0));
    assert_eq!(
        data(&drain(&mut s, t1)),
        vec![(Dest::Group, 0, Data::REPAIR)]
    );
    // Every non-zero page sent once: the end game.
    for pfn in [1, 2, 3, 4, 6, 7] {
        s.handle_datagram(t1, c, &ask(Kind::Request, RequestFlags::empty(), pfn));
    }
    drain(&mut s, t1);
    let t2 = t1 + Duration::from_millis(10);
    s.handle_datagram(t2, c, &ask(Kind::Request, Request::RETRY, 3));
    s.handle_datagram(t2, c, &ask(Kind::Nack, RequestFlags::empty(), 4));
    let mut got = data(&drain(&mut s, t2));
    got.sort_by_key(|x| x.1);
    assert_eq!(
        got,
        vec![
            // A re-ask in the end game is answered twice: its first answer
            // was lost already.
            (Dest::Peer(c), 3, Data::REPAIR),
            (Dest::Peer(c), 3, Data::REPAIR),
            (Dest::Group, 4, Data::REPAIR)
        ]
    );
}

#[test]
fn an_unvalidated_address_gets_at_most_three_times_what_it_sent() {
    let t0 = Instant::now();
    let mut s = server(t0);
    drain(&mut s, t0);
    let stranger = addr(9);
    let mut buf = vec![0u8; 65_536];
    let mut sent_in = 0;
    let mut got = 0;
    let attacks = [
        join([0; 16]),
        join([7; 16]),
        ask(Kind::Request, RequestFlags::empty(), 2),
        ask(Kind::Request, Request::RETRY, 3),
        ask(Kind::Nack, RequestFlags::empty(), 4),
        ask(Kind::Request, RequestFlags::empty(), 5),
        datagram(Body::Heartbeat(Heartbeat {
            rx_rate: 1,
            loss_permille: 0,
            overload_permille: 0,
            have_pages: 8,
            flags: Heartbeat::COMPLETE,
            token: [1; 16],
        })),
    ];
    for d in &attacks {
        sent_in += d.len();
        s.handle_datagram(t0, stranger, d);
        while let Some(t) = s.poll_transmit(t0, &mut buf) {
            assert_eq!(t.dest, Dest::Peer(stranger), "nothing goes to the group");
            got += t.len;
        }
    }
    assert!(got > 0, "the join is answered");
    assert!(got <= 3 * sent_in, "{got} bytes out for {sent_in} in");
    assert_eq!(s.client_count(), 0, "no stranger in the receiver table");
    assert_eq!(s.completed_clients(), 0);
    // A join shorter than a third of the reply gets nothing.
    let short = &join([0; 16])[..50];
    s.handle_datagram(t0, stranger, short);
    assert!(s.poll_transmit(t0, &mut buf).is_none());
    // The token of one address does not validate another, nor another instance.
    let token = validate(&mut s, t0, addr(1));
    s.handle_datagram(t0, addr(2), &join(token));
    assert!(!s.peers.contains(&addr(2)));
    let mut fresh = server(t0);
    fresh.handle_datagram(t0, addr(1), &join(token));
    assert_eq!(fresh.client_count(), 0, "a replayed join validates nothing");
}

#[test]
fn control_is_paced_and_its_queue_bounded() {
    let t0 = Instant::now();
    let mut s = server(t0);
    drain(&mut s, t0);
    let mut buf = vec![0u8; 65_536];
    let mut bytes = 0;
    for round in 0..8u16 {
        for port in 0..5_000u16 {
            s.handle_datagram(t0, addr(round * 5_000 + port), &join([0; 16]));
        }
        assert!(s.out.control.len() <= super::validate::Validator::queue_limit(1));
        while let Some(t) = s.poll_transmit(t0, &mut buf) {
            bytes += t.len as u64;
        }
    }
    assert!(s.stats().queue_full > 0);
    let burst = s.control_bucket.burst();
    assert!(
        bytes <= burst,
        "{bytes} control bytes at one instant, burst {burst}"
    );
    assert!(!s.out.control.is_empty(), "the rest waits for the bucket");
    assert!(s.poll_timeout().is_some_and(|t| t > t0));
}

#[test]
fn every_fragment_of_a_page_goes_out_in_a_datagram_of_one_length() {
    let t0 = Instant::now();
    // An Ethernet MTU's datagram.
    let mut s = server_with(t0, 1472);
    drain(&mut s, t0);
    validate(&mut s, t0, addr(1));
    for pfn in [1, 2] {
        s.handle_datagram(t0, addr(1), &ask(Kind::Request, RequestFlags::empty(), pfn));
    }
    let mut buf = vec![0u8; 65_536];
    let mut lens = Vec::new();
    let mut r = crate::reassembly::Reassembler::new(4096, 4);
    let mut pages = Vec::new();
    while let Some(t) = s.poll_transmit(t0, &mut buf) {
        if let Ok(Message {
            body: Body::Data(d),
            ..
        }) = Message::parse(&buf[..t.len])
        {
            assert!(d.frag_count > 1, "{d:?}");
            lens.push(t.len);
            if let Some(page) = r
                .insert(d.pfn, d.frag_index, d.frag_count, d.payload)
                .unwrap()
            {
                pages.push((d.pfn, page));
            }
        }
    }
    // The hash page above them, then the two pages, each in 3 fragments: 4096 = 1366 +
    // 1366 + 1364, the last padded to 1366.
    assert_eq!(lens.len(), 9, "{lens:?}");
    assert!(lens.iter().all(|&l| l == lens[0]), "{lens:?}");
    let img: Vec<u8> = (0..8 * 4096).map(|i| (i % 251 + 1) as u8).collect();
    assert_eq!(pages.iter().map(|p| p.0).collect::<Vec<_>>(), [8, 1, 2]);
    for (pfn, page) in pages.into_iter().skip(1) {
        let at = pfn as usize * 4096;
        assert_eq!(&page[..], &img[at..at + 4096], "page {pfn}");
    }
}

/// Validates `from` and returns the pages of each working-set hint it was sent.
fn hints_on_joining(s: &mut Server, now: Instant, from: SocketAddr) -> Vec<Vec<u64>> {
    let token = token_for(s, now, from);
    s.handle_datagram(now, from, &join(token));
    let mut buf = vec![0u8; 65_536];
    let mut hints = Vec::new();
    while let Some(t) = s.poll_transmit(now, &mut buf) {
        if let Body::Hint(q) = Message::parse(&buf[..t.len]).unwrap().body {
            assert_eq!(
                t.dest,
                Dest::Peer(from),
                "a hint goes to its receiver alone"
            );
            hints.push(q.ranges.iter().flat_map(|r| r.start..r.end()).collect());
        }
    }
    hints
}

#[test]
fn a_receiver_of_a_later_generation_is_hinted_the_recorded_set_in_page_order() {
    for hints_on in [true, false] {
        let t0 = Instant::now();
        let mut s = server(t0);
        s.cfg.working_set_hints = hints_on;
        assert!(hints_on_joining(&mut s, t0, addr(1000)).is_empty());
        for p in [6, 2, 3, 5] {
            s.handle_datagram(
                t0,
                addr(1000),
                &ask(Kind::Request, RequestFlags::empty(), p),
            );
        }
        drain(&mut s, t0);
        // A late joiner of the recording generation: no hint.
        let t1 = t0 + Duration::from_millis(10);
        assert!(hints_on_joining(&mut s, t1, addr(1001)).is_empty());
        // A later generation: the recorded pages (zero page 5 was never recorded), in page
        // order, once per receiver.
        let t2 = t0 + Duration::from_secs(1);
        let want: Vec<Vec<u64>> = if hints_on {
            vec![vec![2, 3, 6]]
        } else {
            vec![]
        };
        assert_eq!(hints_on_joining(&mut s, t2, addr(1002)), want);
        assert_eq!(hints_on_joining(&mut s, t2, addr(1003)), want);
        assert!(hints_on_joining(&mut s, t2, addr(1002)).is_empty(), "once");
        assert_eq!(s.stats().hint_datagrams, want.len() as u64 * 2);
        assert_eq!(s.stats().hint_pages, if hints_on { 6 } else { 0 });
    }
}

/// A clone's first request can go out before its address is validated (dropped) and
/// come again as a re-ask: a page never sent is still a first ask and is recorded; a
/// re-ask of a page that was sent is not.
#[test]
fn a_reask_of_a_page_never_sent_is_recorded_in_the_working_set() {
    let t0 = Instant::now();
    let mut s = server(t0);
    let a = addr(1100);
    s.handle_datagram(t0, a, &ask(Kind::Request, RequestFlags::empty(), 3));
    assert!(s.working_set().is_empty(), "an unvalidated ask is dropped");
    validate(&mut s, t0, a);
    s.handle_datagram(t0, a, &ask(Kind::Request, Request::RETRY, 3));
    drain(&mut s, t0);
    assert_eq!(s.working_set().order(), &[3]);
    s.handle_datagram(t0, a, &ask(Kind::Request, RequestFlags::empty(), 4));
    drain(&mut s, t0);
    s.handle_datagram(t0, a, &ask(Kind::Request, Request::RETRY, 6));
    s.handle_datagram(t0, a, &ask(Kind::Nack, RequestFlags::empty(), 7));
    drain(&mut s, t0);
    // 6 was never sent (recorded), 7 came in a NACK (not a fault).
    assert_eq!(s.working_set().order(), &[3, 4, 6]);
    // Re-asks of pages already sent leave the order as it is.
    s.handle_datagram(t0, a, &ask(Kind::Request, Request::RETRY, 4));
    drain(&mut s, t0);
    assert_eq!(s.working_set().order(), &[3, 4, 6]);
}

/// A receiver silent for `client_timeout` is forgotten; only one that had not completed
/// times out (`mcdist serve` printed "timed out" for receivers that had finished).
#[test]
fn only_a_receiver_that_had_not_completed_times_out() {
    let t0 = Instant::now();
    let mut s = server(t0);
    let done = validate(&mut s, t0, addr(1));
    validate(&mut s, t0, addr(2));
    let leave = Body::Leave(Leave {
        reason: 0,
        token: done,
    });
    s.handle_datagram(t0, addr(1), &datagram(leave));
    let t1 = t0 + s.cfg.client_timeout + Duration::from_secs(2);
    s.handle_timeout(t1);
    let events: Vec<_> = std::iter::from_fn(|| s.poll_event()).collect();
    assert!(
        events.contains(&ServerEvent::ClientCompleted(addr(1))),
        "{events:?}"
    );
    assert!(
        events.contains(&ServerEvent::ClientTimedOut(addr(2))),
        "{events:?}"
    );
    assert!(
        !events.contains(&ServerEvent::ClientTimedOut(addr(1))),
        "{events:?}"
    );
    assert!(!s.peers.contains(&addr(1)) && !s.peers.contains(&addr(2)));
}
