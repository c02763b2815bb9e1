//! `mcdist-fuse`: one clone host's lazy memory file. Joins the session a QEMU descriptor
//! names, mounts the frozen RAM image as `MOUNT/memory` (zero pages answered locally, others
//! fetched through one mcdist client), and unmounts cleanly on SIGINT/SIGTERM, printing (and
//! optionally writing) its counters.

#[path = "common/session_args.rs"]
mod session_args;

use clap::Parser;
use mcdist_kvm::fuse::{HostFile, HostFileOptions};
use mcdist_kvm::qemu::descriptor::QemuDescriptor;
use nix::sys::signal::{SigSet, Signal};
use session_args::KeyArgs;
use std::path::PathBuf;
use std::time::Duration;

/// Serve a frozen QEMU parent's RAM as a lazy FUSE file on this host.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The parent's descriptor (`mcdist-qemu` writes it).
    #[arg(long)]
    descriptor: PathBuf,
    /// Directory to mount on; the file appears as `MOUNT/NAME`.
    #[arg(long)]
    mount: PathBuf,
    /// File name inside the mount.
    #[arg(long, default_value = "memory")]
    name: String,
    /// Enter this network namespace (`ip netns` name) before opening sockets.
    #[arg(long)]
    netns: Option<String>,
    /// Interface that reaches the memory server.
    #[arg(long, default_value = "eth0")]
    iface: String,
    #[command(flatten)]
    key: KeyArgs,
    /// Receive replies by unicast instead of joining the multicast group.
    #[arg(long)]
    unicast: bool,
    /// Write the counters as JSON here on exit.
    #[arg(long)]
    stats: Option<PathBuf>,
    /// Answer READs from this local copy of the image instead of the network (the baseline
    /// for READ latency).
    #[arg(long, conflicts_with_all = ["key", "unicast", "eager", "netns"])]
    local_image: Option<PathBuf>,
    /// Fetch the whole image before mounting (baseline for comparisons).
    #[arg(long)]
    eager: bool,
    /// With --eager: also write the whole image to FILE once fetched (zero pages as
    /// holes), a local copy for clones to map, as `mcdist fetch` makes.
    #[arg(long, value_name = "FILE", requires = "eager")]
    copy_to: Option<PathBuf>,
    /// Seconds to wait for the server's announce.
    #[arg(long, default_value_t = 30)]
    join_timeout: u64,
}

fn run(a: Args) -> Result<(), String> {
    // Signals are taken synchronously by the main thread; block them before any thread starts.
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGINT);
    sigs.add(Signal::SIGTERM);
    sigs.thread_block()
        .map_err(|e| format!("blocking signals: {e}"))?;
    if let Some(reason) = mcdist_kvm::fuse::unavailable() {
        return Err(reason.to_string());
    }
    if let Some(ns) = &a.netns {
        mcdist_kvm::qemu::enter_netns(ns)
            .map_err(|e| format!("cannot enter network namespace {ns}: {e}"))?;
    }
    let desc = QemuDescriptor::load(&a.descriptor).map_err(|e| e.to_string())?;
    let security = if a.local_image.is_some() {
        None
    } else {
        a.key
            .checked(|sec| desc.check_keyed(sec).map_err(|e| e.to_string()))?
    };
    let opts = HostFileOptions {
        iface: a.iface.clone(),
        security,
        unicast: a.unicast,
        join_timeout: Duration::from_secs(a.join_timeout.max(1)),
        eager: a.eager,
        copy_to: a.copy_to.clone(),
    };
    let host = match &a.local_image {
        Some(img) => HostFile::start_local(&desc, img, &a.mount, &a.name),
        None => HostFile::start(&desc, &a.mount, &a.name, &opts),
    }
    .map_err(|e| e.to_string())?;
    println!(
        "mcdist-fuse: {} ({} bytes, session {:016x}) mounted",
        host.mount.file().display(),
        desc.mem_bytes,
        desc.session_id
    );
    let sig = sigs
        .wait()
        .map_err(|e| format!("waiting for a signal: {e}"))?;
    let stats = host.stats_json();
    let HostFile { mount, client } = host;
    let unmounted = mount.unmount();
    if let Some(c) = client {
        c.leave(true);
    }
    let text = stats.to_string();
    println!("mcdist-fuse: {sig:?}, unmounted; {text}");
    if let Some(p) = &a.stats {
        std::fs::write(p, &text).map_err(|e| format!("writing {}: {e}", p.display()))?;
    }
    unmounted.map_err(|e| format!("unmounting {}: {e}", a.mount.display()))
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("mcdist-fuse: {e}");
        std::process::exit(1);
    }
}
