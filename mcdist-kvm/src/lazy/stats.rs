//! Per-clone lazy-memory counters and the fault-latency histogram.

use std::time::{Duration, Instant};

/// Fault latencies (fault event read → page installed), in nanoseconds.
#[derive(Debug, Clone, Default)]
pub struct LatencyHistogram {
    samples: Vec<u64>,
}

impl LatencyHistogram {
    /// Adds one sample.
    pub fn record(&mut self, d: Duration) {
        self.samples
            .push(d.as_nanos().min(u128::from(u64::MAX)) as u64);
    }
    /// Number of samples.
    pub fn count(&self) -> usize {
        self.samples.len()
    }
    /// The `q`-quantile (0.0..=1.0), or `None` without samples.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.samples.is_empty() {
            return None;
        }
        let mut s = self.samples.clone();
        s.sort_unstable();
        let idx = ((s.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        Some(Duration::from_nanos(s[idx]))
    }
    /// The `q`-quantile in nanoseconds, 0 without samples (for report lines).
    pub fn quantile_ns(&self, q: f64) -> u128 {
        self.quantile(q).map_or(0, |d| d.as_nanos())
    }
    /// Counts per power-of-two bucket: `(upper bound, count)` for non-empty buckets.
    pub fn buckets(&self) -> Vec<(Duration, u64)> {
        let mut b = [0u64; 64];
        for &s in &self.samples {
            b[(64 - s.max(1).leading_zeros()) as usize - 1] += 1;
        }
        b.iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(i, &c)| (Duration::from_nanos(1u64 << (i + 1).min(63)), c))
            .collect()
    }
    /// Merges another histogram into this one.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        self.samples.extend_from_slice(&other.samples);
    }
}

/// Per-clone lazy-memory statistics.
#[derive(Debug, Clone, Default)]
pub struct LazyStats {
    /// Fault events for pages that had to be fetched.
    pub demand_faults: u64,
    /// Distinct pages requested from the fetcher.
    pub pages_requested: u64,
    /// Pages installed because a fault asked for them.
    pub pages_demand: u64,
    /// Pages installed before any fault asked, pushed by the server.
    pub pages_pushed: u64,
    /// Pages installed before any fault asked, because [`super::LazyMemory::prefetch`]
    /// asked for them.
    pub pages_prefetched: u64,
    /// Zero pages filled locally.
    pub zero_pages: u64,
    /// Deliveries of pages already present (`EEXIST` or repeated delivery).
    pub duplicates: u64,
    /// Deliveries for pages that the zero map lists as zero (should stay 0).
    pub zero_pages_received: u64,
    /// Page bytes delivered by the fetcher.
    pub bytes_received: u64,
    /// Fault latency, fault read → page installed, for fetched pages.
    pub fault_latency: LatencyHistogram,
}

impl LazyStats {
    /// Pages whose contents came from the fetcher.
    pub fn pages_fetched(&self) -> u64 {
        self.pages_demand + self.pages_pushed + self.pages_prefetched
    }
}

/// Timestamps of one demand fault, kept when [`super::LazyConfig::trace_faults`] is on (for
/// benches: where a fault's time goes). All read the same monotonic clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultStamps {
    /// The page.
    pub pfn: u64,
    /// The first fault event on the page was read from the userfaultfd.
    pub read: Instant,
    /// The coordinator found the page missing and handed it to the fetcher.
    pub asked: Instant,
    /// The fetcher's `request` returned (for a network fetcher: the request was sent).
    /// `None` when the page was installed before it returned (a local fetcher).
    pub sent: Option<Instant>,
    /// The datagram that carried the page was received (inline fetchers that tell;
    /// `None` otherwise).
    pub received: Option<Instant>,
    /// The page was handed to the memory (after its verification, for mcdist).
    pub delivered: Instant,
    /// `UFFDIO_COPY` returned: the page is present and the faulting thread woken.
    pub installed: Instant,
}
