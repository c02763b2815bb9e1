//! The mcdist-kvm demo: a parent KVM guest fills a table, forks N clones on this host over
//! loopback multicast (inside a private network namespace), each clone hashes its slice, and
//! every result is checked against the host's own computation.
//!
//! With `--generations 2` a second generation of clones (same ids, so the same work) starts
//! against the same memory server after the first has been joined, once with the server's
//! recorded working-set push and once without, and the demand faults of each generation are
//! printed side by side.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use mcdist_kvm::clone::{CloneOptions, ThreadLauncher};
use mcdist_kvm::guest::HashJob;
use mcdist_kvm::netns::Netns;
use mcdist_kvm::remote::connect_fetcher;
use mcdist_kvm::{CloneTicket, Frozen, Parent};

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
    let ns =
        Netns::create(&format!("mcdk-demo-{}", std::process::id())).map_err(|e| e.to_string())?;
    ns.multicast_route("lo").map_err(|e| e.to_string())?;
    ns.enter().map_err(|e| e.to_string())?;

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
        println!(
            "{:>3} {:>10} {:>4} {:>7} {:>7} {:>7} {:>6} {:>9} {:>9} {:>9} {:>11} {:>9}",
            "id",
            "result",
            "ok",
            "faults",
            "demand",
            "pushed",
            "zero",
            "MiB recv",
            "p50 µs",
            "p99 µs",
            "1st insn ms",
            "total ms"
        );
        let mut totals = GenTotals::default();
        for (id, r) in &results {
            match r {
                Ok(r) => {
                    let ok = r.result == job.expected(*id);
                    bad += usize::from(!ok);
                    let s = &r.stats;
                    totals.demand_faults += s.demand_faults;
                    totals.pages_pushed += s.pages_pushed;
                    totals.clones += 1;
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
        gens.push(totals);
    }
    let s = server.shutdown().map_err(|e| e.to_string())?;
    println!(
        "\nserver: {} pages sent ({} demand, {} push, {} working-set push), {:.1} MiB, {} zero replies",
        s.stats.pages_sent,
        s.stats.demand_pages,
        s.stats.push_pages,
        s.stats.ws_push_pages,
        s.stats.bytes_sent as f64 / f64::from(1 << 20),
        s.stats.zero_replies,
    );
    if bad > 0 {
        return Err(format!("{bad} clone(s) failed or computed a wrong result"));
    }
    println!(
        "all {} results match the host's computation",
        gens.iter().map(|g| g.clones).sum::<u64>()
    );
    Ok(gens)
}
