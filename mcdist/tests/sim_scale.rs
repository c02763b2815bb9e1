//! Many receivers on one session, in the deterministic simulator: server bytes,
//! control traffic and time to the last receiver as the receiver count grows.
//!
//! `scale_table` prints the table for the receiver counts in `MCDIST_SCALE_N`
//! (default `16,128,1000`) and the loss rates in `MCDIST_SCALE_LOSS` (percent,
//! default `1,5`), with and without FEC (`MCDIST_SCALE_FEC=0,1`):
//!
//! ```text
//! MCDIST_SCALE_N=16,128,1000,10000 cargo test -p mcdist --release --test sim_scale -- --ignored --nocapture scale_table
//! ```

use mcdist::server::ServerConfig;
use mcdist::sim::{test_image, ClientSpec, Sim};
use std::time::{Duration, Instant};

const PS: usize = 4096;
/// 8 MiB.
const PAGES: usize = 2048;

#[derive(Debug, Clone, Copy)]
struct Metrics {
    n: usize,
    loss_pct: u32,
    fec: bool,
    bytes_per_byte: f64,
    nacks_per_rx: f64,
    control_per_rx: f64,
    last_ms: f64,
    median_ms: f64,
    unicast: u64,
    wall_us_per_rx: f64,
}

fn config(n: usize, fec: bool) -> ServerConfig {
    ServerConfig {
        session_id: Some(0x5ca1e),
        max_datagram: 1500,
        sweep: true,
        sweep_min_clients: n,
        max_clients: n.max(4096),
        fec,
        ..ServerConfig::default()
    }
}

fn run(n: usize, loss_pct: u32, fec: bool, seed: u64) -> Metrics {
    let wall = Instant::now();
    let loss = f64::from(loss_pct) / 100.0;
    let img = test_image(PAGES, PS, 0, seed);
    let image_bytes = img.len() as f64;
    let mut sim = Sim::new(seed, config(n, fec), img, PS).unwrap();
    for _ in 0..n {
        sim.add_client(ClientSpec::fetch_all(loss));
    }
    assert!(
        sim.drive(Duration::from_secs(600)).unwrap(),
        "n {n} loss {loss_pct}% fec {fec}: not settled"
    );
    sim.verify().unwrap();
    let mut done: Vec<f64> = sim
        .clients()
        .iter()
        .map(|c| {
            assert!(c.failed.is_none(), "{:?}", c.failed);
            c.finished_after.unwrap_or_default().as_secs_f64() * 1e3
        })
        .collect();
    done.sort_by(f64::total_cmp);
    let st = sim.server().stats();
    Metrics {
        n,
        loss_pct,
        fec,
        bytes_per_byte: st.bytes_sent as f64 / image_bytes,
        nacks_per_rx: st.nacks as f64 / n as f64,
        control_per_rx: sim.server_rx_datagrams as f64 / n as f64,
        last_ms: done[n - 1],
        median_ms: done[(n - 1) / 2],
        unicast: sim.server_unicast_datagrams,
        wall_us_per_rx: wall.elapsed().as_secs_f64() * 1e6 / n as f64,
    }
}

fn env_list(name: &str, default: &str) -> Vec<u64> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|x| x.trim().parse().ok())
        .collect()
}

#[test]
#[ignore = "a measurement: run with --release --ignored"]
fn scale_table() {
    let ns = env_list("MCDIST_SCALE_N", "16,128,1000");
    let losses = env_list("MCDIST_SCALE_LOSS", "1,5");
    let fecs = env_list("MCDIST_SCALE_FEC", "0,1");
    eprintln!(
        "#    n loss fec bytes/img nacks/rx ctl/rx ctl/100pg last_ms median_ms unicast wall_us/rx"
    );
    for &loss in &losses {
        for &fec in &fecs {
            for &n in &ns {
                let m = run(n as usize, loss as u32, fec != 0, 1);
                eprintln!(
                    "{:>6} {:>3} {:>3} {:>9.3} {:>8.1} {:>6.1} {:>10.2} {:>7.1} {:>9.1} {:>7} {:>10.0}",
                    m.n,
                    m.loss_pct,
                    u8::from(m.fec),
                    m.bytes_per_byte,
                    m.nacks_per_rx,
                    m.control_per_rx,
                    m.control_per_rx * 100.0 / PAGES as f64,
                    m.last_ms,
                    m.median_ms,
                    m.unicast,
                    m.wall_us_per_rx
                );
            }
        }
    }
}
