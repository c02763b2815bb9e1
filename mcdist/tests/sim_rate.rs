//! Rate control under three kinds of loss, kept as a reviewed snapshot
//! (`tests/snapshots/rate_control.txt`).
//!
//! One server sweeps an image of 4096 pages of 4 KiB (every seventh page zero)
//! to 8 clients, in each of these networks:
//!
//! - `random5`: every link loses 5 % of datagrams both ways, at any rate;
//! - `random5_one`: only one client's links lose 5 %;
//! - `slow_one`: one client processes at most 15 MB/s (the others are not
//!   limited); its socket buffer (256 KiB) overflows when the server is faster;
//! - `slow_all`: every client processes at most 40 MB/s;
//! - `bottleneck`: every datagram of the server crosses one shared queue of
//!   256 KiB drained at 40 MB/s, which drops it for everyone when full;
//! - `bottleneck_random2`: the same bottleneck, and 2 % random loss on every link.
//! - `stalls`: every client is descheduled for 20 ms in every 200 ms, each at
//!   its own time (the clients take turns, as processes on shared cores do),
//!   and processes at 1 GB/s otherwise; its socket buffer (256 KiB) overflows
//!   during each stall at any rate but a trickle.
//! - `stalls_shared`: half the clients are descheduled together for 150 ms in every
//!   second (a stall their hosts share: writeback, a paused host), and process at
//!   1 GB/s otherwise: they lose the same datagrams.
//!
//! Each network runs twice: with receivers' overload (their socket's drops)
//! told apart from path loss (`sep`, the default) and with it counted as path
//! loss (`mixed`, [`RateConfig::separate_overload`] off). Times are virtual;
//! each row averages 4 seeds. The columns are the median client's and the
//! last fast client's completion time (clients the server isolated as slow
//! are left out of both), the last client's (isolated or not), server bytes
//! per non-zero image byte, the mean number of isolations, and datagrams
//! dropped at the clients' own receive queues per client.
//!
//! Like the goodput snapshot, every number must stay within 25 % (or 2 units)
//! of the reviewed value. To accept new numbers:
//!
//! ```text
//! MCDIST_UPDATE_SNAPSHOTS=1 cargo test --release -p mcdist --test sim_rate
//! ```

use mcdist::pacing::RateConfig;
use mcdist::server::ServerConfig;
use mcdist::sim::{test_image, ClientSpec, RxCapacity, Sim, Stalls};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

const PAGES: usize = 4096;
const PS: usize = 4096;
const CLIENTS: usize = 8;
const SEEDS: [u64; 4] = [1, 2, 3, 4];
const QUEUE: u64 = 256 * 1024;

#[derive(Clone, Copy)]
enum Net {
    Random5,
    Random5One,
    SlowOne,
    SlowAll,
    Bottleneck,
    BottleneckRandom2,
    Stalls,
    StallsShared,
}

impl Net {
    const ALL: [Net; 8] = [
        Net::Random5,
        Net::Random5One,
        Net::SlowOne,
        Net::SlowAll,
        Net::Bottleneck,
        Net::BottleneckRandom2,
        Net::Stalls,
        Net::StallsShared,
    ];

    fn name(self) -> &'static str {
        match self {
            Net::Random5 => "random5",
            Net::Random5One => "random5_one",
            Net::SlowOne => "slow_one",
            Net::SlowAll => "slow_all",
            Net::Bottleneck => "bottleneck",
            Net::BottleneckRandom2 => "bottleneck_random2",
            Net::Stalls => "stalls",
            Net::StallsShared => "stalls_shared",
        }
    }

    fn client(self, i: usize) -> ClientSpec {
        let loss = match self {
            Net::Random5 => 0.05,
            Net::Random5One if i == 0 => 0.05,
            Net::BottleneckRandom2 => 0.02,
            _ => 0.0,
        };
        let mut s = ClientSpec::fetch_all(loss);
        s.rx_capacity = match self {
            Net::SlowOne if i == 0 => Some(RxCapacity::new(15_000_000, QUEUE)),
            Net::SlowAll => Some(RxCapacity::new(40_000_000, QUEUE)),
            Net::Stalls => Some(RxCapacity {
                stalls: Some(Stalls {
                    every: Duration::from_millis(200),
                    length: Duration::from_millis(20),
                    phase: Duration::from_millis(25 * i as u64),
                }),
                ..RxCapacity::new(1_000_000_000, QUEUE)
            }),
            Net::StallsShared => Some(RxCapacity {
                stalls: (i < CLIENTS / 2).then_some(Stalls {
                    every: Duration::from_millis(1000),
                    length: Duration::from_millis(150),
                    phase: Duration::from_millis(100),
                }),
                ..RxCapacity::new(1_000_000_000, QUEUE)
            }),
            _ => None,
        };
        s
    }

    fn bottleneck(self) -> Option<RxCapacity> {
        matches!(self, Net::Bottleneck | Net::BottleneckRandom2)
            .then_some(RxCapacity::new(40_000_000, QUEUE))
    }
}

struct Row {
    net: &'static str,
    separate: bool,
    median_ms: f64,
    last_ms: f64,
    slowest_ms: f64,
    bytes_per_byte: f64,
    isolated: f64,
    drops_per_client: f64,
}

fn measure(net: Net, separate: bool) -> Row {
    let (mut median, mut last, mut bytes, mut isolated, mut drops) = (0.0, 0.0, 0.0, 0.0, 0.0);
    let mut slowest = 0.0;
    for seed in SEEDS {
        let cfg = ServerConfig {
            session_id: Some(0x7a7e),
            max_datagram: 1500,
            sweep: true,
            sweep_min_clients: CLIENTS,
            rate: RateConfig {
                separate_overload: separate,
                ..RateConfig::default()
            },
            ..ServerConfig::default()
        };
        let mut sim = Sim::new(seed, cfg, test_image(PAGES, PS, 7, seed), PS).unwrap();
        sim.set_bottleneck(net.bottleneck());
        for i in 0..CLIENTS {
            sim.add_client(net.client(i));
        }
        assert!(
            sim.drive(Duration::from_secs(600)).unwrap(),
            "{} seed {seed}",
            net.name()
        );
        sim.verify().unwrap();
        let mut times = Vec::new();
        let mut slowest_here: f64 = 0.0;
        for c in sim.clients() {
            assert!(c.failed.is_none(), "{}: {:?}", net.name(), c.failed);
            drops += c.rx_overflows as f64;
            let ms = c.finished_after.unwrap_or_default().as_secs_f64() * 1000.0;
            slowest_here = slowest_here.max(ms);
            if !sim.server().is_slow_receiver(c.addr) {
                times.push(ms);
            }
        }
        slowest += slowest_here;
        times.sort_by(f64::total_cmp);
        median += times.get(times.len() / 2).copied().unwrap_or_default();
        last += times.last().copied().unwrap_or_default();
        isolated += sim.server().stats().slow_receivers as f64;
        bytes += sim.server().stats().bytes_sent as f64 / (sim.nonzero_pages() as f64 * PS as f64);
    }
    let n = SEEDS.len() as f64;
    Row {
        net: net.name(),
        separate,
        median_ms: median / n,
        last_ms: last / n,
        slowest_ms: slowest / n,
        bytes_per_byte: bytes / n,
        isolated: isolated / n,
        drops_per_client: drops / n / CLIENTS as f64,
    }
}

fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# mcdist rate control: 1 server, {CLIENTS} clients, {PAGES} x {PS} B image, sweep, 1500 B datagrams, virtual time, mean of {} seeds",
        SEEDS.len()
    );
    let _ = writeln!(
        s,
        "# columns: network  overload(sep: told apart from path loss, mixed: counted as path loss)  median_ms  last_fast_ms  last_ms  server_bytes/nonzero_image_byte  isolated_slow  own_queue_drops/client"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:<20} {:<5} {:>8.1} {:>8.1} {:>8.1} {:>7.3} {:>5.2} {:>8.1}",
            r.net,
            if r.separate { "sep" } else { "mixed" },
            r.median_ms,
            r.last_ms,
            r.slowest_ms,
            r.bytes_per_byte,
            r.isolated,
            r.drops_per_client
        );
    }
    s
}

fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= 2.0 || (got - want).abs() <= 0.25 * want.abs()
}

#[test]
fn rate_control_snapshot() {
    let mut rows = Vec::new();
    let only = std::env::var("NET").ok();
    for net in Net::ALL {
        if only.as_deref().is_some_and(|o| o != net.name()) {
            continue;
        }
        for separate in [true, false] {
            rows.push(measure(net, separate));
        }
    }
    let text = table(&rows);
    eprintln!("{text}");
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots/rate_control.txt");
    if std::env::var_os("MCDIST_UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, &text).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .expect("snapshot missing: run with MCDIST_UPDATE_SNAPSHOTS=1 to create it");
    let numbers = |t: &str| -> Vec<(String, Vec<f64>)> {
        t.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let mut f = l.split_whitespace();
                let key = format!("{} {}", f.next().unwrap_or(""), f.next().unwrap_or(""));
                (key, f.map(|x| x.parse().unwrap()).collect())
            })
            .collect()
    };
    let (want_rows, got_rows) = (numbers(&want), numbers(&text));
    assert_eq!(want_rows.len(), got_rows.len(), "row count changed");
    let mut diffs = Vec::new();
    for ((wk, w), (gk, g)) in want_rows.iter().zip(&got_rows) {
        assert_eq!(wk, gk, "row order changed");
        for (col, (a, b)) in w.iter().zip(g).enumerate() {
            if !close(*b, *a) {
                diffs.push(format!("{wk}: column {col}: snapshot {a}, now {b}"));
            }
        }
    }
    assert!(
        diffs.is_empty(),
        "rate-control table moved beyond tolerance (review, then regenerate with MCDIST_UPDATE_SNAPSHOTS=1):\n{}\nnow:\n{text}",
        diffs.join("\n")
    );
}
