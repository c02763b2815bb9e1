//! Runs one KVM clone from a descriptor, fetching its memory lazily over mcdist, and prints
//! a `MCDIST-CLONE ...` report line (exit status 1 and a message on stderr on failure).

use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use mcdist_kvm::clone::{run_clone, CloneError, CloneOptions};
use mcdist_kvm::remote::connect_fetcher;
use mcdist_kvm::Descriptor;

#[derive(Parser, Debug)]
#[command(about = "Run one mcdist-kvm clone from a descriptor")]
struct Args {
    /// Descriptor file written by the parent.
    #[arg(long)]
    descriptor: PathBuf,
    /// Clone id (the guest's fork return value).
    #[arg(long)]
    id: u32,
    /// Multicast group (overrides the descriptor).
    #[arg(long)]
    group: Option<SocketAddrV4>,
    /// Interface for multicast.
    #[arg(long)]
    iface: Option<String>,
    /// Memory server request address (overrides the descriptor).
    #[arg(long)]
    server: Option<SocketAddr>,
    /// Give up on a page after this many milliseconds.
    #[arg(long, default_value_t = 10_000)]
    fetch_timeout_ms: u64,
}

fn main() {
    let args = Args::parse();
    match run(&args) {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("mcdist-clone {}: {e}", args.id);
            std::process::exit(1);
        }
    }
}

fn run(args: &Args) -> Result<String, CloneError> {
    let mut desc = Descriptor::load(&args.descriptor)?;
    if let Some(s) = desc.session.as_mut() {
        if let Some(g) = args.group {
            s.group = g;
        }
        if let Some(a) = args.server {
            s.server = a;
        }
    }
    let mut opts = CloneOptions::default();
    opts.lazy.fetch_timeout = Duration::from_millis(args.fetch_timeout_ms);
    let give_up = opts.lazy.fetch_timeout;
    let report = run_clone(&desc, args.id, &opts, |h| {
        connect_fetcher(&desc, args.iface.as_deref(), h, give_up)
    })?;
    Ok(report.to_line())
}
