//! `mcdist-secure-bench`: whole-image distribution time of plaintext,
//! authenticated-only and encrypted sessions, measured in one run.
//!
//! A server and N clients (threads, real UDP multicast sockets) run on the
//! loopback interface of a private network namespace that the bench creates
//! and deletes; nothing leaves it. Each configuration is run `--reps` times,
//! interleaved, and the median time is reported with its ratio to plaintext.
//! Every client's copy is checked against the image digest after each run.
//!
//! ```text
//! cargo run --release -p mcdist-benches --bin mcdist-secure-bench -- --mib 256 --clients 4
//! ```

use mcdist::client::ClientConfig;
use mcdist::node::{ClientNode, NodeConfig, PageSink, ServerNode, SinkError};
use mcdist::secure::{Psk, Security};
use mcdist::server::ServerConfig;
use mcdist::source::MemSource;
use mcdist::testnet::{unavailable, Topology};
use mcdist::transport::udp::{UdpConfig, UdpTransport};
use std::net::{SocketAddr, SocketAddrV4};
use std::process::{Command, ExitCode};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

struct Args {
    inner: bool,
    mib: usize,
    clients: usize,
    reps: usize,
    csv: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        inner: false,
        mib: 256,
        clients: 4,
        reps: 3,
        csv: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut num = |name: &str| -> Result<usize, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .filter(|&v: &usize| v > 0)
                .ok_or(format!("{name} needs a positive number"))
        };
        match arg.as_str() {
            "--inner" => a.inner = true,
            "--mib" => a.mib = num("--mib")?,
            "--clients" => a.clients = num("--clients")?.min(64),
            "--reps" => a.reps = num("--reps")?.min(20),
            "--csv" => a.csv = Some(it.next().ok_or("--csv needs a file")?),
            "-h" | "--help" => {
                return Err(
                    "usage: mcdist-secure-bench [--mib N] [--clients N] [--reps N] [--csv FILE]"
                        .into(),
                )
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let res = if args.inner { run(&args) } else { outer(&args) };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcdist-secure-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Create a private namespace with a multicast-capable loopback and re-run
/// this binary inside it.
fn outer(args: &Args) -> Result<(), String> {
    if let Some(why) = unavailable() {
        return Err(format!("cannot create a network namespace: {why}"));
    }
    let topo = Topology::create("mcsb", 1, 61).map_err(|e| e.to_string())?;
    let ns = topo.hosts[0].ns.clone();
    ip(&["-n", &ns, "link", "set", "lo", "multicast", "on"])?;
    ip(&["-n", &ns, "route", "add", "239.255.0.0/16", "dev", "lo"])?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns])
        .arg(exe)
        .arg("--inner")
        .args(["--mib", &args.mib.to_string()])
        .args(["--clients", &args.clients.to_string()])
        .args(["--reps", &args.reps.to_string()]);
    if let Some(c) = &args.csv {
        cmd.args(["--csv", c]);
    }
    let st = cmd.status().map_err(|e| e.to_string())?;
    drop(topo);
    if st.success() {
        Ok(())
    } else {
        Err(format!("the bench inside the namespace failed: {st}"))
    }
}

/// A page store: every page lands at its place in a buffer of the image's size
/// (as a clone's memory would receive it).
struct Store {
    mem: Mutex<Vec<u8>>,
}

impl Store {
    fn new(len: usize) -> Store {
        Store {
            mem: Mutex::new(vec![0; len]),
        }
    }
    fn digest(&self) -> [u8; 32] {
        let m = self.mem.lock().unwrap_or_else(PoisonError::into_inner);
        *blake3::hash(&m).as_bytes()
    }
}

impl PageSink for Store {
    fn page_ready(&self, pfn: u64, data: &[u8]) -> Result<(), SinkError> {
        let mut m = self.mem.lock().unwrap_or_else(PoisonError::into_inner);
        let size = m.len();
        let does_not_fit = || SinkError::DoesNotFit {
            pfn,
            len: data.len(),
            pages: (size / data.len().max(1)) as u64,
            page_size: data.len(),
        };
        let start = usize::try_from(pfn)
            .ok()
            .and_then(|p| p.checked_mul(data.len()))
            .ok_or_else(does_not_fit)?;
        // The last page may reach past the image end.
        let end = (start + data.len()).min(m.len());
        let dst = m.get_mut(start..end).ok_or_else(does_not_fit)?;
        let n = dst.len();
        dst.copy_from_slice(&data[..n]);
        Ok(())
    }
}

/// The image shared by every run.
struct Shared {
    bytes: Vec<u8>,
    info: mcdist::source::ImageInfo,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Plain,
    AuthOnly,
    Encrypted,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Plain => "plaintext",
            Mode::AuthOnly => "auth-only",
            Mode::Encrypted => "encrypted",
        }
    }
    fn security(self, psk: &Psk) -> Option<Security> {
        match self {
            Mode::Plain => None,
            Mode::AuthOnly => Some(Security::auth_only(psk.clone())),
            Mode::Encrypted => Some(Security::new(psk.clone())),
        }
    }
}

struct Outcome {
    secs: f64,
    cpu_secs: f64,
    bytes_sent: u64,
    datagrams: u64,
}

/// CPU time (user + system) of this whole process so far, in seconds.
fn process_cpu_secs() -> f64 {
    // Fields 14 and 15 of /proc/self/stat, in USER_HZ (100 per second) ticks;
    // the command name (field 2) may hold spaces, so count after its ')'.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    f.iter().sum::<u64>() as f64 / 100.0
}

fn image(mib: usize) -> Vec<u8> {
    let mut v = vec![0u8; mib << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for (i, c) in v.chunks_exact_mut(8).enumerate() {
        // One page in 64 stays zero (elided), the rest is pseudo-random.
        if (i * 8 / 4096) % 64 == 5 {
            continue;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    v
}

fn once(
    mode: Mode,
    rep: usize,
    img: &Shared,
    clients: usize,
    psk: &Psk,
) -> Result<Outcome, String> {
    let port = 7100 + (rep as u16) * 10 + mode as u16 * 2;
    let group = SocketAddrV4::new([239, 255, 61, 1].into(), port);
    let listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], port + 1));
    let mut ucfg = UdpConfig::new(group);
    ucfg.iface = Some("lo".into());
    ucfg.listen = Some(listen);
    ucfg.server = Some(listen);
    ucfg.buffer_bytes = 32 << 20;
    let defaults = ServerConfig::default();
    let scfg = ServerConfig {
        sweep: true,
        sweep_min_clients: clients,
        rate: mcdist::pacing::RateConfig {
            cap: 4_000_000_000,
            initial: 400_000_000,
            ..defaults.rate
        },
        ..defaults
    };
    let source = Arc::new(MemSource::new(img.bytes.clone(), 4096));
    let transport = UdpTransport::server(&ucfg).map_err(|e| e.to_string())?;
    let server = ServerNode::start_with_info(
        NodeConfig::new(scfg, mode.security(psk)),
        transport,
        source,
        img.info.clone(),
    )
    .map_err(|e| e.to_string())?;
    let mut nodes = Vec::new();
    for i in 0..clients {
        let t = UdpTransport::client(&ucfg).map_err(|e| e.to_string())?;
        let mut c = ClientConfig::new(listen);
        c.seed = (rep * 100 + i) as u64;
        let store = Arc::new(Store::new(img.bytes.len()));
        let node = ClientNode::start(NodeConfig::new(c, mode.security(psk)), t, store.clone())
            .map_err(|e| e.to_string())?;
        nodes.push((node, store));
    }
    let start = Instant::now();
    let cpu0 = process_cpu_secs();
    for (n, _) in &nodes {
        n.fetch_all();
    }
    for (n, _) in &nodes {
        n.wait_complete(Duration::from_secs(300))
            .map_err(|e| format!("{}: {e}", mode.name()))?;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu_secs = process_cpu_secs() - cpu0;
    for (n, _) in &nodes {
        n.leave(true);
    }
    let snap = server.shutdown().map_err(|e| e.to_string())?;
    for (i, (n, store)) in nodes.into_iter().enumerate() {
        if let Some(s) = n.security_stats() {
            if s.bad_tag + s.unauthenticated > 0 {
                return Err(format!("client {i}: unexpected drops {s:?}"));
            }
            if s.dropped() > 0 {
                println!("    client {i} dropped: {s:?}");
            }
        }
        drop(n);
        if store.digest() != img.info.digest {
            return Err(format!("{}: client {i} holds a wrong image", mode.name()));
        }
    }
    Ok(Outcome {
        secs,
        cpu_secs,
        bytes_sent: snap.stats.bytes_sent,
        datagrams: snap.stats.datagrams_sent,
    })
}

/// Seal and open one 4 KiB page datagram in a loop, for each protection mode
/// (single thread, no network): the crypto cost alone.
fn crypto_only() {
    use mcdist::secure::{Opener, Role, Sealer, TRAILER_LEN};
    use mcdist::wire::{Body, Data, HeaderFlags, Message};
    let psk = Psk::generate();
    let payload = vec![0x5au8; 4096];
    let plain = {
        let m = Message {
            session: 77,
            seq: 1,
            flags: HeaderFlags::empty(),
            body: Body::Data(Data {
                pfn: 1,
                frag_index: 0,
                frag_count: 1,
                flags: mcdist::wire::DataFlags::empty(),
                payload: &payload,
            }),
        };
        let mut b = vec![0u8; m.buffer_len()];
        let n = m.emit(&mut b).unwrap_or(0);
        b.truncate(n);
        b
    };
    let announce = |s: &mut Sealer, o: &mut Opener| {
        let m = Message {
            session: 77,
            seq: 1,
            flags: HeaderFlags::empty(),
            body: Body::Announce(mcdist::wire::Announce {
                image_size: 4096,
                page_size: 4096,
                page_count: 1,
                digest: [0; 32],
                zero_count: 0,
                zero_map_digest: [0; 32],
                zero_map_chunks: 0,
                sweep_pos: mcdist::wire::Announce::SWEEP_NONE,
                rate: 0,
                flags: mcdist::wire::AnnounceFlags::empty(),
                frag_payload: 4096,
                token: [0; 16],
            }),
        };
        let mut b = vec![0u8; m.buffer_len() + TRAILER_LEN];
        if let Ok(n) = m.emit(&mut b) {
            if let Ok(n) = s.seal(&mut b, n) {
                let _ = o.open(
                    Instant::now(),
                    SocketAddr::from(([127, 0, 0, 1], 1)),
                    &mut b[..n],
                );
            }
        }
    };
    let from = SocketAddr::from(([127, 0, 0, 1], 1));
    for sec in [Security::auth_only(psk.clone()), Security::new(psk.clone())] {
        let mut s = Sealer::new(&sec, Role::Server);
        let mut o = Opener::client(&sec);
        announce(&mut s, &mut o);
        let mut buf = vec![0u8; plain.len() + TRAILER_LEN];
        let n = 50_000;
        let (mut seal_t, mut open_t) = (Duration::ZERO, Duration::ZERO);
        for _ in 0..n {
            buf[..plain.len()].copy_from_slice(&plain);
            let t = Instant::now();
            let len = s.seal(&mut buf, plain.len()).unwrap_or(0);
            let t2 = Instant::now();
            let ok = o.open(t2, from, &mut buf[..len]).is_ok();
            open_t += t2.elapsed();
            seal_t += t2 - t;
            assert!(ok);
        }
        let per = |d: Duration| d.as_secs_f64() / n as f64 * 1e6;
        println!(
            "crypto alone, {:?}: seal {:.2} us, open {:.2} us per 4 KiB page ({:.0} / {:.0} MB/s)",
            sec.protection,
            per(seal_t),
            per(open_t),
            4096.0 / per(seal_t),
            4096.0 / per(open_t)
        );
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn run(args: &Args) -> Result<(), String> {
    crypto_only();
    let bytes = image(args.mib);
    let source = MemSource::new(bytes.clone(), 4096);
    let info = mcdist::source::scan(&source).map_err(|e| e.to_string())?;
    let img = Shared { bytes, info };
    let psk = Psk::generate();
    let modes = [Mode::Plain, Mode::AuthOnly, Mode::Encrypted];
    // Per mode: wall times, CPU times, per-rep ratio to that rep's plaintext run.
    let mut wall: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut paired: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut sent: Vec<(u64, u64)> = vec![(0, 0); modes.len()];
    println!(
        "mcdist-secure-bench: {} MiB image ({} pages, {} zero) to {} clients on loopback in a private namespace, {} rep(s) each, interleaved",
        args.mib,
        img.info.zero_map.len(),
        img.info.zero_map.count_ones(),
        args.clients,
        args.reps
    );
    for rep in 0..args.reps {
        let mut plain_secs = 0.0;
        for (k, m) in modes.iter().enumerate() {
            let o = once(*m, rep, &img, args.clients, &psk)?;
            if *m == Mode::Plain {
                plain_secs = o.secs;
            }
            println!(
                "  rep {rep} {:<10} {:>7.3} s  {:>8.1} MB/s per client  cpu {:>6.2} s",
                m.name(),
                o.secs,
                img.bytes.len() as f64 / o.secs / 1e6,
                o.cpu_secs
            );
            wall[k].push(o.secs);
            cpu[k].push(o.cpu_secs);
            paired[k].push(o.secs / plain_secs);
            sent[k] = (o.bytes_sent, o.datagrams);
        }
    }
    let plain = median(&mut wall[0].clone());
    let plain_cpu = median(&mut cpu[0].clone());
    println!();
    println!(
        "{:<10} {:>9} {:>12} {:>9} {:>11} {:>9} {:>9} {:>13} {:>9}",
        "mode",
        "median s",
        "MB/s/client",
        "vs plain",
        "paired med",
        "cpu s",
        "cpu vs",
        "server bytes",
        "datagrams"
    );
    let mut csv = String::from(
        "mode,median_s,mb_per_s_per_client,ratio_to_plain,paired_ratio_median,median_cpu_s,cpu_ratio,server_bytes,datagrams,times\n",
    );
    for (k, m) in modes.iter().enumerate() {
        let t = median(&mut wall[k].clone());
        let c = median(&mut cpu[k].clone());
        let pr = median(&mut paired[k].clone());
        let mbps = img.bytes.len() as f64 / t / 1e6;
        let (bytes, dgrams) = sent[k];
        println!(
            "{:<10} {:>9.3} {:>12.1} {:>8.2}x {:>10.2}x {:>9.2} {:>8.2}x {:>13} {:>9}",
            m.name(),
            t,
            mbps,
            t / plain,
            pr,
            c,
            c / plain_cpu,
            bytes,
            dgrams
        );
        let all: Vec<String> = wall[k].iter().map(|x| format!("{x:.3}")).collect();
        csv.push_str(&format!(
            "{},{t:.4},{mbps:.1},{:.3},{pr:.3},{c:.2},{:.3},{bytes},{dgrams},{}\n",
            m.name(),
            t / plain,
            c / plain_cpu,
            all.join(" ")
        ));
    }
    if let Some(path) = &args.csv {
        std::fs::write(path, csv).map_err(|e| format!("writing {path}: {e}"))?;
    }
    Ok(())
}
