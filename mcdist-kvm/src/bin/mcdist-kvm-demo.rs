//! The mcdist-kvm demo: a parent KVM guest fills a table, forks N clones on this host over
//! loopback multicast (inside a private network namespace), each clone hashes its slice, and
//! every result is checked against the host's own computation.
//!
//! With `--generations 2` a second generation of clones (same ids, so the same work) starts
//! against the same memory server after the first has been joined, once with the server's
//! recorded working-set push and once without, and the demand faults of each generation are
//! printed side by side.
//!
//! With `--clones-per-host K` the clones run on ceil(N/K) namespace hosts of a private bridge
//! (the parent and its memory server on a host of their own), K per host; the clones of one
//! host share one mcdist client and page cache (`--share on`, the default), or each run their
//! own client (`--share off`); `--share both` runs both and prints a comparison.

use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use clap::Parser;
use mcdist::node::ServerSnapshot;
use mcdist::ClientStats;
use mcdist_kvm::clone::connect_fetcher;
use mcdist_kvm::clone::{CloneError, CloneOptions, CloneReport, ProcessLauncher, ThreadLauncher};
use mcdist_kvm::guest::HashJob;
use mcdist_kvm::inline::InlineMcdist;
use mcdist_kvm::lazy::LatencyHistogram;
use mcdist_kvm::netns::{BridgeNet, Netns};
use mcdist_kvm::share::HostCacheProcess;
use mcdist_kvm::{CloneTicket, Descriptor, Frozen, HostCache, Parent};

#[derive(Parser, Debug)]
#[command(about = "Fork KVM clones whose memory arrives lazily over mcdist multicast")]
struct Args {
    /// Number of clones.
    #[arg(long, default_value_t = 8)]
    clones: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    mem_mib: u64,
    /// Fraction of guest memory the parent fills before the fork.
    #[arg(long, default_value_t = 0.9)]
    table: f64,
    /// Fraction of guest memory each clone hashes.
    #[arg(long, default_value_t = 0.1)]
    slice: f64,
    /// Bytes between table entries (4 = dense; 4096 = one load per page, fast on nested hosts).
    #[arg(long, default_value_t = 4096)]
    stride: u32,
    /// Disable the server's neighbour push (pure demand paging).
    #[arg(long)]
    no_push: bool,
    /// Generations of clones run one after another against the same memory server. With 2
    /// or more, the run is made twice, without and with working-set push, and compared.
    #[arg(long, default_value_t = 1)]
    generations: u32,
    /// Run the clones on ceil(clones / K) network-namespace hosts joined by a private bridge,
    /// K clones per host (the parent and its memory server run on a host of their own).
    /// Without this option all clones run in one namespace over loopback, each with its own
    /// mcdist client.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    clones_per_host: Option<u32>,
    /// With --clones-per-host: `on` (default): the clones of a host share one mcdist client
    /// (one socket, one receiver at the server) and one page cache, so a page crosses the
    /// network once per host and a later fault on it by another clone of the host is served
    /// from local memory; `off`: every clone runs its own client; `both`: run both, one after
    /// the other with a fresh memory server each, and print a comparison.
    #[arg(long, value_enum, default_value_t = Share::On)]
    share: Share,
    /// With --clones-per-host: run every clone as an `mcdist-clone` process and, when
    /// sharing, one `mcdist-host-cache` process per host (page cache in shared memory, clone
    /// processes attached over a unix socket), instead of threads of this program. The
    /// binaries are looked up next to this one.
    #[arg(long)]
    processes: bool,
}

/// Whether the clones of one host share one client and page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Share {
    /// One client and cache per host.
    On,
    /// One client per clone.
    Off,
    /// Both, compared.
    Both,
}

/// Demand faults and clones of one generation.
#[derive(Debug, Default, Clone, Copy)]
struct GenTotals {
    demand_faults: u64,
    pages_pushed: u64,
    clones: u64,
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn us(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64() * 1e6))
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("mcdist-kvm-demo: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), String> {
    if args.clones_per_host.is_some() && args.generations > 1 {
        return Err("--generations and --clones-per-host cannot be combined".into());
    }
    let per_host = args.clones_per_host.map(|k| k.min(args.clones.max(1)));
    let (_ns, net) = match per_host {
        None => {
            let ns = Netns::create(&format!("mcdk-demo-{}", std::process::id()))
                .map_err(|e| e.to_string())?;
            ns.multicast_route("lo").map_err(|e| e.to_string())?;
            ns.enter().map_err(|e| e.to_string())?;
            (Some(ns), None)
        }
        Some(k) => {
            let hosts = args.clones.div_ceil(k) as usize;
            let net = BridgeNet::create(&format!("mcdd{}", std::process::id() % 10000), hosts + 1)
                .map_err(|e| e.to_string())?;
            net.hosts[0].enter().map_err(|e| e.to_string())?;
            (None, Some(net))
        }
    };

    let job = HashJob::new(
        args.mem_mib << 20,
        args.table,
        args.slice,
        0x5eed,
        args.stride,
    );
    job.validate(args.clones).map_err(|e| e.to_string())?;
    let t = Instant::now();
    let mut frozen = Parent::boot(job)
        .and_then(|p| p.run_to_fork())
        .map_err(|e| e.to_string())?;
    println!(
        "parent: {} MiB guest filled {} MiB and asked for clones ({} ms incl. zero map and digest)",
        args.mem_mib,
        job.table_bytes() >> 20,
        ms(t.elapsed())
    );
    if let (Some(net), Some(k)) = (&net, per_host) {
        let mut tickets = Vec::new();
        let mut left = args.clones;
        while left > 0 {
            tickets.push(
                frozen
                    .request_ticket(k.min(left))
                    .map_err(|e| e.to_string())?,
            );
            left -= k.min(left);
        }
        println!(
            "{} clones on {} namespace host(s) ({} per host), memory server on a host of its own",
            args.clones,
            tickets.len(),
            k
        );
        let modes: &[bool] = match args.share {
            Share::On => &[true],
            Share::Off => &[false],
            Share::Both => &[false, true],
        };
        let mut rows = Vec::new();
        for (run, &share) in modes.iter().enumerate() {
            println!(
                "\n=== {} ===",
                if share {
                    "one mcdist client and page cache per host"
                } else {
                    "one mcdist client per clone"
                }
            );
            rows.push((
                share,
                run_hosts(&args, &frozen, &tickets, net, share, run as u16)?,
            ));
        }
        print_comparison(&rows, args.processes);
        return Ok(());
    }
    let ticket = frozen
        .request_ticket(args.clones)
        .map_err(|e| e.to_string())?;
    if args.generations <= 1 {
        run_server(
            &args,
            &frozen,
            &ticket,
            1,
            mcdist::ServerConfig::default().working_set_push,
            0,
        )
        .map(|_| ())
    } else {
        let mut rows = Vec::new();
        for (k, ws) in [false, true].into_iter().enumerate() {
            println!(
                "\n=== working-set push {} ===",
                if ws { "on" } else { "off" }
            );
            rows.push((
                ws,
                run_server(&args, &frozen, &ticket, args.generations, ws, k as u16)?,
            ));
        }
        println!(
            "\ndemand faults per generation (sum over {} clones):",
            args.clones
        );
        println!(
            "{:>16} {:>4} {:>14} {:>12} {:>14}",
            "working-set push", "gen", "demand faults", "pushed pages", "vs generation 1"
        );
        for (ws, gens) in &rows {
            for (g, t) in gens.iter().enumerate() {
                let ratio = if t.demand_faults == 0 {
                    "no faults".to_string()
                } else {
                    format!(
                        "{:.1}x",
                        gens[0].demand_faults as f64 / t.demand_faults as f64
                    )
                };
                println!(
                    "{:>16} {:>4} {:>14} {:>12} {:>14}",
                    if *ws { "on" } else { "off" },
                    g + 1,
                    t.demand_faults,
                    t.pages_pushed,
                    ratio
                );
            }
        }
        Ok(())
    }
}

/// Starts a memory server for `frozen` and runs `generations` generations of the ticket's
/// clones against it, one after another; returns each generation's totals.
fn run_server(
    args: &Args,
    frozen: &Frozen,
    ticket: &CloneTicket,
    generations: u32,
    working_set_push: bool,
    run: u16,
) -> Result<Vec<GenTotals>, String> {
    let job = *frozen.job();
    let group = SocketAddrV4::new([239, 255, 70, 1].into(), 46001 + 2 * run);
    let listen = SocketAddr::from(([127, 0, 0, 1], 46002 + 2 * run));
    let scfg = mcdist::ServerConfig {
        push_neighbors: !args.no_push,
        working_set_push,
        ..Default::default()
    };
    let (server, desc) = frozen
        .serve(group, Some("lo"), listen, scfg)
        .map_err(|e| e.to_string())?;
    let desc = Arc::new(desc);
    println!(
        "descriptor: {} bytes for {} pages ({} zero), server {} group {}",
        desc.encode().len(),
        desc.page_count(),
        desc.zero_map.count_ones(),
        listen,
        group
    );
    let launcher = ThreadLauncher {
        make_fetcher: Arc::new(|_id, d: &mcdist_kvm::Descriptor, h| {
            connect_fetcher(d, Some("lo"), h, Duration::from_secs(5))
        }),
        opts: CloneOptions::default(),
    };
    let mut bad = 0;
    let mut gens = Vec::new();
    for gen in 1..=generations {
        let t = Instant::now();
        let results = frozen
            .clone_vms(ticket, &desc, &launcher)
            .join(Duration::from_secs(300));
        let wall = t.elapsed();
        println!(
            "\ngeneration {gen}: {} clones in {} ms",
            results.len(),
            ms(wall)
        );
        let (b, totals, _) = print_clones(&job, &results);
        bad += b;
        gens.push(totals);
    }
    let s = server.shutdown().map_err(|e| e.to_string())?;
    print_server(&s);
    if bad > 0 {
        return Err(format!("{bad} clone(s) failed or computed a wrong result"));
    }
    println!(
        "all {} results match the host's computation",
        gens.iter().map(|g| g.clones).sum::<u64>()
    );
    Ok(gens)
}

/// Prints one row per clone; returns the number of failed or wrong clones, the totals and
/// the fault latencies of all clones.
fn print_clones(
    job: &HashJob,
    results: &[(u32, Result<CloneReport, CloneError>)],
) -> (usize, GenTotals, LatencyHistogram) {
    println!(
        "{:>3} {:>10} {:>4} {:>7} {:>7} {:>7} {:>6} {:>9} {:>9} {:>9} {:>11} {:>9}",
        "id",
        "result",
        "ok",
        "faults",
        "demand",
        "pushed",
        "zero",
        "MiB inst",
        "p50 µs",
        "p99 µs",
        "1st insn ms",
        "total ms"
    );
    let mut bad = 0;
    let mut totals = GenTotals::default();
    let mut latency = LatencyHistogram::default();
    for (id, r) in results {
        match r {
            Ok(r) => {
                let ok = r.result == job.expected(*id);
                bad += usize::from(!ok);
                let s = &r.stats;
                totals.demand_faults += s.demand_faults;
                totals.pages_pushed += s.pages_pushed;
                totals.clones += 1;
                latency.merge(&s.fault_latency);
                println!(
                    "{:>3} {:>#10x} {:>4} {:>7} {:>7} {:>7} {:>6} {:>9.1} {:>9} {:>9} {:>11} {:>9}",
                    id,
                    r.result,
                    if ok { "yes" } else { "NO" },
                    s.demand_faults,
                    s.pages_demand,
                    s.pages_pushed,
                    s.zero_pages,
                    s.bytes_received as f64 / f64::from(1 << 20),
                    us(s.fault_latency.quantile(0.5)),
                    us(s.fault_latency.quantile(0.99)),
                    ms(r.time_to_first_instruction),
                    ms(r.total)
                );
            }
            Err(e) => {
                bad += 1;
                println!("{id:>3} error: {e}");
            }
        }
    }
    (bad, totals, latency)
}

fn print_server(s: &ServerSnapshot) {
    println!(
        "\nserver: {} pages sent ({} demand, {} push, {} working-set push), {:.1} MiB, {} zero replies, {} request datagrams for {} pages",
        s.stats.pages_sent,
        s.stats.demand_pages,
        s.stats.push_pages,
        s.stats.ws_push_pages,
        s.stats.bytes_sent as f64 / f64::from(1 << 20),
        s.stats.zero_replies,
        s.stats.requests,
        s.stats.pages_requested,
    );
}

/// Socket-level traffic of the clients of one host (one client when shared).
#[derive(Debug, Default, Clone, Copy)]
struct HostTraffic {
    /// Clients whose counters are summed here (clone processes' own clients report none).
    clients: u64,
    bytes_received: u64,
    pages_received: u64,
    requests_sent: u64,
    /// UDP datagrams the host's sockets received (the namespace's `/proc/net/snmp`).
    udp_datagrams: u64,
}

impl HostTraffic {
    fn add(&mut self, c: &ClientStats) {
        self.clients += 1;
        self.bytes_received += c.bytes_received;
        self.pages_received += c.pages_received + c.duplicates;
        self.requests_sent += c.requests_sent;
    }
    fn sum(&mut self, o: &HostTraffic) {
        self.clients += o.clients;
        self.bytes_received += o.bytes_received;
        self.pages_received += o.pages_received;
        self.requests_sent += o.requests_sent;
        self.udp_datagrams += o.udp_datagrams;
    }
}

/// UDP datagrams received by sockets of the calling thread's network namespace.
fn udp_in_datagrams() -> Result<u64, String> {
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
struct ProcessSetup {
    descriptor: PathBuf,
    bin_dir: PathBuf,
}

/// Runs `ticket`'s clones as processes on `host`: each with its own client, or all attached
/// to one `mcdist-host-cache` process.
fn run_host_processes(
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
            HostCacheProcess::start(
                &setup.bin_dir.join("mcdist-host-cache"),
                host.name(),
                &setup.descriptor,
                socket.clone(),
                "eth0",
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
                c.args(["--iface", "eth0"]);
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
struct HostResult {
    results: Vec<(u32, Result<CloneReport, CloneError>)>,
    traffic: HostTraffic,
    cache: Option<Arc<HostCache>>,
}

/// Runs `ticket`'s clones on namespace host `host`, sharing one client and cache or not.
fn run_host(
    frozen: &Frozen,
    ticket: &CloneTicket,
    desc: &Arc<Descriptor>,
    host: &Netns,
    share: bool,
    processes: Option<&ProcessSetup>,
) -> Result<HostResult, String> {
    // Sockets made on this thread, and clone threads it starts, belong to the host.
    host.enter().map_err(|e| e.to_string())?;
    let udp0 = udp_in_datagrams()?;
    let mut r = match processes {
        Some(setup) => run_host_processes(frozen, ticket, desc, host, share, setup)?,
        None => run_host_threads(frozen, ticket, desc, host, share)?,
    };
    r.traffic.udp_datagrams = udp_in_datagrams()?.saturating_sub(udp0);
    Ok(r)
}

/// [`run_host`] with the clones as threads of this program.
fn run_host_threads(
    frozen: &Frozen,
    ticket: &CloneTicket,
    desc: &Arc<Descriptor>,
    host: &Netns,
    share: bool,
) -> Result<HostResult, String> {
    let give_up = |c: &mut mcdist::ClientConfig| c.give_up_after = Duration::from_secs(5);
    let join = Duration::from_secs(5);
    let mut traffic = HostTraffic::default();
    if share {
        let cache = HostCache::connect(desc, Some("eth0"), join, give_up)
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
            let f = InlineMcdist::connect(d, Some("eth0"), &h, join, give_up)
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
struct HostRun {
    wall: Duration,
    server: ServerSnapshot,
    traffic: HostTraffic,
    /// Every fault's latency (thread clones).
    latency: LatencyHistogram,
    /// Each clone's p50 and p99 (clone processes report only these).
    clone_quantiles: Vec<(Duration, Duration)>,
    installed: u64,
}

impl HostRun {
    /// Fault latency p50 and p99 over all faults; for clone processes, which report only
    /// their own p50 and p99, the median of the clones' p50 and the largest p99.
    fn quantiles(&self, processes: bool) -> (Option<Duration>, Option<Duration>) {
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
fn run_hosts(
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
    let scfg = mcdist::ServerConfig {
        push_neighbors: !args.no_push,
        ..Default::default()
    };
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
                s.spawn(move || run_host(frozen, ticket, desc, host, share, processes))
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

/// One row per run: what sharing changed.
fn print_comparison(rows: &[(bool, HostRun)], processes: bool) {
    if processes {
        println!("\n(clone processes: p50 is the median of the clones' p50, p99 the largest p99)");
    }
    println!(
        "\n{:>7} {:>9} {:>12} {:>11} {:>14} {:>11} {:>15} {:>8} {:>8} {:>8}",
        "sharing",
        "receivers",
        "server pages",
        "server reqs",
        "host UDP dgrams",
        "host MiB rx",
        "pages in clones",
        "wall ms",
        "p50 µs",
        "p99 µs"
    );
    for (share, r) in rows {
        // Clone processes with their own clients report no socket counters.
        let mib = if r.traffic.clients == 0 {
            "-".to_string()
        } else {
            format!(
                "{:.1}",
                r.traffic.bytes_received as f64 / f64::from(1 << 20)
            )
        };
        println!(
            "{:>7} {:>9} {:>12} {:>11} {:>14} {:>11} {:>15} {:>8} {:>8} {:>8}",
            if *share { "on" } else { "off" },
            r.server.clients,
            r.server.stats.pages_sent,
            r.server.stats.requests,
            r.traffic.udp_datagrams,
            mib,
            r.installed,
            ms(r.wall),
            us(r.quantiles(processes).0),
            us(r.quantiles(processes).1),
        );
    }
}
