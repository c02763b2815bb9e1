//! The borrowed page path hands out the same pages, once each, as the event path.

use super::{Client, ClientConfig, ClientEvent};
use crate::{Dest, MemSource, Server, ServerConfig};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

const PAGE: usize = 4096;
const PAGES: u64 = 96;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn image() -> Vec<u8> {
    let mut img = vec![0u8; PAGE * PAGES as usize];
    for (i, page) in img.chunks_mut(PAGE).enumerate() {
        if i % 7 != 3 {
            page.iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = (i * 31 + j) as u8 | 1);
        }
    }
    img
}

/// Pages one client handed out: `(pfn -> bytes)` and how many came through the sink.
#[derive(Default)]
struct Got {
    pages: BTreeMap<u64, Vec<u8>>,
    lent: usize,
}

impl Got {
    fn put(&mut self, pfn: u64, data: &[u8]) {
        assert!(
            self.pages.insert(pfn, data.to_vec()).is_none(),
            "page {pfn} twice"
        );
    }

    fn drain(&mut self, c: &mut Client) {
        while let Some(e) = c.poll_event() {
            if let ClientEvent::PageReady { pfn, data } = e {
                self.put(pfn, &data);
            }
        }
    }
}

/// A server sending datagrams of `max_datagram` bytes; client `a` talks to it through
/// `handle_datagram`, client `b` hears the same datagrams through the borrowed path.
fn fetch_both(max_datagram: usize) -> (Got, Got, Client, Client) {
    let img = image();
    let mut now = Instant::now();
    let scfg = ServerConfig {
        max_datagram,
        sweep: true,
        ..ServerConfig::default()
    };
    let source = Arc::new(MemSource::new(img.clone(), PAGE));
    let mut server = Server::with_info(
        scfg,
        source.clone(),
        crate::source::scan(source.as_ref()).expect("an in-memory image scans"),
        now,
    )
    .expect("server configuration");
    let mut a = Client::new(ClientConfig::new(addr(1)), now);
    let mut b = Client::new(ClientConfig::new(addr(1)), now);
    a.fetch_all(now);
    b.fetch_all(now);
    let (mut got_a, mut got_b) = (Got::default(), Got::default());
    let mut buf = vec![0u8; 65_536];
    for _ in 0..20_000 {
        if a.is_complete() || a.is_failed() {
            break;
        }
        now += Duration::from_millis(1);
        for c in [&mut a, &mut b] {
            if c.poll_timeout().is_some_and(|t| t <= now) {
                c.handle_timeout(now);
            }
        }
        while let Some(t) = a.poll_transmit(now, &mut buf) {
            assert_eq!(t.dest, Dest::Peer(addr(1)));
            server.handle_datagram(now, addr(2), &buf[..t.len]);
        }
        // `b` sends nothing: it must reach the same state from the same input.
        while b.poll_transmit(now, &mut buf).is_some() {}
        if server.poll_timeout().is_some_and(|t| t <= now) {
            server.handle_timeout(now);
        }
        while let Some(t) = server.poll_transmit(now, &mut buf) {
            let d = &buf[..t.len];
            a.handle_datagram(now, addr(1), bytes::Bytes::copy_from_slice(d));
            let lent = &mut got_b;
            b.handle_datagram_borrowed(now, addr(1), d, &mut |pfn, page| {
                lent.put(pfn, page);
                lent.lent += 1;
            });
        }
        got_a.drain(&mut a);
        got_b.drain(&mut b);
    }
    assert!(a.is_complete() && b.is_complete(), "fetch did not complete");
    for (pfn, data) in &got_a.pages {
        let at = *pfn as usize * PAGE;
        assert_eq!(data[..], img[at..at + PAGE], "page {pfn}");
    }
    (got_a, got_b, a, b)
}

#[test]
fn borrowed_whole_pages_match_the_event_path() {
    let (a, b, ca, cb) = fetch_both(65_507);
    assert_eq!(a.pages, b.pages);
    assert_eq!(a.lent, 0);
    // Every page with data arrived whole and was lent, none copied into an event; the
    // zero pages of the map are present without data.
    assert_eq!(b.lent, b.pages.len());
    assert_eq!(b.pages.len() as u64 + cb.zero_map().count_ones(), PAGES);
    assert_eq!(ca.stats(), cb.stats());
}

#[test]
fn fragmented_pages_still_come_as_events() {
    let (a, b, ca, cb) = fetch_both(1400);
    assert_eq!(a.pages, b.pages);
    assert_eq!(b.lent, 0);
    assert_eq!(ca.stats(), cb.stats());
}

/// Joins nobody answers: the first four retries keep the short interval
/// (`join_interval / 8`; a join or its answer lost on a lossy path is common),
/// then the interval doubles up to a second.
#[test]
fn unanswered_joins_retry_quickly_four_times_then_back_off() {
    use crate::wire::{Kind, Message};
    let t0 = Instant::now();
    let cfg = ClientConfig::new(addr(9));
    let quick = cfg.join_interval / 8;
    let mut c = Client::new(cfg, t0);
    let mut buf = vec![0u8; 65_536];
    let mut joins = Vec::new();
    let mut now = t0;
    while now < t0 + Duration::from_secs(3) {
        while let Some(t) = c.poll_transmit(now, &mut buf) {
            let m = Message::parse(&buf[..t.len]).expect("the client's datagrams parse");
            if m.body.kind() == Kind::Join {
                joins.push(now - t0);
            }
        }
        let Some(next) = c.poll_timeout() else { break };
        now = next.max(now);
        c.handle_timeout(now);
    }
    let gaps: Vec<Duration> = joins.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.len() >= 8, "joins at {joins:?}");
    assert!(gaps[..4].iter().all(|g| *g == quick), "gaps {gaps:?}");
    assert_eq!(gaps[4], quick * 2, "gaps {gaps:?}");
    assert_eq!(gaps[5], quick * 4, "gaps {gaps:?}");
    assert!(
        gaps.iter().all(|g| *g <= Duration::from_secs(1)),
        "gaps {gaps:?}"
    );
}

/// One step of a server and its clients (client `i` at port `base` + `i`, server at port 1):
/// timers, the clients' datagrams to the server, the server's to the group or to one client.
fn exchange(server: &mut Server, clients: &mut [Client], base: u16, now: Instant) {
    let mut buf = vec![0u8; 65_536];
    for (i, c) in clients.iter_mut().enumerate() {
        if c.poll_timeout().is_some_and(|t| t <= now) {
            c.handle_timeout(now);
        }
        while let Some(t) = c.poll_transmit(now, &mut buf) {
            server.handle_datagram(now, addr(base + i as u16), &buf[..t.len]);
        }
    }
    if server.poll_timeout().is_some_and(|t| t <= now) {
        server.handle_timeout(now);
    }
    while let Some(t) = server.poll_transmit(now, &mut buf) {
        for (i, c) in clients.iter_mut().enumerate() {
            if t.dest == Dest::Group || t.dest == Dest::Peer(addr(base + i as u16)) {
                c.handle_datagram_slice(now, addr(1), &buf[..t.len]);
            }
        }
    }
}

#[test]
fn a_later_clone_is_told_the_working_set_unless_it_refuses_hints() {
    let t0 = Instant::now();
    let source = Arc::new(MemSource::new(image(), PAGE));
    let info = crate::source::scan(source.as_ref()).expect("an in-memory image scans");
    let scfg = ServerConfig {
        push_neighbors: false,
        ..ServerConfig::default()
    };
    let mut server = Server::with_info(scfg, source, info, t0).expect("server");
    // Generation 1 asks for pages 20..=29 and 50 (page 24 is zero: answered, not recorded).
    let mut first = vec![Client::new(ClientConfig::new(addr(1)), t0)];
    let mut now = t0;
    for p in (20..30).chain([50]) {
        first[0].request_page(now, p);
    }
    for _ in 0..200 {
        now += Duration::from_millis(1);
        exchange(&mut server, &mut first, 10, now);
    }
    assert!((20..30).chain([50]).all(|p| first[0].has_page(p)));
    // Generation 2, a second later: one client takes hints, one refuses them.
    now += Duration::from_secs(1);
    let refusing = ClientConfig {
        accept_hints: false,
        ..ClientConfig::new(addr(1))
    };
    let mut later = vec![
        Client::new(ClientConfig::new(addr(1)), now),
        Client::new(refusing, now),
    ];
    let mut hints: Vec<Vec<u64>> = vec![Vec::new(), Vec::new()];
    for _ in 0..100 {
        now += Duration::from_millis(1);
        exchange(&mut server, &mut later, 20, now);
        for (i, c) in later.iter_mut().enumerate() {
            while let Some(e) = c.poll_event() {
                if let ClientEvent::WorkingSetHint(p) = e {
                    hints[i].extend(p);
                }
            }
        }
    }
    let want: Vec<u64> = (20..30).filter(|p| p % 7 != 3).chain([50]).collect();
    assert_eq!(hints[0], want);
    assert_eq!(later[0].stats().hint_pages, want.len() as u64);
    assert!(hints[1].is_empty());
    assert_eq!(later[1].stats().hints_refused, 1);
    assert_eq!(server.stats().hint_datagrams, 2);

    // Ranges out of order and overlapping (not the server's): reported once each, ascending.
    use crate::wire::{encode_ranges, ranges_from_encoded, Body, HeaderFlags, Message};
    use crate::wire::{PageRange, Request, RequestFlags};
    let mut raw = Vec::new();
    let r = |start, len| PageRange { start, len };
    encode_ranges(&[r(60, 3), r(57, 5), r(95, 9)], &mut raw);
    let m = Message {
        session: later[0].session().expect("a session").session_id,
        seq: 1_000,
        flags: HeaderFlags::empty(),
        body: Body::Hint(Request {
            rx_rate: 0,
            loss_permille: 0,
            flags: RequestFlags::empty(),
            heard_seq: 0,
            ranges: ranges_from_encoded(&raw),
        }),
    };
    let mut buf = vec![0u8; m.buffer_len()];
    let n = m.emit(&mut buf).expect("emit");
    later[0].handle_datagram_slice(now, addr(1), &buf[..n]);
    let mut got = Vec::new();
    while let Some(e) = later[0].poll_event() {
        if let ClientEvent::WorkingSetHint(p) = e {
            got = p;
        }
    }
    let want: Vec<u64> = (57..63)
        .chain([95])
        .filter(|&p| !later[0].has_page(p))
        .collect();
    assert_eq!(got, want, "in range, once each, ascending");
}

/// Runs client `c` (port 1) against `server` (port 2) in steps of a millisecond until it
/// completes or fails, for at most 20 s: each datagram the client sends goes to `up`,
/// and reaches the server if `up` says so; each one the server sends goes to `down`
/// with the client and where it was sent, and reaches the client if `down` says so.
pub(super) fn run_lockstep(
    server: &mut Server,
    c: &mut Client,
    mut now: Instant,
    mut up: impl FnMut(&[u8]) -> bool,
    mut down: impl FnMut(&mut Client, Dest, &[u8]) -> bool,
) {
    let mut buf = vec![0u8; 65_536];
    for _ in 0..20_000 {
        if c.is_complete() || c.is_failed() {
            break;
        }
        now += Duration::from_millis(1);
        if c.poll_timeout().is_some_and(|t| t <= now) {
            c.handle_timeout(now);
        }
        while let Some(t) = c.poll_transmit(now, &mut buf) {
            if up(&buf[..t.len]) {
                server.handle_datagram(now, addr(2), &buf[..t.len]);
            }
        }
        if server.poll_timeout().is_some_and(|t| t <= now) {
            server.handle_timeout(now);
        }
        while let Some(t) = server.poll_transmit(now, &mut buf) {
            if down(c, t.dest, &buf[..t.len]) {
                c.handle_datagram_slice(now, addr(1), &buf[..t.len]);
            }
        }
        while c.poll_event().is_some() {}
    }
}

/// A server of an image of `pages` pages (none zero) with `scfg`, and a client of it (server
/// at port 1) that has asked for nothing yet.
fn server_and_client(now: Instant, pages: usize, scfg: ServerConfig) -> (Server, Client) {
    let img: Vec<u8> = (0..PAGE * pages).map(|i| (i / 7) as u8 | 1).collect();
    let source = Arc::new(MemSource::new(img, PAGE));
    let info = crate::source::scan(source.as_ref()).expect("an in-memory image scans");
    let server = Server::with_info(scfg, source, info, now).expect("server configuration");
    (server, Client::new(ClientConfig::new(addr(1)), now))
}

/// A receiver whose socket drops every eighth datagram (all its loss is overload)
/// closes each measured interval with a heartbeat before any request that carries
/// the interval's loss: requests carry the loss but not the overload, which the
/// server would otherwise take from the interval before and count as path loss.
#[test]
fn the_heartbeat_closing_an_interval_precedes_the_requests_carrying_its_loss() {
    use crate::wire::{self, Body, Message};
    let now = Instant::now();
    let (mut server, mut c) = server_and_client(
        now,
        2048,
        ServerConfig {
            max_datagram: 1400,
            sweep: true,
            ..ServerConfig::default()
        },
    );
    c.fetch_all(now);
    let (mut group, mut dropped) = (0u64, 0u64);
    // (loss, overload) of the latest heartbeat, and the requests checked against it.
    let mut last_heartbeat: Option<(u16, u16)> = None;
    let mut checked = 0;
    run_lockstep(
        &mut server,
        &mut c,
        now,
        |d| {
            match Message::parse(d)
                .expect("the client's datagrams parse")
                .body
            {
                Body::Heartbeat(h) => last_heartbeat = Some((h.loss_permille, h.overload_permille)),
                Body::Nack(wire::Request { loss_permille, .. })
                | Body::Request(wire::Request { loss_permille, .. })
                | Body::FragmentNack(wire::FragmentNack { loss_permille, .. })
                    if !wire::loss_unmeasured(loss_permille) =>
                {
                    let (loss, overload) = last_heartbeat.expect("a heartbeat reported the loss");
                    assert_eq!(
                        loss, loss_permille,
                        "a request carries a loss no heartbeat told"
                    );
                    assert_eq!(overload, loss, "all of this receiver's loss is its own");
                    checked += 1;
                }
                _ => {}
            }
            true
        },
        |c, dest, _| {
            if dest == Dest::Group {
                group += 1;
                if group % 8 == 0 {
                    dropped += 1;
                    c.note_socket_drops(dropped);
                    return false;
                }
            }
            true
        },
    );
    assert!(c.is_complete(), "fetch did not complete");
    assert!(
        dropped > 100 && checked > 10,
        "dropped {dropped}, checked {checked}"
    );
}

/// Every request and NACK says the highest group sequence number the receiver had taken
/// in when it sent it (the server tells by it an answer still on its way); datagrams lost
/// on the way and the server's unicast sequence do not count.
#[test]
fn requests_carry_the_highest_group_sequence_number_taken_in() {
    use crate::wire::{self, Body, Message};
    use std::cell::Cell;
    let now = Instant::now();
    let (mut server, mut c) = server_and_client(
        now,
        1024,
        ServerConfig {
            max_datagram: 1400,
            sweep: true,
            ..ServerConfig::default()
        },
    );
    c.fetch_all(now);
    let heard = Cell::new(0u64);
    let (mut checked, mut lost) = (0u32, 0u64);
    run_lockstep(
        &mut server,
        &mut c,
        now,
        |d| {
            let said = match Message::parse(d)
                .expect("the client's datagrams parse")
                .body
            {
                Body::Nack(q) | Body::Request(q) => Some(q.heard_seq),
                Body::FragmentNack(f) => Some(f.heard_seq),
                _ => None,
            };
            if let Some(said) = said {
                assert_eq!(
                    said,
                    heard.get(),
                    "the heard sequence number a request says"
                );
                checked += 1;
            }
            true
        },
        |_, dest, d| {
            let seq = Message::parse(d).expect("the server's datagrams parse").seq;
            if dest == Dest::Group {
                if seq % 7 == 3 {
                    lost += 1;
                    return false;
                }
                heard.set(heard.get().max(seq));
            } else {
                assert_ne!(seq & wire::SEQ_UNICAST_BIT, 0, "unicast sequence");
            }
            true
        },
    );
    assert!(c.is_complete(), "fetch did not complete");
    assert!(lost > 50 && checked > 5, "lost {lost}, checked {checked}");
    assert!(heard.get() > 0);
}

/// A lazy receiver on a loss-free path, asking for a page every 10 ms for 2.5 s while the
/// server announces every 200 ms, measures no loss: the announces are group datagrams
/// it took in, not gaps.
#[test]
fn a_loss_free_lazy_receiver_measures_no_loss_across_announces() {
    use crate::wire::{Body, Message};
    let mut now = Instant::now();
    let (mut server, mut c) = server_and_client(
        now,
        512,
        ServerConfig {
            max_datagram: 1400,
            push_neighbors: false,
            ..ServerConfig::default()
        },
    );
    let mut buf = vec![0u8; 65_536];
    let (mut measures, mut worst, mut announces) = (0, 0u16, 0);
    for step in 0..3000u64 {
        now += Duration::from_millis(1);
        if step % 10 == 0 && step < 2500 {
            c.request_page(now, step / 10);
        }
        if c.poll_timeout().is_some_and(|t| t <= now) {
            c.handle_timeout(now);
        }
        while let Some(t) = c.poll_transmit(now, &mut buf) {
            if let Body::Heartbeat(h) = Message::parse(&buf[..t.len]).unwrap().body {
                if !crate::wire::loss_unmeasured(h.loss_permille) {
                    measures += 1;
                    worst = worst.max(h.loss_permille);
                }
            }
            server.handle_datagram(now, addr(2), &buf[..t.len]);
        }
        if server.poll_timeout().is_some_and(|t| t <= now) {
            server.handle_timeout(now);
        }
        while let Some(t) = server.poll_transmit(now, &mut buf) {
            let m = Message::parse(&buf[..t.len]).unwrap();
            announces += u32::from(t.dest == Dest::Group && matches!(m.body, Body::Announce(_)));
            if t.dest == Dest::Group || t.dest == Dest::Peer(addr(2)) {
                c.handle_datagram_slice(now, addr(1), &buf[..t.len]);
            }
        }
        while c.poll_event().is_some() {}
    }
    assert!((0..250).all(|p| c.has_page(p)), "every page asked for came");
    assert!(
        announces >= 10 && measures >= 3,
        "{announces} announces, {measures} measures"
    );
    assert_eq!(worst, 0, "loss measured on a loss-free path");
}

/// With FEC on, a receiver keeps received pages for decoding while the server marks them
/// to be kept (it does once it forms blocks) or while it sees path loss itself. In a
/// loss-free sweep no page is marked, and once the receiver measured an interval without
/// loss it keeps no more (it kept every page, and its buffer, for nothing); a server that
/// sends repairs from the first page marks its pages, and the receiver keeps them and
/// decodes a page whose datagram was lost.
#[test]
fn fec_pages_are_kept_only_while_marked_or_losing() {
    use crate::wire::{Body, Data, Message};
    const PAGES: usize = 2048;
    for min_overhead in [0.0, 0.1] {
        let now = Instant::now();
        let img: Vec<u8> = (0..PAGE * PAGES).map(|i| (i / 7) as u8 | 1).collect();
        let source = Arc::new(MemSource::new(img, PAGE));
        let scfg = ServerConfig {
            max_datagram: 1400,
            sweep: true,
            fec: true,
            fec_min_overhead: min_overhead,
            ..ServerConfig::default()
        };
        let info = crate::source::scan(source.as_ref()).expect("an in-memory image scans");
        let mut server = Server::with_info(scfg, source, info, now).expect("server configuration");
        // Loss is measured per heartbeat interval: a short one measures it early.
        let mut ccfg = ClientConfig::new(addr(1));
        ccfg.heartbeat_interval = Duration::from_millis(20);
        let mut c = Client::new(ccfg, now);
        c.fetch_all(now);
        let (mut kept, mut marked, mut data) = (0, 0, 0);
        run_lockstep(
            &mut server,
            &mut c,
            now,
            |_| true,
            |c, dest, d| {
                kept = kept.max(c.fec.rx.held_bytes());
                let Ok(Message {
                    body: Body::Data(page),
                    ..
                }) = Message::parse(d)
                else {
                    return true;
                };
                marked += usize::from(page.flags.contains(Data::KEEP));
                data += usize::from(dest == Dest::Group && page.pfn == 1000);
                // With repairs from the first page, a fragment of page 1000 is lost.
                !(min_overhead > 0.0 && page.pfn == 1000 && page.frag_index == 0 && data == 1)
            },
        );
        assert!(c.is_complete(), "fetch did not complete");
        if min_overhead > 0.0 {
            assert!(marked > 0, "no page was marked to be kept");
            // Page 1000 went out long after the first interval was measured without
            // loss: its block decoded from marked pages kept.
            assert!(kept > 0, "no marked page kept");
            assert!(c.stats().fec_pages >= 1, "the lost page was not decoded");
        } else {
            assert_eq!(marked, 0, "pages marked to be kept without loss");
            assert!(
                kept < PAGES / 4 * PAGE,
                "kept {} of {PAGES} pages",
                kept / PAGE
            );
        }
    }
}
