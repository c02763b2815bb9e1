//! Clones on namespace hosts of a private bridge, as threads or processes, each host's
//! clones sharing one client and page cache or not.

use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use mcdist::node::ServerSnapshot;
use mcdist::secure::Security;
use mcdist::ClientStats;
use mcdist_kvm::clone::{CloneError, CloneOptions, CloneReport, ProcessLauncher, ThreadLauncher};
use mcdist_kvm::inline::InlineMcdist;
use mcdist_kvm::lazy::LatencyHistogram;
use mcdist_kvm::netns::{BridgeNet, Netns};
use mcdist_kvm::share::HostCacheProcess;
use mcdist_kvm::DescriptorFile;
use mcdist_kvm::{CloneTicket, Descriptor, Frozen, HostCache};

use crate::report::{ms, print_clones, print_server};
use crate::Args;

/// Socket-level traffic of the clients of one host (one client when shared).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct HostTraffic {
    /// Clients whose counters are summed here (clone processes' own clients report none).
    pub(crate) clients: u64,
    pub(crate) bytes_received: u64,
    pub(crate) pages_received: u64,
    pub(crate) requests_sent: u64,
    /// UDP datagrams the host's sockets received (the namespace's `/proc/net/snmp`).
    pub(crate) udp_datagrams: u64,
}

impl HostTraffic {
    pub(crate) fn add(&mut self, c: &ClientStats) {
        self.clients += 1;
        self.bytes_received += c.bytes_received;
        self.pages_received += c.pages_received + c.duplicates;
        self.requests_sent += c.requests_sent;
    }
    pub(crate) fn sum(&mut self, o: &HostTraffic) {
        self.clients += o.clients;
        self.bytes_received += o.bytes_received;
        self.pages_received += o.pages_received;
        self.requests_sent += o.requests_sent;
        self.udp_datagrams += o.udp_datagrams;
    }
}

/// UDP datagrams received by sockets of the calling thread's network namespace.
pub(crate) fn udp_in_datagrams() -> Result<u64, String> {
    let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").map_err(|e| e.to_string())?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next(), udp.next());
    names
        .zip(values)
        .and_then(|(n, v)| {
            n.split_whitespace()
                .zip(v.split_whitespace())
                .find(|(k, _)| *k == "InDatagrams")
                .and_then(|(_, v)| v.parse().ok())
        })
        .ok_or_else(|| "no Udp InDatagrams in /proc/net/snmp".to_string())
}

/// Where the clone processes find what they need.
pub(crate) struct ProcessSetup {
    pub(crate) descriptor: PathBuf,
    pub(crate) bin_dir: PathBuf,
    /// `--key FILE [--auth-only]` for the clone and cache processes.
    pub(crate) key_args: Vec<std::ffi::OsString>,
}

/// Runs `ticket`'s clones as processes on `host`: each with its own client, or all attached
/// to one `mcdist-host-cache` process.
pub(crate) fn run_host_processes(
    frozen: &Frozen,
    ticket: &CloneTicket,
    desc: &Arc<Descriptor>,
    host: &Netns,
    share: bool,
    setup: &ProcessSetup,
) -> Result<HostResult, String> {
    let socket = setup
        .descriptor
        .with_file_name(format!("{}.sock", host.name()));
    let cache = if share {
        Some(
            HostCacheProcess::start_with_args(
                &setup.bin_dir.join("mcdist-host-cache"),
                host.name(),
                &setup.descriptor,
                socket.clone(),
                "eth0",
                &setup.key_args,
            )
            .map_err(|e| format!("host {}: {e}", host.name()))?,
        )
    } else {
        None
    };
    let launcher = ProcessLauncher {
        command: |id: u32| {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", host.name()])
                .arg(setup.bin_dir.join("mcdist-clone"))
                .arg("--descriptor")
                .arg(&setup.descriptor)
                .args(["--id", &id.to_string()]);
            if share {
                c.arg("--host-cache").arg(&socket);
            } else {
                c.args(["--iface", "eth0"]).args(&setup.key_args);
            }
            c
        },
    };
    let results = frozen
        .clone_vms(ticket, desc, &launcher)
        .join(Duration::from_secs(300));
    let mut traffic = HostTraffic::default();
    if let Some(cache) = cache {
        let st = cache.finish().map_err(|e| e.to_string())?;
        let field = |k: &str| st.get(k).copied().unwrap_or(0);
        traffic.clients = 1;
        traffic.bytes_received = field("bytes_received");
        traffic.pages_received = field("network_pages") + field("duplicates");
        traffic.requests_sent = field("requests_sent");
        println!(
            "host cache process: {} pages from the network, {} asked by the host, {} faults served from the cache, {} joined a pending page",
            field("network_pages"),
            field("host_requests"),
            field("cache_hits"),
            field("joined")
        );
    }
    Ok(HostResult {
        results,
        traffic,
        cache: None,
    })
}

/// What one host's clones did.
pub(crate) struct HostResult {
    pub(crate) results: Vec<(u32, Result<CloneReport, CloneError>)>,
    pub(crate) traffic: HostTraffic,
    pub(crate) cache: Option<Arc<HostCache>>,
}

/// Runs `ticket`'s clones on namespace host `host`, sharing one client and cache or not.
pub(crate) fn run_host(
    frozen: &Frozen,
    ticket: &CloneTicket,
    desc: &Arc<Descriptor>,
    host: &Netns,
    share: bool,
    processes: Option<&ProcessSetup>,
    sec: Option<&Security>,
) -> Result<HostResult, String> {
    // Sockets made on this thread, and clone threads it starts, belong to the host.
    host.enter().map_err(|e| e.to_string())?;
    let udp0 = udp_in_datagrams()?;
    let mut r = match processes {
        Some(setup) => run_host_processes(frozen, ticket, desc, host, share, setup)?,
        None => run_host_threads(frozen, ticket, desc, host, share, sec)?,
    };
    r.traffic.udp_datagrams = udp_in_datagrams()?.saturating_sub(udp0);
    Ok(r)
}

/// [`run_host`] with the clones as threads of this program.
pub(crate) fn run_host_threads(
    frozen: &Frozen,
    ticket: &CloneTicket,
    desc: &Arc<Descriptor>,
    host: &Netns,
    share: bool,
    sec: Option<&Security>,
) -> Result<HostResult, String> {
    let sec = sec.cloned();
    let give_up = move |c: &mut mcdist_kvm::session::ClientSetup| {
        c.give_up_after = Duration::from_secs(5);
        c.security = sec.clone();
    };
    let join = Duration::from_secs(5);
    let mut traffic = HostTraffic::default();
    if share {
        let cache = HostCache::connect(desc, Some("eth0"), join, give_up.clone())
            .map_err(|e| format!("host {}: {e}", host.name()))?;
        let results = frozen
            .clone_vms(ticket, desc, &cache.launcher(CloneOptions::default()))
            .join(Duration::from_secs(300));
        traffic.add(&cache.client_stats());
        return Ok(HostResult {
            results,
            traffic,
            cache: Some(cache),
        });
    }
    let stats = Arc::new(Mutex::new(Vec::new()));
    let handles = stats.clone();
    let launcher = ThreadLauncher {
        make_fetcher: Arc::new(move |_id, d: &Descriptor, h| {
            let f = InlineMcdist::connect(d, Some("eth0"), &h, join, give_up.clone())
                .map_err(CloneError::Session)?;
            handles
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(f.stats_handle());
            Ok(f.into_fetcher())
        }),
        opts: CloneOptions::default(),
    };
    let results = frozen
        .clone_vms(ticket, desc, &launcher)
        .join(Duration::from_secs(300));
    for h in stats.lock().unwrap_or_else(PoisonError::into_inner).iter() {
        traffic.add(&h.lock().unwrap_or_else(PoisonError::into_inner));
    }
    Ok(HostResult {
        results,
        traffic,
        cache: None,
    })
}

/// What one run on namespace hosts measured.
pub(crate) struct HostRun {
    pub(crate) wall: Duration,
    pub(crate) server: ServerSnapshot,
    pub(crate) traffic: HostTraffic,
    /// Every fault's latency (thread clones).
    pub(crate) latency: LatencyHistogram,
    /// Each clone's p50 and p99 (clone processes report only these).
    pub(crate) clone_quantiles: Vec<(Duration, Duration)>,
    pub(crate) installed: u64,
}

impl HostRun {
    /// Fault latency p50 and p99 over all faults; for clone processes, which report only
    /// their own p50 and p99, the median of the clones' p50 and the largest p99.
    pub(crate) fn quantiles(&self, processes: bool) -> (Option<Duration>, Option<Duration>) {
        if !processes {
            return (self.latency.quantile(0.5), self.latency.quantile(0.99));
        }
        let mut p50: Vec<Duration> = self.clone_quantiles.iter().map(|q| q.0).collect();
        p50.sort_unstable();
        (
            p50.get(p50.len() / 2).copied(),
            self.clone_quantiles.iter().map(|q| q.1).max(),
        )
    }
}

/// Starts a memory server on the bridge and runs one ticket per host, all hosts at once.
pub(crate) fn run_hosts(
    args: &Args,
    frozen: &Frozen,
    tickets: &[CloneTicket],
    net: &BridgeNet,
    share: bool,
    run: u16,
) -> Result<HostRun, String> {
    let job = *frozen.job();
    let group = SocketAddrV4::new([239, 255, 70, 2].into(), 46101 + 2 * run);
    let listen = SocketAddr::new(BridgeNet::addr(0).into(), 46102 + 2 * run);
    let sec = args.keys.security()?;
    let scfg = mcdist::node::NodeConfig::new(super::server_config(args), sec.clone());
    let (server, desc) = frozen
        .serve(group, Some("eth0"), listen, scfg)
        .map_err(|e| e.to_string())?;
    let desc = Arc::new(desc);
    let dir = std::env::temp_dir().join(format!("mcdist-kvm-demo-{}-{run}", std::process::id()));
    let processes = if args.processes {
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let descriptor = dir.join("parent.desc");
        desc.save(&descriptor).map_err(|e| e.to_string())?;
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let bin_dir = exe.parent().ok_or("no binary directory")?.to_path_buf();
        Some(ProcessSetup {
            descriptor,
            bin_dir,
            key_args: args.keys.child_args(),
        })
    } else {
        None
    };
    let t = Instant::now();
    let hosts: Vec<Result<HostResult, String>> = std::thread::scope(|s| {
        let running: Vec<_> = tickets
            .iter()
            .zip(&net.hosts[1..])
            .map(|(ticket, host)| {
                let desc = &desc;
                let processes = processes.as_ref();
                let sec = sec.as_ref();
                s.spawn(move || run_host(frozen, ticket, desc, host, share, processes, sec))
            })
            .collect();
        running
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a host thread panicked".into()))
            })
            .collect()
    });
    let wall = t.elapsed();
    if processes.is_some() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    // The server publishes its counters as it runs; let the last ones land. Host clients
    // (and per-clone clients, forgotten only after 10 s of silence) are still counted.
    std::thread::sleep(Duration::from_millis(200));
    let snapshot = server.stats();
    let mut bad = 0;
    let mut run = HostRun {
        wall,
        server: snapshot.clone(),
        traffic: HostTraffic::default(),
        latency: LatencyHistogram::default(),
        clone_quantiles: Vec::new(),
        installed: 0,
    };
    for (h, r) in hosts.into_iter().enumerate() {
        let r = r?;
        println!(
            "\nhost {}: {} clones; its sockets received {} UDP datagrams; {} client(s) reporting counters received {} pages ({:.1} MiB) and sent {} request datagrams",
            h + 1,
            r.results.len(),
            r.traffic.udp_datagrams,
            r.traffic.clients,
            r.traffic.pages_received,
            r.traffic.bytes_received as f64 / f64::from(1 << 20),
            r.traffic.requests_sent,
        );
        if let Some(c) = &r.cache {
            let st = c.stats();
            println!(
                "host cache: {} pages from the network ({:.1} MiB resident), {} asked by the host, {} faults served from the cache, {} joined a pending page",
                st.network_pages,
                c.resident_bytes() as f64 / f64::from(1 << 20),
                st.host_requests,
                st.cache_hits,
                st.joined_waits
            );
        }
        let (b, _, latency) = print_clones(&job, &r.results);
        bad += b;
        run.latency.merge(&latency);
        run.clone_quantiles.extend(
            r.results
                .iter()
                .filter_map(|(_, r)| r.as_ref().ok())
                .filter_map(|r| {
                    let h = &r.stats.fault_latency;
                    Some((h.quantile(0.5)?, h.quantile(0.99)?))
                }),
        );
        run.traffic.sum(&r.traffic);
        run.installed += r
            .results
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok())
            .map(|r| r.stats.pages_fetched())
            .sum::<u64>();
    }
    let s = server.shutdown().map_err(|e| e.to_string())?;
    print_server(&s);
    println!(
        "receivers at the server: {}; wall time {} ms",
        snapshot.clients,
        ms(wall)
    );
    if bad > 0 {
        return Err(format!("{bad} clone(s) failed or computed a wrong result"));
    }
    println!(
        "all {} results match the host's computation",
        tickets.iter().map(|t| t.ids().len()).sum::<usize>()
    );
    Ok(run)
}
