//! Embedding mcdist-kvm's lazy memory in another VMM.
//!
//! - a custom [`PageSource`] (pages computed from their number; every fourth page is zero),
//! - a custom [`PageFetcher`] that serves requests on its own worker thread (the shape of any
//!   asynchronous backend: a network client, a decompressor, a storage reader),
//! - [`LazyMemory`] as the guest RAM region of "another VMM": its `host_addr()`/`size()` go
//!   into that VMM's `KVM_SET_USER_MEMORY_REGION`; here host threads stand in for vCPUs and
//!   touch the region directly.
//!
//! Run as root: `cargo run -p mcdist-kvm --example embed`.

use std::io;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use mcdist_kvm::source::zero_map;
use mcdist_kvm::{LazyConfig, LazyHandle, LazyMemory, PageFetcher, PageSource};

const PAGE: usize = 4096;

/// A 16 MiB image whose pages are computed on demand.
struct Procedural {
    pages: u64,
}

impl PageSource for Procedural {
    fn page_size(&self) -> usize {
        PAGE
    }
    fn image_size(&self) -> u64 {
        self.pages * PAGE as u64
    }
    fn read_page(&self, pfn: u64, buf: &mut [u8]) -> io::Result<()> {
        if pfn >= self.pages {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "past the end"));
        }
        if pfn % 4 == 0 {
            buf.fill(0);
        } else {
            for (i, chunk) in buf.chunks_exact_mut(8).enumerate() {
                chunk.copy_from_slice(&(pfn << 20 | i as u64).to_le_bytes());
            }
        }
        Ok(())
    }
}

/// Queues requests to a worker thread that reads the source and installs pages.
struct WorkerFetcher {
    tx: Mutex<mpsc::Sender<u64>>,
}

impl WorkerFetcher {
    fn start(source: Arc<dyn PageSource>, handle: LazyHandle) -> Self {
        let (tx, rx) = mpsc::channel::<u64>();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; source.page_size()];
            for pfn in rx {
                match source.read_page(pfn, &mut buf) {
                    Ok(()) => handle.install(pfn, &buf),
                    Err(e) => handle.fail(format!("page {pfn}: {e}")),
                }
            }
        });
        Self { tx: Mutex::new(tx) }
    }
}

impl PageFetcher for WorkerFetcher {
    fn request(&self, pfn: u64) {
        if let Ok(tx) = self.tx.lock() {
            let _ = tx.send(pfn);
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let source: Arc<dyn PageSource> = Arc::new(Procedural { pages: 4096 });
    // The zero map normally comes from the descriptor; here we scan the source once.
    let zero = zero_map(&*source)?;
    let mut mem = LazyMemory::new(
        source.image_size() as usize,
        zero.clone(),
        LazyConfig::default(),
    )?;
    let fetcher = WorkerFetcher::start(source.clone(), mem.handle());
    mem.start(Arc::new(fetcher))?;
    println!(
        "guest RAM for the other VMM: userspace_addr={:#x} memory_size={} ({} zero pages of {})",
        mem.host_addr(),
        mem.size(),
        zero.count_ones(),
        zero.len()
    );
    // Four "vCPUs" touch every 16th page, overlapping, and check what they read.
    let mem = Arc::new(mem);
    let workers: Vec<_> = (0..4u64)
        .map(|t| {
            let mem = mem.clone();
            let source = source.clone();
            std::thread::spawn(move || -> io::Result<()> {
                let mut got = vec![0u8; PAGE];
                let mut want = vec![0u8; PAGE];
                for pfn in (t..4096).step_by(16) {
                    mem.read(pfn as usize * PAGE, &mut got)?;
                    source.read_page(pfn, &mut want)?;
                    if got != want {
                        return Err(io::Error::other(format!("page {pfn} differs")));
                    }
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        w.join().map_err(|_| "worker panicked")??;
    }
    let s = mem.stats();
    println!(
        "demand faults {}, pages fetched {}, zero pages filled locally {}, p50 {:?}, p99 {:?}",
        s.demand_faults,
        s.pages_fetched(),
        s.zero_pages,
        s.fault_latency.quantile(0.5).unwrap_or_default(),
        s.fault_latency.quantile(0.99).unwrap_or_default()
    );
    for (bound, count) in s.fault_latency.buckets() {
        println!("  < {bound:>10?}: {count}");
    }
    Ok(())
}
