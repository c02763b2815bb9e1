//! RaptorQ FEC over swept pages, in the deterministic simulator: the image
//! arrives byte-identical with FEC under independent loss, burst loss,
//! reordering and duplication, and at 5 % loss over 16 receivers the server
//! sends fewer bytes with FEC than without (a property of the protocol, not a
//! timing). Hostile repair datagrams are dropped and counted, never panic.

use bytes::Bytes;
use mcdist::server::ServerConfig;
use mcdist::sim::{test_image, ClientSpec, LinkConfig, Loss, Sim, Workload};
use mcdist::wire::{Body, HeaderFlags, Message, Repair};
use std::time::Duration;

const PS: usize = 4096;

fn cfg(fec: bool, clients: usize) -> ServerConfig {
    ServerConfig {
        session_id: Some(0xfec),
        max_datagram: 1500,
        sweep: true,
        sweep_min_clients: clients,
        fec,
        ..ServerConfig::default()
    }
}

struct Run {
    bytes_ratio: f64,
    fec_pages: u64,
    nack_pages: u64,
    done_ms: f64,
}

fn run(seed: u64, pages: usize, clients: usize, server: ServerConfig, link: LinkConfig) -> Run {
    let img = test_image(pages, PS, 7, seed);
    let image_bytes = img.len() as f64;
    let mut sim = Sim::new(seed, server, img, PS).unwrap();
    for _ in 0..clients {
        let mut spec = ClientSpec::fetch_all(0.0);
        spec.downlink = link;
        spec.uplink = link;
        sim.add_client(spec);
    }
    assert!(
        sim.drive(Duration::from_secs(600)).unwrap(),
        "seed {seed}: not settled"
    );
    sim.verify().unwrap();
    let (mut fec_pages, mut nack_pages) = (0, 0);
    let mut worst = Duration::ZERO;
    for c in sim.clients() {
        assert!(c.failed.is_none(), "seed {seed}: {:?}", c.failed);
        assert!(
            c.mismatches.is_empty() && c.double_ready == 0,
            "seed {seed}"
        );
        fec_pages += c.client.stats().fec_pages;
        nack_pages += c.client.stats().nack_pages;
        worst = worst.max(c.finished_after.unwrap_or_default());
    }
    Run {
        bytes_ratio: sim.server().stats().bytes_sent as f64 / image_bytes,
        fec_pages,
        nack_pages,
        done_ms: worst.as_secs_f64() * 1e3,
    }
}

#[test]
fn fec_sends_fewer_bytes_at_5pct_loss_16_receivers() {
    for seed in [1u64, 2] {
        let plain = run(seed, 2048, 16, cfg(false, 16), LinkConfig::lossy(0.05));
        let fec = run(seed, 2048, 16, cfg(true, 16), LinkConfig::lossy(0.05));
        eprintln!(
            "seed {seed}: server bytes / image: without FEC {:.3} ({} pages NACKed, {:.0} ms), with FEC {:.3} ({} pages NACKed, {} recovered, {:.0} ms)",
            plain.bytes_ratio, plain.nack_pages, plain.done_ms, fec.bytes_ratio, fec.nack_pages, fec.fec_pages, fec.done_ms
        );
        assert!(fec.fec_pages > 0, "seed {seed}: FEC recovered nothing");
        assert!(
            fec.bytes_ratio < plain.bytes_ratio,
            "seed {seed}: FEC {:.3} not below {:.3}",
            fec.bytes_ratio,
            plain.bytes_ratio
        );
    }
}

/// FEC with a fixed minimum overhead, so a small image is protected from its first page.
fn fec_always(clients: usize) -> ServerConfig {
    ServerConfig {
        fec_min_overhead: 0.15,
        fec_block_pages: 16,
        ..cfg(true, clients)
    }
}

#[test]
fn fec_survives_burst_loss_reordering_and_duplication() {
    let links = [
        (
            "gilbert-elliott",
            LinkConfig {
                loss: Loss::GilbertElliott {
                    p_good_to_bad: 0.02,
                    p_bad_to_good: 0.3,
                    loss_good: 0.01,
                    loss_bad: 0.5,
                },
                ..LinkConfig::default()
            },
        ),
        (
            "reorder",
            LinkConfig {
                reorder: 0.2,
                reorder_delay: Duration::from_millis(3),
                jitter: Duration::from_micros(300),
                ..LinkConfig::lossy(0.05)
            },
        ),
        (
            "duplicate",
            LinkConfig {
                duplicate: 0.2,
                ..LinkConfig::lossy(0.05)
            },
        ),
    ];
    for (name, link) in links {
        for seed in 0..4u64 {
            let r = run(seed, 512, 8, fec_always(8), link);
            eprintln!(
                "{name} seed {seed}: {:.3} x image, {} pages recovered by FEC, {} NACKed",
                r.bytes_ratio, r.fec_pages, r.nack_pages
            );
            assert!(r.fec_pages > 0, "{name} seed {seed}: FEC recovered nothing");
        }
    }
}

/// Lazy clones: pages pushed next to faults are protected too.
#[test]
fn fec_protects_pushed_pages() {
    let img = test_image(1024, PS, 7, 3);
    let server = ServerConfig {
        sweep: false,
        ..fec_always(0)
    };
    let mut sim = Sim::new(3, server, img, PS).unwrap();
    let faults: Vec<u64> = (0..1024).step_by(3).collect();
    for _ in 0..4 {
        let mut spec = ClientSpec::faults(0.05, faults.clone(), Duration::from_micros(50));
        spec.workload = Workload::Faults {
            pages: faults.clone(),
            think: Duration::from_micros(50),
        };
        sim.add_client(spec);
    }
    assert!(sim.drive(Duration::from_secs(120)).unwrap());
    sim.verify().unwrap();
    let recovered: u64 = sim
        .clients()
        .iter()
        .map(|c| c.client.stats().fec_pages)
        .sum();
    assert!(sim.server().stats().fec_repairs > 0);
    assert!(recovered > 0, "no pushed page was recovered by FEC");
    for c in sim.clients() {
        assert!(c.failed.is_none(), "{:?}", c.failed);
    }
}

fn repair_datagram(session: u64, r: Repair<'_>) -> Bytes {
    let m = Message {
        session,
        seq: 1,
        flags: HeaderFlags::empty(),
        body: Body::Repair(r),
    };
    let mut buf = vec![0u8; m.buffer_len()];
    m.emit(&mut buf).unwrap();
    Bytes::from(buf)
}

/// Repair datagrams that do not fit the session or contradict a block are
/// dropped and counted; the image still arrives intact.
#[test]
fn hostile_repairs_are_dropped_and_counted() {
    let img = test_image(256, PS, 7, 9);
    let mut sim = Sim::new(9, fec_always(2), img, PS).unwrap();
    for _ in 0..2 {
        sim.add_client(ClientSpec::fetch_all(0.05));
    }
    sim.run_until(Duration::from_millis(5)).unwrap();
    let from = Sim::SERVER_ADDR;
    let sym = vec![0xa5u8; 1366];
    let all = [0xffu8; 128];
    let bad = [
        // symbol size that does not match the session's fragments
        Repair {
            first_pfn: 1,
            span: 1,
            symbols_per_page: 3,
            symbol_size: 1000,
            esi: 3,
            burst_share: 4,
            members: &[1],
            symbol: &sym[..1000],
        },
        // block past the end of the image
        Repair {
            first_pfn: 250,
            span: 64,
            symbols_per_page: 3,
            symbol_size: 1366,
            esi: 200,
            burst_share: 4,
            members: &all[..8],
            symbol: &sym,
        },
        // wrong page geometry (one symbol per page of 1366 bytes)
        Repair {
            first_pfn: 3,
            span: 1,
            symbols_per_page: 1,
            symbol_size: 1366,
            esi: 1,
            burst_share: 4,
            members: &[1],
            symbol: &sym,
        },
    ];
    for r in bad {
        sim.inject(Some(0), from, repair_datagram(0xfec, r), Duration::ZERO);
    }
    // The same block told two ways: the second is refused.
    let a = Repair {
        first_pfn: 200,
        span: 2,
        symbols_per_page: 3,
        symbol_size: 1366,
        esi: 6,
        burst_share: 4,
        members: &[0b11],
        symbol: &sym,
    };
    let b = Repair {
        span: 1,
        members: &[0b1],
        ..a
    };
    sim.inject(Some(0), from, repair_datagram(0xfec, a), Duration::ZERO);
    sim.inject(
        Some(0),
        from,
        repair_datagram(0xfec, b),
        Duration::from_micros(1),
    );
    // Truncated and oversized counts fail to parse.
    let mut trunc = repair_datagram(0xfec, a).to_vec();
    trunc.truncate(40);
    sim.inject(Some(0), from, Bytes::from(trunc), Duration::ZERO);
    let mut huge = repair_datagram(0xfec, a).to_vec();
    huge[32..34].copy_from_slice(&u16::MAX.to_be_bytes()); // span
    sim.inject(Some(0), from, Bytes::from(huge), Duration::ZERO);
    sim.run_until(Duration::from_millis(6)).unwrap();
    let st = sim.client(0).client.stats().clone();
    assert!(st.fec_repairs_refused >= 4, "{st:?}");
    assert!(st.malformed >= 2, "{st:?}");
    assert!(sim.drive(Duration::from_secs(60)).unwrap());
    sim.verify().unwrap();
    assert!(sim.client(0).failed.is_none());
}
