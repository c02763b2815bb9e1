//! Boots Debian's Linux kernel on KVM and clones it over mcdist.
//!
//! - `mcdist-linux boot`: boot, print the console, exit when init does.
//! - `mcdist-linux fork --clones N`: build a bridge of network namespaces, boot the parent in
//!   host 0, run it to its fork point, serve its frozen memory with mcdist, start N
//!   `mcdist-linux clone` processes in hosts 1..=N, collect and check their results.
//! - `mcdist-linux clone`: run one clone from a descriptor with lazy memory over mcdist and
//!   print its console and a `MCDIST-LINUX-CLONE` report line.

use std::collections::HashMap;
use std::io::Read;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
#[path = "common/session_args.rs"]
mod session_args;
use mcdist_kvm::inline::InlineMcdist;
use mcdist_kvm::linux::{
    expected_sum, parse_report_line, run_linux_clone, BootOptions, GuestPlan, LinuxDescriptor,
    LinuxError, LinuxExit, LinuxParent,
};
use mcdist_kvm::netns::BridgeNet;
use mcdist_kvm::DescriptorFile;
use mcdist_kvm::LazyConfig;
use mcdist_kvm::MemoryServer;
use session_args::KeyArgs;

#[derive(Parser, Debug)]
#[command(about = "Boot a real Linux guest on KVM and clone it over mcdist")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Boot the kernel with the busybox initramfs and print its console.
    Boot {
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 256)]
        mem_mib: u64,
        /// Show the kernel's boot log (drops `quiet`).
        #[arg(long)]
        verbose: bool,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout_s: u64,
        /// Extra kernel command line.
        #[arg(long, default_value = "")]
        cmdline: String,
    },
    /// Boot a parent, fork it at init's fork point and run N clones in namespace hosts.
    Fork {
        /// Number of clones (each in its own namespace host).
        #[arg(long, default_value_t = 4)]
        clones: u8,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 256)]
        mem_mib: u64,
        /// Numbers in the workload table the parent builds before forking.
        #[arg(long, default_value_t = 100_000)]
        lines: u32,
        /// Show the kernel's boot log.
        #[arg(long)]
        verbose: bool,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout_s: u64,
        /// Multicast group of the memory server (239.255.0.0/16).
        #[arg(long, default_value = "239.255.78.1:47101")]
        group: SocketAddrV4,
        /// UDP port the memory server takes requests on (host 0's bridge address).
        #[arg(long, default_value_t = 47102)]
        port: u16,
        #[command(flatten)]
        keys: KeyArgs,
    },
    /// Run one clone from a descriptor.
    Clone {
        /// Descriptor written by `fork`.
        #[arg(long)]
        descriptor: PathBuf,
        /// Clone id.
        #[arg(long)]
        id: u32,
        /// Interface for multicast.
        #[arg(long)]
        iface: Option<String>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout_s: u64,
        #[command(flatten)]
        keys: KeyArgs,
    },
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Linux(#[from] LinuxError),
    #[error("{0}")]
    Other(String),
}

fn main() {
    let args = Args::parse();
    let r = match args.cmd {
        Cmd::Boot {
            mem_mib,
            verbose,
            timeout_s,
            cmdline,
        } => boot(mem_mib, verbose, timeout_s, &cmdline),
        Cmd::Fork {
            clones,
            mem_mib,
            lines,
            verbose,
            timeout_s,
            group,
            port,
            keys,
        } => fork(
            clones, mem_mib, lines, verbose, timeout_s, group, port, &keys,
        ),
        Cmd::Clone {
            descriptor,
            id,
            iface,
            timeout_s,
            keys,
        } => clone(&descriptor, id, iface.as_deref(), timeout_s, &keys),
    };
    match r {
        Ok(()) => {}
        // Fail closed: the vCPUs were stopped; the line starts with "memory lost: ".
        Err(CliError::Linux(e @ LinuxError::MemoryLost(_))) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("mcdist-linux: {e}");
            std::process::exit(1);
        }
    }
}

fn opts(plan: GuestPlan, mem_mib: u64, verbose: bool) -> Result<BootOptions, CliError> {
    let mut o = BootOptions::new(plan)?;
    o.mem_size = mem_mib << 20;
    o.echo = Some("guest| ".into());
    if verbose {
        o.extra_cmdline.clear();
    }
    Ok(o)
}

fn boot(mem_mib: u64, verbose: bool, timeout_s: u64, cmdline: &str) -> Result<(), CliError> {
    let t = Instant::now();
    let mut o = opts(GuestPlan::Boot, mem_mib, verbose)?;
    o.extra_cmdline.push(' ');
    o.extra_cmdline.push_str(cmdline);
    let mut p = LinuxParent::boot(&o)?;
    let exit = p.run(Duration::from_secs(timeout_s))?;
    let booted = p
        .console()
        .lock()
        .map_err(|_| CliError::Other("console lock".into()))?
        .lines()
        .iter()
        .any(|l| l.starts_with("MCDIST-BOOTED "));
    println!(
        "MCDIST-BOOT exit={exit:?} booted={booted} elapsed_ms={}",
        t.elapsed().as_millis()
    );
    if exit != LinuxExit::Exit(0) || !booted {
        return Err(CliError::Other("the guest did not boot to its init".into()));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn fork(
    clones: u8,
    mem_mib: u64,
    lines: u32,
    verbose: bool,
    timeout_s: u64,
    group: SocketAddrV4,
    port: u16,
    keys: &KeyArgs,
) -> Result<(), CliError> {
    let other = |e: &dyn std::fmt::Display| CliError::Other(e.to_string());
    let scfg = mcdist::node::NodeConfig::new(
        mcdist::ServerConfig::default(),
        keys.security().map_err(CliError::Other)?,
    );
    if clones == 0 {
        return Err(CliError::Other("--clones must be at least 1".into()));
    }
    let timeout = Duration::from_secs(timeout_s);
    let net = BridgeNet::create(
        &format!("mcdl{}", std::process::id() % 100_000),
        usize::from(clones) + 1,
    )
    .map_err(|e| other(&e))?;
    net.hosts[0].enter().map_err(|e| other(&e))?;
    let t = Instant::now();
    let parent = LinuxParent::boot(&opts(GuestPlan::Fork { lines }, mem_mib, verbose)?)?;
    let frozen = parent.run_to_fork(timeout)?;
    println!(
        "parent: booted and reached its fork point in {} ms; frozen (state, zero scan, digest) in {} ms",
        frozen.fork_after.as_millis(),
        frozen.freeze_time.as_millis()
    );
    let listen = SocketAddr::new(BridgeNet::addr(0).into(), port);
    let server = MemoryServer::start(
        frozen.image(),
        frozen.zero_map(),
        frozen.digest(),
        group,
        Some("eth0"),
        listen,
        scfg,
    )
    .map_err(|e| other(&e))?;
    let desc = frozen.descriptor(clones, Some(server.session().clone()));
    let path = std::env::temp_dir().join(format!("mcdist-linux-{}.desc", std::process::id()));
    desc.save(&path).map_err(|e| other(&e))?;
    let desc_len = desc.encode().len();
    let pages = desc.base.page_count();
    let zero = desc.base.zero_map.count_ones();
    println!(
        "descriptor: {desc_len} bytes for {} MiB of guest memory ({pages} pages, {zero} zero pages = {:.1}%)",
        mem_mib,
        100.0 * zero as f64 / pages as f64
    );
    let exe = std::env::current_exe().map_err(|e| other(&e))?;
    let mut children = Vec::new();
    for id in 0..u32::from(clones) {
        let child = Command::new("ip")
            .args(["netns", "exec", net.hosts[id as usize + 1].name()])
            .arg(&exe)
            .arg("clone")
            .arg("--descriptor")
            .arg(&path)
            .args(["--id", &id.to_string(), "--iface", "eth0"])
            .args(["--timeout-s", &timeout_s.to_string()])
            .args(keys.child_args())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| other(&format!("spawn clone {id}: {e}")))?;
        children.push((id, child));
    }
    let deadline = Instant::now() + timeout + Duration::from_secs(10);
    let mut failures = Vec::new();
    let mut reports: Vec<HashMap<String, String>> = Vec::new();
    for (id, mut child) in children {
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(other(&e)),
            }
        };
        let mut out = String::new();
        let mut err = String::new();
        if let Some(o) = child.stdout.as_mut() {
            let _ = o.read_to_string(&mut out);
        }
        if let Some(e) = child.stderr.as_mut() {
            let _ = e.read_to_string(&mut err);
        }
        for l in out.lines().filter(|l| l.starts_with("console| ")) {
            println!("clone {id} {l}");
        }
        let rep = out.lines().find_map(parse_report_line);
        let want = expected_sum(lines, id, u32::from(clones));
        match (status, rep) {
            (Some(s), Some(r)) if s.success() => {
                let got = r.get("sum").cloned().unwrap_or_default();
                if got != want.to_string() {
                    failures.push(format!("clone {id}: sum {got}, expected {want}"));
                }
                reports.push(r);
            }
            (s, _) => failures.push(format!(
                "clone {id}: {} {}",
                s.map_or("timed out".to_string(), |s| s.to_string()),
                err.lines().last().unwrap_or("")
            )),
        }
    }
    let _ = std::fs::remove_file(&path);
    let snap = server.shutdown().map_err(|e| other(&e))?;
    println!(
        "\n{:>5} {:>10} {:>9} {:>8} {:>9} {:>12} {:>12} {:>10} {:>10}",
        "clone",
        "fetched",
        "% of RAM",
        "demand",
        "pushed",
        "resume ms",
        "1st line ms",
        "p50 us",
        "p99 us"
    );
    let num = |r: &HashMap<String, String>, k: &str| -> f64 {
        r.get(k).and_then(|v| v.parse().ok()).unwrap_or(0.0)
    };
    for r in &reports {
        let fetched = num(r, "fetched");
        println!(
            "{:>5} {:>10} {:>8.2}% {:>8} {:>9} {:>12.2} {:>12.2} {:>10.1} {:>10.1}",
            r.get("id").map_or("?", String::as_str),
            fetched,
            100.0 * fetched / pages as f64,
            num(r, "demand"),
            num(r, "pushed"),
            num(r, "resume_ns") / 1e6,
            num(r, "first_line_ns") / 1e6,
            num(r, "p50_ns") / 1e3,
            num(r, "p99_ns") / 1e3,
        );
    }
    println!(
        "server: {} pages sent ({:.2} MiB) for {} clones of a {} MiB guest; total {} ms",
        snap.stats.pages_sent,
        snap.stats.pages_sent as f64 * 4096.0 / (1 << 20) as f64,
        clones,
        mem_mib,
        t.elapsed().as_millis()
    );
    if !failures.is_empty() {
        return Err(CliError::Other(failures.join("; ")));
    }
    println!("MCDIST-LINUX-FORK ok clones={clones}");
    Ok(())
}

fn clone(
    path: &std::path::Path,
    id: u32,
    iface: Option<&str>,
    timeout_s: u64,
    keys: &KeyArgs,
) -> Result<(), CliError> {
    let desc = LinuxDescriptor::load(path).map_err(|e| CliError::Other(e.to_string()))?;
    let security = keys.for_descriptor(&desc.base).map_err(CliError::Other)?;
    let lazy = LazyConfig::default();
    let give_up = lazy.fetch_timeout;
    let report = run_linux_clone(&desc, id, lazy, Duration::from_secs(timeout_s), None, |h| {
        // Fail closed: a lost memory ends the process with "memory lost: ...".
        h.exit_process_on_loss().map_err(LinuxError::Io)?;
        // The fault thread drives the client itself (the clone path's fetcher).
        let f = InlineMcdist::connect(&desc.base, iface, &h, Duration::from_secs(5), |c| {
            c.give_up_after = give_up;
            c.security = security;
        })
        .map_err(LinuxError::Session)?;
        Ok(f.into_fetcher())
    })?;
    for l in &report.console {
        println!("console| {l}");
    }
    println!("{}", report.to_line());
    if report.exit_code != 0 {
        return Err(CliError::Other(format!(
            "guest exit code {}",
            report.exit_code
        )));
    }
    Ok(())
}
