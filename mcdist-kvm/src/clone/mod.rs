//! The clone system, after SnowFlock's API: boot a parent, run it to its fork point, request
//! a ticket for N clones, clone, join, kill.
//!
//! ```text
//! Parent::boot(job) ─run_to_fork()─► Frozen ─descriptor()─► Descriptor (small, shipped eagerly)
//!                                      │
//!            request_ticket(n) ─► CloneTicket ─clone(ticket, launcher)─► CloneSet ─join()/kill()
//! ```
//!
//! Clones run from the descriptor with [`LazyMemory`]: no page is present at start. A
//! [`CloneLauncher`] decides where clones run and where their pages come from: threads of this
//! process fed from a local page source ([`LocalLauncher`]), threads fed by an mcdist client,
//! or separate `mcdist-clone` processes ([`ProcessLauncher`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::descriptor::{Descriptor, SessionParams};
use crate::guest::{HashJob, JobError, CODE_GPA, GUEST_CODE, MAILBOX_GPA};
use crate::lazy::{
    LazyConfig, LazyFailure, LazyHandle, LazyMemory, LazyStats, PageFetcher, Prefetched,
    UffdSetupError,
};
use crate::session::SessionError;
use crate::source::{PageBitmap, PageSource};
use crate::vm::{GuestExit, GuestRam, Vm, VmError, VmMemory};

mod connect;
mod launch;
mod report;
mod serve;
mod working_set;

pub use connect::{connect_fetcher, connect_threaded_fetcher};
pub use launch::{
    CloneLauncher, CloneSet, LocalLauncher, ProcessLauncher, RunningClone, ThreadLauncher,
};
pub use serve::MemoryServer;
pub use working_set::{
    decode_working_set, encode_working_set, load_working_set, save_working_set, WorkingSetError,
};

/// Errors of the clone system.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    /// VMM failure.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Lazy memory could not be set up.
    #[error(transparent)]
    Uffd(#[from] UffdSetupError),
    /// The clone's memory stopped arriving (server gone, session failed...).
    #[error("memory lost: clone {id}: {failure}")]
    MemoryLost {
        /// Clone id.
        id: u32,
        /// Why.
        failure: LazyFailure,
    },
    /// Job parameters are invalid.
    #[error(transparent)]
    Job(#[from] JobError),
    /// The guest did not reach its fork point or result.
    #[error("guest stopped unexpectedly: {0:?}")]
    GuestStopped(GuestExit),
    /// The clone's mcdist session could not be joined.
    #[error("page source: {0}")]
    Session(#[from] SessionError),
    /// A working-set file could not be read or written.
    #[error(transparent)]
    WorkingSet(#[from] WorkingSetError),
    /// A page provider could not be attached (for example the host cache).
    #[error("page source: {0}")]
    Attach(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Reading the parent's image failed (the scan, or the eager copy).
    #[error("page source: {what}: {source}")]
    Image {
        /// Which read.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Starting or waiting for a clone (thread or process) failed.
    #[error("clone {id} process: {what}: {source}")]
    Spawn {
        /// Clone id.
        id: u32,
        /// Which step.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A clone process failed; `stderr` is the last line it wrote there.
    #[error("clone {id} process: exited with {status}: {stderr}")]
    ProcessFailed {
        /// Clone id.
        id: u32,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Its last non-empty line on standard error.
        stderr: String,
    },
    /// The clone did not finish before the join deadline.
    #[error("clone {0} did not finish in time")]
    JoinTimeout(u32),
    /// The clone was killed.
    #[error("clone {0} was killed")]
    Killed(u32),
    /// A clone thread panicked.
    #[error("clone {0} thread panicked")]
    Panicked(u32),
    /// Descriptor problem.
    #[error(transparent)]
    Descriptor(#[from] crate::descriptor::DescriptorError),
}

/// What one clone did.
#[derive(Debug, Clone)]
pub struct CloneReport {
    /// Clone id.
    pub id: u32,
    /// The guest's reported result.
    pub result: u32,
    /// Lazy-memory statistics.
    pub stats: LazyStats,
    /// Clone start (descriptor in hand) → first `KVM_RUN` (the first instruction).
    pub time_to_first_instruction: Duration,
    /// Clone start → result.
    pub total: Duration,
    /// The prefetch before the first instruction ([`CloneOptions::prefetch`]), if any.
    pub prefetched: Option<Prefetched>,
    /// The non-zero pages the clone ended with (touched or pushed), ascending: the working
    /// set a later clone of the same parent can prefetch. Empty unless
    /// [`CloneOptions::record_working_set`].
    pub working_set: Vec<u64>,
}

/// Options for running one clone.
#[derive(Clone, Default)]
pub struct CloneOptions {
    /// Lazy memory options.
    pub lazy: LazyConfig,
    /// Eager baseline: copy every non-zero page from this source before the first instruction.
    pub eager_from: Option<Arc<dyn PageSource>>,
    /// Fetch these pages (a working set an earlier clone of the same parent recorded) in
    /// bulk, in the list's order, from the first instruction on
    /// ([`LazyMemory::prefetch_start`]; with `prefetch_before_start`, before it:
    /// [`LazyMemory::prefetch`], waiting at most the lazy memory's `fetch_timeout`).
    pub prefetch: Option<Arc<[u64]>>,
    /// With `prefetch`: wait for the prefetch before the first instruction instead of
    /// letting it run alongside the guest. By default the guest starts at once and the
    /// prefetch runs while it does (a fault on a page still waiting its turn asks for it at
    /// once), which measured best at every touch rate (`benches/README.md`); waiting trades
    /// start time for no demand fault at all on the listed pages.
    pub prefetch_before_start: bool,
    /// Report the pages the clone ended with ([`CloneReport::working_set`]).
    pub record_working_set: bool,
}

impl std::fmt::Debug for CloneOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloneOptions")
            .field("lazy", &self.lazy)
            .field("eager", &self.eager_from.is_some())
            .field("prefetch", &self.prefetch.as_ref().map(|p| p.len()))
            .field("prefetch_before_start", &self.prefetch_before_start)
            .field("record_working_set", &self.record_working_set)
            .finish()
    }
}

/// Runs clone `id` from `desc` in the calling thread. `make_fetcher` connects the clone's
/// lazy memory to its page provider (it gets the handle to deliver pages through).
pub fn run_clone(
    desc: &Descriptor,
    id: u32,
    opts: &CloneOptions,
    make_fetcher: impl FnOnce(LazyHandle) -> Result<Arc<dyn PageFetcher>, CloneError>,
) -> Result<CloneReport, CloneError> {
    let t0 = Instant::now();
    let lazy_cfg = LazyConfig {
        page_size: desc.page_size as usize,
        ..opts.lazy.clone()
    };
    let fetch_timeout = lazy_cfg.fetch_timeout;
    let mut mem = LazyMemory::new(desc.mem_size as usize, desc.zero_map.clone(), lazy_cfg)?;
    let fetcher = make_fetcher(mem.handle())?;
    mem.start(fetcher)?;
    if let Some(src) = &opts.eager_from {
        mem.populate_from(&**src)
            .map_err(|source| CloneError::Image {
                what: "eager copy",
                source,
            })?;
    }
    let prefetched = match &opts.prefetch {
        Some(pages) if !opts.prefetch_before_start => {
            let asked = mem.prefetch_start(pages);
            Some(Prefetched {
                asked,
                missing: asked,
                elapsed: Duration::ZERO,
            })
        }
        Some(pages) => {
            let p = mem
                .prefetch(pages, fetch_timeout)
                .map_err(|failure| CloneError::MemoryLost { id, failure })?;
            if p.missing > 0 {
                tracing::warn!(
                    id,
                    missing = p.missing,
                    asked = p.asked,
                    "prefetch incomplete after {:?}; the clone starts and faults on the rest",
                    p.elapsed
                );
            }
            Some(p)
        }
        None => None,
    };
    let mem = Arc::new(mem);
    let mut vm = Vm::new(VmMemory::Lazy(mem.clone()), desc.vcpus.len())?;
    vm.restore(&desc.vcpus)?;
    vm.set_rbx(u64::from(id))?;
    let first = t0.elapsed();
    let exit = vm.run(0);
    let total = t0.elapsed();
    if let Some(failure) = mem.failure() {
        return Err(CloneError::MemoryLost { id, failure });
    }
    let result = match exit? {
        GuestExit::Result(r) => r,
        other => return Err(CloneError::GuestStopped(other)),
    };
    drop(vm);
    Ok(CloneReport {
        id,
        result,
        stats: mem.stats(),
        time_to_first_instruction: first,
        total,
        prefetched,
        working_set: if opts.record_working_set {
            mem.installed_pages()
        } else {
            Vec::new()
        },
    })
}

/// A parent VM running the demo guest.
#[derive(Debug)]
pub struct Parent {
    vm: Vm,
    ram: Arc<GuestRam>,
    job: HashJob,
}

impl Parent {
    /// Creates the parent VM with the demo guest and `job` loaded.
    pub fn boot(job: HashJob) -> Result<Self, CloneError> {
        job.validate(0)?;
        let ram = Arc::new(GuestRam::new(job.mem_size as usize)?);
        ram.write(MAILBOX_GPA, &job.mailbox())?;
        ram.write(CODE_GPA, GUEST_CODE)?;
        let mut vm = Vm::new(VmMemory::Ram(ram.clone()), 1)?;
        vm.setup_flat32(CODE_GPA)?;
        Ok(Self { vm, ram, job })
    }

    /// Runs the parent to its fork point and freezes it.
    pub fn run_to_fork(mut self) -> Result<Frozen, CloneError> {
        match self.vm.run(0)? {
            GuestExit::CloneMe => {}
            other => return Err(CloneError::GuestStopped(other)),
        }
        let vcpus = self.vm.capture()?;
        // One pass over the frozen image: digest, zero map and hash pages (kept for the
        // memory server, which then reads the image only for pages it sends).
        let info = crate::source::scan(&*self.ram).map_err(|source| CloneError::Image {
            what: "scan",
            source,
        })?;
        Ok(Frozen {
            _vm: self.vm,
            image: self.ram,
            job: self.job,
            vcpus,
            info,
            next_id: 0,
        })
    }
}

/// A parent frozen at its fork point: its memory image is immutable from here on.
#[derive(Debug)]
pub struct Frozen {
    _vm: Vm,
    image: Arc<GuestRam>,
    job: HashJob,
    vcpus: Vec<crate::vm::VcpuState>,
    info: mcdist::source::ImageInfo,
    next_id: u32,
}

/// Permission to create `count` clones with consecutive ids (SnowFlock's `sf_request_ticket`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneTicket {
    first_id: u32,
    count: u32,
}

impl CloneTicket {
    /// Clone ids granted.
    pub fn ids(&self) -> std::ops::Range<u32> {
        self.first_id..self.first_id + self.count
    }
}

impl Frozen {
    /// The frozen memory image (a page source for a memory server).
    pub fn image(&self) -> Arc<dyn PageSource> {
        self.image.clone()
    }

    /// The job the guest runs.
    pub fn job(&self) -> &HashJob {
        &self.job
    }

    /// Pages listed as zero.
    pub fn zero_map(&self) -> &PageBitmap {
        &self.info.zero_map
    }

    /// BLAKE3 digest of the frozen image.
    pub fn digest(&self) -> [u8; 32] {
        self.info.digest
    }

    /// Starts a memory server for the frozen image (multicast `group` via `iface`,
    /// requests on `listen`) and returns it with the descriptor clones start from.
    pub fn serve(
        &self,
        group: std::net::SocketAddrV4,
        iface: Option<&str>,
        listen: std::net::SocketAddr,
        cfg: impl Into<mcdist::node::NodeConfig<mcdist::ServerConfig>>,
    ) -> Result<(MemoryServer, Descriptor), SessionError> {
        let server = MemoryServer::start_with_info(
            self.image(),
            self.info.clone(),
            group,
            iface,
            listen,
            cfg,
        )?;
        let desc = self.descriptor(Some(server.session().clone()));
        Ok((server, desc))
    }

    /// The descriptor clones start from.
    pub fn descriptor(&self, session: Option<SessionParams>) -> Descriptor {
        Descriptor {
            mem_size: self.job.mem_size,
            page_size: self.image.page_size() as u32,
            digest: self.info.digest,
            session,
            vcpus: self.vcpus.clone(),
            zero_map: self.info.zero_map.clone(),
        }
    }

    /// Grants a ticket for `n` clones; fails if their slices do not fit the job's table.
    pub fn request_ticket(&mut self, n: u32) -> Result<CloneTicket, CloneError> {
        self.job.validate(self.next_id + n)?;
        let t = CloneTicket {
            first_id: self.next_id,
            count: n,
        };
        self.next_id += n;
        Ok(t)
    }

    /// Starts the ticket's clones with `launcher` (SnowFlock's `sf_clone`).
    pub fn clone_vms(
        &self,
        ticket: &CloneTicket,
        desc: &Arc<Descriptor>,
        launcher: &dyn CloneLauncher,
    ) -> CloneSet {
        let clones = ticket
            .ids()
            .map(|id| (id, launcher.launch(desc, id)))
            .collect();
        CloneSet { clones }
    }
}
