//! Goodput versus loss, kept as a reviewed snapshot (`tests/snapshots/goodput.txt`,
//! and with FEC on, `tests/snapshots/goodput_fec.txt`).
//!
//! One server sweeps a 1 MiB image (256 pages of 4 KiB, every seventh page zero)
//! to 16 clients; every client link loses datagrams independently, both ways,
//! with the given probability. Times are virtual. Each row averages 8 seeds.
//!
//! The test recomputes the table and compares it with the snapshot; every
//! number must stay within 25% (or 2 units for small counts) of the reviewed
//! value, so protocol changes that move goodput or repair cost show up in
//! review. To accept new numbers, regenerate the file and review the diff:
//!
//! ```text
//! MCDIST_UPDATE_SNAPSHOTS=1 cargo test -p mcdist --test sim_goodput
//! ```

use mcdist::server::ServerConfig;
use mcdist::sim::{test_image, ClientSpec, Sim};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

const PAGES: usize = 256;
const PS: usize = 4096;
const CLIENTS: usize = 16;
const SEEDS: [u64; 8] = [1, 2, 3, 4, 5, 6, 7, 8];
const LOSSES: [u32; 6] = [0, 1, 5, 10, 20, 30];

struct Row {
    loss_pct: u32,
    done_ms: f64,
    goodput_mbps: f64,
    sent_per_page: f64,
    nacks_per_client: f64,
    retries_per_client: f64,
    bytes_per_byte: f64,
}

fn measure(loss_pct: u32, fec: bool) -> Row {
    let loss = f64::from(loss_pct) / 100.0;
    let (mut done, mut sent, mut nacks, mut retries) = (0.0, 0.0, 0.0, 0.0);
    let mut bytes = 0.0;
    for seed in SEEDS {
        let img = test_image(PAGES, PS, 7, seed);
        let cfg = ServerConfig {
            session_id: Some(0x600d),
            max_datagram: 1500,
            sweep: true,
            sweep_min_clients: CLIENTS,
            fec,
            ..ServerConfig::default()
        };
        // The whole sweep of this small image is over before the first loss
        // report (100 ms), so the adaptive rule alone would never send a repair
        // symbol here: start at the rate it picks for this loss once reports
        // arrive for a full block (`ServerConfig::fec_repair_fraction`).
        let informed = cfg.fec_repair_fraction(loss, cfg.fec_block_pages * 3, CLIENTS);
        let cfg = ServerConfig {
            fec_min_overhead: if fec && loss > 0.0 {
                informed.min(cfg.fec_max_overhead)
            } else {
                0.0
            },
            ..cfg
        };
        let mut sim = Sim::new(seed, cfg, img, PS).unwrap();
        for _ in 0..CLIENTS {
            sim.add_client(ClientSpec::fetch_all(loss));
        }
        assert!(
            sim.drive(Duration::from_secs(600)).unwrap(),
            "loss {loss_pct}% seed {seed}"
        );
        sim.verify().unwrap();
        let mut worst = Duration::ZERO;
        for c in sim.clients() {
            assert!(c.failed.is_none(), "loss {loss_pct}%: {:?}", c.failed);
            worst = worst.max(c.finished_after.unwrap_or_default());
            nacks += c.client.stats().nack_pages as f64;
            retries += c.client.stats().retries as f64;
        }
        done += worst.as_secs_f64() * 1000.0;
        sent += sim.server().stats().pages_sent as f64 / sim.nonzero_pages() as f64;
        bytes += sim.server().stats().bytes_sent as f64 / (sim.nonzero_pages() as f64 * PS as f64);
    }
    let n = SEEDS.len() as f64;
    let done_ms = done / n;
    Row {
        loss_pct,
        done_ms,
        goodput_mbps: (PAGES * PS) as f64 / 1e6 / (done_ms / 1000.0),
        sent_per_page: sent / n,
        nacks_per_client: nacks / n / CLIENTS as f64,
        retries_per_client: retries / n / CLIENTS as f64,
        bytes_per_byte: bytes / n,
    }
}

fn table(rows: &[Row], fec: bool) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# mcdist goodput vs loss: 1 server, {CLIENTS} clients, {PAGES} x {PS} B image, sweep{}, 1500 B datagrams, virtual time, mean of {} seeds",
        if fec {
            ", FEC from the first page at the adaptive rule's rate for the link loss"
        } else {
            ""
        },
        SEEDS.len()
    );
    let _ = writeln!(
        s,
        "# columns: loss_pct  done_ms(slowest client)  goodput_MB/s(per client)  server_pages_sent/nonzero_page  nacked_pages/client  retries/client  server_bytes/nonzero_image_byte"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:>3} {:>10.1} {:>8.2} {:>7.2} {:>8.1} {:>8.1} {:>7.3}",
            r.loss_pct,
            r.done_ms,
            r.goodput_mbps,
            r.sent_per_page,
            r.nacks_per_client,
            r.retries_per_client,
            r.bytes_per_byte
        );
    }
    s
}

fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= 2.0 || (got - want).abs() <= 0.25 * want.abs()
}

#[test]
fn goodput_versus_loss_snapshot() {
    check_snapshot(false, "tests/snapshots/goodput.txt");
}

/// The same table with FEC on. Repair symbols are not pages: compare the
/// bytes column with the table without FEC.
#[test]
fn goodput_versus_loss_with_fec_snapshot() {
    check_snapshot(true, "tests/snapshots/goodput_fec.txt");
}

fn check_snapshot(fec: bool, file: &str) {
    let rows: Vec<Row> = LOSSES.iter().map(|&l| measure(l, fec)).collect();
    let text = table(&rows, fec);
    eprintln!("{text}");
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(file);
    if std::env::var_os("MCDIST_UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, &text).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .expect("snapshot missing: run with MCDIST_UPDATE_SNAPSHOTS=1 to create it");
    let want_rows: Vec<Vec<f64>> = want
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().map(|x| x.parse().unwrap()).collect())
        .collect();
    let got_rows: Vec<Vec<f64>> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split_whitespace().map(|x| x.parse().unwrap()).collect())
        .collect();
    assert_eq!(want_rows.len(), got_rows.len(), "row count changed");
    let mut diffs = Vec::new();
    for (w, g) in want_rows.iter().zip(&got_rows) {
        for (col, (a, b)) in w.iter().zip(g).enumerate() {
            if !close(*b, *a) {
                diffs.push(format!(
                    "loss {}%: column {col}: snapshot {a}, now {b}",
                    w[0]
                ));
            }
        }
    }
    assert!(
        diffs.is_empty(),
        "goodput table moved beyond tolerance (review, then regenerate with MCDIST_UPDATE_SNAPSHOTS=1):\n{}\nnow:\n{text}",
        diffs.join("\n")
    );
}
