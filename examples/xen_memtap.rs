//! Memtap a Xen clone domain from an mcdist memory server.
//!
//! Run on a Xen host (dom0, as root) after the toolstack has created the clone
//! domain paused from the parent's saved state:
//!
//! ```text
//! cargo run -p mcdist-examples --features xen --example xen_memtap -- \
//!     --domid 12 --descriptor parent.mcdx \
//!     --group 239.255.10.1:7000 --iface eth1 --server 10.0.0.1:7001
//! xl unpause 12
//! ```
//!
//! It enables mem_paging for the domain, pages out every page of the image,
//! and fills them on demand from the mcdist client (zero pages locally),
//! loading pushed pages ahead of faults. With `--complete` it also fetches the
//! rest of the image in the background and exits, paging disabled, once the
//! domain is fully populated; otherwise it serves faults until `--timeout`
//! seconds have passed, then disables paging.
//!
//! Write the descriptor from the parent's frozen memory image first:
//!
//! ```text
//! cargo run -p mcdist-examples --features xen --example xen_memtap -- \
//!     --write-descriptor parent.mcdx --image parent.mem
//! ```
//!
//! It runs on a real Xen 4.17 (under QEMU TCG) in mcdist-xen's
//! `real_xen_fork_two_clones` test, driven by `examples/xen-dom0-test.sh`.

use clap::Parser;
use mcdist::node::ClientNode;
use mcdist::secure::{Psk, Security};
use mcdist::transport::udp::{UdpConfig, UdpTransport};
use mcdist::{ClientConfig, FileSource};
use mcdist_xen::{Memtap, MemtapConfig, PageInbox, XenDescriptor, XenHypervisor};
use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(about = "Fill a Xen clone domain's memory on demand from an mcdist server")]
struct Args {
    /// Clone domain id.
    #[arg(long, required_unless_present = "write_descriptor")]
    domid: Option<u32>,
    /// Descriptor of the parent image (read; or written with --write-descriptor).
    #[arg(long)]
    descriptor: Option<PathBuf>,
    /// Multicast group ADDR:PORT (239.255.0.0/16).
    #[arg(long)]
    group: Option<SocketAddrV4>,
    /// Interface to receive the group on.
    #[arg(long)]
    iface: Option<String>,
    /// Memory server request address ADDR:PORT.
    #[arg(long)]
    server: Option<SocketAddr>,
    /// Fetch the whole image in the background and exit when the domain is populated.
    #[arg(long)]
    complete: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 3600)]
    timeout: u64,
    /// Stop (disable paging, print statistics) once this file exists.
    #[arg(long, value_name = "FILE")]
    stop_file: Option<PathBuf>,
    /// Write a descriptor for --image to this path and exit.
    #[arg(long, requires = "image")]
    write_descriptor: Option<PathBuf>,
    /// Frozen parent memory image (with --write-descriptor).
    #[arg(long)]
    image: Option<PathBuf>,
    /// Pre-shared 256-bit key file (32 raw bytes or 64 hex digits), as `mcdist fetch --key`.
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// With --key: the server authenticates only (page contents in the clear).
    #[arg(long, requires = "key")]
    auth_only: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xen_memtap: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    if let (Some(out), Some(image)) = (&args.write_descriptor, &args.image) {
        let src = FileSource::open(image, 4096).map_err(|e| format!("{}: {e}", image.display()))?;
        let d = XenDescriptor::from_source(&src).map_err(|e| format!("scanning the image: {e}"))?;
        d.write(out).map_err(|e| e.to_string())?;
        println!(
            "descriptor {}: {} pages, {} zero, digest {}",
            out.display(),
            d.page_count,
            d.zero_map.count_ones(),
            mcdist::hex(&d.digest)
        );
        return Ok(());
    }
    let domid = args.domid.ok_or("--domid is required")?;
    let path = args.descriptor.ok_or("--descriptor is required")?;
    let group = args.group.ok_or("--group is required")?;
    let server = args.server.ok_or("--server is required")?;
    let desc = XenDescriptor::read(&path).map_err(|e| match e {
        // The I/O error names the file already.
        mcdist_xen::DescriptorError::Io { .. } => e.to_string(),
        e => format!("{}: {e}", path.display()),
    })?;

    let mut ucfg = UdpConfig::new(group);
    ucfg.iface = args.iface.clone();
    ucfg.server = Some(server);
    let transport = UdpTransport::client(&ucfg).map_err(|e| format!("client socket: {e}"))?;
    let (inbox, rx) = PageInbox::new().map_err(|e| format!("inbox: {e}"))?;
    let mut ccfg = ClientConfig::new(server);
    ccfg.expected_digest = Some(desc.digest);
    let security = match &args.key {
        Some(k) => {
            let loaded = Psk::load(k).map_err(|e| e.to_string())?;
            if let Some(w) = &loaded.permission_warning {
                eprintln!("xen_memtap: warning: {w}");
            }
            Some(if args.auth_only {
                Security::auth_only(loaded.psk)
            } else {
                Security::new(loaded.psk)
            })
        }
        None => {
            eprintln!(
                "xen_memtap: warning: unkeyed mcdist session (no --key): integrity (every page \
                 is verified against the descriptor's root) but no confidentiality and no \
                 authentication of the control plane"
            );
            None
        }
    };
    let client = Arc::new(
        ClientNode::start(
            mcdist::node::NodeConfig::new(ccfg, security),
            transport,
            inbox,
        )
        .map_err(|e| e.to_string())?,
    );
    let info = client
        .wait_session(Duration::from_secs(30))
        .map_err(|e| format!("joining the session: {e}"))?;
    if info.page_count != desc.page_count || info.page_size != desc.page_size as usize {
        return Err(format!(
            "server serves {} pages of {} bytes, descriptor says {} of {}",
            info.page_count, info.page_size, desc.page_count, desc.page_size
        ));
    }

    let hv = XenHypervisor::open(domid).map_err(|e| e.to_string())?;
    let mut cfg = MemtapConfig::new(
        desc.page_size as usize,
        desc.page_count,
        desc.zero_map.clone(),
    );
    cfg.exit_when_complete = args.complete;
    cfg.fetch_all = args.complete;
    let mut memtap = Memtap::new(hv, cfg, client.clone(), rx).map_err(|e| e.to_string())?;
    let setup = memtap.setup().map_err(|e| e.to_string())?;
    println!(
        "domain {domid}: {} pages paged out, {} not pageable; unpause the domain now",
        setup.evicted, setup.not_pageable
    );

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let deadline = std::time::Instant::now() + Duration::from_secs(args.timeout);
        let stop_file = args.stop_file.clone();
        std::thread::spawn(move || {
            while std::time::Instant::now() < deadline
                && !stop_file.as_ref().is_some_and(|f| f.exists())
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            stop.store(true, Ordering::Release);
        });
    }
    let stats = memtap.run_to_end(&stop).map_err(|e| e.to_string())?;
    println!("domain {domid}: {stats:?}");
    println!("client: {:?}", client.stats());
    Ok(())
}
