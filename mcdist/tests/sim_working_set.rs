//! Deterministic simulation of recorded working-set push: a first generation of
//! clones faults on a working set; a second generation joining later faults on
//! the same pages and finds most of them pushed by the server's replay of the
//! first generation's fault order.

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
