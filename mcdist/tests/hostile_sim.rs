//! Hostile and malformed input against a live simulated session: every bad
//! datagram is dropped and counted, nothing panics, nothing grows with an
//! attacker-chosen number, and honest clients still get byte-identical images.

mod common;

use bytes::Bytes;
use mcdist::client::{Client, ClientConfig};
use mcdist::server::ServerConfig;
use mcdist::sim::{test_image, ClientSpec, Sim};
use mcdist::wire::{
    Announce, Body, Data, Header, HeaderFlags, Kind, PageRange, Request, HEADER_LEN, MAX_RANGE_LEN,
    VERSION,
};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const PS: usize = 4096;
const PAGES: usize = 256;
const SESSION: u64 = 0xbad;

fn emit(session: u64, body: Body<'_>) -> Bytes {
    common::emit(session, body).into()
}

fn request(session: u64, flags: mcdist::wire::RequestFlags, ranges: &[PageRange]) -> Bytes {
    common::request(session, flags, ranges).into()
}

/// Datagrams a server must drop, each with the counter it must land in.
fn bad_for_server() -> Vec<(&'static str, Bytes)> {
    let good = request(
        SESSION,
        mcdist::wire::RequestFlags::empty(),
        &[PageRange { start: 1, len: 1 }],
    );
    let mut wrong_magic = good.to_vec();
    wrong_magic[0] = b'X';
    let mut wrong_version = good.to_vec();
    wrong_version[2] = VERSION + 1;
    let mut bad_kind = good.to_vec();
    bad_kind[3] = 0xee;
    // Claims 5000 ranges, carries one (the count is the fixed part's last two bytes).
    let mut short_ranges = good.to_vec();
    let n = HEADER_LEN + Request::FIXED_LEN - 2;
    short_ranges[n..n + 2].copy_from_slice(&5000u16.to_be_bytes());
    // A zero-length range and an over-long one.
    let mut zero_len = good.to_vec();
    let r = HEADER_LEN + Request::FIXED_LEN;
    zero_len[r + 8..r + 12].copy_from_slice(&0u32.to_be_bytes());
    let mut too_long = good.to_vec();
    too_long[r + 8..r + 12].copy_from_slice(&(MAX_RANGE_LEN + 1).to_be_bytes());
    let mut oversized = good.to_vec();
    oversized.resize(65_507, 0xa5);
    vec![
        ("malformed", Bytes::from_static(b"MD\x01")),
        ("malformed", Bytes::new()),
        ("malformed", Bytes::from(wrong_magic)),
        ("malformed", Bytes::from(wrong_version)),
        ("malformed", Bytes::from(bad_kind)),
        ("malformed", Bytes::from(short_ranges)),
        ("malformed", Bytes::from(zero_len)),
        ("malformed", Bytes::from(too_long)),
        // Trailing bytes after a complete body are ignored (a trailer may
        // follow); the request itself is served like any other.
        ("request", Bytes::from(oversized)),
        (
            "foreign",
            request(
                SESSION + 1,
                mcdist::wire::RequestFlags::empty(),
                &[PageRange { start: 1, len: 1 }],
            ),
        ),
        // Page numbers past the end of the image, and a range reaching u64::MAX.
        (
            "out_of_range",
            request(
                SESSION,
                mcdist::wire::RequestFlags::empty(),
                &[PageRange {
                    start: PAGES as u64 + 5,
                    len: 3,
                }],
            ),
        ),
        (
            "out_of_range",
            request(
                SESSION,
                mcdist::wire::RequestFlags::empty(),
                &[PageRange {
                    start: u64::MAX - 10,
                    len: MAX_RANGE_LEN,
                }],
            ),
        ),
        // Server-side kinds sent to a server.
        (
            "foreign",
            emit(
                SESSION,
                Body::Data(Data {
                    pfn: 0,
                    frag_index: 0,
                    frag_count: 1,
                    flags: mcdist::wire::DataFlags::empty(),
                    payload: &[],
                }),
            ),
        ),
    ]
}

fn datagram_with(session: u64, kind: Kind, body: &[u8]) -> Bytes {
    let mut v = vec![0u8; HEADER_LEN];
    Header {
        kind,
        flags: HeaderFlags::empty(),
        session,
        seq: 7,
    }
    .emit(&mut v)
    .unwrap();
    v.extend_from_slice(body);
    Bytes::from(v)
}

/// Datagrams a client must drop (spoofed as coming from the server).
fn bad_for_client() -> Vec<Bytes> {
    let mut frag_past_count = Vec::new();
    frag_past_count.extend_from_slice(&3u64.to_be_bytes());
    frag_past_count.extend_from_slice(&5u16.to_be_bytes()); // index 5
    frag_past_count.extend_from_slice(&2u16.to_be_bytes()); // of 2
    frag_past_count.push(Data::DEMAND.bits());
    frag_past_count.extend_from_slice(&[1; 100]);
    vec![
        datagram_with(SESSION, Kind::Data, &frag_past_count),
        // A page past the end of the image.
        emit(
            SESSION,
            Body::Data(Data {
                pfn: 1 << 40,
                frag_index: 0,
                frag_count: 1,
                flags: Data::DEMAND,
                payload: &[7; PS],
            }),
        ),
        // A page of the wrong length.
        emit(
            SESSION,
            Body::Data(Data {
                pfn: 2,
                frag_index: 0,
                frag_count: 1,
                flags: Data::DEMAND,
                payload: &[7; 100],
            }),
        ),
        // Another session's page.
        emit(
            SESSION ^ 1,
            Body::Data(Data {
                pfn: 2,
                frag_index: 0,
                frag_count: 1,
                flags: Data::DEMAND,
                payload: &[7; PS],
            }),
        ),
        Bytes::from_static(b"garbage that is not mcdist at all"),
    ]
}

#[test]
fn bad_datagrams_are_dropped_and_counted_and_honest_clients_finish() {
    let cfg = ServerConfig {
        session_id: Some(SESSION),
        max_datagram: 1500,
        sweep: true,
        sweep_min_clients: 4,
        ..ServerConfig::default()
    };
    let mut sim = Sim::new(5, cfg, test_image(PAGES, PS, 6, 5), PS).unwrap();
    for i in 0..4u64 {
        let spec = if i < 2 {
            ClientSpec::fetch_all(0.02)
        } else {
            ClientSpec::faults(
                0.02,
                (0..64).map(|k| (k * 11 + i) % PAGES as u64).collect(),
                Duration::from_micros(100),
            )
        };
        sim.add_client(spec);
    }
    let rogue: SocketAddr = "10.9.9.9:4444".parse().unwrap();
    let bad_s = bad_for_server();
    let bad_c = bad_for_client();
    // Spray the bad datagrams throughout the session, at server and clients.
    let rounds = 50u32;
    for k in 0..rounds {
        let at = Duration::from_micros(u64::from(k) * 700);
        for (_, d) in &bad_s {
            sim.inject(None, rogue, d.clone(), at);
        }
        for c in 0..4 {
            for d in &bad_c {
                sim.inject(Some(c), Sim::SERVER_ADDR, d.clone(), at);
            }
        }
    }
    assert!(sim.drive(Duration::from_secs(60)).unwrap());
    // The clients may finish before the spray ends: deliver all of it.
    sim.run_until(Duration::from_micros(u64::from(rounds) * 700 + 1000))
        .unwrap();
    sim.verify().unwrap();
    for (i, c) in sim.clients().iter().enumerate() {
        assert!(
            c.failed.is_none() && c.finished(),
            "client {i}: {:?}",
            c.failed
        );
        let st = c.client.stats();
        // Frag index past count, bad payload length and garbage are malformed;
        // the other session's page foreign; the page past the end out of range.
        assert!(
            st.malformed >= 2 * u64::from(rounds) / 2,
            "client {i}: {st:?}"
        );
        assert!(
            st.out_of_range >= u64::from(rounds) / 2,
            "client {i}: {st:?}"
        );
        assert!(st.foreign >= u64::from(rounds) / 2, "client {i}: {st:?}");
    }
    let s = sim.server().stats();
    let want =
        |what: &str| bad_s.iter().filter(|(k, _)| *k == what).count() as u64 * u64::from(rounds);
    assert!(s.malformed >= want("malformed"), "{s:?}");
    assert!(s.foreign >= want("foreign"), "{s:?}");
    // The rogue never validated its address: its requests are dropped before
    // their pages are looked at.
    assert!(
        s.unvalidated >= want("out_of_range") + want("request"),
        "{s:?}"
    );
    // The out-of-range ranges made the server consider nothing.
    assert!(s.pages_requested < 64 * 4 * 8 + 5_000, "{s:?}");
}

#[test]
fn absurd_announces_allocate_nothing() {
    // An announce claiming 2^50 pages, or 2^32 zero-map chunks, must be
    // dropped, not turned into a bitmap of that size.
    let server: SocketAddr = "10.0.0.1:7000".parse().unwrap();
    let t0 = Instant::now();
    let mut c = Client::new(ClientConfig::new(server), t0);
    let huge = Announce {
        image_size: 1 << 62,
        page_size: 4096,
        page_count: (1u64 << 62) / 4096,
        digest: [1; 32],
        zero_count: 0,
        zero_map_digest: [0; 32],
        zero_map_chunks: 1,
        sweep_pos: 0,
        rate: 0,
        flags: mcdist::wire::AnnounceFlags::empty(),
        frag_payload: 1400,
        token: [0; 16],
    };
    let many_chunks = Announce {
        image_size: 4096 * 10,
        page_count: 10,
        zero_map_chunks: u32::MAX,
        ..huge
    };
    for a in [huge, many_chunks] {
        c.handle_datagram(t0, server, emit(SESSION, Body::Announce(a)));
        assert!(c.session().is_none(), "accepted {a:?}");
    }
    assert_eq!(c.stats().malformed, 2);
    // A sane announce afterwards is taken.
    let ok = Announce {
        image_size: 4096 * 10,
        page_count: 10,
        zero_map_chunks: 1,
        flags: Announce::FLAG_HASH_PAGES,
        ..huge
    };
    c.handle_datagram(t0, server, emit(SESSION, Body::Announce(ok)));
    assert_eq!(c.session().map(|s| s.page_count), Some(10));
}

/// Virtual-time run of one honest fault workload, optionally with a rogue
/// source sending 50,000 retry requests per second for 64 pages each.
fn flood_run(flood: bool) -> (Duration, usize, u64, u64) {
    let cfg = ServerConfig {
        session_id: Some(SESSION),
        max_datagram: 9000,
        ..ServerConfig::default()
    };
    let mut sim = Sim::new(9, cfg, test_image(2048, PS, 0, 9), PS).unwrap();
    let pages: Vec<u64> = (0..300).map(|k| (k * 97) % 2048).collect();
    for _ in 0..3 {
        sim.add_client(ClientSpec::faults(
            0.01,
            pages.clone(),
            Duration::from_micros(100),
        ));
    }
    let rogue: SocketAddr = "10.9.9.9:4444".parse().unwrap();
    if flood {
        // Retry requests land in the unicast end game once the image has been
        // sent; before that they ask for multicast repairs.
        for k in 0..50_000u64 {
            let start = (k * 64) % 2048;
            let d = request(SESSION, Request::RETRY, &[PageRange { start, len: 64 }]);
            sim.inject(None, rogue, d, Duration::from_micros(20 * k));
        }
    }
    let mut peak = 0;
    for step in 1..=1000u64 {
        sim.run_until(Duration::from_millis(step)).unwrap();
        peak = peak.max(sim.server().queued_jobs());
        if sim.all_settled() {
            break;
        }
    }
    assert!(sim.drive(Duration::from_secs(60)).unwrap());
    sim.verify().unwrap();
    let worst = sim
        .clients()
        .iter()
        .map(|c| {
            assert!(c.failed.is_none() && c.finished(), "{:?}", c.failed);
            c.finished_after.unwrap_or_default()
        })
        .max()
        .unwrap_or_default();
    let s = sim.server().stats();
    (worst, peak, s.unvalidated, s.queue_full)
}

#[test]
fn rogue_request_flood_is_bounded_and_honest_clients_finish() {
    let (quiet, quiet_peak, _, _) = flood_run(false);
    let (loud, loud_peak, limited, full) = flood_run(true);
    eprintln!(
        "honest clients (virtual time): {quiet:?} without the flood, {loud:?} with 50k req/s; \
         peak queue {quiet_peak} vs {loud_peak}; dropped as unvalidated {limited}, refused on full queue {full}"
    );
    assert!(limited > 0, "the rogue's requests were looked at");
    // Queued work stays bounded whatever the flood: at most one entry per page
    // for group answers plus the per-receiver cap of unicast ones.
    assert!(loud_peak <= 2048 + 1024 + 64, "queue grew to {loud_peak}");
}
