//! Deterministic simulation: one server, sixteen clients, whole-image fetches
//! and demand faults under loss. Every client gets every page byte-identical.

use mcdist::server::ServerConfig;
use mcdist::sim::{test_image, ClientSpec, Sim};
use std::time::Duration;

const PAGES: usize = 256;
const PS: usize = 4096;

fn server_cfg(sweep: bool) -> ServerConfig {
    ServerConfig {
        session_id: Some(0x5eed),
        max_datagram: 1500,
        sweep,
        sweep_min_clients: 16,
        ..ServerConfig::default()
    }
}

fn run_fetch_all(seed: u64, loss: f64, sweep: bool) -> Sim {
    let img = test_image(PAGES, PS, 7, seed);
    let mut sim = Sim::new(seed, server_cfg(sweep), img, PS).unwrap();
    for _ in 0..16 {
        sim.add_client(ClientSpec::fetch_all(loss));
    }
    let done = sim.drive(Duration::from_secs(60)).unwrap();
    assert!(
        done,
        "seed {seed} loss {loss}: not every client settled: {sim:?}"
    );
    sim.verify().unwrap();
    sim
}

#[test]
fn whole_image_sixteen_clients_under_loss() {
    for loss in [0.0, 0.05, 0.10, 0.20] {
        for sweep in [true, false] {
            let sim = run_fetch_all(1, loss, sweep);
            for (i, c) in sim.clients().iter().enumerate() {
                assert!(c.failed.is_none(), "client {i} failed: {:?}", c.failed);
                assert!(c.client.is_complete(), "client {i} incomplete");
            }
            let s = sim.server().stats();
            let nz = sim.nonzero_pages();
            eprintln!(
                "loss {loss} sweep {sweep}: t={:?} pages_sent={} nonzero={} ratio={:.2} req={} nacks={} supp_lock={} supp_q={}",
                sim.clients().iter().filter_map(|c| c.finished_after).max(),
                s.pages_sent, nz, s.pages_sent as f64 / nz as f64, s.requests, s.nacks, s.suppressed_lockstep, s.suppressed_queued
            );
        }
    }
}

/// Pages a vCPU-like workload faults on: a deterministic scatter over the image.
fn fault_pages(n: usize, seed: u64) -> Vec<u64> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s % PAGES as u64
        })
        .collect()
}

#[test]
fn demand_faults_sixteen_clients_under_loss() {
    for loss in [0.0, 0.05, 0.10, 0.20] {
        let seed = 7;
        let img = test_image(PAGES, PS, 7, seed);
        let mut sim = Sim::new(seed, server_cfg(false), img, PS).unwrap();
        for i in 0..16u64 {
            // Each clone faults on its own scatter of pages.
            sim.add_client(ClientSpec::faults(
                loss,
                fault_pages(64, i + 1),
                Duration::from_micros(200),
            ));
        }
        assert!(sim.drive(Duration::from_secs(60)).unwrap(), "loss {loss}");
        sim.verify().unwrap();
        for (i, c) in sim.clients().iter().enumerate() {
            assert!(
                c.failed.is_none(),
                "loss {loss}: client {i} failed: {:?}",
                c.failed
            );
            assert!(c.finished(), "loss {loss}: client {i} did not finish");
            assert_eq!(c.fault_latencies.len(), 64);
            let Some(pages) = (match &c.spec().workload {
                mcdist::sim::Workload::Faults { pages, .. } => Some(pages),
                _ => None,
            }) else {
                unreachable!()
            };
            for &p in pages {
                assert!(c.client.has_page(p), "client {i} lacks faulted page {p}");
            }
        }
        let s = sim.server().stats();
        eprintln!(
            "faults loss {loss}: t={:?} pages_sent={} demand={} push={} repair={} requests={}",
            sim.clients().iter().filter_map(|c| c.finished_after).max(),
            s.pages_sent,
            s.demand_pages,
            s.push_pages,
            s.repair_pages,
            s.pages_requested
        );
    }
}
