//! Pressure during a run: a core kept busy, and receivers descheduled in turn.

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A thread running `work` until dropped: the flag it is given turns true, and the
/// drop waits for the thread to end.
struct StopThread {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StopThread {
    fn spawn(work: impl FnOnce(&AtomicBool) + Send + 'static) -> StopThread {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || work(&s));
        StopThread {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for StopThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A thread spinning on one core until dropped.
pub(super) struct CpuHog {
    _running: StopThread,
}

impl CpuHog {
    pub(super) fn start() -> CpuHog {
        let running = StopThread::spawn(|stop| {
            let mut x = 0u64;
            while !stop.load(Ordering::Relaxed) {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        });
        CpuHog { _running: running }
    }
}

/// Receivers stopped for `stall` in every `every` (`--stall-receivers STALL/EVERY[:N]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StallSpec {
    /// How long each stop lasts.
    pub stall: Duration,
    /// Period.
    pub every: Duration,
    /// Only the first this many receivers stall (`None`: every one).
    pub receivers: Option<usize>,
    /// All of them at once, half a period in (a stall their hosts share: writeback,
    /// a paused host), instead of in turn.
    pub together: bool,
}

impl std::str::FromStr for StallSpec {
    type Err = String;

    /// `STALL/EVERY` in milliseconds, e.g. `20/200`; `:N` after it stalls only the first
    /// `N` receivers (`500/600:1`: receiver 1 alone, the others run freely); `:together`
    /// stalls them all at once (`150/1000:8:together`).
    fn from_str(s: &str) -> Result<StallSpec, String> {
        let bad = || {
            format!(
                "expected STALL/EVERY[:N][:together] in milliseconds with STALL < EVERY and N \
                 at least 1, e.g. 20/200, 500/600:1 or 150/1000:8:together, got {s:?}"
            )
        };
        let mut parts = s.split(':');
        let spec = parts.next().unwrap_or_default();
        let (mut count, mut together) = (None, false);
        for part in parts {
            match part.trim() {
                "together" if !together => together = true,
                n if count.is_none() && !together => {
                    count = Some(n.parse::<usize>().map_err(|_| bad())?);
                }
                _ => return Err(bad()),
            }
        }
        let (a, b) = spec.split_once('/').ok_or_else(bad)?;
        let ms = |x: &str| x.trim().parse::<u64>().map_err(|_| bad());
        let (stall, every) = (ms(a)?, ms(b)?);
        if stall == 0 || stall >= every || count == Some(0) {
            return Err(bad());
        }
        Ok(StallSpec {
            stall: Duration::from_millis(stall),
            every: Duration::from_millis(every),
            receivers: count,
            together,
        })
    }
}

/// Receivers behind a slower link (`--slow-link MBIT[:N]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlowLink {
    /// The link's rate, Mbit/s.
    pub mbit: u64,
    /// How many receivers (the first ones) are behind it.
    pub receivers: usize,
}

impl std::str::FromStr for SlowLink {
    type Err = String;

    /// `MBIT`, e.g. `200`, for receiver 1; `MBIT:N` for the first `N` receivers.
    fn from_str(s: &str) -> Result<SlowLink, String> {
        let bad =
            || format!("expected MBIT[:N] with both at least 1, e.g. 200 or 200:2, got {s:?}");
        let (mbit, n) = s.split_once(':').unwrap_or((s, "1"));
        let num = |x: &str| {
            x.trim()
                .parse::<u64>()
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(bad)
        };
        Ok(SlowLink {
            mbit: num(mbit)?,
            receivers: usize::try_from(num(n)?).map_err(|_| bad())?,
        })
    }
}

/// A thread that stops (`SIGSTOP`) and resumes (`SIGCONT`) processes in turn, as a
/// host's scheduler deschedules a receiver now and then when other work shares its
/// cores: process `i` of `n` is stopped for `stall` from `i × every / n` into every
/// period (all of them from `every / 2` with `together`). Dropping it resumes them all.
pub(super) struct Stalls {
    _running: StopThread,
}

impl Stalls {
    pub(super) fn start(pids: Vec<u32>, spec: StallSpec) -> Stalls {
        let running = StopThread::spawn(move |stop| {
            let pids: Vec<Pid> = pids
                .into_iter()
                .take(spec.receivers.unwrap_or(usize::MAX))
                .filter_map(|p| i32::try_from(p).ok().map(Pid::from_raw))
                .collect();
            let n = pids.len().max(1) as u128;
            let every = spec.every.as_nanos().max(1);
            let stall = spec.stall.as_nanos();
            let mut stopped = vec![false; pids.len()];
            let t0 = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let t = t0.elapsed().as_nanos();
                for (i, pid) in pids.iter().enumerate() {
                    let phase = if spec.together {
                        every / 2
                    } else {
                        every * i as u128 / n
                    };
                    let want = (t + every - phase) % every < stall;
                    if want != stopped[i] {
                        // A process that exited already cannot be signalled: nothing to do.
                        let signal = if want {
                            Signal::SIGSTOP
                        } else {
                            Signal::SIGCONT
                        };
                        let _ = kill(*pid, signal);
                        stopped[i] = want;
                    }
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            for pid in pids {
                let _ = kill(pid, Signal::SIGCONT);
            }
        });
        Stalls { _running: running }
    }
}
