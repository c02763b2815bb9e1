//! `mcdist-qemu fork`: boot a parent, freeze it, serve its RAM from one network namespace
//! and start clones on `hosts` others (one `mcdist-fuse` each) on a private bridge; print a
//! table per clone and one JSON line; every result is checked against the host's computation.
//! Also the memory server process (`mcdist-qemu serve`).

use super::clone::{check_host, run_clone, CloneError, CloneOutcome, CloneSpec};
use super::descriptor::{DescriptorError, Keying, QemuDescriptor};
use super::parent::{boot_and_freeze, ParentError, ParentOptions};
use crate::netns::{BridgeNet, NetnsError};
use mcdist::node::{NodeError, ServerNode};
use mcdist::secure::Security;
use mcdist::server::{Delivery, ServerConfig};
use mcdist::source::FileSource;
use mcdist::transport::udp::{UdpConfig, UdpSetupError, UdpTransport};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Errors of the fork driver and the server.
#[derive(Debug, thiserror::Error)]
pub enum ForkError {
    /// The parent failed.
    #[error(transparent)]
    Parent(#[from] ParentError),
    /// The descriptor does not fit.
    #[error(transparent)]
    Descriptor(#[from] DescriptorError),
    /// This host cannot run the clones.
    #[error(transparent)]
    Clone(#[from] CloneError),
    /// Namespaces.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// Something this driver needs is missing.
    #[error("{0}")]
    Unavailable(&'static str),
    /// A helper process failed.
    #[error("{what} did not start: {detail}")]
    Helper {
        /// Which helper.
        what: &'static str,
        /// Its last output.
        detail: String,
    },
    /// Spawning or reading a helper.
    #[error("{what}: {source}")]
    Io {
        /// What was done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Server sockets.
    #[error(transparent)]
    Udp(#[from] UdpSetupError),
    /// The server.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The served file is not the frozen image.
    #[error("{0} does not match the descriptor's image digest")]
    ImageChanged(PathBuf),
    /// A group or address is malformed.
    #[error("descriptor address: {0}")]
    Addr(#[from] std::net::AddrParseError),
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> ForkError {
    move |source| ForkError::Io { what, source }
}

/// Where clones get their memory from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MemoryMode {
    /// A lazy FUSE file per host, pages fetched on first touch (the point of mcdist).
    Lazy,
    /// The whole image fetched to each host with mcdist first, then the clones start.
    Eager,
    /// The parent's RAM file itself, already local (the ideal, for comparison).
    Local,
    /// A FUSE file per host answering READs from the local RAM file (READ latency baseline).
    FuseLocal,
}

/// Options of `fork`.
#[derive(Debug, Clone)]
pub struct ForkOptions {
    /// Clones in all.
    pub clones: u32,
    /// Clone hosts (network namespaces).
    pub hosts: usize,
    /// Guest RAM.
    pub mem_mib: u32,
    /// Table the parent fills.
    pub table_mib: u32,
    /// Pre-shared key file.
    pub key: Option<PathBuf>,
    /// With `key`: authenticate only, page contents in the clear.
    pub auth_only: bool,
    /// Unicast replies instead of multicast.
    pub unicast: bool,
    /// The memory server's highest send rate, Mbit/s: the parent host's uplink, which
    /// unicast replies to every host share.
    pub rate_mbit: u64,
    /// Where clones get their memory from.
    pub memory: MemoryMode,
    /// Work folder.
    pub workdir: PathBuf,
    /// The `mcdist-fuse` binary.
    pub fuse_bin: PathBuf,
    /// This program (run as `serve` in the server's namespace).
    pub self_bin: PathBuf,
    /// Kill the memory server (SIGKILL) as soon as the first clone resumed (fail-closed check).
    pub kill_server_at_resume: bool,
    /// Bound on each clone's run.
    pub clone_timeout: Duration,
}

/// What `fork` measured.
#[derive(Debug)]
pub struct ForkReport {
    /// Per clone.
    pub clones: Vec<CloneOutcome>,
    /// Per host: the `mcdist-fuse` counters (JSON), if it wrote them.
    pub hosts: Vec<Value>,
    /// The final JSON line.
    pub summary: Value,
}

impl ForkReport {
    /// Every clone printed the right result.
    pub fn all_ok(&self) -> bool {
        !self.clones.is_empty() && self.clones.iter().all(CloneOutcome::ok)
    }
}

struct Helper {
    child: Child,
    /// The line that said it was ready.
    ready_line: String,
    /// Its output lines after that one.
    lines: std::sync::mpsc::Receiver<String>,
}

/// A helper spawned but not yet ready: its output lines arrive on `lines`. Dropped
/// before it is ready (another helper failed), it is killed.
struct Spawned {
    child: Option<Child>,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Spawned {
    /// Waits until a stdout or stderr line contains `ready`; the output is drained on
    /// threads from then on.
    fn ready(mut self, what: &'static str, ready: &str) -> Result<Helper, ForkError> {
        let mut seen = Vec::new();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(120)) {
            if l.contains(ready) {
                if let Some(child) = self.child.take() {
                    return Ok(Helper {
                        child,
                        ready_line: l,
                        // (`Spawned` kills an unready child on drop, so its fields are
                        // taken, not moved.)
                        lines: std::mem::replace(&mut self.lines, std::sync::mpsc::channel().1),
                    });
                }
            }
            seen.push(l);
        }
        Err(ForkError::Helper {
            what,
            detail: seen.join(" | "),
        })
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Helper {
    /// Spawns `cmd` without waiting for it (see [`Spawned::ready`]).
    fn spawn(mut cmd: Command) -> Result<Spawned, ForkError> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io("spawning a helper"))?;
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        if let Some(out) = child.stdout.take() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(out).lines().map_while(Result::ok) {
                    let _ = tx.send(l);
                }
            });
        }
        if let Some(err) = child.stderr.take() {
            std::thread::spawn(move || {
                for l in BufReader::new(err).lines().map_while(Result::ok) {
                    let _ = tx.send(l);
                }
            });
        }
        Ok(Spawned {
            child: Some(child),
            lines: rx,
        })
    }

    /// Spawns `cmd` and waits until a stdout line contains `ready`.
    fn start(cmd: Command, what: &'static str, ready: &str) -> Result<Self, ForkError> {
        Self::spawn(cmd)?.ready(what, ready)
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, sig);
    }

    /// Stops it (SIGTERM, then SIGKILL after 10 s); the lines it printed after the
    /// ready one.
    fn stop(mut self) -> Vec<String> {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut exited = false;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                exited = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if !exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // The reader threads end with the helper's output; what they read is here.
        let mut out = Vec::new();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
            out.push(l);
        }
        out
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn key_args(cmd: &mut Command, o: &ForkOptions) {
    if let Some(k) = &o.key {
        cmd.arg("--key").arg(k);
        if o.auth_only {
            cmd.arg("--auth-only");
        }
    }
    if o.unicast {
        cmd.arg("--unicast");
    }
}

fn p50(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[(v.len() - 1) / 2]
}

/// Runs the whole fork: parent, server, one lazy file per host, clones.
pub fn fork(o: &ForkOptions) -> Result<ForkReport, ForkError> {
    if let Some(why) = mcdist::testnet::unavailable() {
        return Err(ForkError::Helper {
            what: "the bridge network",
            detail: why,
        });
    }
    if let Some(why) = crate::fuse::unavailable() {
        return Err(ForkError::Unavailable(why));
    }
    let qemu = super::find_qemu().map_err(ParentError::from)?;
    let parent = boot_and_freeze(&ParentOptions {
        mem_mib: o.mem_mib,
        workload: super::descriptor::Workload {
            table_mib: o.table_mib,
        },
        workdir: o.workdir.clone(),
        page_size: 4096,
        boot_timeout: Duration::from_secs(300),
    })?;
    let state_bytes = parent.desc.device_state.len() / 2;
    println!(
        "parent: booted to its fork marker in {:.2} s, frozen in {:.0} ms, device state {} bytes, {} of {} pages zero",
        parent.boot.as_secs_f64(),
        parent.freeze.as_secs_f64() * 1e3,
        state_bytes,
        parent.desc.zero_map()?.count_ones(),
        parent.desc.page_count()
    );
    let tag = format!("mq{}", std::process::id() % 100_000);
    let net = BridgeNet::create(&tag, o.hosts + 1)?;
    let mut desc = parent.desc.clone();
    desc.session_id = rand::random::<u64>() | 1;
    desc.group = format!("239.255.{}.{}:7400", 14, 1 + std::process::id() % 250);
    desc.server = format!("{}:7401", BridgeNet::addr(0));
    desc.keying = o.key.as_ref().map(|_| {
        if o.auth_only {
            Keying::AuthOnly
        } else {
            Keying::Encrypted
        }
    });
    let desc_path = o.workdir.join("descriptor.json");
    desc.save(&desc_path)?;
    check_host(&desc, &qemu)?;

    let mut serve = Command::new("ip");
    serve
        .args(["netns", "exec", net.hosts[0].name()])
        .arg(&o.self_bin)
        .arg("serve")
        .arg("--descriptor")
        .arg(&desc_path)
        .arg("--image")
        .arg(&parent.ram);
    key_args(&mut serve, o);
    serve.arg("--rate").arg(o.rate_mbit.to_string());
    if o.memory == MemoryMode::Eager {
        // Hosts fetch the whole image first: served as `mcdist serve` serves a fetch.
        serve.arg("--sweep");
    }
    let server = Helper::start(serve, "the memory server", "serving")?;

    let mut fuses = Vec::new();
    let mut spawned = Vec::new();
    let mut files = Vec::new();
    let start = Instant::now();
    for h in 0..o.hosts {
        let dir = o.workdir.join(format!("host{h}"));
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).map_err(io("creating a mount point"))?;
        let stats = dir.join("fuse-stats.json");
        let _ = std::fs::remove_file(&stats);
        let mut cmd = Command::new(&o.fuse_bin);
        cmd.arg("--descriptor")
            .arg(&desc_path)
            .arg("--mount")
            .arg(&mnt)
            .arg("--stats")
            .arg(&stats);
        match o.memory {
            MemoryMode::FuseLocal => {
                cmd.arg("--local-image").arg(&parent.ram);
            }
            _ => {
                cmd.arg("--netns").arg(net.hosts[h + 1].name());
                key_args(&mut cmd, o);
                if o.memory == MemoryMode::Eager {
                    // The whole image, fetched, written to a local file on the host.
                    cmd.arg("--eager")
                        .arg("--copy-to")
                        .arg(dir.join("memory.img"));
                }
            }
        }
        if o.memory != MemoryMode::Local {
            spawned.push(Helper::spawn(cmd)?);
        }
        let file = match o.memory {
            MemoryMode::Local => parent.ram.clone(),
            // Clones of an eager host start on its local copy, as on a host that
            // fetched the image before starting them (not through the lazy file).
            MemoryMode::Eager => dir.join("memory.img"),
            _ => mnt.join("memory"),
        };
        files.push((file, stats, dir));
    }
    // Every host starts before any is waited for: eager hosts fetch the image
    // together, one multicast for all, as hosts of a real cluster would.
    for s in spawned {
        fuses.push(s.ready("mcdist-fuse", "mounted")?);
    }
    let hosts_ready = start.elapsed().as_secs_f64();
    let (resumed_tx, resumed_rx) = std::sync::mpsc::channel::<()>();
    let outcomes: Vec<CloneOutcome> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..o.clones)
            .map(|id| {
                let host = id as usize % o.hosts;
                let spec = CloneSpec {
                    id,
                    count: o.clones,
                    host,
                    ram: files[host].0.clone(),
                    workdir: files[host].2.join(format!("clone{id}")),
                    timeout: o.clone_timeout,
                };
                let (desc, qemu, tx) = (&desc, &qemu, resumed_tx.clone());
                s.spawn(move || {
                    run_clone(desc, qemu, &spec, &move || {
                        let _ = tx.send(());
                    })
                })
            })
            .collect();
        drop(resumed_tx);
        if o.kill_server_at_resume && resumed_rx.recv().is_ok() {
            server.signal(nix::sys::signal::Signal::SIGKILL);
            println!("memory server killed after the first clone resumed");
        }
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let wall = start.elapsed().as_secs_f64();
    for f in fuses {
        let _ = f.stop();
    }
    let server_line = server.ready_line.clone();
    // What the server sent in all (its last line): the bytes on the parent's uplink.
    let server_sent: Value = server
        .stop()
        .iter()
        .find_map(|l| l.strip_prefix("server stopped: "))
        .and_then(|j| serde_json::from_str::<Value>(j).ok())
        .map_or(Value::Null, |v| v["bytes_sent"].clone());
    let hosts: Vec<Value> = files
        .iter()
        .map(|(_, stats, _)| {
            std::fs::read_to_string(stats)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or(Value::Null)
        })
        .collect();
    let host_field = |k: &str| -> Vec<Value> { hosts.iter().map(|h| h[k].clone()).collect() };
    let mut resume: Vec<f64> = outcomes.iter().map(|c| c.resume_ms).collect();
    let mut first: Vec<f64> = outcomes.iter().filter_map(|c| c.first_line_ms).collect();
    let summary = json!({
        "clones": o.clones,
        "ok": outcomes.iter().filter(|c| c.ok()).count(),
        "hosts": o.hosts,
        "guest_pages": desc.page_count(),
        "host_pages_fetched": host_field("pages_received"),
        "host_bytes_received": host_field("bytes_received"),
        "resume_ms_p50": (p50(&mut resume) * 10.0).round() / 10.0,
        "first_line_ms_p50": (p50(&mut first) * 10.0).round() / 10.0,
        "wall_s": (wall * 100.0).round() / 100.0,
        "hosts_ready_s": (hosts_ready * 100.0).round() / 100.0,
        "memory": format!("{:?}", o.memory),
        "unicast": o.unicast,
        "server": server_line,
        "server_bytes_sent": server_sent,
        "fuse_reads": host_field("reads"),
        "fuse_page_reads": host_field("page_reads"),
        "fuse_max_read": host_field("max_read"),
        "fuse_read_latency_us_p50": host_field("read_latency_us_p50"),
        "fuse_read_latency_us_p99": host_field("read_latency_us_p99"),
        "pages_unasked": host_field("pages_unasked"),
        "zero_pages_received": host_field("zero_pages_received"),
        "eio": host_field("eio"),
        "accel": desc.accel,
        "boot_s": (parent.boot.as_secs_f64() * 100.0).round() / 100.0,
        "device_state_bytes": state_bytes,
    });
    Ok(ForkReport {
        clones: outcomes,
        hosts,
        summary,
    })
}

/// Prints one row per clone.
pub fn print_table(r: &ForkReport) {
    println!(
        "{:>5} {:>4} {:>12} {:>12} {:>10} {:>13} {:>10}  result",
        "clone", "host", "host pages", "host bytes", "resume ms", "1st line ms", "result ms"
    );
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.0}"));
    for c in &r.clones {
        let h = r.hosts.get(c.host).cloned().unwrap_or(Value::Null);
        let pages = h["pages_received"].as_u64().unwrap_or(0);
        let bytes = h["bytes_received"].as_u64().unwrap_or(0);
        let result = if c.ok() {
            "ok".to_string()
        } else {
            format!(
                "FAILED: {}",
                c.error.clone().unwrap_or_else(|| "wrong digest".into())
            )
        };
        println!(
            "{:>5} {:>4} {:>12} {:>12} {:>10.0} {:>13} {:>10}  {}",
            c.id,
            c.host,
            pages,
            bytes,
            c.resume_ms,
            opt(c.first_line_ms),
            opt(c.result_ms),
            result
        );
    }
}

/// Serves the frozen RAM file `image` for `desc` until SIGINT/SIGTERM (run inside the
/// server's namespace; `iface` carries the group), replying by unicast and sweeping the
/// whole image as the flags say, at most at `rate_mbit` Mbit/s.
pub fn serve(
    desc: &QemuDescriptor,
    image: &Path,
    iface: &str,
    security: Option<Security>,
    unicast: bool,
    sweep: bool,
    rate_mbit: u64,
) -> Result<(), ForkError> {
    use nix::sys::signal::{SigSet, Signal};
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGINT);
    sigs.add(Signal::SIGTERM);
    sigs.thread_block()
        .map_err(|e| io("blocking signals")(e.into()))?;
    let group: SocketAddrV4 = desc.group.parse()?;
    let mut ucfg = UdpConfig::new(group);
    ucfg.iface = Some(iface.to_string());
    ucfg.listen = Some(desc.server.parse()?);
    let transport = UdpTransport::server(&ucfg)?;
    let source = FileSource::open(image, desc.page_size).map_err(io("opening the image"))?;
    let defaults = ServerConfig::default();
    let cfg = ServerConfig {
        session_id: Some(desc.session_id),
        delivery: if unicast {
            Delivery::UnicastFanout
        } else {
            Delivery::Multicast
        },
        sweep,
        rate: defaults
            .rate
            .capped(rate_mbit.max(1).saturating_mul(125_000)),
        ..defaults
    };
    let node = ServerNode::start(
        mcdist::node::NodeConfig::new(cfg, security),
        transport,
        std::sync::Arc::new(source),
    )?;
    if node.image_info().digest != desc.image_digest()? {
        return Err(ForkError::ImageChanged(image.to_path_buf()));
    }
    println!(
        "serving {} session {:016x} on {} via {iface}, at most {rate_mbit} Mbit/s",
        image.display(),
        desc.session_id,
        desc.group
    );
    let _ = sigs.wait();
    let stats = node.shutdown()?;
    let s = &stats.stats;
    println!(
        "server stopped: {}",
        serde_json::json!({
            "bytes_sent": s.bytes_sent,
            "datagrams_sent": s.datagrams_sent,
            "pages_sent": s.pages_sent,
            "push_pages": s.push_pages,
            "unicast_pages": s.unicast_pages,
        })
    );
    Ok(())
}
