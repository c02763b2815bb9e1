//! `mcdist-uffd`: a drop-in Firecracker page-fault handler whose snapshot memory comes from
//! an mcdist session, one client and one page cache for every microVM on this host.
//!
//! Start it with `--socket PATH`, then restore each microVM with
//! `mem_backend: {"backend_type": "Uffd", "backend_path": PATH}`. Prints
//! `MCDIST-UFFD ready socket=PATH` once it listens; logs each microVM it serves and how that
//! ended. With `--vmms N` it exits after N microVMs ended (status 1 if one was lost).

use std::net::{SocketAddr, SocketAddrV4};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use mcdist::secure::{Psk, Security};
use mcdist_kvm::descriptor::DescriptorError;
use mcdist_kvm::fcuffd::{plain_descriptor, Backend, Handler, HandlerConfig, OnLoss, VmmEnd};
use mcdist_kvm::source::{FileSource, PageSource};
use mcdist_kvm::{Descriptor, DescriptorFile, HostCache};

#[derive(Parser, Debug)]
#[command(
    about = "Firecracker page-fault handler serving snapshot memory over mcdist",
    long_about = "Listens on --socket for Firecracker's userfaultfd handshake (PUT /snapshot/load \
                  with a Uffd memory backend) and serves the microVMs' page faults from one \
                  mcdist session per host: the session a descriptor names, or a plain memory \
                  file served by `mcdist serve` (--group, --server). Zero pages and pages a \
                  balloon removed are filled locally. If the session is lost, the microVM is \
                  killed (or, with --on-loss stop, no longer served), never left hung."
)]
struct Args {
    /// Unix socket Firecracker connects to (its `backend_path`).
    #[arg(long)]
    socket: PathBuf,
    /// Descriptor naming the session (instead of --group/--server).
    #[arg(long, conflicts_with_all = ["group", "server", "digest", "local"])]
    descriptor: Option<PathBuf>,
    /// Multicast group of `mcdist serve` (a plain memory file).
    #[arg(long, requires = "server")]
    group: Option<SocketAddrV4>,
    /// Request address of `mcdist serve` (its --listen).
    #[arg(long, requires = "group")]
    server: Option<SocketAddr>,
    /// Expected BLAKE3 digest of the memory file (64 hex digits).
    #[arg(long, requires = "group")]
    digest: Option<String>,
    /// Interface to join the group on.
    #[arg(long)]
    iface: Option<String>,
    /// Pre-shared 256-bit key file (32 raw bytes or 64 hex digits), as `mcdist serve --key`.
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// With --key: authenticate only, pages in the clear (as the server's --auth-only).
    #[arg(long, requires = "key")]
    auth_only: bool,
    /// Serve from a local memory file instead (Firecracker's own on_demand behaviour).
    #[arg(long, conflicts_with_all = ["group", "server", "key"])]
    local: Option<PathBuf>,
    /// What to do with a microVM whose memory can no longer be served.
    #[arg(long, value_enum, default_value_t = Loss::Kill)]
    on_loss: Loss,
    /// Exit after this many microVMs ended (0: serve forever).
    #[arg(long, default_value_t = 0)]
    vmms: usize,
    /// How long a connection may take to send its message (milliseconds).
    #[arg(long, default_value_t = 5_000)]
    handshake_timeout_ms: u64,
    /// A page not delivered within this time is a lost session (milliseconds).
    #[arg(long, default_value_t = 10_000)]
    fetch_timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Loss {
    Kill,
    Stop,
}

fn main() {
    if let Err(e) = run(&Args::parse()) {
        eprintln!("mcdist-uffd: {e}");
        std::process::exit(1);
    }
}

fn security(key: Option<&Path>, auth_only: bool) -> Result<Option<Security>, String> {
    let Some(p) = key else { return Ok(None) };
    let loaded = Psk::load(p).map_err(|e| format!("key {}: {e}", p.display()))?;
    if let Some(w) = &loaded.permission_warning {
        eprintln!("mcdist-uffd: warning: {w}");
    }
    Ok(Some(if auth_only {
        Security::auth_only(loaded.psk)
    } else {
        Security::new(loaded.psk)
    }))
}

fn parse_digest(s: &str) -> Result<[u8; 32], String> {
    let bad = || format!("--digest {s:?} is not 64 hex digits");
    if s.len() != 64 {
        return Err(bad());
    }
    let mut d = [0u8; 32];
    for (i, b) in d.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16).map_err(|_| bad())?;
    }
    Ok(d)
}

fn backend(a: &Args) -> Result<Backend, String> {
    if let Some(path) = &a.local {
        let src: Arc<dyn PageSource> =
            Arc::new(FileSource::open(path, 4096).map_err(|e| format!("{}: {e}", path.display()))?);
        return Ok(Backend::Local(src));
    }
    let sec = security(a.key.as_deref(), a.auth_only)?;
    let iface = a.iface.as_deref();
    let join = Duration::from_secs(5);
    let desc: Descriptor = match (&a.descriptor, a.group, a.server) {
        (Some(p), _, _) => Descriptor::load(p).map_err(|e| match e {
            // The I/O error names the file already.
            DescriptorError::Io { .. } => e.to_string(),
            e => format!("{}: {e}", p.display()),
        })?,
        (None, Some(g), Some(s)) => {
            let digest = a.digest.as_deref().map(parse_digest).transpose()?;
            let sec = sec.clone();
            plain_descriptor(g, s, digest, iface, join, |c| c.security = sec)
                .map_err(|e| format!("joining {g}: {e}"))?
        }
        _ => return Err("give --descriptor, --group with --server, or --local".into()),
    };
    let cache = HostCache::connect(&desc, iface, join, |c| c.security = sec)
        .map_err(|e| format!("joining the memory session: {e}"))?;
    Ok(Backend::Host {
        cache,
        zero: Arc::new(desc.zero_map),
    })
}

fn run(a: &Args) -> Result<(), String> {
    let backend = backend(a)?;
    let cfg = HandlerConfig {
        handshake_timeout: Duration::from_millis(a.handshake_timeout_ms),
        fetch_timeout: Duration::from_millis(a.fetch_timeout_ms),
        on_loss: match a.on_loss {
            Loss::Kill => OnLoss::KillVmm,
            Loss::Stop => OnLoss::Stop,
        },
        ..Default::default()
    };
    let _ = std::fs::remove_file(&a.socket);
    let listener = UnixListener::bind(&a.socket)
        .map_err(|e| format!("cannot listen on {}: {e}", a.socket.display()))?;
    // Whoever connects gets the memory image: owner only.
    std::fs::set_permissions(&a.socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", a.socket.display()))?;
    println!("MCDIST-UFFD ready socket={}", a.socket.display());
    let handler = Handler::new(backend, cfg);
    let (ended, endings) = std::sync::mpsc::channel::<bool>();
    let mut started = 0usize;
    let mut lost = 0usize;
    while a.vmms == 0 || started < a.vmms {
        let (stream, _) = listener
            .accept()
            .map_err(|e| format!("accepting on {}: {e}", a.socket.display()))?;
        match handler.handshake(stream) {
            Ok(v) => {
                started += 1;
                let pid = v.pid();
                eprintln!("mcdist-uffd: serving microVM {pid}");
                let ended = ended.clone();
                std::thread::spawn(move || {
                    let ok = report(pid, v.wait());
                    let _ = ended.send(ok);
                });
            }
            Err(e) => eprintln!("mcdist-uffd: refused a connection: {e}"),
        }
    }
    drop(ended);
    for ok in endings {
        lost += usize::from(!ok);
    }
    if lost > 0 {
        return Err(format!("{lost} microVM(s) lost their memory session"));
    }
    Ok(())
}

/// Logs how serving microVM `pid` ended (at once: the log line is the operator's signal);
/// whether it ended well.
fn report(pid: i32, end: VmmEnd) -> bool {
    match end {
        VmmEnd::Exited => {
            eprintln!("mcdist-uffd: microVM {pid} exited");
            true
        }
        VmmEnd::Lost { why, killed } => {
            let what = if killed { "killed" } else { "no longer served" };
            eprintln!("mcdist-uffd: microVM {pid} {what}: its memory session is lost: {why}");
            false
        }
    }
}
