//! The settings every run shares ([`Bench`]), the scratch space, the test image,
//! and one measured run: loss on, counters read, the tool's launch, every copy
//! verified, logs kept.

use super::netns::{children_cpu_secs, set_loss, tx_bytes};
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
}

impl Bench {
    pub(super) fn image_path(&self) -> PathBuf {
        self.work.path().join("src").join("image")
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

    /// Run `tool` to `n` receivers with `loss` percent receive loss.
    pub fn run(&self, topo: &Topology, subnet: u8, tool: Tool, n: usize, loss: f64) -> RunResult {
        let mut r = RunResult {
            tool,
            rep: 1,
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
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = std::fs::create_dir_all(&dir) {
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
        let outcome = self
            .launch_plan(site, tool, loss)
            .and_then(|plan| self.launch(plan, &dir));
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
        if let Some(keep) = &self.keep_logs {
            let to = keep.join(format!("{}-n{n}-loss{loss}", tool.name()));
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
