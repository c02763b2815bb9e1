//! Measurements for mcdist-kvm, all in one run, printed as tables:
//!
//! 1. Fault latency (fault event read → page installed) for one clone whose memory comes from
//!    a local snapshot file (the Firecracker-style handler: read the page, `UFFDIO_COPY`) and
//!    from an mcdist server over loopback multicast, with the fault thread blocking in `poll`
//!    or spinning on non-blocking reads.
//! 2. Clone start (descriptor in hand → first instruction) for several guest sizes: lazy
//!    (local and mcdist) versus an eager full copy before the first instruction.
//!
//! Runs inside a private network namespace it creates; needs root and /dev/kvm.

use std::io::Write;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use mcdist_kvm::clone::{run_clone, CloneError, CloneOptions, CloneReport};
use mcdist_kvm::guest::HashJob;
use mcdist_kvm::netns::Netns;
use mcdist_kvm::remote::{connect_fetcher, MemoryServer};
use mcdist_kvm::source::FileSource;
use mcdist_kvm::{Descriptor, FaultWait, Frozen, PageFetcher, PageSource, Parent, SourceFetcher};

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
    /// Repetitions per configuration.
    #[arg(long, default_value_t = 3)]
    reps: u32,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
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

fn serve(job: HashJob, port: u16, push: bool) -> Result<Served, String> {
    let frozen = Parent::boot(job)
        .and_then(|p| p.run_to_fork())
        .map_err(|e| e.to_string())?;
    let probe = frozen.descriptor(None);
    let group = SocketAddrV4::new([239, 255, 71, 1].into(), port);
    let listen: SocketAddr = format!("127.0.0.1:{}", port + 1)
        .parse()
        .map_err(|e| format!("{e}"))?;
    let cfg = mcdist::ServerConfig {
        push_neighbors: push,
        ..Default::default()
    };
    let server = MemoryServer::start(
        frozen.image(),
        frozen.zero_map(),
        probe.digest,
        group,
        Some("lo"),
        listen,
        cfg,
    )
    .map_err(|e| e.to_string())?;
    let desc = frozen.descriptor(Some(server.session().clone()));
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

fn remote_clone(
    desc: &Descriptor,
    id: u32,
    opts: &CloneOptions,
) -> Result<CloneReport, CloneError> {
    run_clone(desc, id, opts, |h| {
        connect_fetcher(desc, Some("lo"), h, Duration::from_secs(5))
    })
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
    let served = serve(job, 45001, false)?;
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
    println!(
        "{:<28} {:>8} {:>10} {:>10} {:>10}",
        "handler", "faults", "p50 µs", "p90 µs", "p99 µs"
    );
    let mut rows = Vec::new();
    for (name, wait, remote) in [
        ("local file, blocking", FaultWait::Block, false),
        ("mcdist loopback, blocking", FaultWait::Block, true),
        ("local file, polling", FaultWait::Spin, false),
        ("mcdist loopback, polling", FaultWait::Spin, true),
    ] {
        let mut opts = CloneOptions::default();
        opts.lazy.wait = wait;
        let mut hist = mcdist_kvm::lazy::LatencyHistogram::default();
        for _ in 0..args.reps {
            let r = if remote {
                remote_clone(&served.desc, 0, &opts).map_err(e)?
            } else {
                local_clone(&served.desc, &file, 0, &opts).map_err(e)?
            };
            if r.result != job.expected(0) {
                return Err(format!("{name}: wrong result"));
            }
            hist.merge(&r.stats.fault_latency);
        }
        let (p50, p90, p99) = (hist.quantile(0.5), hist.quantile(0.9), hist.quantile(0.99));
        println!(
            "{:<28} {:>8} {:>10.1} {:>10.1} {:>10.1}",
            name,
            hist.count(),
            us(p50),
            us(p90),
            us(p99)
        );
        rows.push((p50, p99));
    }
    for (label, l, r) in [("blocking", 0, 1), ("polling", 2, 3)] {
        println!(
            "ratio mcdist/local ({label}): p50 {:.2}x, p99 {:.2}x",
            us(rows[r].0) / us(rows[l].0),
            us(rows[r].1) / us(rows[l].1)
        );
    }
    // Like with like: the time a faulting thread is stopped (touch → resumed), measured by
    // the faulting thread itself, so the handler's wake-up is included in every mode.
    println!("\ntouch latency seen by the faulting thread (read 1 byte of each page, all pages of the slice)");
    println!(
        "{:<28} {:>8} {:>10} {:>10} {:>10}",
        "handler", "touches", "p50 µs", "p90 µs", "p99 µs"
    );
    let mut trows = Vec::new();
    for (name, wait, remote) in [
        ("local file, blocking", FaultWait::Block, false),
        ("mcdist loopback, blocking", FaultWait::Block, true),
        ("local file, polling", FaultWait::Spin, false),
        ("mcdist loopback, polling", FaultWait::Spin, true),
    ] {
        let mut hist = mcdist_kvm::lazy::LatencyHistogram::default();
        for _ in 0..args.reps {
            let cfg = mcdist_kvm::LazyConfig {
                wait,
                ..Default::default()
            };
            let mut mem = mcdist_kvm::LazyMemory::new(
                served.desc.mem_size as usize,
                served.desc.zero_map.clone(),
                cfg,
            )
            .map_err(|e| e.to_string())?;
            let fetcher = if remote {
                connect_fetcher(
                    &served.desc,
                    Some("lo"),
                    mem.handle(),
                    Duration::from_secs(5),
                )
                .map_err(e)?
            } else {
                Arc::new(SourceFetcher::new(file.clone(), mem.handle())) as Arc<dyn PageFetcher>
            };
            mem.start(fetcher).map_err(|e| e.to_string())?;
            let first = mcdist_kvm::guest::TABLE_GPA as usize / 4096;
            let n = job.pages_touched_per_clone(4096) as usize - 3;
            let mut b = [0u8; 1];
            for pfn in first..first + n {
                if served.desc.zero_map.get(pfn as u64) {
                    continue;
                }
                let t = std::time::Instant::now();
                mem.read(pfn * 4096, &mut b).map_err(|e| e.to_string())?;
                hist.record(t.elapsed());
            }
        }
        let (p50, p90, p99) = (hist.quantile(0.5), hist.quantile(0.9), hist.quantile(0.99));
        println!(
            "{:<28} {:>8} {:>10.1} {:>10.1} {:>10.1}",
            name,
            hist.count(),
            us(p50),
            us(p90),
            us(p99)
        );
        trows.push((p50, p99));
    }
    for (label, l, r) in [("blocking", 0, 1), ("polling", 2, 3)] {
        println!(
            "ratio mcdist/local ({label}): p50 {:.2}x, p99 {:.2}x",
            us(trows[r].0) / us(trows[l].0),
            us(trows[r].1) / us(trows[l].1)
        );
    }
    let _ = served.server.shutdown();
    let _ = std::fs::remove_dir_all(&dir);

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
        let served = serve(job, 45011 + 10 * i as u16, true)?;
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
            let r = remote_clone(&served.desc, 0, &CloneOptions::default()).map_err(e)?;
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
