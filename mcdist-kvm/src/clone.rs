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

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::descriptor::{Descriptor, SessionParams};
use crate::guest::{HashJob, JobError, CODE_GPA, GUEST_CODE, MAILBOX_GPA};
use crate::lazy::{
    LazyConfig, LazyFailure, LazyHandle, LazyMemory, LazyStats, PageFetcher, SourceFetcher,
    UffdSetupError,
};
use crate::source::{PageBitmap, PageSource};
use crate::vm::{GuestExit, GuestRam, Vm, VmError, VmMemory};

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
    #[error("clone {id} lost its memory source: {failure}")]
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
    /// The page source for the fetcher could not be set up.
    #[error("page source: {0}")]
    Source(String),
    /// Starting or talking to a clone process failed.
    #[error("clone {id} process: {msg}")]
    Process {
        /// Clone id.
        id: u32,
        /// What happened.
        msg: String,
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
}

impl CloneReport {
    /// One-line text form printed by `mcdist-clone`.
    pub fn to_line(&self) -> String {
        let q = |x: f64| {
            self.stats
                .fault_latency
                .quantile(x)
                .map_or(0, |d| d.as_nanos())
        };
        format!(
            "MCDIST-CLONE id={} result={} faults={} requested={} demand={} pushed={} zero={} dup={} zero_recv={} bytes={} p50_ns={} p99_ns={} first_ns={} total_ns={}",
            self.id,
            self.result,
            self.stats.demand_faults,
            self.stats.pages_requested,
            self.stats.pages_demand,
            self.stats.pages_pushed,
            self.stats.zero_pages,
            self.stats.duplicates,
            self.stats.zero_pages_received,
            self.stats.bytes_received,
            q(0.5),
            q(0.99),
            self.time_to_first_instruction.as_nanos(),
            self.total.as_nanos()
        )
    }

    /// Parses [`CloneReport::to_line`]; latencies come back as the p50 and p99 only (the
    /// histogram's 0.5- and 0.99-quantiles).
    pub fn from_line(line: &str) -> Option<CloneReport> {
        let rest = line.trim().strip_prefix("MCDIST-CLONE ")?;
        let mut get = std::collections::HashMap::new();
        for kv in rest.split_whitespace() {
            let (k, v) = kv.split_once('=')?;
            get.insert(k, v.parse::<u128>().ok()?);
        }
        let f = |k: &str| get.get(k).copied();
        let mut stats = LazyStats {
            demand_faults: f("faults")? as u64,
            pages_requested: f("requested")? as u64,
            pages_demand: f("demand")? as u64,
            pages_pushed: f("pushed")? as u64,
            zero_pages: f("zero")? as u64,
            duplicates: f("dup")? as u64,
            zero_pages_received: f("zero_recv")? as u64,
            bytes_received: f("bytes")? as u64,
            ..LazyStats::default()
        };
        let (p50, p99) = (f("p50_ns")? as u64, f("p99_ns")? as u64);
        if p50 > 0 || p99 > 0 {
            // Two samples of the p50 and one of the p99, so that the histogram's 0.5-quantile
            // is the p50 and its 0.99-quantile the p99 again.
            stats.fault_latency.record(Duration::from_nanos(p50));
            stats.fault_latency.record(Duration::from_nanos(p50));
            stats.fault_latency.record(Duration::from_nanos(p99));
        }
        Some(CloneReport {
            id: f("id")? as u32,
            result: f("result")? as u32,
            stats,
            time_to_first_instruction: Duration::from_nanos(f("first_ns")? as u64),
            total: Duration::from_nanos(f("total_ns")? as u64),
        })
    }
}

/// Options for running one clone.
#[derive(Clone, Default)]
pub struct CloneOptions {
    /// Lazy memory options.
    pub lazy: LazyConfig,
    /// Eager baseline: copy every non-zero page from this source before the first instruction.
    pub eager_from: Option<Arc<dyn PageSource>>,
}

impl std::fmt::Debug for CloneOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloneOptions")
            .field("lazy", &self.lazy)
            .field("eager", &self.eager_from.is_some())
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
    let mut mem = LazyMemory::new(desc.mem_size as usize, desc.zero_map.clone(), lazy_cfg)?;
    let fetcher = make_fetcher(mem.handle())?;
    mem.start(fetcher)?;
    if let Some(src) = &opts.eager_from {
        mem.populate_from(&**src)
            .map_err(|e| CloneError::Source(format!("eager copy: {e}")))?;
    }
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
        // One pass over the frozen image: digest and zero map.
        let mcdist::source::ImageInfo {
            digest, zero_map, ..
        } = crate::source::scan(&*self.ram).map_err(|e| CloneError::Source(e.to_string()))?;
        Ok(Frozen {
            _vm: self.vm,
            image: self.ram,
            job: self.job,
            vcpus,
            zero_map,
            digest,
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
    zero_map: PageBitmap,
    digest: [u8; 32],
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
        &self.zero_map
    }

    /// BLAKE3 digest of the frozen image.
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    /// Starts a memory server for the frozen image (multicast `group` via `iface`,
    /// requests on `listen`) and returns it with the descriptor clones start from.
    pub fn serve(
        &self,
        group: std::net::SocketAddrV4,
        iface: Option<&str>,
        listen: std::net::SocketAddr,
        cfg: mcdist::ServerConfig,
    ) -> Result<(crate::remote::MemoryServer, Descriptor), crate::remote::RemoteError> {
        let server = crate::remote::MemoryServer::start(
            self.image(),
            &self.zero_map,
            self.digest,
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
            digest: self.digest,
            session,
            vcpus: self.vcpus.clone(),
            zero_map: self.zero_map.clone(),
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

/// A clone that has been started.
pub enum RunningClone {
    /// A thread of this process.
    Thread {
        /// The thread.
        handle: JoinHandle<Result<CloneReport, CloneError>>,
        /// Set by kill; the result is discarded.
        killed: Arc<AtomicBool>,
    },
    /// A child process printing a [`CloneReport`] line.
    Process(Child),
}

impl std::fmt::Debug for RunningClone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunningClone::Thread { .. } => f.write_str("RunningClone::Thread"),
            RunningClone::Process(c) => write!(f, "RunningClone::Process({})", c.id()),
        }
    }
}

/// Starts clones somewhere.
pub trait CloneLauncher {
    /// Starts clone `id` from `desc`.
    fn launch(&self, desc: &Arc<Descriptor>, id: u32) -> Result<RunningClone, CloneError>;
}

/// Clones as threads, with pages read from a page source in this process (no network).
#[derive(Clone)]
pub struct LocalLauncher {
    /// Where pages come from.
    pub source: Arc<dyn PageSource>,
    /// Clone options.
    pub opts: CloneOptions,
}

impl CloneLauncher for LocalLauncher {
    fn launch(&self, desc: &Arc<Descriptor>, id: u32) -> Result<RunningClone, CloneError> {
        let desc = desc.clone();
        let me = self.clone();
        let killed = Arc::new(AtomicBool::new(false));
        let handle = std::thread::Builder::new()
            .name(format!("clone-{id}"))
            .spawn(move || {
                run_clone(&desc, id, &me.opts, |h| {
                    Ok(Arc::new(SourceFetcher::new(me.source.clone(), h)) as Arc<dyn PageFetcher>)
                })
            })
            .map_err(|e| CloneError::Process {
                id,
                msg: e.to_string(),
            })?;
        Ok(RunningClone::Thread { handle, killed })
    }
}

/// Clones as threads with a caller-supplied fetcher factory (for example an mcdist client).
pub struct ThreadLauncher<F> {
    /// Builds the fetcher of clone `id` from its lazy-memory handle.
    pub make_fetcher: Arc<F>,
    /// Clone options.
    pub opts: CloneOptions,
}

impl<F> CloneLauncher for ThreadLauncher<F>
where
    F: Fn(u32, &Descriptor, LazyHandle) -> Result<Arc<dyn PageFetcher>, CloneError>
        + Send
        + Sync
        + 'static,
{
    fn launch(&self, desc: &Arc<Descriptor>, id: u32) -> Result<RunningClone, CloneError> {
        let desc = desc.clone();
        let mk = self.make_fetcher.clone();
        let opts = self.opts.clone();
        let killed = Arc::new(AtomicBool::new(false));
        let handle = std::thread::Builder::new()
            .name(format!("clone-{id}"))
            .spawn(move || run_clone(&desc, id, &opts, |h| mk(id, &desc, h)))
            .map_err(|e| CloneError::Process {
                id,
                msg: e.to_string(),
            })?;
        Ok(RunningClone::Thread { handle, killed })
    }
}

/// Clones as child processes; `command(id)` builds the command line (for example
/// `ip netns exec HOST mcdist-clone --descriptor PATH --id ID ...`). The child must print a
/// [`CloneReport::to_line`] line on stdout.
pub struct ProcessLauncher<F> {
    /// Command builder.
    pub command: F,
}

impl<F: Fn(u32) -> Command> CloneLauncher for ProcessLauncher<F> {
    fn launch(&self, _desc: &Arc<Descriptor>, id: u32) -> Result<RunningClone, CloneError> {
        let child = (self.command)(id)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| CloneError::Process {
                id,
                msg: format!("spawn: {e}"),
            })?;
        Ok(RunningClone::Process(child))
    }
}

/// Clones started from one ticket.
#[derive(Debug)]
pub struct CloneSet {
    clones: Vec<(u32, Result<RunningClone, CloneError>)>,
}

impl CloneSet {
    /// Waits for every clone until `timeout` (SnowFlock's `sf_join`); one result per clone,
    /// in id order. Clones still running at the deadline are killed and reported as timed out.
    pub fn join(self, timeout: Duration) -> Vec<(u32, Result<CloneReport, CloneError>)> {
        let deadline = Instant::now() + timeout;
        self.clones
            .into_iter()
            .map(|(id, c)| {
                let r = match c {
                    Err(e) => Err(e),
                    Ok(RunningClone::Thread { handle, killed }) => {
                        while !handle.is_finished() && Instant::now() < deadline {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        if !handle.is_finished() {
                            Err(CloneError::JoinTimeout(id))
                        } else if killed.load(Ordering::SeqCst) {
                            Err(CloneError::Killed(id))
                        } else {
                            handle.join().unwrap_or(Err(CloneError::Panicked(id)))
                        }
                    }
                    Ok(RunningClone::Process(child)) => wait_process(id, child, deadline),
                };
                (id, r)
            })
            .collect()
    }

    /// Kills every clone (SnowFlock's `sf_kill`): processes get SIGKILL; thread clones are
    /// marked killed and their results discarded (a vCPU thread stops at its next exit).
    pub fn kill(self) -> Vec<(u32, Result<CloneReport, CloneError>)> {
        self.clones
            .into_iter()
            .map(|(id, c)| {
                match c {
                    Ok(RunningClone::Process(mut child)) => {
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                    Ok(RunningClone::Thread { killed, .. }) => killed.store(true, Ordering::SeqCst),
                    Err(_) => {}
                }
                (id, Err(CloneError::Killed(id)))
            })
            .collect()
    }
}

fn wait_process(id: u32, mut child: Child, deadline: Instant) -> Result<CloneReport, CloneError> {
    use std::io::Read;
    let perr = |msg: String| CloneError::Process { id, msg };
    // Drain pipes on threads so a chatty child cannot block on a full pipe.
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_string(&mut s);
        }
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    });
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(CloneError::JoinTimeout(id));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(perr(format!("wait: {e}"))),
        }
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    if let Some(r) = stdout.lines().find_map(CloneReport::from_line) {
        if status.success() {
            return Ok(r);
        }
    }
    let last = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    Err(perr(format!("exited with {status}: {last}")))
}
