//! Measurements for mcdist-kvm, all in one run, printed as tables:
//!
//! 1. Fault latency (fault event read → page installed) for one clone whose memory comes from
//!    a local snapshot file (the Firecracker-style handler: read the page, `UFFDIO_COPY`) and
//!    from an mcdist server over loopback multicast, with the fault thread blocking in `poll`
//!    or spinning on non-blocking reads. mcdist runs two ways: a client I/O thread fed by the
//!    fault thread (`ClientNode`, "threaded") and the client driven by the fault thread itself
//!    (`InlineMcdist`, "inline").
//!    Then the floor (UDP round trip), the network side of a fault stage by stage, and the
//!    touch latency seen by a faulting thread with its stages on the real path (fault event
//!    read, request sent, page received, verified, `UFFDIO_COPY`, touch returned) and the
//!    goal ratios to the floor (`--touch-only` runs only these).
//! 2. Clone start (descriptor in hand → first instruction) for several guest sizes: lazy
//!    (local and mcdist) versus an eager full copy before the first instruction.
//!
//! Runs inside a private network namespace it creates; needs root and /dev/kvm.

use std::io::Write;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use mcdist::secure::Security;
#[path = "common/fault_stages.rs"]
mod fault_stages;
#[path = "common/session_args.rs"]
mod session_args;
#[path = "common/uffd_stages.rs"]
mod uffd_stages;
use mcdist_kvm::clone::{run_clone, CloneError, CloneOptions, CloneReport};
use mcdist_kvm::guest::HashJob;
use mcdist_kvm::inline::InlineMcdist;
use mcdist_kvm::netns::Netns;
use mcdist_kvm::source::FileSource;
use mcdist_kvm::DescriptorFile;
use mcdist_kvm::{Descriptor, FaultWait, Frozen, PageFetcher, PageSource, Parent, SourceFetcher};
use mcdist_kvm::{McdistFetcher, MemoryServer};

#[derive(Parser, Debug)]
#[command(about = "Fault latency and clone start measurements for mcdist-kvm")]
struct Args {
    /// Guest size (MiB) for the fault-latency runs.
    #[arg(long, default_value_t = 64)]
    latency_mib: u64,
    /// Fraction of guest memory the latency clone touches.
    #[arg(long, default_value_t = 0.25)]
    slice: f64,
    /// Guest sizes (MiB) for the clone-start runs.
    #[arg(long, value_delimiter = ',', default_value = "64,1024")]
    start_mib: Vec<u64>,
    /// Server pacing rate for the fault-latency runs, MB/s, as initial rate and cap
    /// (0: the server's defaults).
    #[arg(long, default_value_t = 0)]
    server_rate_mbps: u64,
    /// Repetitions per configuration.
    #[arg(long, default_value_t = 3)]
    reps: u32,
    /// Only the floor, the network-side stages and the touch latency with its stages (no
    /// KVM clones, no clone start).
    #[arg(long)]
    touch_only: bool,
    #[command(flatten)]
    keys: session_args::KeyArgs,
}

/// The session key of every server and client of the run (set once in `main`).
static SECURITY: std::sync::OnceLock<Option<Security>> = std::sync::OnceLock::new();

fn security() -> Option<Security> {
    SECURITY.get().cloned().flatten()
}

fn main() {
    let args = Args::parse();
    let r = args.keys.security().and_then(|sec| {
        let _ = SECURITY.set(sec);
        run(args)
    });
    if let Err(e) = r {
        eprintln!("mcdist-kvm-bench: {e}");
        std::process::exit(1);
    }
}

fn us(d: Option<Duration>) -> f64 {
    d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e6)
}

struct Served {
    frozen: Frozen,
    server: MemoryServer,
    desc: Descriptor,
}

fn serve(job: HashJob, port: u16, push: bool, rate: u64) -> Result<Served, String> {
    let frozen = Parent::boot(job)
        .and_then(|p| p.run_to_fork())
        .map_err(|e| e.to_string())?;
    let group = SocketAddrV4::new([239, 255, 71, 1].into(), port);
    let listen: SocketAddr = format!("127.0.0.1:{}", port + 1)
        .parse()
        .map_err(|e| format!("{e}"))?;
    let cfg = mcdist::ServerConfig {
        push_neighbors: push,
        working_set_push: push,
        rate: match rate {
            0 => mcdist::pacing::RateConfig::default(),
            r => mcdist::pacing::RateConfig {
                initial: r,
                cap: r,
                ..Default::default()
            },
        },
        ..Default::default()
    };
    let cfg = mcdist::node::NodeConfig::new(cfg, security());
    let (server, desc) = frozen
        .serve(group, Some("lo"), listen, cfg)
        .map_err(|e| e.to_string())?;
    Ok(Served {
        frozen,
        server,
        desc,
    })
}

fn local_clone(
    desc: &Descriptor,
    src: &Arc<dyn PageSource>,
    id: u32,
    opts: &CloneOptions,
) -> Result<CloneReport, CloneError> {
    run_clone(desc, id, opts, |h| {
        Ok(Arc::new(SourceFetcher::new(src.clone(), h)) as Arc<dyn PageFetcher>)
    })
}

/// How a clone's faults reach mcdist.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Handler {
    /// Local snapshot file, read on the fault thread.
    Local,
    /// mcdist `ClientNode` on its own I/O thread.
    Threaded,
    /// mcdist client driven by the fault thread.
    Inline,
}

fn mcdist_fetcher(
    desc: &Descriptor,
    h: mcdist_kvm::LazyHandle,
    inline: bool,
) -> Result<Arc<dyn PageFetcher>, CloneError> {
    let join = Duration::from_secs(5);
    let give_up = |c: &mut mcdist_kvm::session::ClientSetup| {
        c.give_up_after = Duration::from_secs(5);
        c.security = security();
    };
    let f: Arc<dyn PageFetcher> = if inline {
        InlineMcdist::connect(desc, Some("lo"), &h, join, give_up)?.into_fetcher()
    } else {
        Arc::new(McdistFetcher::connect(desc, Some("lo"), h, join, give_up)?)
    };
    Ok(f)
}

fn remote_clone(
    desc: &Descriptor,
    id: u32,
    opts: &CloneOptions,
    inline: bool,
) -> Result<CloneReport, CloneError> {
    run_clone(desc, id, opts, |h| mcdist_fetcher(desc, h, inline))
}

/// One measured configuration.
struct Row {
    name: &'static str,
    /// Column heading of the stage table.
    short: &'static str,
    wait: FaultWait,
    handler: Handler,
    /// `LazyConfig::reply_spin` in µs.
    reply_spin_us: u64,
}

const fn row(
    name: &'static str,
    short: &'static str,
    wait: FaultWait,
    handler: Handler,
    reply_spin_us: u64,
) -> Row {
    Row {
        name,
        short,
        wait,
        handler,
        reply_spin_us,
    }
}

use FaultWait::{Block, Spin};
use Handler::{Inline, Local, Threaded};

/// Each mcdist row is compared with the local row of the same wait mode.
const ROWS: [Row; 8] = [
    row("local file, blocking", "loc blk", Block, Local, 0),
    row("mcdist threaded, blocking", "thr blk", Block, Threaded, 0),
    row("mcdist inline, blocking", "inl blk", Block, Inline, 0),
    row("mcdist inline, block+spin50", "inl sp50", Block, Inline, 50),
    row(
        "mcdist inline, block+spin200",
        "inl sp200",
        Block,
        Inline,
        200,
    ),
    row("local file, polling", "loc poll", Spin, Local, 0),
    row("mcdist threaded, polling", "thr poll", Spin, Threaded, 0),
    row("mcdist inline, polling", "inl poll", Spin, Inline, 0),
];

fn lazy_cfg(r: &Row) -> mcdist_kvm::LazyConfig {
    mcdist_kvm::LazyConfig {
        wait: r.wait,
        reply_spin: Duration::from_micros(r.reply_spin_us),
        ..Default::default()
    }
}

/// Each mcdist row of `hists` (one histogram per row of [`ROWS`]) with its histogram and
/// that of the local row of the same wait mode.
fn against_local(
    hists: &[mcdist_kvm::lazy::LatencyHistogram],
) -> impl Iterator<
    Item = (
        &'static Row,
        &mcdist_kvm::lazy::LatencyHistogram,
        &mcdist_kvm::lazy::LatencyHistogram,
    ),
> {
    ROWS.iter().zip(hists).filter_map(move |(r, h)| {
        let local = ROWS
            .iter()
            .position(|b| b.handler == Local && b.wait == r.wait)
            .filter(|_| r.handler != Local)?;
        Some((r, h, &hists[local]))
    })
}

fn print_table(label: &str, hists: &[mcdist_kvm::lazy::LatencyHistogram]) {
    println!(
        "{:<28} {:>8} {:>10} {:>10} {:>10}",
        "handler", label, "p50 µs", "p90 µs", "p99 µs"
    );
    for (r, h) in ROWS.iter().zip(hists) {
        println!(
            "{:<28} {:>8} {:>10.1} {:>10.1} {:>10.1}",
            r.name,
            h.count(),
            us(h.quantile(0.5)),
            us(h.quantile(0.9)),
            us(h.quantile(0.99))
        );
    }
    for (r, h, base) in against_local(hists) {
        println!(
            "ratio {:<28} / local: p50 {:>6.2}x   p99 {:>6.2}x",
            r.name,
            us(h.quantile(0.5)) / us(base.quantile(0.5)),
            us(h.quantile(0.99)) / us(base.quantile(0.99))
        );
    }
}

/// The performance goal, measured in this run: a remote touch's p50 at most 1.5× the floor
/// and its p99 at most 3× the floor, the floor being the UDP round trip plus the local
/// handler's touch latency in the same wait mode (each quantile of the floor from its own
/// parts' quantiles).
fn print_goal(
    hists: &[mcdist_kvm::lazy::LatencyHistogram],
    rtt: &mcdist_kvm::lazy::LatencyHistogram,
) {
    println!(
        "\ngoal: touch p50 <= 1.5x floor, p99 <= 3x floor; floor = UDP round trip + local \
         handler, same wait mode, same run"
    );
    for (r, h, local) in against_local(hists) {
        let floor = |q| us(rtt.quantile(q)) + us(local.quantile(q));
        let (p50, p99) = (us(h.quantile(0.5)), us(h.quantile(0.99)));
        println!(
            "{:<28} p50 {:>6.1} / floor {:>6.1} = {:>5.2}x   p99 {:>7.1} / floor {:>6.1} = {:>5.2}x",
            r.name,
            p50,
            floor(0.5),
            p50 / floor(0.5),
            p99,
            floor(0.99),
            p99 / floor(0.99)
        );
    }
}

/// The kernel's share of a remote fault: a unicast request and a page-sized reply between two
/// threads that sleep in `recv`, over loopback, with no protocol at all.
fn udp_round_trip(trips: usize) -> Result<mcdist_kvm::lazy::LatencyHistogram, String> {
    use std::net::UdpSocket;
    let err = |e: std::io::Error| e.to_string();
    let server = UdpSocket::bind("127.0.0.1:0").map_err(err)?;
    let client = UdpSocket::bind("127.0.0.1:0").map_err(err)?;
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(err)?;
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(err)?;
    let to = server.local_addr().map_err(err)?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let mut b = vec![0u8; 4096 + 64];
        loop {
            let (n, from) = server.recv_from(&mut b)?;
            if n == 1 {
                return Ok(());
            }
            server.send_to(&b[..4096 + 40], from)?;
        }
    });
    let mut hist = mcdist_kvm::lazy::LatencyHistogram::default();
    let mut b = vec![0u8; 4096 + 64];
    for i in 0..trips + 100 {
        let t = std::time::Instant::now();
        client.send_to(&[0u8; 64], to).map_err(err)?;
        client.recv_from(&mut b).map_err(err)?;
        if i >= 100 {
            hist.record(t.elapsed());
        }
        // Let the echo thread go back to sleep, as a server between faults does.
        std::thread::sleep(Duration::from_micros(20));
    }
    client.send_to(&[0u8], to).map_err(err)?;
    echo.join()
        .map_err(|_| "echo thread panicked".to_string())?
        .map_err(err)?;
    Ok(hist)
}

fn run(args: Args) -> Result<(), String> {
    let ns =
        Netns::create(&format!("mcdk-bench-{}", std::process::id())).map_err(|e| e.to_string())?;
    ns.multicast_route("lo").map_err(|e| e.to_string())?;
    ns.enter().map_err(|e| e.to_string())?;
    let e = |e: CloneError| e.to_string();

    // ---- 1. fault latency -----------------------------------------------------------------
    let job = HashJob::new(args.latency_mib << 20, 0.9, args.slice, 1, 4096);
    job.validate(1).map_err(|e| e.to_string())?;
    let served = serve(job, 45001, false, args.server_rate_mbps * 1_000_000)?;
    let dir = std::env::temp_dir().join(format!("mcdist-kvm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let snap = dir.join("parent.mem");
    {
        let img = served.frozen.image();
        let mut f = std::fs::File::create(&snap).map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; img.page_size()];
        for pfn in 0..img.page_count() {
            img.read_page(pfn, &mut buf).map_err(|e| e.to_string())?;
            f.write_all(&buf).map_err(|e| e.to_string())?;
        }
    }
    let file: Arc<dyn PageSource> =
        Arc::new(FileSource::open(&snap, 4096).map_err(|e| e.to_string())?);
    println!(
        "fault latency: {} MiB guest, clone touches {} pages, {} repetitions each, push off",
        args.latency_mib,
        job.pages_touched_per_clone(4096),
        args.reps
    );
    // Repetitions are interleaved (every configuration once per round) so that load from
    // other work on the host falls on all rows alike.
    let mut hists = vec![mcdist_kvm::lazy::LatencyHistogram::default(); ROWS.len()];
    for _ in 0..if args.touch_only { 0 } else { args.reps } {
        for (row, hist) in ROWS.iter().zip(hists.iter_mut()) {
            let opts = CloneOptions {
                lazy: lazy_cfg(row),
                ..CloneOptions::default()
            };
            let r = match row.handler {
                Handler::Local => local_clone(&served.desc, &file, 0, &opts).map_err(e)?,
                Handler::Threaded => remote_clone(&served.desc, 0, &opts, false).map_err(e)?,
                Handler::Inline => remote_clone(&served.desc, 0, &opts, true).map_err(e)?,
            };
            if r.result != job.expected(0) {
                return Err(format!("{}: wrong result", row.name));
            }
            hist.merge(&r.stats.fault_latency);
        }
    }
    if !args.touch_only {
        print_table("faults", &hists);
    }
    let rtt = udp_round_trip(4000)?;
    println!(
        "floor: UDP loopback round trip between two blocking threads (64 B request, 4 KiB \
         reply), {} trips: p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs",
        rtt.count(),
        us(rtt.quantile(0.5)),
        us(rtt.quantile(0.9)),
        us(rtt.quantile(0.99))
    );
    // Where the network side of a remote fault spends its time.
    let stages = fault_stages::measure(1000)?;
    println!(
        "\nremote fault, network side, stage by stage (in-process server and client over two \
         loopback UDP sockets, {} faults timed, {} not, p50 µs):",
        stages.faults, stages.untimed
    );
    for (name, p50) in stages.names.iter().zip(stages.p50_us) {
        println!("  {name:<44} {p50:>8.1}");
    }
    // Like with like: the time a faulting thread is stopped (touch → resumed), measured by
    // the faulting thread itself, so the handler's wake-up is included in every mode.
    println!("\ntouch latency seen by the faulting thread (read 1 byte of each page, all pages of the slice)");
    let mut hists = vec![mcdist_kvm::lazy::LatencyHistogram::default(); ROWS.len()];
    let mut traced = vec![uffd_stages::StageSamples::default(); ROWS.len()];
    for _ in 0..args.reps {
        for ((row, hist), traced) in ROWS.iter().zip(hists.iter_mut()).zip(traced.iter_mut()) {
            let cfg = mcdist_kvm::LazyConfig {
                trace_faults: true,
                ..lazy_cfg(row)
            };
            let mut mem = mcdist_kvm::LazyMemory::new(
                served.desc.mem_size as usize,
                served.desc.zero_map.clone(),
                cfg,
            )
            .map_err(|e| e.to_string())?;
            let fetcher = match row.handler {
                Handler::Local => {
                    Arc::new(SourceFetcher::new(file.clone(), mem.handle())) as Arc<dyn PageFetcher>
                }
                Handler::Threaded => {
                    mcdist_fetcher(&served.desc, mem.handle(), false).map_err(e)?
                }
                Handler::Inline => mcdist_fetcher(&served.desc, mem.handle(), true).map_err(e)?,
            };
            mem.start(fetcher).map_err(|e| e.to_string())?;
            let first = mcdist_kvm::guest::TABLE_GPA as usize / 4096;
            let n = job.pages_touched_per_clone(4096) as usize - 3;
            let mut b = [0u8; 1];
            let mut touches = Vec::with_capacity(n);
            for pfn in first..first + n {
                if served.desc.zero_map.get(pfn as u64) {
                    continue;
                }
                let t = std::time::Instant::now();
                mem.read(pfn * 4096, &mut b).map_err(|e| e.to_string())?;
                let back = std::time::Instant::now();
                hist.record(back - t);
                touches.push((pfn as u64, t, back));
            }
            if let Some(f) = mem.failure() {
                return Err(format!("{}: {f}", row.name));
            }
            traced.add(&touches, &mem.fault_trace());
        }
    }
    print_table("touches", &hists);
    println!("\nthe same touches, stage by stage (fault thread's trace joined with the touches):");
    let shorts: Vec<&str> = ROWS.iter().map(|r| r.short).collect();
    uffd_stages::print(&shorts, &traced);
    print_goal(&hists, &rtt);
    let _ = served.server.shutdown();
    let _ = std::fs::remove_dir_all(&dir);

    if args.touch_only {
        return Ok(());
    }
    // ---- 2. clone start -------------------------------------------------------------------
    println!(
        "\nclone start (descriptor → first instruction), median of {} runs",
        args.reps
    );
    println!(
        "{:>9} {:>16} {:>16} {:>16} {:>9} {:>12}",
        "guest MiB",
        "lazy local ms",
        "lazy mcdist ms",
        "eager copy ms",
        "eager/lazy",
        "descr bytes"
    );
    for (i, &mib) in args.start_mib.iter().enumerate() {
        let job = HashJob::new(mib << 20, 0.9, 0.001, 2, 4096);
        let served = serve(job, 45011 + 10 * i as u16, true, 0)?;
        let img = served.frozen.image();
        let med = |mut v: Vec<Duration>| {
            v.sort();
            v[v.len() / 2]
        };
        let mut lazy = Vec::new();
        let mut remote = Vec::new();
        let mut eager = Vec::new();
        for _ in 0..args.reps {
            let r = local_clone(&served.desc, &img, 0, &CloneOptions::default()).map_err(e)?;
            lazy.push(r.time_to_first_instruction);
            let r = remote_clone(&served.desc, 0, &CloneOptions::default(), true).map_err(e)?;
            remote.push(r.time_to_first_instruction);
            let opts = CloneOptions {
                eager_from: Some(img.clone()),
                ..CloneOptions::default()
            };
            let r = local_clone(&served.desc, &img, 0, &opts).map_err(e)?;
            if r.result != job.expected(0) {
                return Err("eager clone: wrong result".into());
            }
            eager.push(r.time_to_first_instruction);
        }
        let (l, r, x) = (med(lazy), med(remote), med(eager));
        println!(
            "{:>9} {:>16.2} {:>16.2} {:>16.2} {:>9.0}x {:>12}",
            mib,
            l.as_secs_f64() * 1e3,
            r.as_secs_f64() * 1e3,
            x.as_secs_f64() * 1e3,
            x.as_secs_f64() / l.as_secs_f64(),
            served.desc.encode().len()
        );
        let _ = served.server.shutdown();
    }
    Ok(())
}
