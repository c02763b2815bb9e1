//! The per-host page cache for clone processes: joins the memory server's session once for
//! this host and serves the `mcdist-clone --host-cache SOCKET` processes of the host over a
//! unix socket, with the pages in shared memory.
//!
//! Prints `MCDIST-HOST-CACHE ready socket=PATH` once it serves, runs until its standard input
//! is closed (or reaches end of file), then prints a `MCDIST-HOST-CACHE clones=… …` line of
//! counters and removes the socket.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
#[path = "common/session_args.rs"]
mod session_args;
use mcdist_kvm::HostCache;
use session_args::SessionArgs;

#[derive(Parser, Debug)]
#[command(
    about = "Share one mcdist client and page cache among the clone processes of this host",
    long_about = "Joins the memory server's session once for this host (one socket, one \
                  receiver at the server) and keeps every page that arrives in a page cache in \
                  shared memory. Clone processes started with `mcdist-clone --host-cache SOCKET` \
                  ask it for pages over the unix socket and install them straight from the \
                  shared memory: a page crosses the network once per host, however many clones \
                  of the parent run here. Runs until standard input is closed."
)]
struct Args {
    /// Descriptor file written by the parent.
    #[arg(long)]
    descriptor: PathBuf,
    /// Unix socket to serve clone processes on.
    #[arg(long)]
    socket: PathBuf,
    #[command(flatten)]
    session: SessionArgs,
    /// Declare the session failed when the server stays silent this long with pages
    /// outstanding (milliseconds).
    #[arg(long, default_value_t = 10_000)]
    give_up_ms: u64,
}

fn main() {
    if let Err(e) = run(&Args::parse()) {
        eprintln!("mcdist-host-cache: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), String> {
    let desc = args
        .session
        .load(&args.descriptor)
        .map_err(|e| e.to_string())?;
    let security = args.session.keys.for_descriptor(&desc)?;
    let give_up = Duration::from_millis(args.give_up_ms);
    let cache = HostCache::connect(
        &desc,
        args.session.iface.as_deref(),
        Duration::from_secs(5),
        |c| {
            c.give_up_after = give_up;
            c.security = security;
        },
    )
    .map_err(|e| e.to_string())?;
    let server = cache.serve_unix(&args.socket).map_err(|e| e.to_string())?;
    let mut out = std::io::stdout();
    writeln!(
        out,
        "MCDIST-HOST-CACHE ready socket={}",
        server.path().display()
    )
    .and_then(|()| out.flush())
    .map_err(|e| e.to_string())?;
    // Serve until the parent closes our standard input.
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(server);
    let st = cache.stats();
    let cs = cache.client_stats();
    // The parent may be gone already (it closed our input and stopped reading): then the
    // counters have nobody to go to, which is not worth a panic.
    writeln!(
        out,
        "MCDIST-HOST-CACHE clones={} network_pages={} host_requests={} cache_hits={} joined={} waiter_installs={} stale_requests={} malformed={} bytes_received={} duplicates={} requests_sent={}",
        st.clones_attached,
        st.network_pages,
        st.host_requests,
        st.cache_hits,
        st.joined_waits,
        st.waiter_installs,
        st.stale_requests,
        st.malformed_frames,
        cs.bytes_received,
        cs.duplicates,
        cs.requests_sent
    )
    .and_then(|()| out.flush())
    .map_err(|e| format!("cannot report the counters: {e}"))?;
    Ok(())
}
