//! `mcdist`: serve a memory image to many receivers by IP multicast, or fetch one.

#[path = "mcdist/sink.rs"]
mod sink;

use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use mcdist::client::ClientConfig;
use mcdist::node::{ClientNode, NodeConfig, NodeError, ServerNode};
use mcdist::secure::{Psk, Security, SecurityStats};
use mcdist::server::{Delivery, ServerConfig, ServerEvent};
use mcdist::source::{scan_with_progress, FileSource, PageSource};
use mcdist::transport::udp::{UdpConfig, UdpTransport};
use sink::{check, FileSink};
use std::fs::File;
use std::io::{self, IsTerminal};
use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Multicast memory-image distribution (SnowFlock's mcdist protocol).
///
/// A server sends each page of an image once to a multicast group; receivers
/// ask for what they miss by unicast. Multicast groups should come from
/// 239.255.0.0/16 (site-local); the TTL is 1 so traffic stays on the link.
#[derive(Parser, Debug)]
#[command(name = "mcdist", version, about, long_about = None)]
struct Cli {
    /// Log verbosity (error, warn, info, debug, trace); RUST_LOG overrides.
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnOff {
    On,
    Off,
}

const fn on_off(b: bool) -> OnOff {
    if b {
        OnOff::On
    } else {
        OnOff::Off
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve a file image to a multicast group.
    Serve {
        /// The image file to serve.
        #[arg(long)]
        image: PathBuf,
        /// Multicast group and port, e.g. 239.255.10.1:7000.
        #[arg(long)]
        group: SocketAddrV4,
        /// Network interface to send the group on, e.g. eth0 or lo.
        #[arg(long)]
        iface: String,
        /// Address to receive requests on, e.g. 10.0.0.1:7001 or 0.0.0.0:7001.
        #[arg(long)]
        listen: SocketAddr,
        /// Number of receivers expected; the whole-image sweep waits until they joined.
        #[arg(long)]
        clients: Option<usize>,
        /// Exit 0 once --clients receivers reported a verified image.
        #[arg(long, requires = "clients")]
        exit_when_done: bool,
        /// Highest send rate in Mbit/s (the rate follows receivers below it).
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// How far behind its rate the server may catch up at once, in milliseconds of
        /// traffic (when it was not scheduled for a while). Lower it for switches with
        /// shallow buffers; higher lets a busy host keep its rate.
        #[arg(long, value_name = "MS", default_value_t = 8)]
        burst_ms: u64,
        /// Push pages ahead of requests (neighbours of faults, a whole-image sweep, and
        /// the recorded working set of earlier receivers to later ones).
        #[arg(long, value_enum, default_value_t = OnOff::On)]
        push: OnOff,
        /// Page size in bytes (a power of two).
        #[arg(long, default_value_t = 4096)]
        page_size: usize,
        /// Send to each receiver by unicast instead of multicast (baseline / no-multicast networks).
        #[arg(long)]
        unicast: bool,
        /// Give up after this many seconds (0: never).
        #[arg(long, default_value_t = 0)]
        timeout: u64,
        /// Pre-shared 256-bit key file (32 raw bytes or 64 hex digits): authenticate
        /// and encrypt every datagram. Without it the session is unauthenticated.
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// With --key: authenticate only, send page contents in the clear (trusted networks).
        #[arg(long, requires = "key")]
        auth_only: bool,
        /// Follow pushed and swept pages with FEC repair symbols, as many as the
        /// loss receivers report calls for: none while no receiver reports loss
        /// (multicast only; `--unicast` sends none). A bare `--fec` means on.
        #[arg(long, value_enum, default_value_t = OnOff::On, num_args = 0..=1,
              default_missing_value = "on")]
        fec: OnOff,
        /// With FEC on: repair symbols per page symbol sent even while no
        /// receiver reports loss (e.g. 0.08).
        #[arg(long, default_value_t = 0.0)]
        fec_overhead: f64,
        /// With FEC on: most pages per FEC block.
        #[arg(long, default_value_t = 256)]
        fec_block_pages: usize,
        /// Send runs of equal-sized datagrams as UDP GSO buffers (falls back
        /// to one datagram per buffer where the kernel refuses).
        #[arg(long, value_enum, default_value_t = on_off(mcdist::transport::udp::DEFAULT_GSO))]
        gso: OnOff,
    },
    /// Fetch a whole image from a server and verify it.
    Fetch {
        /// Multicast group and port the server sends on.
        #[arg(long)]
        group: SocketAddrV4,
        /// Network interface to receive the group on.
        #[arg(long)]
        iface: String,
        /// The server's request address (its --listen).
        #[arg(long)]
        server: SocketAddr,
        /// Where to write the image.
        #[arg(long)]
        out: PathBuf,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// The image's BLAKE3 digest (64 hex digits, as `serve` prints it): every page is
        /// verified against it. Without it, against the digest of the first announce.
        #[arg(long, value_name = "HEX", value_parser = digest_arg)]
        digest: Option<[u8; 32]>,
        /// Receive by unicast only (the server runs with --unicast).
        #[arg(long)]
        unicast: bool,
        /// Pre-shared 256-bit key file (32 raw bytes or 64 hex digits): authenticate
        /// and encrypt every datagram. Without it the session is unauthenticated.
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// With --key: authenticate only, send page contents in the clear (trusted networks).
        #[arg(long, requires = "key")]
        auth_only: bool,
        /// With --key: drop datagrams the server sent in the clear and fail, naming the
        /// mismatch, if it runs --auth-only (default: on unless --auth-only).
        #[arg(long, value_enum, requires = "key", conflicts_with = "auth_only")]
        require_encryption: Option<OnOff>,
        /// Receive with UDP GRO (coalesced buffers are split back into datagrams).
        #[arg(long, value_enum, default_value_t = on_off(mcdist::transport::udp::DEFAULT_GRO))]
        gro: OnOff,
        /// Once written, read the copy back and check its BLAKE3 digest as well. Every
        /// page is verified against the digest before it is written either way; this
        /// also checks what the disk returns, at the cost of reading the image again.
        #[arg(long)]
        read_back: bool,
        /// NACK a page that arrived in part by its missing fragments, so the server
        /// resends only those (off: whole pages; for a server that predates them, which
        /// this also falls back to after eight unanswered tries).
        #[arg(long, value_enum, default_value_t = OnOff::On)]
        fragment_nacks: OnOff,
    },
    /// Write a fresh random 256-bit key (64 hex digits) to a new file, mode 0600.
    Keygen {
        /// The key file to create (must not exist).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        // Colour only for a terminal: a log file or a pipe gets plain text.
        .with_ansi(io::stderr().is_terminal())
        .init();
    let res = match cli.cmd {
        Cmd::Serve {
            image,
            group,
            iface,
            listen,
            clients,
            exit_when_done,
            rate,
            burst_ms,
            push,
            page_size,
            unicast,
            timeout,
            key,
            auth_only,
            fec,
            fec_overhead,
            fec_block_pages,
            gso,
        } => load_security(key.as_deref(), auth_only).and_then(|security| {
            serve(ServeArgs {
                image,
                group,
                iface,
                listen,
                clients,
                exit_when_done,
                rate,
                burst_ms,
                push: push == OnOff::On,
                page_size,
                unicast,
                timeout,
                security,
                fec: fec == OnOff::On && !unicast,
                fec_overhead,
                fec_block_pages,
                gso: gso == OnOff::On,
            })
        }),
        Cmd::Fetch {
            group,
            iface,
            server,
            out,
            timeout,
            digest,
            unicast,
            key,
            auth_only,
            require_encryption,
            gro,
            read_back,
            fragment_nacks,
        } => load_security(key.as_deref(), auth_only).and_then(|mut security| {
            if let (Some(s), Some(r)) = (security.as_mut(), require_encryption) {
                s.require_encryption = r == OnOff::On;
            }
            let how = FetchHow {
                timeout,
                unicast,
                gro: gro == OnOff::On,
                read_back,
                fragment_nacks: fragment_nacks == OnOff::On,
            };
            fetch(group, iface, server, &out, how, (security, digest))
        }),
        Cmd::Keygen { out } => keygen(&out),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("mcdist: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

struct ServeArgs {
    image: PathBuf,
    group: SocketAddrV4,
    iface: String,
    listen: SocketAddr,
    clients: Option<usize>,
    exit_when_done: bool,
    rate: u64,
    burst_ms: u64,
    push: bool,
    page_size: usize,
    unicast: bool,
    timeout: u64,
    security: Option<Security>,
    fec: bool,
    fec_overhead: f64,
    fec_block_pages: usize,
    gso: bool,
}

/// Why a fetch that requires encryption stops when the server runs --auth-only.
const CLEAR_SERVER: &str = "sends page contents in the clear (--auth-only) but this fetch \
    requires encryption: run both with or both without --auth-only";

fn load_security(key: Option<&Path>, auth_only: bool) -> Result<Option<Security>, String> {
    let Some(path) = key else { return Ok(None) };
    let (sec, warning) = Security::from_key_file(path, auth_only).map_err(|e| e.to_string())?;
    if let Some(w) = warning {
        eprintln!("mcdist: warning: {w}");
    }
    Ok(Some(sec))
}

fn keygen(out: &Path) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| format!("cannot create key file {}: {e}", out.display()))?;
    writeln!(f, "{}", Psk::generate().to_hex())
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("writing key file {}: {e}", out.display()))?;
    println!("wrote a new 256-bit key to {} (mode 0600)", out.display());
    Ok(())
}

fn security_summary(s: Option<SecurityStats>) -> String {
    s.map(|s| format!("; security: {s}")).unwrap_or_default()
}

fn bar(len: u64, msg: &str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(len), indicatif::ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>10} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb
}

fn serve(a: ServeArgs) -> Result<(), String> {
    if !a.page_size.is_power_of_two() || !(512..=(1 << 21)).contains(&a.page_size) {
        return Err(format!(
            "--page-size {} must be a power of two between 512 and 2097152",
            a.page_size
        ));
    }
    if a.rate == 0 {
        return Err("--rate must be at least 1 Mbit/s".into());
    }
    if a.burst_ms > 1000 {
        return Err("--burst-ms must be at most 1000".into());
    }
    if !(0.0..=1.0).contains(&a.fec_overhead) || a.fec_block_pages == 0 {
        return Err("--fec-overhead must be within 0..=1 and --fec-block-pages at least 1".into());
    }
    let source = FileSource::open(&a.image, a.page_size)
        .map_err(|e| format!("cannot open image {}: {e}", a.image.display()))?;
    if source.image_size() == 0 {
        return Err(format!("image {} is empty", a.image.display()));
    }
    let mut ucfg = UdpConfig::new(a.group);
    ucfg.iface = Some(a.iface.clone());
    ucfg.listen = Some(a.listen);
    ucfg.gso = a.gso;
    let transport = UdpTransport::server(&ucfg).map_err(|e| e.to_string())?;
    let pb = bar(source.image_size(), "scanning");
    let ps = source.page_size() as u64;
    let info = scan_with_progress(&source, &mut |pages| pb.set_position(pages * ps))
        .map_err(|e| format!("reading image {}: {e}", a.image.display()))?;
    pb.finish_and_clear();
    let cap = a.rate.saturating_mul(125_000);
    let defaults = ServerConfig::default();
    let cfg = ServerConfig {
        push_neighbors: a.push,
        sweep: a.push,
        working_set_push: a.push && defaults.working_set_push,
        sweep_min_clients: a.clients.unwrap_or(0),
        delivery: if a.unicast {
            Delivery::UnicastFanout
        } else {
            Delivery::Multicast
        },
        rate: mcdist::pacing::RateConfig {
            burst: Duration::from_millis(a.burst_ms),
            ..defaults.rate.capped(cap)
        },
        session_id: Some(rand::random::<u64>() | 1),
        fec: a.fec,
        fec_min_overhead: a.fec_overhead,
        fec_max_overhead: defaults.fec_max_overhead.max(a.fec_overhead),
        fec_block_pages: a.fec_block_pages,
        ..defaults
    };
    let image_size = info.image_size;
    let zero = info.zero_map.count_ones();
    let pages = info.zero_map.len();
    let digest = mcdist::hex(&info.digest);
    let node = ServerNode::start_with_info(
        NodeConfig::new(cfg, a.security.clone()),
        transport,
        Arc::new(source),
        info,
    )
    .map_err(|e| e.to_string())?;
    let label = a
        .security
        .as_ref()
        .map_or("none (unauthenticated)", Security::label);
    println!(
        "serving {} ({} bytes, {} pages, {} zero) session {:016x} digest {} on {} via {}, requests at {}, security {label}",
        a.image.display(),
        image_size,
        pages,
        zero,
        node.session_id(),
        &digest[..16],
        a.group,
        a.iface,
        a.listen
    );
    let start = Instant::now();
    let mut done = 0usize;
    loop {
        if a.timeout > 0 && start.elapsed() > Duration::from_secs(a.timeout) {
            let _ = node.shutdown();
            return Err(format!(
                "timed out after {} s with {done} receiver(s) complete",
                a.timeout
            ));
        }
        if !node.is_running() {
            return node
                .shutdown()
                .map(|_| ())
                .map_err(|e| format!("server stopped: {e}"));
        }
        let event = node.events().recv_timeout(Duration::from_millis(200));
        let secs = start.elapsed().as_secs_f64();
        match event {
            Ok(ServerEvent::ClientCompleted(addr)) => {
                done += 1;
                match a.clients {
                    Some(n) => println!("receiver {addr} complete ({done}/{n}) after {secs:.2} s"),
                    None => println!("receiver {addr} complete ({done}) after {secs:.2} s"),
                }
            }
            Ok(ServerEvent::ClientJoined(addr)) => tracing::info!(%addr, "receiver joined"),
            Ok(ServerEvent::ClientLeft(addr)) => {
                println!("receiver {addr} left without the image after {secs:.2} s")
            }
            Ok(ServerEvent::ClientTimedOut(addr)) => {
                println!("receiver {addr} timed out after {secs:.2} s")
            }
            Ok(ServerEvent::SourceFailed(msg)) => {
                let _ = node.shutdown();
                return Err(format!("image failed while serving: {msg}"));
            }
            Err(_) => {}
        }
        if a.exit_when_done && a.clients.is_some_and(|n| done >= n) {
            let sec = security_summary(node.security_stats());
            let snap = node.shutdown().map_err(|e| e.to_string())?;
            let s = &snap.stats;
            let secs = start.elapsed().as_secs_f64();
            println!(
                "done: {} receivers in {:.2} s; sent {} bytes in {} datagrams = {:.3}x image ({} pages: {} demand, {} push, {} sweep, {} repair, {} unicast; {} FEC repair symbols: {} blocks, {} NACK rounds, {} NACKs answered with pages); requests {} nacks {} ({} by fragment, {} fragments resent) suppressed {} (lockstep {}, in flight {}); isolated {} (refused {}); over the rate limit {} (answered in part {}), queue full {}, asked again while queued {}{}",
                done,
                secs,
                s.bytes_sent,
                s.datagrams_sent,
                s.bytes_sent as f64 / image_size as f64,
                s.pages_sent,
                s.demand_pages,
                s.push_pages,
                s.sweep_pages,
                s.repair_pages,
                s.unicast_pages,
                s.fec_repairs,
                s.fec_blocks,
                s.fec_nack_rounds,
                s.fec_nacks_plain,
                s.requests,
                s.nacks,
                s.fragment_nacks,
                s.fragments_resent,
                s.suppressed_lockstep + s.suppressed_in_flight + s.suppressed_queued,
                s.suppressed_lockstep,
                s.suppressed_in_flight,
                s.slow_receivers,
                s.isolation_refused,
                s.rate_limited,
                s.rate_trimmed,
                s.queue_full,
                s.unicast_widened,
                sec
            );
            return Ok(());
        }
    }
}

/// What a failed fetch had done, for its error line: enough to tell a server that went
/// quiet from one that answered other pages, and FEC blocks refused or given up.
fn failure_counts(s: &mcdist::client::ClientStats, have: u64, pages: u64) -> String {
    format!(
        "{have}/{pages} pages present, {} retries, {} nacks, {} duplicates; FEC: {} repair \
         symbols kept, {} refused, {} blocks decoded, {} given up",
        s.retries,
        s.nacks_sent,
        s.duplicates,
        s.fec_repairs,
        s.fec_repairs_refused,
        s.fec_blocks_decoded,
        s.fec_blocks_dropped
    )
}

fn digest_arg(s: &str) -> Result<[u8; 32], String> {
    mcdist::parse_digest(s).ok_or_else(|| "expected 64 hex digits".to_string())
}

/// How `fetch` receives.
struct FetchHow {
    timeout: u64,
    unicast: bool,
    gro: bool,
    read_back: bool,
    fragment_nacks: bool,
}

fn fetch(
    group: SocketAddrV4,
    iface: String,
    server: SocketAddr,
    out: &Path,
    how: FetchHow,
    (security, digest): (Option<Security>, Option<[u8; 32]>),
) -> Result<(), String> {
    let FetchHow {
        timeout,
        unicast,
        gro,
        read_back,
        fragment_nacks,
    } = how;
    if digest.is_none() {
        eprintln!("mcdist: warning: no --digest: pages are verified against the digest of the first announce, which anyone on the network can send");
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            return Err(format!(
                "output directory {} does not exist",
                parent.display()
            ));
        }
    }
    let mut ucfg = UdpConfig::new(group);
    ucfg.iface = Some(iface);
    ucfg.server = Some(server);
    ucfg.multicast = !unicast;
    ucfg.gro = gro;
    let transport = UdpTransport::client(&ucfg).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let deadline = Duration::from_secs(timeout.max(1));
    let mut ccfg = ClientConfig::new(server);
    ccfg.seed = rand::random();
    ccfg.expected_digest = digest;
    ccfg.fragment_nacks = fragment_nacks;
    let file = File::create(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let cleanup = |msg: String| -> String {
        // Only a regular file is ours to remove: `--out /dev/...` must never
        // unlink a device node.
        if std::fs::symlink_metadata(out).is_ok_and(|m| m.is_file()) {
            let _ = std::fs::remove_file(out);
            format!("{msg} (removed partial {})", out.display())
        } else {
            msg
        }
    };
    let sink = Arc::new(FileSink {
        file,
        state: Mutex::default(),
    });
    let node = ClientNode::start(NodeConfig::new(ccfg, security), transport, sink.clone())
        .map_err(|e| cleanup(e.to_string()))?;
    let announce_wait = deadline.min(Duration::from_secs(30));
    let session = loop {
        let left = (start + announce_wait).saturating_duration_since(Instant::now());
        match node.wait_session(left.min(Duration::from_millis(50))) {
            Ok(s) => break s,
            Err(NodeError::Timeout(..)) => {
                if node.security_stats().is_some_and(|s| s.not_encrypted > 0) {
                    return Err(cleanup(format!("server {server} {CLEAR_SERVER}")));
                } else if left.is_zero() {
                    return Err(cleanup(format!(
                        "no announce from {server} on {group} in {announce_wait:?}"
                    )));
                }
            }
            Err(other) => return Err(cleanup(other.to_string())),
        }
    };
    sink.file
        .set_len(session.image_size)
        .map_err(|e| cleanup(format!("cannot size {}: {e}", out.display())))?;
    node.fetch_all();
    let pb = bar(session.image_size, "fetching");
    let total_pages = session.page_count.max(1);
    loop {
        match node.wait_complete(Duration::from_millis(100)) {
            Ok(()) => break,
            Err(NodeError::Timeout(..)) => {
                sink.add_zero_pages(node.zero_map());
                let have = node.pages_present();
                pb.set_position(
                    (have.saturating_mul(session.image_size) / total_pages).min(session.image_size),
                );
                if start.elapsed() > deadline {
                    pb.abandon();
                    node.leave(false);
                    return Err(cleanup(format!(
                        "timed out after {timeout} s with {have}/{} pages",
                        session.page_count
                    )));
                }
            }
            Err(e) => {
                pb.abandon();
                let msg = format!(
                    "{e} [{}]",
                    failure_counts(&node.stats(), node.pages_present(), session.page_count)
                );
                return Err(cleanup(msg));
            }
        }
    }
    pb.finish_and_clear();
    sink.flush()
        .and_then(|()| sink.file.set_len(session.image_size))
        .and_then(|_| sink.file.sync_data())
        .map_err(|e| cleanup(format!("flushing {}: {e}", out.display())))?;
    sink.add_zero_pages(node.zero_map());
    let wrong = check(&sink, out, &session.digest, read_back)
        .map_err(|e| cleanup(format!("re-reading {}: {e}", out.display())))?;
    node.leave(wrong.is_none());
    let secs = start.elapsed().as_secs_f64();
    let sec = security_summary(node.security_stats());
    let stats = node.shutdown();
    if let Some(wrong) = wrong {
        return Err(cleanup(format!("{}: {wrong}", out.display())));
    }
    println!(
        "fetched {} bytes in {:.2} s ({:.1} MB/s): {} pages received ({} zero local), {} duplicates, {} retries, {} nacks ({} pages, {} by their missing fragments), {} pages recovered by FEC, digest ok{} -> {}{}",
        session.image_size,
        secs,
        session.image_size as f64 / secs / 1e6,
        stats.pages_received,
        session.zero_count,
        stats.duplicates,
        stats.retries,
        stats.nacks_sent,
        stats.nack_pages,
        stats.fragment_nack_pages,
        stats.fec_pages,
        if read_back { " (read back)" } else { "" },
        out.display(),
        sec
    );
    Ok(())
}
