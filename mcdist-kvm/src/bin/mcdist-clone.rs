//! Runs one KVM clone from a descriptor, fetching its memory lazily over mcdist (its own
//! client, or the host's shared page cache with `--host-cache SOCKET`), and prints a
//! `MCDIST-CLONE ...` report line (exit status 1 and a message on stderr on failure).

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
#[path = "common/session_args.rs"]
mod session_args;
use mcdist_kvm::clone::connect_fetcher;
use mcdist_kvm::clone::{load_working_set, run_clone, save_working_set, CloneError, CloneOptions};
use mcdist_kvm::share::connect_host_cache;
use session_args::SessionArgs;

#[derive(Parser, Debug)]
#[command(about = "Run one mcdist-kvm clone from a descriptor")]
struct Args {
    /// Descriptor file written by the parent.
    #[arg(long)]
    descriptor: PathBuf,
    /// Clone id (the guest's fork return value).
    #[arg(long)]
    id: u32,
    #[command(flatten)]
    session: SessionArgs,
    /// Get pages from this host's `mcdist-host-cache` listening on this unix socket instead
    /// of running an mcdist client (the group, interface and server options are then unused).
    #[arg(long)]
    host_cache: Option<PathBuf>,
    /// Give up on a page after this many milliseconds.
    #[arg(long, default_value_t = 10_000)]
    fetch_timeout_ms: u64,
    /// Fetch the pages listed in this working-set file (one written by
    /// `--record-working-set` for an earlier clone of the same parent) in bulk while the
    /// clone runs, so that a clone touching them at memory speed does not wait on one fault
    /// after another. Every page is still verified against the descriptor's root.
    #[arg(long, value_name = "FILE")]
    prefetch: Option<PathBuf>,
    /// With --prefetch: fetch the listed pages before the first instruction instead of
    /// while the guest runs (no demand fault at all on them, at the cost of a later start).
    #[arg(long, requires = "prefetch")]
    prefetch_before_start: bool,
    /// When the clone is done, write the pages it ended with (touched or pushed) to this
    /// working-set file, for later clones' `--prefetch`.
    #[arg(long, value_name = "FILE")]
    record_working_set: Option<PathBuf>,
}

fn main() {
    let args = Args::parse();
    match run(&args) {
        Ok(line) => println!("{line}"),
        // Fail closed: the vCPUs were stopped; the line starts with "memory lost: ".
        Err(e @ CloneError::MemoryLost { .. }) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("mcdist-clone {}: {e}", args.id);
            std::process::exit(1);
        }
    }
}

fn run(args: &Args) -> Result<String, CloneError> {
    let desc = args.session.load(&args.descriptor)?;
    let page_count = desc.page_count();
    // A bad working-set file is refused before anything else is set up.
    let prefetch = match &args.prefetch {
        Some(path) => Some(load_working_set(path, page_count)?),
        None => None,
    };
    let security = if args.host_cache.is_some() {
        // The host cache holds the key and the session; the clone talks to it only.
        None
    } else {
        args.session
            .keys
            .for_descriptor(&desc)
            .map_err(|e| CloneError::Attach(e.into()))?
    };
    let mut opts = CloneOptions::default();
    opts.lazy.fetch_timeout = Duration::from_millis(args.fetch_timeout_ms);
    if let Some(pages) = prefetch {
        opts.prefetch = Some(pages.into());
    }
    opts.prefetch_before_start = args.prefetch_before_start;
    opts.record_working_set = args.record_working_set.is_some();
    let give_up = opts.lazy.fetch_timeout;
    let report = run_clone(&desc, args.id, &opts, |h| {
        // Fail closed: a lost memory ends the process with "memory lost: ...".
        h.exit_process_on_loss()
            .map_err(|source| CloneError::Spawn {
                id: args.id,
                what: "loss watchdog",
                source,
            })?;
        match &args.host_cache {
            Some(path) => {
                connect_host_cache(path, &desc, h).map_err(|e| CloneError::Attach(Box::new(e)))
            }
            None => connect_fetcher(
                &desc,
                args.session.iface.as_deref(),
                h,
                give_up,
                security.as_ref(),
            ),
        }
    })?;
    if let Some(path) = &args.record_working_set {
        save_working_set(path, page_count, &report.working_set)?;
    }
    Ok(report.to_line())
}
