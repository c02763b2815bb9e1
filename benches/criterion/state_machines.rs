//! State-machine throughput and latency, with no I/O at all:
//! - `server/sweep_pages`: pages/s the server's `poll_transmit` produces
//!   sweeping a 64 MiB in-memory image with pacing effectively off;
//! - `client/ingest_pages`: pages/s the client takes in through
//!   `handle_datagram` (parse, reassembly bookkeeping, `PageReady`);
//! - `pair/fault_to_install`: one demand fault through a sans-IO server and
//!   client back to back (request emitted, parsed, page read and emitted,
//!   parsed and reported ready);
//! - `fec/server_sweep_*`: pages/s of a sweep at MTU 1500 (3 fragments per
//!   page) without FEC and with FEC blocks of 128 pages and 10 % repair symbols
//!   (the difference is the encoder's cost per page);
//! - `fec/client_ingest_*`: pages/s into the client of that sweep without loss
//!   and without FEC, and with FEC after losing every 20th data datagram (the
//!   difference is the decoder's cost per page).
//!
//! The erasure codes alone, RaptorQ against Reed–Solomon, are in `fec_codec`.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use mcdist::client::{Client, ClientEvent};
use mcdist::server::{Server, ServerConfig};
use mcdist::source::{scan, MemSource};
use mcdist_benches::{image, unpaced_server_config, Pair, SERVER_ADDR};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

const PAGES: usize = 16 * 1024; // 64 MiB of 4 KiB pages

fn sweep_config() -> ServerConfig {
    ServerConfig {
        push_neighbors: false,
        working_set_push: false,
        sweep: true,
        sweep_min_clients: 0,
        max_datagram: 65_507,
        ..unpaced_server_config()
    }
}

fn server(c: &mut Criterion) {
    let img = Bytes::from(image(PAGES, 4096, 0));
    let source = Arc::new(MemSource::new(img, 4096));
    let info = scan(source.as_ref()).expect("in-memory image");
    let mut g = c.benchmark_group("server");
    g.throughput(Throughput::Elements(PAGES as u64));
    g.sample_size(20);
    g.bench_function("sweep_pages", |b| {
        b.iter_batched(
            || {
                Server::with_info(sweep_config(), source.clone(), info.clone(), Instant::now())
                    .expect("valid configuration")
            },
            |mut s| {
                let mut buf = vec![0u8; 65_536];
                let mut now = Instant::now();
                let mut n = 0u64;
                while n < PAGES as u64 {
                    match s.poll_transmit(now, &mut buf) {
                        Some(t) => {
                            black_box(&buf[..t.len]);
                        }
                        None => now += Duration::from_millis(1),
                    }
                    n = s.stats().sweep_pages;
                }
                s
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn client(c: &mut Criterion) {
    // Record every data datagram of a sweep once.
    let img = image(PAGES, 4096, 0);
    let source = Arc::new(MemSource::new(img.clone(), 4096));
    let mut s = Server::with_info(
        sweep_config(),
        source.clone(),
        mcdist::source::scan(source.as_ref()).expect("an in-memory image scans"),
        Instant::now(),
    )
    .expect("valid configuration");
    let mut buf = vec![0u8; 65_536];
    let mut now = Instant::now();
    let mut dgrams = Vec::with_capacity(PAGES);
    while s.stats().sweep_pages < PAGES as u64 {
        match s.poll_transmit(now, &mut buf) {
            Some(t) if buf[3] == mcdist::wire::Kind::Data as u8 => {
                dgrams.push(Bytes::copy_from_slice(&buf[..t.len]))
            }
            Some(_) => {}
            None => now += Duration::from_millis(1),
        }
    }
    let session = s.session_id();
    let mut g = c.benchmark_group("client");
    g.throughput(Throughput::Elements(dgrams.len() as u64));
    g.sample_size(10);
    g.bench_function("ingest_pages", |b| {
        b.iter_batched(
            || {
                // A joined client of a server with the same session id.
                let mut p = Pair::new(img.clone());
                assert_eq!(p.server.session_id(), session, "same bench session");
                let _ = &mut p;
                p
            },
            |mut p| {
                let now = p.now;
                let mut ready = 0u64;
                for d in &dgrams {
                    p.client.handle_datagram(now, SERVER_ADDR, d.clone());
                    while let Some(ev) = p.client.poll_event() {
                        if matches!(ev, ClientEvent::PageReady { .. }) {
                            ready += 1;
                        }
                    }
                }
                black_box(ready);
                p
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn fault_latency(c: &mut Criterion) {
    let pages = 4096usize;
    let img = image(pages, 4096, 0);
    let mut g = c.benchmark_group("pair");
    g.throughput(Throughput::Elements(1));
    g.bench_function("fault_to_install", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut pair = Pair::new(img.clone());
            let mut pfn = 0u64;
            for _ in 0..iters {
                if pfn as usize >= pages {
                    pair = Pair::new(img.clone());
                    pfn = 0;
                }
                let t = Instant::now();
                let got = pair.fault(pfn);
                total += t.elapsed();
                black_box(got.expect("page arrives over a lossless pair"));
                // Stride so neighbouring pages are not already present.
                pfn += 1;
            }
            total
        })
    });
    g.finish();
}

const FEC_PAGES: usize = 4096;

fn mtu_sweep_config(fec: bool) -> ServerConfig {
    ServerConfig {
        max_datagram: 1472,
        fec,
        fec_min_overhead: if fec { 0.1 } else { 0.0 },
        ..sweep_config()
    }
}

/// Every datagram a sweep of `img` sends (announces included).
fn record_sweep(img: &[u8], cfg: ServerConfig) -> Vec<Bytes> {
    let source = Arc::new(MemSource::new(img.to_vec(), 4096));
    let mut s = Server::with_info(
        cfg,
        source.clone(),
        mcdist::source::scan(source.as_ref()).expect("an in-memory image scans"),
        Instant::now(),
    )
    .expect("valid configuration");
    let mut buf = vec![0u8; 65_536];
    let mut now = Instant::now();
    let mut out = Vec::new();
    loop {
        match s.poll_transmit(now, &mut buf) {
            Some(t) => out.push(Bytes::copy_from_slice(&buf[..t.len])),
            None if s.stats().sweep_pages >= FEC_PAGES as u64 => break,
            None => now += Duration::from_millis(1),
        }
    }
    out
}

fn fec_paths(c: &mut Criterion) {
    let img = image(FEC_PAGES, 4096, 0);
    let source = Arc::new(MemSource::new(Bytes::from(img.clone()), 4096));
    let info = scan(source.as_ref()).expect("in-memory image");
    let mut g = c.benchmark_group("fec");
    g.throughput(Throughput::Elements(FEC_PAGES as u64));
    g.sample_size(10);
    for (name, fec) in [
        ("server_sweep_pages_nofec", false),
        ("server_sweep_pages_fec_10pct", true),
    ] {
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    Server::with_info(
                        mtu_sweep_config(fec),
                        source.clone(),
                        info.clone(),
                        Instant::now(),
                    )
                    .expect("valid configuration")
                },
                |mut s| {
                    let mut buf = vec![0u8; 65_536];
                    let mut now = Instant::now();
                    loop {
                        match s.poll_transmit(now, &mut buf) {
                            Some(t) => {
                                black_box(&buf[..t.len]);
                            }
                            None if s.stats().sweep_pages >= FEC_PAGES as u64 => break,
                            None => now += Duration::from_millis(1),
                        }
                    }
                    s
                },
                BatchSize::LargeInput,
            )
        });
    }
    let plain = record_sweep(&img, mtu_sweep_config(false));
    let with_fec: Vec<Bytes> = record_sweep(&img, mtu_sweep_config(true))
        .into_iter()
        .enumerate()
        .filter(|(i, d)| d[3] != mcdist::wire::Kind::Data as u8 || i % 20 != 7)
        .map(|(_, d)| d)
        .collect();
    for (name, dgrams, fec) in [
        ("client_ingest_pages_nofec", &plain, false),
        ("client_ingest_pages_fec_5pct_loss", &with_fec, true),
    ] {
        g.bench_function(name, |b| {
            b.iter_batched(
                // Joined to a server of the recording's geometry and session.
                || Pair::with_config(img.clone(), mtu_sweep_config(fec)),
                |mut p| {
                    let now = p.now;
                    let mut ready = 0u64;
                    let mut take = |c: &mut Client| {
                        while let Some(ev) = c.poll_event() {
                            if matches!(ev, ClientEvent::PageReady { .. }) {
                                ready += 1;
                            }
                        }
                    };
                    for d in dgrams.iter() {
                        p.client.handle_datagram(now, SERVER_ADDR, d.clone());
                        take(&mut p.client);
                    }
                    // The last block's burst of repair symbols ends with the stream: it
                    // is decoded when its wait is up.
                    p.client.handle_timeout(now + Duration::from_millis(2));
                    take(&mut p.client);
                    assert_eq!(ready, FEC_PAGES as u64, "every page arrives or is decoded");
                    p
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, server, client, fault_latency, fec_paths);
criterion_main!(benches);
