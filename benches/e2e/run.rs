//! The settings every run shares ([`Bench`]), the scratch space, the test image,
//! and one measured run: loss on, counters read, the tool's launch, every copy
//! verified, logs kept.

use super::netns::{children_cpu_secs, set_loss, tx_bytes};
use super::pressure::{CpuHog, StallSpec};
use super::runner::Site;
use super::{RunResult, Tool};
use mcdist::testnet::Topology;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A scratch directory, deleted on drop.
#[derive(Debug)]
pub struct WorkDir {
    dir: tempfile::TempDir,
}

impl WorkDir {
    /// A fresh directory under `parent`, or else in shared memory (`/dev/shm`,
    /// so that every tool's receivers write to memory and the disk does not
    /// enter the comparison), or else the system temp dir.
    pub fn new(parent: Option<&Path>) -> io::Result<WorkDir> {
        let shm = Path::new("/dev/shm");
        let mut b = tempfile::Builder::new();
        b.prefix("mcdist-bench");
        let dir = match parent {
            Some(p) => b.tempdir_in(p)?,
            None if shm.is_dir() => b.tempdir_in(shm)?,
            None => b.tempdir()?,
        };
        Ok(WorkDir { dir })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Settings shared by every run.
#[derive(Debug)]
pub struct Bench {
    /// The mcdist binary.
    pub mcdist: PathBuf,
    /// Another mcdist build, run as `mcdist-base`.
    pub baseline: Option<PathBuf>,
    /// Image size in bytes.
    pub image_bytes: u64,
    /// Send-rate cap, Mbit/s, for every tool.
    pub rate_mbit: u64,
    /// Link MTU.
    pub mtu: u32,
    /// Share of all-zero pages in the image.
    pub zero_percent: u32,
    /// Per-run limit.
    pub run_timeout: Duration,
    /// Scratch space.
    pub work: WorkDir,
    /// Copy each run's sender and receiver logs here.
    pub keep_logs: Option<PathBuf>,
    /// Receiver 1 of every tool writes its copy here (on a disk), not in `work`.
    pub disk_receiver: Option<WorkDir>,
    /// Keep one core busy during every run.
    pub cpu_hog: bool,
    /// Stop every receiver for this long in every period, in turn.
    pub stalls: Option<StallSpec>,
}

/// `text` without terminal colour sequences (`ESC [ ... m`), which builds of mcdist before
/// it wrote to log files too (a `--baseline` may be one).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Receivers the sender's log says it isolated as too slow, by reason
/// (mcdist only: `reason=...` of its "receiver cannot keep up" warning), e.g.
/// `isolated: 1 overload`.
pub(super) fn isolations(tx_log: &Path) -> Option<String> {
    let text = strip_ansi(&std::fs::read_to_string(tx_log).ok()?);
    let mut by: Vec<(String, u32)> = Vec::new();
    for line in text
        .lines()
        .filter(|l| l.contains("receiver cannot keep up"))
    {
        let reason = line
            .split("reason=")
            .nth(1)
            .map(|r| {
                r.split(" loss_permille")
                    .next()
                    .unwrap_or(r)
                    .trim()
                    .to_string()
            })
            .unwrap_or_else(|| "unknown".into());
        match by.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => by.push((reason, 1)),
        }
    }
    if by.is_empty() {
        return None;
    }
    let parts: Vec<String> = by.iter().map(|(r, n)| format!("{n} {r}")).collect();
    Some(format!("isolated: {}", parts.join(", ")))
}

impl Bench {
    pub(super) fn image_path(&self) -> PathBuf {
        self.work.path().join("src").join("image")
    }

    /// Where receiver `i` of the run in `dir` keeps its copy: `dir`, or for receiver 1
    /// under `--disk-receiver` a directory of the same name on the disk (made and removed
    /// with `dir` by [`Bench::run`]).
    pub(super) fn receiver_dir(&self, dir: &Path, i: usize) -> PathBuf {
        match (&self.disk_receiver, dir.file_name()) {
            (Some(d), Some(name)) if i == 1 => d.path().join(name),
            _ => dir.to_path_buf(),
        }
    }

    /// Write the pseudo-random image (with `zero_percent` of pages zero).
    pub fn make_image(&self) -> io::Result<()> {
        let path = self.image_path();
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p)?;
        }
        let mut f = io::BufWriter::new(std::fs::File::create(&path)?);
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut page = vec![0u8; 4096];
        let pages = self.image_bytes / 4096;
        for i in 0..pages {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if (x % 100) < u64::from(self.zero_percent) {
                page.fill(0);
            } else {
                for c in page.chunks_exact_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    c.copy_from_slice(&(x ^ i).to_le_bytes());
                }
            }
            f.write_all(&page)?;
        }
        f.flush()
    }

    fn image_digest(&self) -> io::Result<[u8; 32]> {
        mcdist::source::file_digest(&self.image_path())
    }

    /// Run `tool` to `n` receivers with `loss` percent receive loss, as repetition `rep`
    /// (from 1) of the configuration; `rep` 0 is a warm-up run (`--warmup`), whose
    /// kept logs go to a folder of their own.
    pub fn run(
        &self,
        topo: &Topology,
        subnet: u8,
        tool: Tool,
        n: usize,
        loss: f64,
        rep: usize,
    ) -> RunResult {
        let mut r = RunResult {
            tool,
            rep,
            receivers: n,
            loss_percent: loss,
            secs: 0.0,
            server_bytes: 0,
            cpu_secs: 0.0,
            image_bytes: self.image_bytes,
            ok: false,
            note: String::new(),
        };
        let dir = self.work.path().join(format!("run-{}-{n}", tool.name()));
        let disk = self.receiver_dir(&dir, 1);
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&disk);
        if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::create_dir_all(&disk))
        {
            r.note = format!("scratch dir: {e}");
            return r;
        }
        if let Err(e) = set_loss(topo, n, loss) {
            r.note = format!("loss injection: {e}");
            return r;
        }
        let before = tx_bytes(topo);
        let cpu_before = children_cpu_secs();
        let site = Site {
            topo,
            subnet,
            n,
            dir: &dir,
        };
        let hog = self.cpu_hog.then(CpuHog::start);
        let outcome = self
            .launch_plan(site, tool)
            .and_then(|plan| self.launch(plan, &dir));
        drop(hog);
        let after = tx_bytes(topo);
        r.cpu_secs = (children_cpu_secs() - cpu_before).max(0.0);
        let _ = set_loss(topo, n, 0.0);
        match (before, after) {
            (Ok(b), Ok(a)) => r.server_bytes = a.saturating_sub(b),
            (Err(e), _) | (_, Err(e)) => r.note = format!("tx counter: {e}; "),
        }
        match outcome {
            Ok((secs, outputs)) => {
                r.secs = secs;
                match self.verify(&outputs) {
                    Ok(()) => r.ok = true,
                    Err(e) => r.note.push_str(&e),
                }
            }
            Err(e) => r.note.push_str(&e),
        }
        if let Some(iso) = isolations(&dir.join("tx.log")) {
            if !r.note.is_empty() {
                r.note.push_str("; ");
            }
            r.note.push_str(&iso);
        }
        if let Some(keep) = &self.keep_logs {
            // Repetitions after the first get their own folder, and so does a warm-up.
            let again = match rep {
                0 => "-warmup".to_string(),
                1 => String::new(),
                _ => format!("-rep{rep}"),
            };
            let to = keep.join(format!("{}-n{n}-loss{loss}{again}", tool.name()));
            if std::fs::create_dir_all(&to).is_ok() {
                if let Ok(rd) = std::fs::read_dir(&dir) {
                    for e in rd.flatten() {
                        let p = e.path();
                        if p.extension().is_some_and(|x| x == "log") {
                            let _ = std::fs::copy(&p, to.join(e.file_name()));
                        }
                    }
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&disk);
        r
    }

    fn verify(&self, outputs: &[PathBuf]) -> Result<(), String> {
        let want = self
            .image_digest()
            .map_err(|e| format!("hashing the image: {e}"))?;
        let mut bad = 0;
        for o in outputs {
            match mcdist::source::file_digest(o) {
                Ok(d) if d == want => {}
                _ => bad += 1,
            }
        }
        if bad == 0 {
            Ok(())
        } else {
            Err(format!("{bad}/{} copies missing or wrong", outputs.len()))
        }
    }

    fn rate_bytes(&self) -> u64 {
        self.rate_mbit * 125_000
    }

    /// Bytes per second the rate cap allows (for reports).
    pub fn cap_bytes_per_sec(&self) -> u64 {
        self.rate_bytes()
    }
}
