//! `mcdist-bench`: whole-image distribution to N receivers over network
//! namespaces on a bridge, mcdist against the real peers uftp and udpcast,
//! every configuration measured in the same run.
//!
//! Needs root, `ip` (iproute2), `nft` (loss injection), `uftp`/`uftpd` and
//! `udp-sender`/`udp-receiver`; a peer whose programs are missing is skipped
//! with a note. Traffic stays inside namespaces this program creates; groups
//! come from 239.255.0.0/16 with TTL 1.
//!
//! Prints a table and writes `results.csv` and `results.svg` to `--out`.

use clap::Parser;
use mcdist::testnet::{unavailable, Topology};
use mcdist_benches::e2e::{self, Bench, RunResult, Tool};
use std::path::PathBuf;
use std::process::ExitCode;

/// Whole-image distribution bench: mcdist, mcdist unicast fan-out, uftp, udpcast.
#[derive(Parser, Debug)]
#[command(name = "mcdist-bench", about, long_about = None)]
struct Cli {
    /// The mcdist binary (default: next to this program).
    #[arg(long)]
    mcdist: Option<PathBuf>,
    /// Another mcdist build, run as the tool `mcdist-base` right after `mcdist` (and as
    /// `mcdist-base-fec` right after `mcdist-fec`) in every configuration, so that two
    /// builds are compared in the same run.
    #[arg(long, value_name = "PATH")]
    baseline: Option<PathBuf>,
    /// Run every configuration this many times, the tools taking turns in each round;
    /// the table reports medians (every run is in results.csv).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=50))]
    reps: u32,
    /// Before the first measured run, run the first tool once in the first configuration
    /// and leave it out of the results: the first run right after a build is sometimes
    /// disturbed (benches/README.md, "the first run after a cargo build").
    #[arg(long)]
    warmup: bool,
    /// Small, fast smoke run: 16 MiB, N = 1, 2, 4, loss 0 and 5 %.
    #[arg(long)]
    quick: bool,
    /// Image size in MiB.
    #[arg(long)]
    size_mib: Option<u64>,
    /// Receiver counts for the loss-free sweep, comma separated.
    #[arg(long, value_delimiter = ',')]
    receivers: Option<Vec<usize>>,
    /// Loss rates in percent for the loss sweep, comma separated.
    #[arg(long, value_delimiter = ',')]
    loss: Option<Vec<f64>>,
    /// Receiver count of the loss sweep.
    #[arg(long)]
    loss_receivers: Option<usize>,
    /// Tools to run, comma separated: mcdist, mcdist-fec, mcdist-unicast, mcdist-auth, mcdist-enc, uftp, udpcast, udpcast-fec;
    /// also mcdist-gso and mcdist-nogso (mcdist with UDP GSO/GRO forced on or off) and
    /// mcdist-base and mcdist-base-fec (the --baseline build, without and with FEC).
    #[arg(long, value_delimiter = ',')]
    tools: Option<Vec<String>>,
    /// Send-rate cap for every tool, Mbit/s.
    #[arg(long, default_value_t = 1000)]
    rate_mbit: u64,
    /// MTU of the namespace links.
    #[arg(long, default_value_t = 1500)]
    mtu: u32,
    /// Percentage of all-zero pages in the generated image.
    #[arg(long, default_value_t = 0)]
    zero_percent: u32,
    /// Give up on one run after this many seconds.
    #[arg(long, default_value_t = 300)]
    run_timeout: u64,
    /// Where results.csv and results.svg go.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Keep every run's sender and receiver logs under `<out>/logs`, one folder per
    /// configuration (`<tool>-n<N>-loss<L>`, and `-rep<K>` after it for repetition K > 1).
    #[arg(long)]
    keep_logs: bool,
    /// Directory for the image and received copies (default: /dev/shm, else the system temp dir).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Pressure: receiver 1 of every tool writes its copy to a scratch directory under
    /// DIR (a directory on a disk), the other receivers to the work directory (memory).
    #[arg(long, value_name = "DIR")]
    disk_receiver: Option<PathBuf>,
    /// Pressure: keep one core busy with a spinning thread during every run.
    #[arg(long)]
    cpu_hog: bool,
    /// Pressure: stop every receiver process (SIGSTOP, then SIGCONT) for STALL ms in
    /// every EVERY ms, the receivers in turn, as a busy host deschedules a process now
    /// and then; e.g. 20/200. With :N, only the first N receivers (500/600:1 stalls
    /// receiver 1 alone). With :together, they stall all at once, half a period in, as
    /// when their hosts share the stall (150/1000:8:together).
    #[arg(long, value_name = "STALL/EVERY[:N][:together]")]
    stall_receivers: Option<e2e::StallSpec>,
    /// Pressure: receiver 1 sits behind a slower link of MBIT Mbit/s (a token bucket on
    /// its bridge port: 64 KiB of burst, frames that would wait over 20 ms dropped), as a
    /// host on a slower network; with :N, the first N receivers each behind one.
    #[arg(long, value_name = "MBIT[:N]")]
    slow_link: Option<e2e::SlowLink>,
    /// Run nothing: read a results.csv written earlier and write its plot and table again
    /// (results.svg and results.md next to it; --size-mib and --loss-receivers label the plot).
    #[arg(long, value_name = "CSV")]
    replot: Option<PathBuf>,
}

/// `--replot`: the plot and table of an earlier run's CSV.
fn replot(csv: &std::path::Path, size_mib: u64, loss_n: usize) -> Result<(), String> {
    let text = std::fs::read_to_string(csv).map_err(|e| format!("{}: {e}", csv.display()))?;
    let results = e2e::from_csv(&text).map_err(|e| format!("{}: {e}", csv.display()))?;
    let table = e2e::medians(&results);
    let dir = csv.parent().unwrap_or(std::path::Path::new("."));
    let (svg, md) = (dir.join("results.svg"), dir.join("results.md"));
    std::fs::write(&svg, e2e::to_svg(&table, size_mib, loss_n))
        .and_then(|_| std::fs::write(&md, e2e::to_markdown(&table)))
        .map_err(|e| format!("writing {}: {e}", dir.display()))?;
    println!("wrote {}, {}", svg.display(), md.display());
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(csv) = &cli.replot {
        let size = cli.size_mib.unwrap_or(256);
        return match replot(csv, size, cli.loss_receivers.unwrap_or(8)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mcdist-bench: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(why) = unavailable() {
        eprintln!("mcdist-bench: cannot build namespaces: {why}");
        return ExitCode::FAILURE;
    }
    let mcdist = match cli.mcdist.clone().or_else(e2e::mcdist_next_to_me) {
        Some(p) => p,
        None => {
            eprintln!("mcdist-bench: no mcdist binary next to this program; pass --mcdist PATH");
            return ExitCode::FAILURE;
        }
    };
    let size_mib = cli.size_mib.unwrap_or(if cli.quick { 16 } else { 256 });
    let receivers = cli.receivers.clone().unwrap_or_else(|| {
        if cli.quick {
            vec![1, 2, 4]
        } else {
            vec![1, 2, 4, 8, 16]
        }
    });
    let losses = cli.loss.clone().unwrap_or_else(|| {
        if cli.quick {
            vec![5.0]
        } else {
            vec![1.0, 5.0, 10.0]
        }
    });
    let loss_n = cli.loss_receivers.unwrap_or(if cli.quick { 2 } else { 8 });
    let tools = match cli.tools.as_ref() {
        Some(names) => {
            let mut v = Vec::new();
            for n in names {
                match Tool::from_name(n) {
                    Some(t) => v.push(t),
                    None => {
                        eprintln!("mcdist-bench: unknown tool {n:?}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            v
        }
        None => Tool::ALL.to_vec(),
    };
    let mut tools = tools;
    if cli.baseline.is_some() {
        let mut i = 0;
        while i < tools.len() {
            if let Some(base) = tools[i].baseline().filter(|b| !tools.contains(b)) {
                tools.insert(i + 1, base);
            }
            i += 1;
        }
    }
    let work = match e2e::WorkDir::new(cli.work_dir.as_deref()) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("mcdist-bench: work directory: {e}");
            return ExitCode::FAILURE;
        }
    };
    let disk_receiver = match cli.disk_receiver.as_deref().map(|d| {
        e2e::WorkDir::new(Some(d)).map_err(|e| format!("--disk-receiver {}: {e}", d.display()))
    }) {
        Some(Err(e)) => {
            eprintln!("mcdist-bench: {e}");
            return ExitCode::FAILURE;
        }
        Some(Ok(w)) => Some(w),
        None => None,
    };
    let bench = Bench {
        mcdist,
        baseline: cli.baseline.clone(),
        image_bytes: size_mib << 20,
        rate_mbit: cli.rate_mbit,
        mtu: cli.mtu,
        zero_percent: cli.zero_percent,
        run_timeout: std::time::Duration::from_secs(cli.run_timeout),
        work,
        keep_logs: cli.keep_logs.then(|| cli.out.join("logs")),
        disk_receiver,
        cpu_hog: cli.cpu_hog,
        stalls: cli.stall_receivers,
    };
    if let Err(e) = bench.make_image() {
        eprintln!("mcdist-bench: writing the image: {e}");
        return ExitCode::FAILURE;
    }
    let available: Vec<Tool> = tools
        .into_iter()
        .filter(|t| match t.missing(&bench) {
            Some(why) => {
                println!("skipping {}: {why}", t.name());
                false
            }
            None => true,
        })
        .collect();
    let mut results: Vec<RunResult> = Vec::new();
    let mut ns_all: Vec<usize> = receivers.clone();
    if !losses.is_empty() && !ns_all.contains(&loss_n) {
        ns_all.push(loss_n);
    }
    ns_all.sort_unstable();
    ns_all.dedup();
    println!(
        "image {} MiB, rate cap {} Mbit/s, MTU {}, tools: {}",
        size_mib,
        cli.rate_mbit,
        cli.mtu,
        available
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("{}", RunResult::table_header());
    let mut warmup = cli.warmup;
    for (k, &n) in ns_all.iter().enumerate() {
        let topo = match Topology::create("mcb", n + 1, 60 + k as u8) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("mcdist-bench: building {} namespaces: {e}", n + 1);
                return ExitCode::FAILURE;
            }
        };
        if let Err(e) = e2e::set_mtu(&topo, cli.mtu) {
            eprintln!("mcdist-bench: setting MTU {}: {e}", cli.mtu);
            return ExitCode::FAILURE;
        }
        if let Some(spec) = cli.slow_link {
            if let Err(e) = e2e::set_slow_link(&topo, spec) {
                eprintln!(
                    "mcdist-bench: limiting the link to {} Mbit/s: {e}",
                    spec.mbit
                );
                return ExitCode::FAILURE;
            }
        }
        let mut plan: Vec<f64> = Vec::new();
        if receivers.contains(&n) {
            plan.push(0.0);
        }
        if n == loss_n {
            plan.extend(losses.iter().copied().filter(|l| *l > 0.0));
        }
        if let (true, Some(&loss), Some(&tool)) = (warmup, plan.first(), available.first()) {
            let r = bench.run(&topo, 60 + k as u8, tool, n, loss, 0);
            println!("{} (warm-up, not counted)", r.table_row());
            warmup = false;
        }
        for &loss in &plan {
            for rep in 1..=cli.reps as usize {
                for &tool in &available {
                    if tool.fec() && loss == 0.0 && !receivers.is_empty() && n != loss_n {
                        // FEC variants matter under loss; loss-free they run at the loss sweep's N only.
                        continue;
                    }
                    let r = bench.run(&topo, 60 + k as u8, tool, n, loss, rep);
                    println!("{}", r.table_row());
                    results.push(r);
                }
            }
        }
        drop(topo);
    }
    if let Err(e) = std::fs::create_dir_all(&cli.out) {
        eprintln!("mcdist-bench: creating {}: {e}", cli.out.display());
        return ExitCode::FAILURE;
    }
    let csv = cli.out.join("results.csv");
    let svg = cli.out.join("results.svg");
    let md = cli.out.join("results.md");
    // One row per configuration (medians when it ran more than once); every run in the CSV.
    let table = e2e::medians(&results);
    let markdown = if cli.reps > 1 {
        format!(
            "Medians of {} runs per configuration:\n\n{}\nEvery run:\n\n{}",
            cli.reps,
            e2e::to_markdown(&table),
            e2e::to_markdown(&results)
        )
    } else {
        e2e::to_markdown(&table)
    };
    let res = std::fs::write(&csv, e2e::to_csv(&results))
        .and_then(|_| std::fs::write(&svg, e2e::to_svg(&table, size_mib, loss_n)))
        .and_then(|_| std::fs::write(&md, markdown));
    if let Err(e) = res {
        eprintln!("mcdist-bench: writing results: {e}");
        return ExitCode::FAILURE;
    }
    println!();
    if cli.reps > 1 {
        println!("medians of {} runs:", cli.reps);
        println!("{}", RunResult::table_header());
        for r in &table {
            println!("{}", r.table_row());
        }
    }
    print!("{}", e2e::summary(&table));
    println!(
        "wrote {}, {}, {}",
        csv.display(),
        svg.display(),
        md.display()
    );
    if results.iter().all(|r| r.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}
