//! Answers to fragment NACKs: only the fragments named, widened while queued, suppressed
//! only by a multicast that carried them; end-game re-asks that many receivers share go
//! to the group.

use super::tests::{addr, datagram, server_from, validate};
use super::{Server, ServerConfig};
use crate::wire::{
    encode_fragment_entries, fragment_entries_from_encoded, Announce, Body, FragmentNack, Message,
    PageFragments, RequestFlags,
};
use crate::Dest;
use std::time::{Duration, Instant};

/// Eight pages of 4 KiB in 3 fragments each (an Ethernet MTU); page 5 all zero.
fn server(t0: Instant, sweep: bool) -> Server {
    server_from(
        t0,
        ServerConfig {
            max_datagram: 1472,
            sweep,
            sweep_min_clients: 1,
            ..ServerConfig::default()
        },
    )
}

/// A fragment NACK of `entries` (page, missing mask).
fn frag_nack(flags: RequestFlags, entries: &[(u64, u32)]) -> Vec<u8> {
    let list: Vec<_> = entries
        .iter()
        .map(|&(pfn, missing)| PageFragments { pfn, missing })
        .collect();
    let mut raw = Vec::new();
    encode_fragment_entries(&list, &mut raw);
    datagram(Body::FragmentNack(FragmentNack {
        rx_rate: 0,
        loss_permille: 0,
        flags,
        heard_seq: u64::MAX,
        entries: fragment_entries_from_encoded(&raw),
    }))
}

/// One datagram sent: destination, and for data (page, fragment, flags); for an
/// announce its flags.
#[derive(Debug, PartialEq)]
enum Sent {
    Data(Dest, u64, u16, crate::wire::DataFlags),
    Announce(Dest, crate::wire::AnnounceFlags),
    Other,
}

fn drain(s: &mut Server, now: Instant) -> Vec<Sent> {
    let mut buf = vec![0u8; 65_536];
    let mut out = Vec::new();
    while let Some(t) = s.poll_transmit(now, &mut buf) {
        out.push(match Message::parse(&buf[..t.len]).unwrap().body {
            Body::Data(d) => Sent::Data(t.dest, d.pfn, d.frag_index, d.flags),
            Body::Announce(a) => Sent::Announce(t.dest, a.flags),
            _ => Sent::Other,
        });
        assert!(out.len() < 1000, "the server never ran out of datagrams");
    }
    out
}

/// Data datagrams as (destination, page, fragment).
fn data(sent: &[Sent]) -> Vec<(Dest, u64, u16)> {
    sent.iter()
        .filter_map(|x| match *x {
            Sent::Data(d, pfn, i, _) => Some((d, pfn, i)),
            _ => None,
        })
        .collect()
}

/// A server with receivers on ports 1 to 3 and every page multicast once (the end game),
/// and an instant past the lockstep window after those sends.
fn all_sent() -> (Server, Instant) {
    let t0 = Instant::now();
    let mut s = server(t0, true);
    for p in 1..=3 {
        validate(&mut s, t0, addr(p));
    }
    drain(&mut s, t0);
    assert!(s.in_endgame());
    (s, t0 + Duration::from_millis(20))
}

#[test]
fn a_fragment_nack_is_answered_with_the_fragments_it_names() {
    let (mut s, t1) = all_sent();
    s.handle_datagram(
        t1,
        addr(1),
        &frag_nack(RequestFlags::empty(), &[(2, 0b010)]),
    );
    assert_eq!(data(&drain(&mut s, t1)), vec![(Dest::Group, 2, 1)]);
    assert_eq!(
        (s.stats().fragment_answers, s.stats().fragments_resent),
        (1, 1)
    );
    // A sibling NACKing the same fragment just after is answered by that multicast; one
    // NACKing another fragment is not.
    s.handle_datagram(
        t1,
        addr(2),
        &frag_nack(RequestFlags::empty(), &[(2, 0b010)]),
    );
    assert!(data(&drain(&mut s, t1)).is_empty());
    assert_eq!(s.stats().suppressed_lockstep, 1);
    s.handle_datagram(
        t1,
        addr(2),
        &frag_nack(RequestFlags::empty(), &[(2, 0b011)]),
    );
    assert_eq!(
        data(&drain(&mut s, t1)),
        vec![(Dest::Group, 2, 0), (Dest::Group, 2, 1)]
    );
}

#[test]
fn fragment_nacks_of_a_queued_page_widen_its_answer() {
    let (mut s, t1) = all_sent();
    s.handle_datagram(
        t1,
        addr(1),
        &frag_nack(RequestFlags::empty(), &[(3, 0b001)]),
    );
    s.handle_datagram(
        t1,
        addr(2),
        &frag_nack(RequestFlags::empty(), &[(3, 0b100)]),
    );
    assert_eq!(
        data(&drain(&mut s, t1)),
        vec![(Dest::Group, 3, 0), (Dest::Group, 3, 2)]
    );
    assert_eq!(s.stats().suppressed_queued, 1);
}

#[test]
fn a_mask_of_every_fragment_is_a_whole_page_and_foreign_bits_are_refused() {
    let (mut s, t1) = all_sent();
    let before = s.stats().repair_pages;
    s.handle_datagram(
        t1,
        addr(1),
        &frag_nack(
            RequestFlags::empty(),
            &[(4, u32::MAX), (6, 0b1000), (99, 1)],
        ),
    );
    assert_eq!(
        data(&drain(&mut s, t1)),
        vec![
            (Dest::Group, 4, 0),
            (Dest::Group, 4, 1),
            (Dest::Group, 4, 2)
        ]
    );
    assert_eq!(s.stats().repair_pages, before + 1);
    assert_eq!(s.stats().fragment_answers, 0);
    // Page 6 has no fourth fragment, page 99 does not exist.
    assert_eq!(s.stats().out_of_range, 2);
    // A zero mask does not parse: dropped and counted.
    s.handle_datagram(t1, addr(1), &frag_nack(RequestFlags::empty(), &[(4, 0)]));
    assert_eq!(s.stats().malformed, 1);
}

#[test]
fn an_end_game_reask_that_half_the_receivers_share_is_multicast() {
    let (mut s, t1) = all_sent();
    let retry = crate::wire::Request::RETRY;
    // The first receiver to re-ask gets its fragment by unicast, twice.
    s.handle_datagram(t1, addr(1), &frag_nack(retry, &[(6, 0b100)]));
    assert_eq!(
        data(&drain(&mut s, t1)),
        vec![(Dest::Peer(addr(1)), 6, 2), (Dest::Peer(addr(1)), 6, 2)]
    );
    // A second receiver re-asking the same page: the loss is shared, one multicast.
    s.handle_datagram(t1, addr(2), &frag_nack(retry, &[(6, 0b100)]));
    assert_eq!(data(&drain(&mut s, t1)), vec![(Dest::Group, 6, 2)]);
    assert_eq!(s.stats().shared_reasks, 1);
    // The same receiver re-asking again does not count as another.
    s.handle_datagram(t1, addr(1), &frag_nack(retry, &[(7, 0b001)]));
    s.handle_datagram(t1, addr(1), &frag_nack(retry, &[(7, 0b001)]));
    assert!(data(&drain(&mut s, t1))
        .iter()
        .all(|&(d, _, _)| d == Dest::Peer(addr(1))));
}

#[test]
fn a_page_asked_again_while_its_unicast_answer_waits_is_sent_once_with_every_fragment() {
    let (mut s, t1) = all_sent();
    let retry = crate::wire::Request::RETRY;
    // A re-ask in the end game: two copies queued. Before either goes out, the receiver
    // (its retry timer firing behind a backlog) asks for another fragment of the page:
    // the waiting answer takes it, and nothing more is queued.
    s.handle_datagram(t1, addr(1), &frag_nack(retry, &[(6, 0b100)]));
    s.handle_datagram(t1, addr(1), &frag_nack(retry, &[(6, 0b001)]));
    s.handle_datagram(t1, addr(1), &frag_nack(retry, &[(6, 0b100)]));
    let p = Dest::Peer(addr(1));
    assert_eq!(
        data(&drain(&mut s, t1)),
        vec![(p, 6, 0), (p, 6, 2), (p, 6, 2)]
    );
    assert_eq!(s.stats().unicast_widened, 2);
    assert_eq!(s.stats().reask_doubles, 1);
    // Once the answer went out, a re-ask is a loss again: two copies.
    s.handle_datagram(t1, addr(1), &frag_nack(retry, &[(6, 0b001)]));
    assert_eq!(data(&drain(&mut s, t1)), vec![(p, 6, 0), (p, 6, 0)]);
    assert_eq!(s.stats().unicast_widened, 2);
}

#[test]
fn the_end_of_the_sweep_is_announced_twice() {
    let t0 = Instant::now();
    let mut s = server(t0, true);
    validate(&mut s, t0, addr(1));
    let sent = drain(&mut s, t0);
    let done = sent
        .iter()
        .filter(|x| {
            matches!(x, Sent::Announce(Dest::Group, f) if f.contains(Announce::FLAG_SWEEP_DONE))
        })
        .count();
    assert_eq!(done, 2, "{sent:?}");
    // Seven non-zero pages and the hash page above them.
    assert_eq!(s.stats().sweep_pages, 8);
}
