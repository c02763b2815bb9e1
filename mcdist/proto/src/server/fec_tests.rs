//! The server's FEC policies, driven through the public API: repair symbols follow
//! path loss, NACKs get one shared round of them (or the pages, where the asker could
//! not decode with them), and NACK-formed blocks never contradict an open one.

use super::tests::{
    addr, ask, data, datagram, drain, join, nack_of, token_for, validate, Sent, SESSION,
};
use super::{Server, ServerConfig};
use crate::source::MemSource;
use crate::wire::{Body, Data, Heartbeat, HeartbeatFlags, Kind, Message, Request, RequestFlags};
use crate::Dest;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A sweeping FEC server for the same eight pages (one fragment a page).
fn fec_server(t0: Instant) -> Server {
    fec_server_min(t0, 0.0)
}

/// [`fec_server`] sending `min` repair symbols per page symbol from the start.
fn fec_server_min(t0: Instant, min: f64) -> Server {
    fec_server_pages(t0, min, 8)
}

/// [`fec_server_min`] with an image of `pages` pages (page 5 all zero).
fn fec_server_pages(t0: Instant, min: f64, pages: usize) -> Server {
    fec_server_geo(t0, min, pages, ServerConfig::default().max_datagram)
}

/// [`fec_server_pages`] sending datagrams of at most `max_datagram` bytes.
fn fec_server_geo(t0: Instant, min: f64, pages: usize, max_datagram: usize) -> Server {
    let mut img: Vec<u8> = (0..pages * 4096).map(|i| (i % 251 + 1) as u8).collect();
    img[5 * 4096..6 * 4096].fill(0);
    let cfg = ServerConfig {
        session_id: Some(SESSION),
        push_neighbors: false,
        sweep: true,
        sweep_min_clients: 2,
        fec: true,
        fec_min_overhead: min,
        max_datagram,
        ..ServerConfig::default()
    };
    let source = Arc::new(MemSource::new(img, 4096));
    let info = crate::source::scan(source.as_ref()).expect("an in-memory image scans");
    Server::with_info(cfg, source, info, t0).unwrap()
}

fn kinds(sent: &[Sent], kind: Kind) -> usize {
    sent.iter().filter(|x| x.1 == kind).count()
}

/// [`fec_server`] with receivers 1 and 2 validated and its sweep over (nobody reported
/// loss, so no block was formed), at the instant after it.
fn swept_fec_server() -> (Server, Instant, SocketAddr, SocketAddr) {
    swept(fec_server(Instant::now()), 8)
}

/// `s` (of `pages` pages) with receivers 1 and 2 validated and its sweep over.
fn swept(mut s: Server, pages: u64) -> (Server, Instant, SocketAddr, SocketAddr) {
    let t0 = Instant::now();
    let (a, b) = (addr(1), addr(2));
    validate(&mut s, t0, a);
    validate(&mut s, t0, b);
    let mut now = t0;
    while s.pages_ever_sent() < pages {
        drain(&mut s, now);
        now += Duration::from_millis(1);
        assert!(now < t0 + Duration::from_secs(1), "the sweep ends");
    }
    drain(&mut s, now);
    (s, now, a, b)
}

#[test]
fn first_nacks_are_answered_with_one_shared_round_of_repair_symbols() {
    let (mut s, now, a, b) = swept_fec_server();
    // Nobody reported loss while the sweep ran: no block was formed then. A
    // NACK of page 2 gets fresh repair symbols of the window's pages, not page 2: one
    // for its fragment and the code's spare.
    let round = 1 + crate::fec::DECODE_SPARE;
    s.handle_datagram(now, a, &ask(Kind::Nack, RequestFlags::empty(), 2));
    let sent = drain(&mut s, now);
    assert_eq!((kinds(&sent, Kind::Repair), data(&sent).len()), (round, 0));
    // A sibling's NACK needing no more within the round window adds nothing ...
    s.handle_datagram(now, b, &ask(Kind::Nack, RequestFlags::empty(), 3));
    assert!(drain(&mut s, now).is_empty());
    // ... one needing more grows the round by the difference.
    s.handle_datagram(now, b, &nack_of(2, 3, 0, 0));
    assert_eq!(kinds(&drain(&mut s, now), Kind::Repair), 2);
    assert_eq!(s.stats().fec_nack_rounds, 1);
    // A re-ask takes the plain path: the page itself (in the end game, to the
    // asker alone, twice with this few receivers).
    s.handle_datagram(now, a, &ask(Kind::Nack, Request::RETRY, 2));
    assert_eq!(
        data(&drain(&mut s, now)),
        vec![(Dest::Peer(a), 2, Data::REPAIR); 2]
    );
    assert_eq!(s.stats().reask_doubles, 1);
    // After the window, a NACK starts a new round.
    let later = now + Duration::from_millis(10);
    s.handle_datagram(later, a, &ask(Kind::Nack, RequestFlags::empty(), 4));
    assert_eq!(kinds(&drain(&mut s, later), Kind::Repair), round);
    assert_eq!(s.stats().fec_nack_rounds, 2);
}

/// Data pages go out marked to be kept for FEC decoding from the first path loss a
/// receiver reports on, and not before: receivers keep unmarked pages only while they
/// see loss themselves.
#[test]
fn pages_are_marked_to_be_kept_from_the_first_loss_report() {
    let (mut s, now, a, _) = swept_fec_server();
    assert!(!s.fec_keeping(), "no loss reported during the sweep");
    // A re-ask is answered with the page itself, unmarked.
    s.handle_datagram(now, a, &ask(Kind::Nack, Request::RETRY, 2));
    let sent = data(&drain(&mut s, now));
    assert!(!sent.is_empty() && sent.iter().all(|d| d.1 == 2 && !d.2.contains(Data::KEEP)));
    // A NACK reporting 2 % loss: from now on every data page is marked.
    s.handle_datagram(now, a, &nack_of(3, 1, 0, 20));
    drain(&mut s, now);
    assert!(s.fec_keeping());
    let later = now + Duration::from_millis(20);
    s.handle_datagram(later, a, &ask(Kind::Nack, Request::RETRY, 4));
    let sent = data(&drain(&mut s, later));
    assert!(!sent.is_empty() && sent.iter().all(|d| d.1 == 4 && d.2.contains(Data::KEEP)));
}

#[test]
fn nacks_of_a_block_whose_repair_indices_are_spent_get_the_page() {
    let (mut s, mut now, a, _) = swept_fec_server();
    // A receiver that never decodes NACKs page 2 round after round: repair symbols
    // until the block's indices are spent (receivers take no more), then the page.
    let mut repairs = 0;
    for round in 0..20 {
        now += Duration::from_millis(20);
        s.handle_datagram(now, a, &ask(Kind::Nack, RequestFlags::empty(), 2));
        let sent = drain(&mut s, now);
        repairs += kinds(&sent, Kind::Repair);
        if data(&sent).iter().any(|d| d.1 == 2) {
            assert!(round > 1, "repair symbols first");
            // To the asker alone: its loss, not the group's.
            assert!(data(&sent).iter().all(|d| d.0 == Dest::Peer(a)), "{sent:?}");
            assert_eq!(repairs, crate::fec::max_repairs(7, 255) as usize);
            return;
        }
    }
    panic!("page 2 never sent: {repairs} repair symbols");
}

/// Repair symbols a sweep of 256 pages (a block's worth) sends when one receiver
/// reported `loss` of which `overload` its own (parts per thousand) before it started.
fn sweep_repairs(loss: u16, overload: u16) -> usize {
    let t0 = Instant::now();
    let mut s = fec_server_pages(t0, 0.0, 256);
    let (a, b) = (addr(1), addr(2));
    let token = validate(&mut s, t0, a);
    let hb = Heartbeat {
        rx_rate: 1_000_000,
        loss_permille: loss,
        overload_permille: overload,
        have_pages: 0,
        flags: HeartbeatFlags::empty(),
        token,
    };
    s.handle_datagram(t0, a, &datagram(Body::Heartbeat(hb)));
    // The second receiver starts the sweep.
    validate(&mut s, t0, b);
    let mut now = t0;
    while s.pages_ever_sent() < 256 || s.fec_pending() {
        drain(&mut s, now);
        now += Duration::from_millis(1);
        assert!(now < t0 + Duration::from_secs(5), "the sweep ends");
    }
    s.stats().fec_repairs as usize
}

#[test]
fn repair_symbols_follow_path_loss_not_a_receivers_own_overload() {
    let path_only = sweep_repairs(20, 0);
    assert!(path_only > 0, "2 % path loss gets repair symbols");
    // 15 % loss, all but 2 % of it datagrams the receiver's own socket dropped:
    // repaired for the 2 % of the path (the rate controller removes the rest).
    assert_eq!(sweep_repairs(150, 130), path_only);
    assert!(sweep_repairs(150, 0) > path_only);
}

/// A NACK of a page whose block is still open takes the plain path: a block
/// formed for it then would start at the same page with other members, and
/// receivers refuse repair symbols that contradict a block they hold.
#[test]
fn a_nack_inside_the_open_block_forms_no_second_block() {
    let t0 = Instant::now();
    let mut s = fec_server_min(t0, 0.25);
    let (a, b) = (addr(1), addr(2));
    validate(&mut s, t0, a);
    // The second receiver's validated join starts the sweep.
    let token = token_for(&mut s, t0, b);
    s.handle_datagram(t0, b, &join(token));
    let mut buf = vec![0u8; 65_536];
    let mut blocks: Vec<(u64, u16, Vec<u8>)> = Vec::new();
    let mut note = |s: &mut Server, now: Instant, blocks: &mut Vec<(u64, u16, Vec<u8>)>| {
        let t = s.poll_transmit(now, &mut buf)?;
        if let Body::Repair(r) = Message::parse(&buf[..t.len]).unwrap().body {
            blocks.push((r.first_pfn, r.span, r.members.to_vec()));
        }
        Some(())
    };
    // Part of the sweep goes out, one datagram at a time: its block is open.
    while s.pages_ever_sent() < 3 {
        note(&mut s, t0, &mut blocks).expect("the sweep sends at once");
    }
    s.handle_datagram(t0, a, &ask(Kind::Nack, RequestFlags::empty(), 1));
    let mut now = t0;
    while now < t0 + Duration::from_millis(100) {
        if note(&mut s, now, &mut blocks).is_none() {
            now += Duration::from_millis(1);
        }
    }
    assert!(!blocks.is_empty(), "the open block's repairs went out");
    for (first, span, members) in &blocks {
        assert!(
            blocks
                .iter()
                .all(|(f, sp, m)| f != first || (sp, m) == (span, members)),
            "two blocks start at page {first}: {blocks:?}"
        );
    }
}

/// A NACK naming more lost symbols of a block than a receiver keeps repair symbols of
/// (`min(K, 256) + 16`) is answered with the pages, to the asker alone: it (a receiver
/// host that did not run for a while) could not decode the block with any number of
/// repair symbols, and a loss that large is its own. A NACK of a few pages of the same
/// block still gets a round of repair symbols.
#[test]
fn a_nack_of_more_than_a_receiver_could_decode_is_answered_with_the_pages_to_it() {
    // 256 pages of three fragments (an Ethernet MTU): a block of 765 source symbols.
    let (mut s, now, a, b) = swept(fec_server_geo(Instant::now(), 0.0, 256, 1500), 256);
    let nack = |start, len| nack_of(start, len, 0, 0);
    // What the server sends over the next 200 ms (its bucket lets a few pages out at once).
    let over = |s: &mut Server, t: Instant| -> Vec<Sent> {
        (0..200u64)
            .flat_map(|ms| drain(s, t + Duration::from_millis(ms)))
            .collect()
    };
    // 100 pages lost whole: 300 symbols, more than the 272 kept.
    s.handle_datagram(now, a, &nack(10, 100));
    let sent = over(&mut s, now);
    assert_eq!(kinds(&sent, Kind::Repair), 0, "no round of repair symbols");
    let pages: std::collections::BTreeSet<u64> = data(&sent).iter().map(|d| d.1).collect();
    assert_eq!(pages, (10..110).collect(), "every page NACKed ...");
    assert_eq!(
        data(&sent).len(),
        100 * 3,
        "... once each (three fragments a page)"
    );
    assert!(data(&sent)
        .iter()
        .all(|d| d.0 == Dest::Peer(a) && d.2 == Data::REPAIR));
    assert_eq!(s.stats().fec_nacks_plain, 1);
    // Another receiver's NACK of 10 pages: 30 symbols, which repair symbols serve.
    let later = now + Duration::from_millis(200);
    s.handle_datagram(later, b, &nack(120, 10));
    let sent = over(&mut s, later);
    assert!(kinds(&sent, Kind::Repair) >= 30 + crate::fec::DECODE_SPARE);
    assert!(data(&sent).is_empty(), "{:?}", data(&sent));
    assert_eq!(s.stats().fec_nacks_plain, 1);
}
