//! Results: one run's measurements, the text and Markdown tables, CSV out and
//! back in, medians over repetitions and the summary against the goals.

use super::Tool;
use std::fmt::Write as _;

/// One measured configuration.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// Tool.
    pub tool: Tool,
    /// Which repetition of the configuration this is (1-based).
    pub rep: usize,
    /// Receivers.
    pub receivers: usize,
    /// Injected receive loss, percent.
    pub loss_percent: f64,
    /// Seconds from starting the sender until the last receiver finished.
    pub secs: f64,
    /// Bytes the sender's interface transmitted (Ethernet frames).
    pub server_bytes: u64,
    /// CPU seconds (user + system) the sender and every receiver used.
    pub cpu_secs: f64,
    /// Image size.
    pub image_bytes: u64,
    /// Every receiver ended with a byte-identical copy.
    pub ok: bool,
    /// What went wrong, if anything.
    pub note: String,
}

impl RunResult {
    /// Server bytes per image byte.
    pub fn ratio(&self) -> f64 {
        self.server_bytes as f64 / self.image_bytes.max(1) as f64
    }

    /// Goodput per receiver, MB/s.
    pub fn mbps(&self) -> f64 {
        if self.secs > 0.0 {
            self.image_bytes as f64 / self.secs / 1e6
        } else {
            0.0
        }
    }

    /// The measured cells the text and Markdown tables share, in their order: tool,
    /// receivers, loss % (with `loss_decimals`), seconds, MB/s, CPU seconds, server
    /// bytes per image byte.
    fn cells(&self, loss_decimals: usize) -> [String; 7] {
        [
            self.tool.name().to_string(),
            self.receivers.to_string(),
            format!("{:.*}", loss_decimals, self.loss_percent),
            format!("{:.2}", self.secs),
            format!("{:.1}", self.mbps()),
            format!("{:.2}", self.cpu_secs),
            format!("{:.3}", self.ratio()),
        ]
    }

    /// Header line of the text table.
    pub fn table_header() -> String {
        text_line(
            &[
                "tool",
                "N",
                "loss%",
                "time s",
                "MB/s",
                "cpu s",
                "srv bytes/img",
                "ok",
            ],
            "note",
        )
    }

    /// One line of the text table.
    pub fn table_row(&self) -> String {
        let cells = self.cells(1);
        let mut line: Vec<&str> = cells.iter().map(String::as_str).collect();
        line.push(if self.ok { "yes" } else { "NO" });
        text_line(&line, &self.note)
    }
}

/// Widths of the text table's columns before the note (negative: left-aligned).
const TEXT_WIDTHS: [i8; 8] = [-15, 3, 6, 9, 9, 8, 13, 4];

/// One line of the text table: `cells` padded to [`TEXT_WIDTHS`], then the note.
fn text_line(cells: &[&str], note: &str) -> String {
    let mut s = String::new();
    for (i, (c, w)) in cells.iter().zip(TEXT_WIDTHS).enumerate() {
        let sep = if i == 0 { "" } else { " " };
        let width = usize::from(w.unsigned_abs());
        let _ = if w < 0 {
            write!(s, "{sep}{c:<width$}")
        } else {
            write!(s, "{sep}{c:>width$}")
        };
    }
    let _ = write!(s, "  {note}");
    s
}

/// Results as CSV.
pub fn to_csv(rs: &[RunResult]) -> String {
    let mut s = String::from(
        "tool,rep,receivers,loss_percent,seconds,mb_per_s,cpu_seconds,server_bytes,image_bytes,server_bytes_per_image_byte,ok,note\n",
    );
    for r in rs {
        let _ = writeln!(
            s,
            "{},{},{},{},{:.3},{:.2},{:.2},{},{},{:.4},{},\"{}\"",
            r.tool.name(),
            r.rep,
            r.receivers,
            r.loss_percent,
            r.secs,
            r.mbps(),
            r.cpu_secs,
            r.server_bytes,
            r.image_bytes,
            r.ratio(),
            r.ok,
            r.note.replace('"', "'")
        );
    }
    s
}

/// Results read back from [`to_csv`]'s output (also from files written before the `rep`
/// column existed).
pub fn from_csv(text: &str) -> Result<Vec<RunResult>, String> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().ok_or("empty file")?.split(',').collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .ok_or_else(|| format!("no column {name:?}"))
    };
    let (tool, n, loss, secs, cpu, sb, ib, ok) = (
        col("tool")?,
        col("receivers")?,
        col("loss_percent")?,
        col("seconds")?,
        col("cpu_seconds")?,
        col("server_bytes")?,
        col("image_bytes")?,
        col("ok")?,
    );
    let rep = col("rep").ok();
    let note = col("note")?;
    let mut out = Vec::new();
    for (i, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        // The note is last and quoted; it may hold commas.
        let f: Vec<&str> = line.splitn(header.len(), ',').collect();
        let bad = |what: &str| format!("line {}: bad {what}", i + 2);
        let get = |c: usize| f.get(c).copied().ok_or_else(|| bad("field count"));
        out.push(RunResult {
            tool: Tool::from_name(get(tool)?).ok_or_else(|| bad("tool"))?,
            rep: match rep {
                Some(c) => get(c)?.parse().map_err(|_| bad("rep"))?,
                None => 1,
            },
            receivers: get(n)?.parse().map_err(|_| bad("receivers"))?,
            loss_percent: get(loss)?.parse().map_err(|_| bad("loss_percent"))?,
            secs: get(secs)?.parse().map_err(|_| bad("seconds"))?,
            server_bytes: get(sb)?.parse().map_err(|_| bad("server_bytes"))?,
            cpu_secs: get(cpu)?.parse().map_err(|_| bad("cpu_seconds"))?,
            image_bytes: get(ib)?.parse().map_err(|_| bad("image_bytes"))?,
            ok: get(ok)?.parse().map_err(|_| bad("ok"))?,
            note: get(note)?.trim_matches('"').to_string(),
        });
    }
    Ok(out)
}

/// One result per configuration (tool, receivers, loss), in the order first run: the
/// median time, CPU time and server bytes of its successful repetitions (every field of the
/// single run when there was one). A configuration with a failed repetition is marked
/// failed, with the count in its note.
pub fn medians(rs: &[RunResult]) -> Vec<RunResult> {
    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => 0.0,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }
    let mut out: Vec<RunResult> = Vec::new();
    for r in rs {
        let same = |o: &RunResult| {
            o.tool == r.tool && o.receivers == r.receivers && o.loss_percent == r.loss_percent
        };
        if out.iter().any(same) {
            continue;
        }
        let all: Vec<&RunResult> = rs.iter().filter(|o| same(o)).collect();
        let good: Vec<&RunResult> = all.iter().copied().filter(|o| o.ok).collect();
        let mut m = (*good.first().unwrap_or(&r)).clone();
        if !good.is_empty() {
            m.secs = median(good.iter().map(|o| o.secs).collect());
            m.cpu_secs = median(good.iter().map(|o| o.cpu_secs).collect());
            m.server_bytes = median(good.iter().map(|o| o.server_bytes as f64).collect()) as u64;
        }
        m.rep = all.len();
        if good.len() < all.len() && all.len() > 1 {
            m.ok = false;
            let why = all
                .iter()
                .find(|o| !o.ok)
                .map_or(String::new(), |o| o.note.clone());
            m.note = format!(
                "{} of {} runs failed: {why}",
                all.len() - good.len(),
                all.len()
            );
        }
        out.push(m);
    }
    out
}

/// The markdown table of `rs` (one row per result).
pub fn to_markdown(rs: &[RunResult]) -> String {
    let mut s = String::from(
        "| tool | N | loss % | time s | MB/s per receiver | CPU s (all processes) | server bytes / image | ok |\n|---|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rs {
        let ok = if r.ok {
            "yes".to_string()
        } else {
            format!("no: {}", r.note)
        };
        let _ = writeln!(s, "| {} | {ok} |", r.cells(0).join(" | "));
    }
    s
}

fn find(rs: &[RunResult], tool: Tool, n: usize, loss: f64) -> Option<&RunResult> {
    rs.iter()
        .find(|r| r.tool == tool && r.receivers == n && r.loss_percent == loss && r.ok)
}

/// mcdist's (and mcdist-fec's) time and CPU seconds against each peer that
/// finished the same configuration (receivers and loss), one line per pair.
fn peer_ratios(rs: &[RunResult]) -> Vec<String> {
    let mut out = Vec::new();
    for m in rs
        .iter()
        .filter(|r| r.ok && matches!(r.tool, Tool::Mcdist | Tool::McdistFec))
    {
        for peer in [Tool::Uftp, Tool::Udpcast, Tool::UdpcastFec] {
            let Some(p) = find(rs, peer, m.receivers, m.loss_percent) else {
                continue;
            };
            out.push(format!(
                "N={} loss {}%: {} vs {}: {:.2}x time ({:.2} s / {:.2} s), {:.2}x CPU ({:.2} / {:.2} CPU s)",
                m.receivers,
                m.loss_percent,
                m.tool.name(),
                p.tool.name(),
                m.secs / p.secs.max(1e-9),
                m.secs,
                p.secs,
                m.cpu_secs / p.cpu_secs.max(1e-9),
                m.cpu_secs,
                p.cpu_secs
            ));
        }
    }
    out
}

/// The goals, computed from the results that exist.
pub fn summary(rs: &[RunResult]) -> String {
    let mut s = String::new();
    let mut ns: Vec<usize> = rs.iter().map(|r| r.receivers).collect();
    ns.sort_unstable();
    ns.dedup();
    for &n in &ns {
        let m = find(rs, Tool::Mcdist, n, 0.0);
        let peers = [Tool::Uftp, Tool::Udpcast]
            .iter()
            .filter_map(|t| find(rs, *t, n, 0.0))
            .min_by(|a, b| a.secs.total_cmp(&b.secs));
        if let (Some(m), Some(p)) = (m, peers) {
            let _ = writeln!(
                s,
                "N={n}: mcdist {:.2} s vs fastest peer {} {:.2} s = {:.2}x",
                m.secs,
                p.tool.name(),
                p.secs,
                m.secs / p.secs
            );
        }
    }
    for line in peer_ratios(rs) {
        let _ = writeln!(s, "{line}");
    }
    // Each build under test against the --baseline build run the same way.
    for tool in [Tool::Mcdist, Tool::McdistFec] {
        let Some(base) = tool.baseline() else {
            continue;
        };
        for m in rs.iter().filter(|r| r.ok && r.tool == tool) {
            let Some(b) = find(rs, base, m.receivers, m.loss_percent).filter(|b| b.ok) else {
                continue;
            };
            let _ = writeln!(
                s,
                "N={} loss {}%: {} {:.2} s, {:.2} CPU s vs {} {:.2} s, {:.2} CPU s = {:.2}x time, {:.2}x CPU",
                m.receivers,
                m.loss_percent,
                tool.name(),
                m.secs,
                m.cpu_secs,
                base.name(),
                b.secs,
                b.cpu_secs,
                m.secs / b.secs.max(1e-9),
                m.cpu_secs / b.cpu_secs.max(1e-9)
            );
        }
    }
    for r in rs.iter().filter(|r| r.ok && r.tool != Tool::McdistUnicast) {
        if matches!(
            r.tool,
            Tool::Mcdist
                | Tool::McdistBase
                | Tool::McdistBaseFec
                | Tool::McdistFec
                | Tool::McdistGso
                | Tool::McdistNoGso
        ) {
            let _ = writeln!(
                s,
                "{} N={} loss {}%: server bytes / image = {:.3}",
                r.tool.name(),
                r.receivers,
                r.loss_percent,
                r.ratio()
            );
        }
    }
    s
}
