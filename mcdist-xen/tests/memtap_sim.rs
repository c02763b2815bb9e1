//! Memtap against the simulated hypervisor, with pages served by a real
//! mcdist `ServerNode` and received by a real `ClientNode` over UDP multicast
//! on the loopback interface of a private network namespace.
//!
//! Each test re-executes itself under `unshare -n` (a fresh namespace that
//! disappears with the process), brings `lo` up there and uses group
//! 239.255.66.x with TTL 1.

use mcdist::bitmap::PageBitmap;
use mcdist::node::{ClientNode, ServerNode};
use mcdist::transport::udp::{UdpConfig, UdpTransport};
use mcdist::{ClientConfig, MemSource, PageSource, ServerConfig};
use mcdist_xen::{
    Memtap, MemtapConfig, MemtapStats, PageFetcher, PageInbox, SimGuest, SimGuestError, SimXen,
};
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PAGE: usize = 4096;
const IN_NETNS: &str = "MCDIST_XEN_TEST_IN_NETNS";
const TOUCH_TIMEOUT: Duration = Duration::from_secs(20);

/// Run `name` inside a fresh network namespace. Returns true in the child
/// (which then runs the body), false in the parent once the child passed.
fn in_private_netns(name: &str) -> bool {
    if std::env::var_os(IN_NETNS).is_some() {
        let st = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .expect("run ip");
        assert!(st.success(), "bringing lo up in the namespace failed");
        return true;
    }
    let exe = std::env::current_exe().expect("test executable");
    let out = Command::new("unshare")
        .arg("-n")
        .arg(exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(IN_NETNS, "1")
        .output()
        .expect("run unshare -n");
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    println!("{text}\n{err}");
    assert!(out.status.success(), "{name} failed in its namespace");
    assert!(
        text.contains("1 passed"),
        "{name} did not run in its namespace"
    );
    false
}

/// A deterministic image: runs of pseudo-random pages with zero pages mixed in.
fn image(pages: usize) -> Vec<u8> {
    let mut img = vec![0u8; pages * PAGE];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for (i, p) in img.chunks_exact_mut(PAGE).enumerate() {
        if i % 5 == 2 || i % 17 == 0 {
            continue; // all-zero page
        }
        for c in p.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
    }
    img
}

/// The real client, recording which pages Memtap asked of it.
struct Recording {
    client: ClientNode,
    asked: Mutex<Vec<u64>>,
}

impl PageFetcher for Recording {
    fn request(&self, pfn: u64) {
        self.asked.lock().expect("lock").push(pfn);
        self.client.request(pfn);
    }
    fn fetch_all(&self) {
        self.client.fetch_all();
    }
}

struct Rig {
    server: ServerNode,
    fetcher: Arc<Recording>,
    guest: SimGuest,
    memtap: std::thread::JoinHandle<Result<MemtapStats, mcdist_xen::MemtapError>>,
    stop: Arc<AtomicBool>,
    image: Vec<u8>,
    zero: PageBitmap,
}

fn start(port: u16, pages: usize, push: bool, exit_when_complete: bool) -> Rig {
    let img = image(pages);
    let source: Arc<dyn PageSource> = Arc::new(MemSource::new(img.clone(), PAGE));
    let zero = mcdist::source::zero_map(source.as_ref()).expect("zero map");
    let group = SocketAddrV4::new(Ipv4Addr::new(239, 255, 66, 1), port);
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, port + 1));

    let mut scfg = UdpConfig::new(group);
    scfg.iface = Some("lo".into());
    scfg.listen = Some(listen);
    let server_cfg = ServerConfig {
        push_neighbors: push,
        sweep: push,
        ..ServerConfig::default()
    };
    let server = ServerNode::start(
        server_cfg,
        UdpTransport::server(&scfg).expect("server transport"),
        source,
    )
    .expect("server");

    let (inbox, rx) = PageInbox::new().expect("inbox");
    let mut ccfg = UdpConfig::new(group);
    ccfg.iface = Some("lo".into());
    ccfg.server = Some(listen);
    let client = ClientNode::start(
        ClientConfig::new(listen),
        UdpTransport::client(&ccfg).expect("client transport"),
        inbox,
    )
    .expect("client");
    let info = client
        .wait_session(Duration::from_secs(10))
        .expect("session");
    assert_eq!(info.page_count, pages as u64);
    assert_eq!(info.page_size, PAGE);
    // The zero map Memtap uses is the one the session announced.
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.zero_map().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let session_zero = client
        .zero_map()
        .expect("zero map from the session")
        .clone();
    assert_eq!(session_zero.to_bytes(), zero.to_bytes());

    let fetcher = Arc::new(Recording {
        client,
        asked: Mutex::new(Vec::new()),
    });
    let (hv, guest) = SimXen::new(7, PAGE, pages as u64, &[]).expect("simulated domain");
    let mut cfg = MemtapConfig::new(PAGE, pages as u64, session_zero);
    cfg.exit_when_complete = exit_when_complete;
    cfg.fetch_all = exit_when_complete;
    let stop = Arc::new(AtomicBool::new(false));
    let memtap = {
        let fetcher = fetcher.clone();
        let stop = stop.clone();
        let mut m = Memtap::new(hv, cfg, fetcher, rx).expect("memtap");
        m.setup().expect("memtap setup");
        std::thread::spawn(move || m.run_to_end(&stop))
    };
    Rig {
        server,
        fetcher,
        guest,
        memtap,
        stop,
        image: img,
        zero,
    }
}

fn page_of(img: &[u8], gfn: u64) -> &[u8] {
    &img[gfn as usize * PAGE..(gfn as usize + 1) * PAGE]
}

#[test]
fn concurrent_vcpus_fault_pages_in_over_multicast() {
    if !in_private_netns("concurrent_vcpus_fault_pages_in_over_multicast") {
        return;
    }
    let pages = 256;
    // Demand only: no push, so every non-zero page the guest sees was faulted.
    let rig = start(46600, pages, false, false);
    assert_eq!(rig.guest.paged_out(), pages as u64);

    // 12 vCPUs (more than the 8 ring slots), overlapping page sets so that
    // several vCPUs fault on the same gfn at once.
    let vcpus = 12u32;
    let started = Instant::now();
    let mut threads = Vec::new();
    for v in 0..vcpus {
        let guest = rig.guest.clone();
        let img = rig.image.clone();
        threads.push(std::thread::spawn(move || {
            let mut touched = Vec::new();
            let mut lat = Vec::new();
            for k in 0..48u64 {
                let gfn = (k * 5 + u64::from(v % 4) * 3) % pages as u64;
                let t = Instant::now();
                let data = guest.touch(v, gfn, TOUCH_TIMEOUT).expect("guest access");
                lat.push(t.elapsed());
                assert!(
                    data == page_of(&img, gfn),
                    "vcpu {v} saw wrong bytes in gfn {gfn:#x}"
                );
                touched.push(gfn);
            }
            (touched, lat)
        }));
    }
    let mut touched = BTreeSet::new();
    let mut lat = Vec::new();
    for t in threads {
        let (g, l) = t.join().expect("vcpu thread");
        touched.extend(g);
        lat.extend(l);
    }
    let elapsed = started.elapsed();
    rig.stop.store(true, Ordering::Release);
    let stats = rig.memtap.join().expect("memtap thread").expect("memtap");
    let report = rig.guest.report();
    lat.sort();
    println!(
        "{} accesses by {vcpus} vcpus in {elapsed:?}; access latency p50 {:?} p99 {:?}",
        lat.len(),
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100]
    );
    println!("memtap {stats:?}");
    println!("hypervisor {report:?}");

    assert!(
        report.violations.is_empty(),
        "violations: {:?}",
        report.violations
    );
    let asked: Vec<u64> = rig.fetcher.asked.lock().expect("lock").clone();
    let asked_set: BTreeSet<u64> = asked.iter().copied().collect();
    assert_eq!(asked.len(), asked_set.len(), "a page was requested twice");
    for g in &asked_set {
        assert!(!rig.zero.get(*g), "zero page {g:#x} was requested");
    }
    let touched_zero = touched.iter().filter(|g| rig.zero.get(**g)).count() as u64;
    let touched_data: BTreeSet<u64> = touched
        .iter()
        .copied()
        .filter(|g| !rig.zero.get(*g))
        .collect();
    assert_eq!(
        asked_set, touched_data,
        "requests must be exactly the data pages touched"
    );
    assert_eq!(stats.zero_fills, touched_zero);
    assert_eq!(stats.fetches, touched_data.len() as u64);
    assert_eq!(stats.loaded, touched.len() as u64);
    assert_eq!(report.loads, stats.loaded);
    assert_eq!(stats.responses, stats.requests);
    assert_eq!(report.requests_raised, stats.requests);
    assert_eq!(report.unpauses, report.requests_raised);
    assert!(stats.requests >= touched.len() as u64);
    // Pages never touched stay paged out.
    assert_eq!(rig.guest.paged_out(), pages as u64 - touched.len() as u64);
    let client_stats = rig.fetcher.client.stats();
    println!("client {client_stats:?}");
    drop(rig.server);
}

#[test]
fn pushed_pages_are_loaded_ahead_and_the_clone_completes() {
    if !in_private_netns("pushed_pages_are_loaded_ahead_and_the_clone_completes") {
        return;
    }
    let pages = 1024;
    let rig = start(46610, pages, true, true);
    // A few early faults, then let the server's push fill the rest.
    let first: Vec<u64> = vec![0, 1, 300, 301, 302, 777];
    for (i, g) in first.iter().enumerate() {
        let data = rig
            .guest
            .touch(i as u32, *g, TOUCH_TIMEOUT)
            .expect("access");
        assert!(data == page_of(&rig.image, *g));
    }
    // Memtap exits on its own once every page is loaded; stop is a safety net.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !rig.memtap.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    rig.stop.store(true, Ordering::Release);
    let stats = rig.memtap.join().expect("memtap thread").expect("memtap");
    println!("memtap {stats:?}");
    let report = rig.guest.report();
    println!("hypervisor {report:?}");
    assert!(
        report.violations.is_empty(),
        "violations: {:?}",
        report.violations
    );
    assert_eq!(rig.guest.paged_out(), 0, "every page is loaded");
    assert_eq!(stats.loaded, pages as u64);
    assert!(stats.loaded_ahead > 0, "push loaded pages ahead of faults");
    // Zero pages never came over the network: none requested, none delivered.
    let asked = rig.fetcher.asked.lock().expect("lock").clone();
    assert!(asked.iter().all(|g| !rig.zero.get(*g)));
    assert_eq!(
        stats.loaded_ahead + stats.loaded_on_demand,
        pages as u64 - rig.zero.count_ones(),
        "every data page arrived through the client exactly once"
    );
    // Paging is disabled now: the whole domain reads back as the image.
    for g in 0..pages as u64 {
        let data = rig
            .guest
            .touch(0, g, TOUCH_TIMEOUT)
            .expect("read after completion");
        assert!(
            data == page_of(&rig.image, g),
            "gfn {g:#x} differs from the image"
        );
    }
    drop(rig.server);
}

#[test]
fn a_fault_after_paging_is_disabled_crashes_the_simulated_domain() {
    // No network involved: a Memtap with nothing to serve, shut down early.
    let (hv, guest) = SimXen::new(3, PAGE, 16, &[5]).expect("simulated domain");
    let (_inbox, rx) = PageInbox::new().expect("inbox");
    struct Never;
    impl PageFetcher for Never {
        fn request(&self, _pfn: u64) {}
    }
    let mut m = Memtap::new(
        hv,
        MemtapConfig::new(PAGE, 16, PageBitmap::new(16)),
        Arc::new(Never),
        rx,
    )
    .expect("memtap");
    let stats = m.setup().expect("setup").clone();
    assert_eq!(stats.evicted, 15);
    assert_eq!(stats.not_pageable, 1);
    // The not-pageable gfn keeps its (stale) content and never faults.
    let d = guest.touch(0, 5, TOUCH_TIMEOUT).expect("present page");
    assert!(d.iter().all(|b| *b == mcdist_xen::sim::STALE_BYTE));
    m.shutdown().expect("shutdown disables paging");
    match guest.touch(1, 6, TOUCH_TIMEOUT) {
        Err(e @ SimGuestError::Crashed { .. }) => assert!(e.to_string().contains("no ring")),
        other => panic!("expected a crash, got {other:?}"),
    }
}
