//! Forged pages against unkeyed clients: datagrams of the right session with valid headers
//! and wrong bytes, for data pages (whole, fragmented, zero replies) and hash pages. Every
//! page a client hands out is byte-identical to the image, none of the forged ones is
//! handed out, and the forgeries are counted as integrity failures.

mod common;

use bytes::Bytes;
use mcdist::client::{Client, ClientConfig, ClientError, ClientEvent};
use mcdist::integrity::HashLayout;
use mcdist::server::ServerConfig;
use mcdist::sim::{test_image, ClientSpec, Sim};
use mcdist::wire::{Announce, Body, Data};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const PS: usize = 4096;
const PAGES: usize = 384;
const SESSION: u64 = 0x5eed;

fn data(
    pfn: u64,
    frag_index: u16,
    frag_count: u16,
    flags: mcdist::wire::DataFlags,
    payload: &[u8],
) -> Bytes {
    common::emit(
        SESSION,
        Body::Data(Data {
            pfn,
            frag_index,
            frag_count,
            flags,
            payload,
        }),
    )
    .into()
}

/// Forged datagrams for page `pfn`: the whole page, its three fragments (the server's
/// geometry at 1500-byte datagrams), and a zero reply.
fn forgeries(pfn: u64, fill: u8) -> Vec<Bytes> {
    let page = vec![fill; PS];
    let frag = PS.div_ceil(3);
    let mut v = vec![data(pfn, 0, 1, Data::DEMAND, &page)];
    for i in 0..3u16 {
        let start = usize::from(i) * frag;
        let end = (start + frag).min(PS);
        v.push(data(pfn, i, 3, Data::SWEEP, &page[start..end]));
    }
    v.push(data(pfn, 0, 1, Data::ZERO, &[]));
    v
}

#[test]
fn forged_data_and_hash_pages_never_reach_an_unkeyed_client() {
    let cfg = ServerConfig {
        session_id: Some(SESSION),
        max_datagram: 1500,
        sweep: true,
        sweep_min_clients: 4,
        ..ServerConfig::default()
    };
    let layout = HashLayout::new((PAGES * PS) as u64, PS).unwrap();
    let hash: Vec<u64> = (PAGES as u64..layout.total_pages()).collect();
    assert_eq!(hash.len(), 4, "three level-1 hash pages and the top one");
    let mut sim = Sim::new(11, cfg, test_image(PAGES, PS, 6, 11), PS).unwrap();
    for i in 0..4u64 {
        let spec = if i < 2 {
            ClientSpec::fetch_all(0.02)
        } else {
            ClientSpec::faults(
                0.02,
                (0..96).map(|k| (k * 13 + i) % PAGES as u64).collect(),
                Duration::from_micros(100),
            )
        };
        sim.add_client(spec);
    }
    // Throughout the session, at every client, as if from the server: forged copies of
    // data pages and of every hash page (each page forged a few times, below the bound
    // that fails a session).
    let rounds = 40u64;
    let mut forged = 0;
    for k in 0..rounds {
        let at = Duration::from_micros(k * 500);
        let mut pfns = vec![(k * 37) % PAGES as u64];
        if k % 4 == 0 {
            pfns.push(hash[(k / 4) as usize % hash.len()]);
        }
        for pfn in pfns {
            for d in forgeries(pfn, 0xa5 ^ k as u8) {
                for c in 0..4 {
                    sim.inject(Some(c), Sim::SERVER_ADDR, d.clone(), at);
                    forged += 1;
                }
            }
        }
    }
    assert!(sim.drive(Duration::from_secs(60)).unwrap());
    // Every page handed out equals the image; completed clients hold every page.
    sim.verify().unwrap();
    let mut failures = 0;
    for (i, c) in sim.clients().iter().enumerate() {
        assert!(
            c.failed.is_none() && c.finished(),
            "client {i}: {:?}",
            c.failed
        );
        let st = c.client.stats();
        failures += st.integrity_failures;
        eprintln!(
            "client {i}: {} integrity failures, {} held, {} hash pages",
            st.integrity_failures, st.integrity_held, st.hash_pages
        );
    }
    eprintln!("{forged} forged datagrams, {failures} pages refused, 0 handed out");
    assert!(failures > 0, "no forgery was ever checked");
}

/// A client that has joined session `SESSION` of a 10-page image.
fn joined(now: Instant, server: SocketAddr, a: Announce) -> Client {
    let mut c = Client::new(ClientConfig::new(server), now);
    c.handle_datagram(now, server, common::emit(SESSION, Body::Announce(a)).into());
    assert!(c.session().is_some());
    while let Some(e) = c.poll_event() {
        assert!(matches!(e, ClientEvent::SessionStarted(_)), "{e:?}");
    }
    c
}

#[test]
fn a_same_session_announce_of_another_image_fails_the_session() {
    let server: SocketAddr = "10.0.0.1:7000".parse().unwrap();
    let t0 = Instant::now();
    let real = Announce {
        image_size: 4096 * 10,
        page_size: 4096,
        page_count: 10,
        digest: [1; 32],
        zero_count: 0,
        zero_map_digest: [0; 32],
        zero_map_chunks: 1,
        sweep_pos: 0,
        rate: 0,
        flags: Announce::FLAG_HASH_PAGES,
        frag_payload: 1400,
        token: [0; mcdist::wire::TOKEN_LEN],
    };
    // What may change within a session: the sweep position, the rate, the push flags.
    let mut c = joined(t0, server, real);
    let moved = Announce {
        sweep_pos: 5,
        rate: 1 << 20,
        flags: real.flags | Announce::FLAG_SWEEP,
        ..real
    };
    c.handle_datagram(
        t0,
        server,
        common::emit(SESSION, Body::Announce(moved)).into(),
    );
    assert!(!c.is_failed());
    // What may not: each of these, announced under the same session id, is a hijack.
    let hijacks = [
        Announce {
            digest: [2; 32],
            ..real
        },
        Announce {
            image_size: 4096 * 20,
            page_count: 20,
            ..real
        },
        Announce {
            page_size: 8192,
            image_size: 8192 * 10,
            ..real
        },
        Announce {
            frag_payload: 700,
            ..real
        },
        Announce {
            zero_map_digest: [3; 32],
            ..real
        },
        Announce {
            flags: mcdist::wire::AnnounceFlags::empty(),
            ..real
        },
    ];
    for h in hijacks {
        let mut c = joined(t0, server, real);
        c.handle_datagram(t0, server, common::emit(SESSION, Body::Announce(h)).into());
        assert!(c.is_failed(), "accepted {h:?}");
        assert!(
            matches!(
                c.poll_event(),
                Some(ClientEvent::Failed(ClientError::ImageChanged { .. }))
            ),
            "{h:?}"
        );
        assert_eq!(c.session().map(|s| s.digest), Some(real.digest));
    }
    // A session without hash pages cannot be verified: refused from the first announce.
    let mut c = Client::new(ClientConfig::new(server), t0);
    let bare = Announce {
        flags: mcdist::wire::AnnounceFlags::empty(),
        ..real
    };
    c.handle_datagram(
        t0,
        server,
        common::emit(SESSION, Body::Announce(bare)).into(),
    );
    assert!(c.is_failed());
    assert!(matches!(
        c.poll_event(),
        Some(ClientEvent::Failed(ClientError::Unverifiable { .. }))
    ));
}
