//! Deterministic simulation of recorded working-set push: a first generation of
//! clones faults on a working set; a second generation joining later faults on
//! the same pages and finds most of them pushed by the server's replay of the
//! first generation's fault order.

mod common;

use mcdist::server::ServerConfig;
use mcdist::sim::{test_image, ClientSpec, Sim, Workload};
use std::time::Duration;

const PAGES: usize = 1024;
const PS: usize = 4096;
const CLONES: usize = 4;

/// A working set: a deterministic scatter of distinct pages in fault order.
fn working_set(n: usize, seed: u64) -> Vec<u64> {
    let mut s = seed | 1;
    let mut seen = vec![false; PAGES];
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let p = s % PAGES as u64;
        if !seen[p as usize] {
            seen[p as usize] = true;
            out.push(p);
        }
    }
    out
}

struct Generations {
    /// Pages each generation asked for on demand (first requests), summed over its clones.
    demand: [u64; 2],
    ws_push_pages: u64,
}

fn run(loss: f64, working_set_push: bool, push_neighbors: bool) -> Generations {
    let seed = 11;
    let img = test_image(PAGES, PS, 7, seed);
    let cfg = ServerConfig {
        session_id: Some(0x3e7),
        max_datagram: 1500,
        working_set_push,
        push_neighbors,
        ..ServerConfig::default()
    };
    let mut sim = Sim::new(seed, cfg, img, PS).unwrap();
    let pages = working_set(200, 5);
    let gen2_start = Duration::from_secs(5);
    for g in 0..2 {
        for _ in 0..CLONES {
            let mut spec = ClientSpec::faults(loss, pages.clone(), Duration::from_micros(200));
            if g == 1 {
                spec.start_at = gen2_start;
            }
            sim.add_client(spec);
        }
    }
    assert!(
        sim.drive(Duration::from_secs(60)).unwrap(),
        "loss {loss} push {working_set_push}: not every client finished"
    );
    sim.verify().unwrap();
    let mut demand = [0u64; 2];
    for (i, c) in sim.clients().iter().enumerate() {
        assert!(c.failed.is_none(), "client {i} failed: {:?}", c.failed);
        assert!(c.finished(), "client {i} did not finish");
        let Workload::Faults { pages, .. } = &c.spec().workload else {
            unreachable!("every client runs a fault workload")
        };
        for &p in pages {
            assert!(c.client.has_page(p), "client {i} lacks faulted page {p}");
        }
        let gen = i / CLONES;
        // The first generation finished before the second started.
        if gen == 0 {
            let done = c.finished_after.expect("finished clients have a time");
            assert!(done < gen2_start, "generation 1 still running at {done:?}");
        }
        demand[gen] += c.client.stats().pages_requested;
    }
    Generations {
        demand,
        ws_push_pages: sim.server().stats().ws_push_pages,
    }
}

#[test]
fn second_generation_gets_its_working_set_pushed() {
    for (loss, neighbors) in [(0.0, false), (0.05, false), (0.0, true), (0.05, true)] {
        let on = run(loss, true, neighbors);
        let off = run(loss, false, neighbors);
        eprintln!(
            "loss {loss} neighbor push {neighbors}: demand pages gen1/gen2 with working-set push {}/{} (ws_push_pages {}), without {}/{}",
            on.demand[0], on.demand[1], on.ws_push_pages, off.demand[0], off.demand[1]
        );
        assert!(on.ws_push_pages > 0, "loss {loss}: nothing was replayed");
        assert!(
            on.demand[1] < on.demand[0],
            "loss {loss}: second generation made {} demand requests, first {}",
            on.demand[1],
            on.demand[0]
        );
        assert_eq!(off.ws_push_pages, 0);
    }
}

mod server_direct {
    //! The server state machine driven directly: replay order, zero pages
    //! skipped, demand pre-empting the replay.

    use mcdist::server::{Server, ServerConfig};
    use mcdist::sim::test_image;
    use mcdist::wire::{Body, Data, Join, Message, PageRange};
    use mcdist::{Dest, MemSource};
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    const PS: usize = 4096;

    fn request(session: u64, pfn: u64) -> Vec<u8> {
        crate::common::request(
            session,
            mcdist::wire::RequestFlags::empty(),
            &[PageRange { start: pfn, len: 1 }],
        )
    }

    fn join(session: u64, token: [u8; 16]) -> Vec<u8> {
        crate::common::emit(
            session,
            Body::Join(Join {
                flags: mcdist::wire::JoinFlags::empty(),
                token,
            }),
        )
    }

    /// Join from `addr` and echo the token of the announce reply: the address
    /// is validated (nothing else the server sends is looked at).
    fn validate(server: &mut Server, now: Instant, addr: SocketAddr) {
        let sid = server.session_id();
        server.handle_datagram(now, addr, &join(sid, [0; 16]));
        let mut buf = vec![0u8; 65_536];
        let mut token = None;
        for _ in 0..10_000 {
            let Some(t) = server.poll_transmit(now, &mut buf) else {
                break;
            };
            if let Ok(Message {
                body: Body::Announce(a),
                ..
            }) = Message::parse(&buf[..t.len])
            {
                if t.dest == Dest::Peer(addr) {
                    token = Some(a.token);
                }
            }
        }
        let token = token.expect("an announce reply with a token");
        server.handle_datagram(now, addr, &join(sid, token));
    }

    /// A server of `img` started at `t0`.
    fn server(cfg: ServerConfig, img: Vec<u8>, t0: Instant) -> Server {
        let source = Arc::new(MemSource::new(img, PS));
        Server::with_info(
            cfg,
            source.clone(),
            mcdist::source::scan(source.as_ref()).expect("an in-memory image scans"),
            t0,
        )
        .expect("valid configuration")
    }

    /// Group data pages the server sends now, as (pfn, flags), until it has nothing more.
    fn drain(server: &mut Server, now: Instant) -> Vec<(u64, mcdist::wire::DataFlags)> {
        let mut buf = vec![0u8; 65_536];
        let mut out = Vec::new();
        for _ in 0..10_000 {
            let Some(t) = server.poll_transmit(now, &mut buf) else {
                break;
            };
            if t.dest != Dest::Group {
                continue;
            }
            if let Ok(Message {
                body: Body::Data(d),
                ..
            }) = Message::parse(&buf[..t.len])
            {
                out.push((d.pfn, d.flags));
            }
        }
        out
    }

    #[test]
    fn replay_follows_recorded_order_and_demand_preempts_it() {
        let pages = 64;
        // Every 7th page is zero.
        let cfg = ServerConfig {
            session_id: Some(0x77),
            push_neighbors: false,
            working_set_push: true,
            ..ServerConfig::default()
        };
        let t0 = Instant::now();
        let mut server = server(cfg, test_image(pages, PS, 7, 3), t0);
        let zero = server.image_info().zero_map.clone();
        let sid = server.session_id();
        let a: SocketAddr = "10.0.0.2:9000".parse().expect("address");
        let b: SocketAddr = "10.0.0.3:9000".parse().expect("address");

        // Generation 1 faults on these pages, in this order, and on a zero page
        // (answered from the zero map, never recorded nor replayed).
        let order: Vec<u64> = vec![40, 3, 21, 9, 50, 33];
        let zero_page = (0..pages as u64)
            .find(|&p| zero.get(p))
            .expect("the test image has zero pages");
        let mut now = t0;
        validate(&mut server, now, a);
        drain(&mut server, now);
        for (i, &p) in order.iter().enumerate() {
            now += Duration::from_millis(1);
            server.handle_datagram(now, a, &request(sid, p));
            if i == 2 {
                server.handle_datagram(now, a, &request(sid, zero_page));
            }
            drain(&mut server, now);
        }
        assert!(order.iter().all(|&p| !zero.get(p)));
        assert_eq!(server.working_set().order(), &order[..]);
        // A clone of the same generation joining a moment later sets off no replay.
        now += Duration::from_millis(1);
        let a2: SocketAddr = "10.0.0.4:9000".parse().expect("address");
        validate(&mut server, now, a2);
        drain(&mut server, now);
        assert_eq!(server.working_set().replays_started(), 0);
        assert_eq!(server.stats().ws_push_pages, 0);

        // Generation 2 joins later (its address validated): the replay pushes
        // the order, zero pages left out.
        now += Duration::from_secs(1);
        validate(&mut server, now, b);
        // Before the replay gets far, the new clone faults on a page late in the order.
        server.handle_datagram(now, b, &request(sid, 33));
        let sent = drain(&mut server, now);
        // 33 went out on demand after the join: the replay leaves it out.
        let expected: Vec<u64> = order.iter().copied().filter(|&p| p != 33).collect();
        assert_eq!(
            sent.first().map(|s| s.0),
            Some(33),
            "demand goes before the replay: {sent:?}"
        );
        assert!(sent[0].1.contains(Data::DEMAND));
        let replayed: Vec<u64> = sent[1..].iter().map(|s| s.0).collect();
        assert_eq!(replayed, expected, "replay in recorded order");
        assert!(sent[1..].iter().all(|s| s.1.contains(Data::PUSH)));
        assert_eq!(server.stats().ws_push_pages, expected.len() as u64);
        eprintln!("recorded {order:?}, sent to generation 2: {sent:?}");
    }

    /// Neighbour push skips only pages the group was sent since the asker joined:
    /// a clone joining later gets the neighbours of its faults pushed again.
    #[test]
    fn neighbour_push_serves_a_receiver_that_joined_later() {
        let pages = 256;
        let (mut server, t0) = push_server(0x78, pages, (16, 16));
        let sid = server.session_id();
        let (a, b) = (addr(2), addr(3));
        let pushed = |sent: &[Sent]| pushed_in(sent, 0..pages as u64);
        validate(&mut server, t0, a);
        drain(&mut server, t0);
        let now = t0 + Duration::from_millis(1);
        server.handle_datagram(now, a, &request(sid, 100));
        let first = pushed(&drain(&mut server, now));
        assert_eq!(first, (101..117).collect::<Vec<u64>>());
        // The same fault by A again pushes nothing: A was sent those pages.
        let now = now + Duration::from_millis(1);
        server.handle_datagram(now, a, &request(sid, 100));
        assert!(pushed(&drain(&mut server, now)).is_empty());
        // B joins a second later and faults on the same page: it was not there
        // when the neighbours went out, so they go again.
        let now = now + Duration::from_secs(1);
        validate(&mut server, now, b);
        drain(&mut server, now);
        server.handle_datagram(now, b, &request(sid, 100));
        assert_eq!(pushed(&drain(&mut server, now)), first);
    }

    /// Clones that each read their own region (their share of a table) get a push
    /// stream each: faults that alternate between two regions grow both windows, where
    /// one stream re-aimed by every fault went back to the smallest window at each.
    #[test]
    fn neighbour_push_follows_two_regions_at_once() {
        let pages = 4096;
        let (mut server, t0) = push_server(0x79, pages, (16, 1024));
        let sid = server.session_id();
        let (a, b) = (addr(2), addr(3));
        validate(&mut server, t0, a);
        validate(&mut server, t0, b);
        drain(&mut server, t0);
        // Each round A then B fault at the first page of their region not pushed yet;
        // pages pushed in each region that round. In round 1, B's fault stops A's
        // stream, which A's fault had followed once only; from the third fault on, both
        // streams go on.
        let rounds = [(16u64, 16u64), (0, 32), (64, 64), (128, 128), (256, 256)];
        let (mut next_a, mut next_b) = (100u64, 2000u64);
        let mut now = t0;
        for (round, (want_a, want_b)) in rounds.into_iter().enumerate() {
            now += Duration::from_millis(1);
            let mut sent = Vec::new();
            // Drained over 200 ms: the pushes go at the server's starting rate.
            let mut drain_for = |server: &mut Server, now: &mut Instant| {
                for _ in 0..200 {
                    sent.extend(drain(server, *now));
                    *now += Duration::from_millis(1);
                }
            };
            server.handle_datagram(now, a, &request(sid, next_a));
            if round == 0 {
                // Two first faults: A's push goes before B starts another stream.
                drain_for(&mut server, &mut now);
            }
            server.handle_datagram(now, b, &request(sid, next_b));
            drain_for(&mut server, &mut now);
            let (got_a, got_b) = (
                pushed_in(&sent, 0..1000),
                pushed_in(&sent, 1000..pages as u64),
            );
            let want = |from: u64, n: u64| (from + 1..=from + n).collect::<Vec<u64>>();
            assert_eq!(got_a, want(next_a, want_a), "region A, round {round}");
            assert_eq!(got_b, want(next_b, want_b), "region B, round {round}");
            next_a += want_a + 1;
            next_b += want_b + 1;
        }
    }

    /// A data page the server sent: (pfn, flags).
    type Sent = (u64, mcdist::wire::DataFlags);

    /// A server of `pages` with neighbour push (`window`) and no working-set replay.
    fn push_server(session: u64, pages: usize, window: (u64, u64)) -> (Server, Instant) {
        let cfg = ServerConfig {
            session_id: Some(session),
            working_set_push: false,
            push_window: window,
            ..ServerConfig::default()
        };
        let t0 = Instant::now();
        (server(cfg, test_image(pages, PS, 0, 5), t0), t0)
    }

    /// Receiver `n`'s address.
    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 9000))
    }

    /// The pages in `range` that `sent` pushed, in order.
    fn pushed_in(sent: &[Sent], range: std::ops::Range<u64>) -> Vec<u64> {
        let mut p: Vec<u64> = sent
            .iter()
            .filter(|s| s.1.contains(Data::PUSH) && range.contains(&s.0))
            .map(|s| s.0)
            .collect();
        p.sort_unstable();
        p
    }
}
