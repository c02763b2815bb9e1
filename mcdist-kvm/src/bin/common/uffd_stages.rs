//! Where the time of one fault goes on the real path, userfaultfd side included.
//!
//! A thread touches one byte of each page of a lazy memory (`LazyMemory::read`) and stamps
//! the touch and its return; the fault thread keeps its own stamps of each demand fault
//! (`LazyConfig::trace_faults`: fault event read, fetcher asked, request returned, page
//! datagram received, page verified and handed over, `UFFDIO_COPY` returned). Joined by page,
//! they give the stages below; a stage a handler does not have (a local file has no
//! request; the threaded client does not tell when the datagram came) reads "-".
//! `UFFDIO_COPY` wakes the faulting thread, which usually runs (on the other core, or in
//! place of the handler) before the ioctl returns: the last stage ends at the touch's
//! return, and the ioctl's own duration is shown within it.

use mcdist_kvm::lazy::LatencyHistogram;
use mcdist_kvm::FaultStamps;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The stages, in order; indented ones split the stage above them.
pub const STAGES: [&str; 9] = [
    "touch -> fault event read",
    "fault read -> fetcher asked",
    "asked -> page in hand (verified)",
    "  asked -> request sent",
    "  request sent -> page received",
    "  page received -> verified",
    "in hand -> touch returned",
    "  (UFFDIO_COPY call: in hand -> returned)",
    "total (touch -> returned)",
];

/// Per-stage samples of one handler.
#[derive(Debug, Clone, Default)]
pub struct StageSamples {
    stages: [LatencyHistogram; STAGES.len()],
    /// Touches that faulted but left no trace (a page another fault already asked for).
    pub untraced: usize,
}

/// `b - a`, zero when `b` came first (a woken thread may run before its waker's system
/// call returns), so that every fault has every stage its handler has.
fn span(a: Instant, b: Instant) -> Option<Duration> {
    Some(b.saturating_duration_since(a))
}

impl StageSamples {
    /// Adds the touches `(pfn, touched, returned)` joined with the fault thread's `trace`.
    pub fn add(&mut self, touches: &[(u64, Instant, Instant)], trace: &[FaultStamps]) {
        let by_pfn: HashMap<u64, &FaultStamps> = trace.iter().map(|s| (s.pfn, s)).collect();
        for &(pfn, touched, back) in touches {
            let Some(s) = by_pfn.get(&pfn) else {
                self.untraced += 1;
                continue;
            };
            let stages = [
                span(touched, s.read),
                span(s.read, s.asked),
                span(s.asked, s.delivered),
                s.sent.and_then(|t| span(s.asked, t)),
                s.sent.zip(s.received).and_then(|(t, r)| span(t, r)),
                s.received.and_then(|r| span(r, s.delivered)),
                span(s.delivered, back),
                span(s.delivered, s.installed),
                span(touched, back),
            ];
            for (h, d) in self.stages.iter_mut().zip(stages) {
                if let Some(d) = d {
                    h.record(d);
                }
            }
        }
    }

    /// Faults timed (touches joined with a trace).
    pub fn count(&self) -> usize {
        self.stages[STAGES.len() - 1].count()
    }

    /// The `q`-quantile of stage `k` in µs, if it has samples.
    pub fn quantile_us(&self, k: usize, q: f64) -> Option<f64> {
        self.stages[k].quantile(q).map(|d| d.as_secs_f64() * 1e6)
    }
}

/// Prints one column per handler: the p50 of each stage, then the p99 of the total.
pub fn print(names: &[&str], samples: &[StageSamples]) {
    print!("{:<36}", "stage (p50 µs)");
    for n in names {
        print!(" {n:>9}");
    }
    println!();
    let cell = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
    for (k, stage) in STAGES.iter().enumerate() {
        print!("{stage:<36}");
        for s in samples {
            print!(" {:>9}", cell(s.quantile_us(k, 0.5)));
        }
        println!();
    }
    print!("{:<36}", "total p99");
    for s in samples {
        print!(" {:>9}", cell(s.quantile_us(STAGES.len() - 1, 0.99)));
    }
    println!();
    print!("{:<36}", "faults timed / untraced");
    for s in samples {
        print!(" {:>9}", format!("{}/{}", s.count(), s.untraced));
    }
    println!();
}
