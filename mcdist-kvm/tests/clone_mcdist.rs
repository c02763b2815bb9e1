//! Real KVM clones fed by mcdist over UDP multicast, inside network namespaces this test
//! creates (loopback, or a private bridge between namespace hosts).

use std::net::{SocketAddr, SocketAddrV4};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mcdist_kvm::clone::{run_clone, CloneError, CloneOptions, ProcessLauncher};
use mcdist_kvm::guest::HashJob;
use mcdist_kvm::netns::BridgeNet;
use mcdist_kvm::DescriptorFile;
use mcdist_kvm::McdistFetcher;
use mcdist_kvm::PageFetcher;

mod common;
use common::{assert_child_lost_memory, fork, have_kvm, in_child, loopback_ns};

#[test]
fn laziness_is_real_and_zero_pages_are_never_sent() {
    if !have_kvm() {
        return;
    }
    let ns = loopback_ns("lazy");
    ns.enter().expect("enter netns");
    let mem = 256u64 << 20;
    let job = HashJob::new(mem, 0.5, 0.10, 9, 4096);
    let frozen = fork(job);
    let group = SocketAddrV4::new([239, 255, 77, 1].into(), 47001);
    let listen: SocketAddr = "127.0.0.1:47002".parse().expect("addr");
    let (server, desc) = frozen
        .serve(group, Some("lo"), listen, mcdist::ServerConfig::default())
        .expect("server");
    let id = 3;
    let report = run_clone(&desc, id, &CloneOptions::default(), |h| {
        let f = McdistFetcher::connect(&desc, Some("lo"), h, Duration::from_secs(5), |_| {})
            .map_err(CloneError::Session)?;
        Ok(Arc::new(f) as Arc<dyn PageFetcher>)
    })
    .expect("clone");
    assert_eq!(report.result, job.expected(id));
    let pages = desc.page_count();
    let fetched = report.stats.pages_fetched();
    eprintln!(
        "pages {pages}, zero {}, fetched {fetched} ({:.1}%), demand {}, pushed {}",
        desc.zero_map.count_ones(),
        100.0 * fetched as f64 / pages as f64,
        report.stats.pages_demand,
        report.stats.pages_pushed
    );
    assert!(
        fetched * 100 <= pages * 15,
        "fetched {fetched} of {pages} pages"
    );
    assert!(
        fetched >= job.pages_touched_per_clone(4096) - 3,
        "the slice was fetched"
    );
    assert_eq!(report.stats.zero_pages_received, 0, "a zero page arrived");
    let s = server.shutdown().expect("server stats");
    assert_eq!(s.stats.zero_replies, 0, "server sent zero pages");
    assert!(
        s.stats.pages_sent * 100 <= pages * 15,
        "server sent {} pages",
        s.stats.pages_sent
    );
}

#[test]
fn clone_fails_clearly_when_its_server_disappears() {
    if !have_kvm() {
        return;
    }
    if !in_child() {
        assert_child_lost_memory("clone_fails_clearly_when_its_server_disappears");
        return;
    }
    let ns = loopback_ns("gone");
    ns.enter().expect("enter netns");
    let job = HashJob::new(16 << 20, 0.5, 0.1, 5, 4096);
    let frozen = fork(job);
    let group = SocketAddrV4::new([239, 255, 77, 2].into(), 47011);
    let listen: SocketAddr = "127.0.0.1:47012".parse().expect("addr");
    let (server, desc) = frozen
        .serve(group, Some("lo"), listen, mcdist::ServerConfig::default())
        .expect("server");
    let server = Mutex::new(Some(server));
    let mut opts = CloneOptions::default();
    opts.lazy.fetch_timeout = Duration::from_secs(4);
    let t0 = Instant::now();
    let r = run_clone(&desc, 0, &opts, |h| {
        h.exit_process_on_loss().expect("watchdog");
        let f = McdistFetcher::connect(&desc, Some("lo"), h, Duration::from_secs(5), |c| {
            c.give_up_after = Duration::from_secs(2)
        })
        .map_err(CloneError::Session)?;
        // The server goes away after the clone joined, before its first fault.
        if let Some(s) = server.lock().expect("lock").take() {
            s.shutdown().expect("shutdown");
        }
        Ok(Arc::new(f) as Arc<dyn PageFetcher>)
    });
    let took = t0.elapsed();
    match r {
        // Where the vCPU could be kicked out of its fault, the clone returns instead.
        Err(e @ CloneError::MemoryLost { id: 0, .. }) => {
            eprintln!("clone failed after {took:?}");
            eprintln!("{e}");
            std::process::exit(1);
        }
        other => panic!("expected a memory-lost error, got {other:?}"),
    }
}

#[test]
fn four_clone_processes_on_four_namespace_hosts() {
    if !have_kvm() {
        return;
    }
    let net = BridgeNet::create(&format!("mcdk{}", std::process::id() % 10000), 5).expect("bridge");
    // Host 0 runs the parent and its memory server; hosts 1..=4 run one clone process each.
    net.hosts[0].enter().expect("enter server host");
    let job = HashJob::new(64 << 20, 0.5, 0.1, 77, 4096);
    let mut frozen = fork(job);
    let group = SocketAddrV4::new([239, 255, 77, 3].into(), 47021);
    let listen = SocketAddr::new(BridgeNet::addr(0).into(), 47022);
    let (server, desc) = frozen
        .serve(group, Some("eth0"), listen, mcdist::ServerConfig::default())
        .expect("server");
    let desc = Arc::new(desc);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("parent.desc");
    desc.save(&path).expect("save descriptor");
    let ticket = frozen.request_ticket(4).expect("ticket");
    let hosts: Vec<String> = net.hosts.iter().map(|h| h.name().to_string()).collect();
    let launcher = ProcessLauncher {
        command: |id: u32| {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &hosts[id as usize + 1]])
                .arg(env!("CARGO_BIN_EXE_mcdist-clone"))
                .arg("--descriptor")
                .arg(&path)
                .args(["--id", &id.to_string(), "--iface", "eth0"])
                .args([
                    "--group",
                    &group.to_string(),
                    "--server",
                    &listen.to_string(),
                ]);
            c
        },
    };
    let results = frozen
        .clone_vms(&ticket, &desc, &launcher)
        .join(Duration::from_secs(120));
    assert_eq!(results.len(), 4);
    for (id, r) in results {
        let r = r.unwrap_or_else(|e| panic!("clone {id}: {e}"));
        assert_eq!(r.result, job.expected(id), "clone {id}");
        assert_eq!(r.stats.zero_pages_received, 0);
        eprintln!("{}", r.to_line());
    }
    let s = server.shutdown().expect("server stats");
    assert_eq!(s.stats.zero_replies, 0);
}
