//! The demo's tables: one row per clone, the server's counters, the sharing comparison.

use std::time::Duration;

use mcdist::node::ServerSnapshot;
use mcdist_kvm::clone::{CloneError, CloneReport};
use mcdist_kvm::guest::HashJob;
use mcdist_kvm::lazy::LatencyHistogram;

use crate::hosts::HostRun;
use crate::GenTotals;

pub(crate) fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

pub(crate) fn us(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64() * 1e6))
}

/// Prints one row per clone; returns the number of failed or wrong clones, the totals and
/// the fault latencies of all clones.
pub(crate) fn print_clones(
    job: &HashJob,
    results: &[(u32, Result<CloneReport, CloneError>)],
) -> (usize, GenTotals, LatencyHistogram) {
    println!(
        "{:>3} {:>10} {:>4} {:>7} {:>7} {:>7} {:>8} {:>6} {:>9} {:>9} {:>9} {:>11} {:>9}",
        "id",
        "result",
        "ok",
        "faults",
        "demand",
        "pushed",
        "prefetch",
        "zero",
        "MiB inst",
        "p50 µs",
        "p99 µs",
        "1st insn ms",
        "total ms"
    );
    let mut bad = 0;
    let mut totals = GenTotals::default();
    let mut latency = LatencyHistogram::default();
    for (id, r) in results {
        match r {
            Ok(r) => {
                let ok = r.result == job.expected(*id);
                bad += usize::from(!ok);
                let s = &r.stats;
                totals.demand_faults += s.demand_faults;
                totals.pages_pushed += s.pages_pushed;
                totals.pages_prefetched += s.pages_prefetched;
                totals.clones += 1;
                totals.working_set.extend_from_slice(&r.working_set);
                latency.merge(&s.fault_latency);
                println!(
                    "{:>3} {:>#10x} {:>4} {:>7} {:>7} {:>7} {:>8} {:>6} {:>9.1} {:>9} {:>9} {:>11} {:>9}",
                    id,
                    r.result,
                    if ok { "yes" } else { "NO" },
                    s.demand_faults,
                    s.pages_demand,
                    s.pages_pushed,
                    s.pages_prefetched,
                    s.zero_pages,
                    s.bytes_received as f64 / f64::from(1 << 20),
                    us(s.fault_latency.quantile(0.5)),
                    us(s.fault_latency.quantile(0.99)),
                    ms(r.time_to_first_instruction),
                    ms(r.total)
                );
            }
            Err(e) => {
                bad += 1;
                println!("{id:>3} error: {e}");
            }
        }
    }
    totals.working_set.sort_unstable();
    totals.working_set.dedup();
    (bad, totals, latency)
}

pub(crate) fn print_server(s: &ServerSnapshot) {
    println!(
        "\nserver: {} pages sent ({} demand, {} push, {} working-set push), {} working-set hints for {} pages, {:.1} MiB, {} zero replies, {} request datagrams for {} pages; asks suppressed: {} queued, {} lockstep window, {} answer in flight",
        s.stats.pages_sent,
        s.stats.demand_pages,
        s.stats.push_pages,
        s.stats.ws_push_pages,
        s.stats.hint_datagrams,
        s.stats.hint_pages,
        s.stats.bytes_sent as f64 / f64::from(1 << 20),
        s.stats.zero_replies,
        s.stats.requests,
        s.stats.pages_requested,
        s.stats.suppressed_queued,
        s.stats.suppressed_lockstep,
        s.stats.suppressed_in_flight,
    );
}

/// One row per run: what sharing changed.
pub(crate) fn print_comparison(rows: &[(bool, HostRun)], processes: bool) {
    if processes {
        println!("\n(clone processes: p50 is the median of the clones' p50, p99 the largest p99)");
    }
    println!(
        "\n{:>7} {:>9} {:>12} {:>11} {:>14} {:>11} {:>15} {:>8} {:>8} {:>8}",
        "sharing",
        "receivers",
        "server pages",
        "server reqs",
        "host UDP dgrams",
        "host MiB rx",
        "pages in clones",
        "wall ms",
        "p50 µs",
        "p99 µs"
    );
    for (share, r) in rows {
        // Clone processes with their own clients report no socket counters.
        let mib = if r.traffic.clients == 0 {
            "-".to_string()
        } else {
            format!(
                "{:.1}",
                r.traffic.bytes_received as f64 / f64::from(1 << 20)
            )
        };
        println!(
            "{:>7} {:>9} {:>12} {:>11} {:>14} {:>11} {:>15} {:>8} {:>8} {:>8}",
            if *share { "on" } else { "off" },
            r.server.clients,
            r.server.stats.pages_sent,
            r.server.stats.requests,
            r.traffic.udp_datagrams,
            mib,
            r.installed,
            ms(r.wall),
            us(r.quantiles(processes).0),
            us(r.quantiles(processes).1),
        );
    }
}
