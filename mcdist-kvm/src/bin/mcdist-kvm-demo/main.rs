//! The mcdist-kvm demo: a parent KVM guest fills a table, forks N clones on this host over
//! loopback multicast (inside a private network namespace), each clone hashes its slice, and
//! every result is checked against the host's own computation.
//!
//! With `--generations 2` a second generation of clones (same ids, so the same work) starts
//! against the same memory server after the first has been joined, four times: without the
//! server's recorded working set; with its replay only; with the replay and its hints (the
//! default: each clone asks for the recorded pages in bulk while it runs); and with every
//! clone fetching the pages the first generation ended with before its first instruction.
//! The demand faults and times of each generation are printed side by side.
//!
//! With `--clones-per-host K` the clones run on ceil(N/K) namespace hosts of a private bridge
//! (the parent and its memory server on a host of their own), K per host; the clones of one
//! host share one mcdist client and page cache (`--share on`, the default), or each run their
//! own client (`--share off`); `--share both` runs both and prints a comparison.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use mcdist_kvm::clone::connect_fetcher;
use mcdist_kvm::clone::{CloneOptions, ThreadLauncher};
use mcdist_kvm::guest::HashJob;
use mcdist_kvm::netns::{BridgeNet, Netns};
use mcdist_kvm::DescriptorFile;
use mcdist_kvm::{CloneTicket, Frozen, Parent};

mod hosts;
mod report;
#[path = "../common/session_args.rs"]
mod session_args;

use hosts::run_hosts;
use report::{ms, print_clones, print_comparison, print_server};
#[derive(Parser, Debug)]
#[command(about = "Fork KVM clones whose memory arrives lazily over mcdist multicast")]
pub(crate) struct Args {
    /// Number of clones.
    #[arg(long, default_value_t = 8)]
    pub(crate) clones: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub(crate) mem_mib: u64,
    /// Fraction of guest memory the parent fills before the fork.
    #[arg(long, default_value_t = 0.9)]
    pub(crate) table: f64,
    /// Fraction of guest memory each clone hashes.
    #[arg(long, default_value_t = 0.1)]
    pub(crate) slice: f64,
    /// Bytes between table entries (4 = dense; 4096 = one load per page, fast on nested hosts).
    #[arg(long, default_value_t = 4096)]
    pub(crate) stride: u32,
    /// Disable the server's pushes (pure demand paging): next to faults, and of the
    /// recorded working set to later generations (which `--generations` compares).
    #[arg(long)]
    pub(crate) no_push: bool,
    /// The memory server's highest send rate in Mbit/s, as `mcdist serve --rate` (the
    /// rate follows receivers below it).
    #[arg(long, value_name = "MBIT", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) rate: u64,
    /// Generations of clones run one after another against the same memory server. With 2
    /// or more, the run is made four times and compared: without the recorded working set,
    /// with the server's replay of it only, with the replay and hints (the default: clones
    /// ask for the recorded pages in bulk while they run), and with clones fetching the
    /// pages generation 1 ended with before their first instruction.
    #[arg(long, default_value_t = 1)]
    pub(crate) generations: u32,
    /// With --generations: most pages a prefetching clone has asked for and not yet
    /// received (the rest wait their turn).
    #[arg(long, value_name = "PAGES", default_value_t = mcdist_kvm::LazyConfig::default().prefetch_window as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) prefetch_window: u64,
    /// Run the clones on ceil(clones / K) network-namespace hosts joined by a private bridge,
    /// K clones per host (the parent and its memory server run on a host of their own).
    /// Without this option all clones run in one namespace over loopback, each with its own
    /// mcdist client.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) clones_per_host: Option<u32>,
    /// With --clones-per-host: `on` (default): the clones of a host share one mcdist client
    /// (one socket, one receiver at the server) and one page cache, so a page crosses the
    /// network once per host and a later fault on it by another clone of the host is served
    /// from local memory; `off`: every clone runs its own client; `both`: run both, one after
    /// the other with a fresh memory server each, and print a comparison.
    #[arg(long, value_enum, default_value_t = Share::On)]
    pub(crate) share: Share,
    /// With --clones-per-host: run every clone as an `mcdist-clone` process and, when
    /// sharing, one `mcdist-host-cache` process per host (page cache in shared memory, clone
    /// processes attached over a unix socket), instead of threads of this program. The
    /// binaries are looked up next to this one.
    #[arg(long)]
    pub(crate) processes: bool,
    #[command(flatten)]
    pub(crate) keys: session_args::KeyArgs,
}

/// Whether the clones of one host share one client and page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Share {
    /// One client and cache per host.
    On,
    /// One client per clone.
    Off,
    /// Both, compared.
    Both,
}

/// Demand faults and clones of one generation.
#[derive(Debug, Default, Clone)]
pub(crate) struct GenTotals {
    pub(crate) demand_faults: u64,
    pub(crate) pages_pushed: u64,
    pub(crate) pages_prefetched: u64,
    pub(crate) clones: u64,
    /// The generation's start to its last clone's result.
    pub(crate) wall: Duration,
    /// The union of the clones' working sets (pages they ended with), ascending.
    pub(crate) working_set: Vec<u64>,
}

/// What later generations get of the first one's pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Later {
    /// Nothing: they fault on what they touch.
    NoPush,
    /// The server replays the recorded working set when they join, and sends no hints.
    Replay,
    /// The server's default: the replay, and a hint of the recorded set to each clone,
    /// which asks for it in bulk while it runs.
    Hints,
    /// The default, and every clone fetches generation 1's pages before it starts.
    ListFirst,
}

impl Later {
    fn label(self) -> &'static str {
        match self {
            Later::NoPush => "off",
            Later::Replay => "replay",
            Later::Hints => "replay+hints",
            Later::ListFirst => "list 1st",
        }
    }
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("mcdist-kvm-demo: {e}");
        std::process::exit(1);
    }
}

pub(crate) fn run(args: Args) -> Result<(), String> {
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
            if server_config(&args).working_set_push {
                Later::Hints
            } else {
                Later::NoPush
            },
            0,
        )
        .map(|_| ())
    } else {
        let mut rows = Vec::new();
        for (k, later) in [Later::NoPush, Later::Replay, Later::Hints, Later::ListFirst]
            .into_iter()
            .enumerate()
        {
            println!(
                "\n=== working set for later generations: {} ===",
                later.label()
            );
            rows.push((
                later,
                run_server(&args, &frozen, &ticket, args.generations, later, k as u16)?,
            ));
        }
        println!(
            "\ndemand faults per generation (sum over {} clones):",
            args.clones
        );
        println!(
            "{:>16} {:>4} {:>14} {:>12} {:>12} {:>10} {:>14}",
            "working set",
            "gen",
            "demand faults",
            "pushed pages",
            "prefetched",
            "wall ms",
            "vs generation 1"
        );
        for (later, gens) in &rows {
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
                    "{:>16} {:>4} {:>14} {:>12} {:>12} {:>10} {:>14}",
                    later.label(),
                    g + 1,
                    t.demand_faults,
                    t.pages_pushed,
                    t.pages_prefetched,
                    ms(t.wall),
                    ratio
                );
            }
        }
        Ok(())
    }
}

/// The memory server's settings the options ask for.
pub(crate) fn server_config(args: &Args) -> mcdist::ServerConfig {
    let defaults = mcdist::ServerConfig::default();
    mcdist::ServerConfig {
        push_neighbors: !args.no_push,
        working_set_push: !args.no_push && defaults.working_set_push,
        rate: defaults.rate.capped(args.rate.saturating_mul(125_000)),
        ..defaults
    }
}

/// Starts a memory server for `frozen` and runs `generations` generations of the ticket's
/// clones against it, one after another; returns each generation's totals.
pub(crate) fn run_server(
    args: &Args,
    frozen: &Frozen,
    ticket: &CloneTicket,
    generations: u32,
    later: Later,
    run: u16,
) -> Result<Vec<GenTotals>, String> {
    let job = *frozen.job();
    let group = SocketAddrV4::new([239, 255, 70, 1].into(), 46001 + 2 * run);
    let listen = SocketAddr::from(([127, 0, 0, 1], 46002 + 2 * run));
    let sec = args.keys.security()?;
    let scfg = mcdist::node::NodeConfig::new(
        mcdist::ServerConfig {
            working_set_push: later != Later::NoPush,
            working_set_hints: later != Later::Replay,
            ..server_config(args)
        },
        sec.clone(),
    );
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
    let make_fetcher = Arc::new(move |_id, d: &mcdist_kvm::Descriptor, h| {
        connect_fetcher(d, Some("lo"), h, Duration::from_secs(5), sec.as_ref())
    });
    let mut bad = 0;
    let mut gens: Vec<GenTotals> = Vec::new();
    for gen in 1..=generations {
        let first = later == Later::ListFirst;
        let prefetch = gens
            .first()
            .filter(|_| first)
            .map(|g| Arc::from(g.working_set.as_slice()));
        let launcher = ThreadLauncher {
            make_fetcher: make_fetcher.clone(),
            opts: CloneOptions {
                record_working_set: gen == 1 && generations > 1,
                prefetch,
                prefetch_before_start: first,
                lazy: mcdist_kvm::LazyConfig {
                    prefetch_window: usize::try_from(args.prefetch_window).unwrap_or(usize::MAX),
                    ..Default::default()
                },
                ..CloneOptions::default()
            },
        };
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
        let (b, mut totals, _) = print_clones(&job, &results);
        totals.wall = wall;
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
