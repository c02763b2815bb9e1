//! The one-line text form of a [`CloneReport`] that clone processes print and launchers parse.

use std::time::Duration;

use super::CloneReport;
use crate::lazy::LazyStats;

impl CloneReport {
    /// One-line text form printed by `mcdist-clone`.
    pub fn to_line(&self) -> String {
        let q = |x: f64| self.stats.fault_latency.quantile_ns(x);
        format!(
            "MCDIST-CLONE id={} result={} faults={} requested={} demand={} pushed={} prefetched={} zero={} dup={} zero_recv={} bytes={} p50_ns={} p99_ns={} first_ns={} total_ns={}",
            self.id,
            self.result,
            self.stats.demand_faults,
            self.stats.pages_requested,
            self.stats.pages_demand,
            self.stats.pages_pushed,
            self.stats.pages_prefetched,
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
            // Absent from the lines of builds before prefetching.
            pages_prefetched: f("prefetched").unwrap_or(0) as u64,
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
            prefetched: None,
            working_set: Vec::new(),
        })
    }
}
