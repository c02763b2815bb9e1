//! Where clones run: threads of this process ([`LocalLauncher`], [`ThreadLauncher`]) or child
//! processes ([`ProcessLauncher`]); [`CloneSet`] joins or kills them.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{run_clone, CloneError, CloneOptions, CloneReport};
use crate::descriptor::Descriptor;
use crate::lazy::{LazyHandle, PageFetcher, SourceFetcher};
use crate::source::PageSource;

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
        spawn_thread(id, move || {
            run_clone(&desc, id, &me.opts, |h| {
                Ok(Arc::new(SourceFetcher::new(me.source.clone(), h)) as Arc<dyn PageFetcher>)
            })
        })
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
        spawn_thread(id, move || {
            run_clone(&desc, id, &opts, |h| mk(id, &desc, h))
        })
    }
}

/// Runs clone `id` as a thread of this process.
fn spawn_thread(
    id: u32,
    body: impl FnOnce() -> Result<CloneReport, CloneError> + Send + 'static,
) -> Result<RunningClone, CloneError> {
    let handle = std::thread::Builder::new()
        .name(format!("clone-{id}"))
        .spawn(body)
        .map_err(|source| CloneError::Spawn {
            id,
            what: "thread",
            source,
        })?;
    Ok(RunningClone::Thread {
        handle,
        killed: Arc::new(AtomicBool::new(false)),
    })
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
            .map_err(|source| CloneError::Spawn {
                id,
                what: "spawn",
                source,
            })?;
        Ok(RunningClone::Process(child))
    }
}

/// Clones started from one ticket.
#[derive(Debug)]
pub struct CloneSet {
    pub(super) clones: Vec<(u32, Result<RunningClone, CloneError>)>,
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
            Err(source) => {
                return Err(CloneError::Spawn {
                    id,
                    what: "wait",
                    source,
                })
            }
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
    Err(CloneError::ProcessFailed {
        id,
        status,
        stderr: last.to_string(),
    })
}
