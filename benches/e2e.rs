//! The end-to-end bench's runners and reports (used by the `mcdist-bench` binary).
//!
//! Each run starts the receivers of one tool in hosts 1..=N of a namespace
//! topology and its sender in host 0, injects receive-side loss with nftables
//! (`numgen random`) when asked, waits for every process, verifies every copy
//! against the image's BLAKE3 digest and reads the sender's interface byte
//! counter before and after.

use mcdist::testnet::Topology;
use std::fmt::Write as _;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Something that distributes a file to N receivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// mcdist over multicast.
    Mcdist,
    /// mcdist over multicast from another build (`--baseline PATH`), to compare two builds
    /// in the same run.
    McdistBase,
    /// mcdist over multicast with FEC repair symbols (when the binary offers `--fec`).
    McdistFec,
    /// mcdist with UDP GSO on the server and UDP GRO on the receivers (`--gso on`, `--gro on`).
    McdistGso,
    /// mcdist with UDP GSO and GRO off (`--gso off`, `--gro off`): one datagram per buffer.
    McdistNoGso,
    /// mcdist sending to each receiver by unicast.
    McdistUnicast,
    /// mcdist over multicast with a pre-shared key, authenticated only (`--key --auth-only`).
    McdistAuth,
    /// mcdist over multicast with a pre-shared key, encrypted (`--key`).
    McdistEnc,
    /// uftp / uftpd (Debian package `uftp`).
    Uftp,
    /// udp-sender / udp-receiver (Debian package `udpcast`).
    Udpcast,
    /// udpcast with its FEC (`--fec 8x8/128`).
    UdpcastFec,
}

impl Tool {
    /// Every tool, in table order.
    pub const ALL: [Tool; 8] = [
        Tool::Mcdist,
        Tool::McdistFec,
        Tool::McdistUnicast,
        Tool::McdistAuth,
        Tool::McdistEnc,
        Tool::Uftp,
        Tool::Udpcast,
        Tool::UdpcastFec,
    ];

    /// Every tool that can be named on the command line: [`Tool::ALL`] and
    /// variants run only when asked for.
    pub const NAMED: [Tool; 11] = [
        Tool::Mcdist,
        Tool::McdistBase,
        Tool::McdistFec,
        Tool::McdistGso,
        Tool::McdistNoGso,
        Tool::McdistUnicast,
        Tool::McdistAuth,
        Tool::McdistEnc,
        Tool::Uftp,
        Tool::Udpcast,
        Tool::UdpcastFec,
    ];

    /// Name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Tool::Mcdist => "mcdist",
            Tool::McdistBase => "mcdist-base",
            Tool::McdistFec => "mcdist-fec",
            Tool::McdistGso => "mcdist-gso",
            Tool::McdistNoGso => "mcdist-nogso",
            Tool::McdistUnicast => "mcdist-unicast",
            Tool::McdistAuth => "mcdist-auth",
            Tool::McdistEnc => "mcdist-enc",
            Tool::Uftp => "uftp",
            Tool::Udpcast => "udpcast",
            Tool::UdpcastFec => "udpcast-fec",
        }
    }

    /// Parse a name.
    pub fn from_name(s: &str) -> Option<Tool> {
        Tool::NAMED.into_iter().find(|t| t.name() == s)
    }

    /// True for the FEC variants.
    pub fn fec(self) -> bool {
        matches!(self, Tool::McdistFec | Tool::UdpcastFec)
    }

    /// Why this tool cannot run here, if it cannot.
    pub fn missing(self, bench: &Bench) -> Option<String> {
        match self {
            Tool::Mcdist | Tool::McdistUnicast | Tool::McdistAuth | Tool::McdistEnc => None,
            Tool::McdistBase => match &bench.baseline {
                Some(p) if p.is_file() => None,
                Some(p) => Some(format!("baseline binary {} not found", p.display())),
                None => Some("needs --baseline PATH (another mcdist build)".into()),
            },
            Tool::McdistGso | Tool::McdistNoGso => {
                let help = Command::new(&bench.mcdist)
                    .args(["serve", "--help"])
                    .output()
                    .ok()?;
                if String::from_utf8_lossy(&help.stdout).contains("--gso") {
                    None
                } else {
                    Some("this mcdist binary has no `serve --gso`".into())
                }
            }
            Tool::McdistFec => {
                let help = Command::new(&bench.mcdist)
                    .args(["serve", "--help"])
                    .output()
                    .ok()?;
                if String::from_utf8_lossy(&help.stdout).contains("--fec") {
                    None
                } else {
                    Some("this mcdist binary has no `serve --fec`".into())
                }
            }
            Tool::Uftp => ["uftp", "uftpd"]
                .iter()
                .find(|p| !on_path(p))
                .map(|p| format!("`{p}` not installed (Debian package uftp)")),
            Tool::Udpcast | Tool::UdpcastFec => ["udp-sender", "udp-receiver"]
                .iter()
                .find(|p| !on_path(p))
                .map(|p| format!("`{p}` not installed (Debian package udpcast)")),
        }
    }
}

/// A fresh random 256-bit key in a mode-0600 file in `dir`, for the keyed runs.
fn write_key(dir: &Path) -> Result<PathBuf, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("session.key");
    let key = mcdist::secure::Psk::generate();
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(key.to_hex().as_bytes()))
        .map_err(|e| format!("writing the session key: {e}"))?;
    Ok(path)
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

/// The `mcdist` binary in the directory of the running program, if there is one.
pub fn mcdist_next_to_me() -> Option<PathBuf> {
    let me = std::env::current_exe().ok()?;
    let p = me.parent()?.join("mcdist");
    p.is_file().then_some(p)
}

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

    /// Header line of the text table.
    pub fn table_header() -> String {
        format!(
            "{:<15} {:>3} {:>6} {:>9} {:>9} {:>8} {:>13} {:>4}  {}",
            "tool", "N", "loss%", "time s", "MB/s", "cpu s", "srv bytes/img", "ok", "note"
        )
    }

    /// One line of the text table.
    pub fn table_row(&self) -> String {
        format!(
            "{:<15} {:>3} {:>6.1} {:>9.2} {:>9.1} {:>8.2} {:>13.3} {:>4}  {}",
            self.tool.name(),
            self.receivers,
            self.loss_percent,
            self.secs,
            self.mbps(),
            self.cpu_secs,
            self.ratio(),
            if self.ok { "yes" } else { "NO" },
            self.note
        )
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

const LOSS_TABLE: &str = "mcdistbench";

impl Bench {
    fn image_path(&self) -> PathBuf {
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
        let outcome = match tool {
            Tool::Mcdist
            | Tool::McdistBase
            | Tool::McdistFec
            | Tool::McdistGso
            | Tool::McdistNoGso
            | Tool::McdistUnicast
            | Tool::McdistAuth
            | Tool::McdistEnc => self.run_mcdist(topo, subnet, tool, n, loss, &dir),
            Tool::Uftp => self.run_uftp(topo, subnet, n, &dir),
            Tool::Udpcast | Tool::UdpcastFec => self.run_udpcast(topo, subnet, tool, n, &dir),
        };
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

    fn run_mcdist(
        &self,
        topo: &Topology,
        subnet: u8,
        tool: Tool,
        n: usize,
        loss: f64,
        dir: &Path,
    ) -> Result<(f64, Vec<PathBuf>), String> {
        let group = format!("239.255.{subnet}.1:7000");
        // UDP GSO/GRO: forced by the two variants that name it. Otherwise the binary's
        // default, except under injected loss: the nft rule drops whole GSO buffers (up to 64
        // datagrams) where a wire would lose single frames, so loss runs send plain datagrams.
        let offload = match tool {
            Tool::McdistGso => Some("on"),
            Tool::McdistNoGso => Some("off"),
            _ if loss > 0.0 => Some("off"),
            _ => None,
        };
        let listen = format!("{}:7001", topo.hosts[0].addr);
        let t = self.run_timeout.as_secs().max(1).to_string();
        let unicast = tool == Tool::McdistUnicast;
        let key = match tool {
            Tool::McdistAuth | Tool::McdistEnc => Some(write_key(dir)?),
            _ => None,
        };
        let key_args = |c: &mut Command| {
            if let Some(k) = &key {
                c.arg("--key").arg(k);
                if tool == Tool::McdistAuth {
                    c.arg("--auth-only");
                }
            }
        };
        let bin = match (tool, &self.baseline) {
            (Tool::McdistBase, Some(b)) => b,
            _ => &self.mcdist,
        }
        .to_string_lossy()
        .into_owned();
        let mut outs = Vec::new();
        let mut rx = Vec::new();
        for i in 1..=n {
            let out = dir.join(format!("out{i}"));
            let mut c = topo.command(i, &bin);
            c.args(["fetch", "--group", &group, "--iface", &topo.hosts[i].iface])
                .args(["--server", &listen, "--timeout", &t, "--out"])
                .arg(&out);
            if unicast {
                c.arg("--unicast");
            }
            if let Some(o) = offload {
                c.args(["--gro", o]);
            }
            key_args(&mut c);
            rx.push(spawn_quiet(c, &dir.join(format!("rx{i}.log")))?);
            outs.push(out);
        }
        let mut c = topo.command(0, &bin);
        c.args(["serve", "--image"])
            .arg(self.image_path())
            .args(["--group", &group, "--iface", &topo.hosts[0].iface])
            .args(["--listen", &listen, "--clients", &n.to_string()])
            .args(["--exit-when-done", "--timeout", &t])
            .args(["--rate", &self.rate_mbit.to_string()]);
        if unicast {
            c.arg("--unicast");
        }
        if tool == Tool::McdistFec {
            c.arg("--fec");
        }
        if let Some(o) = offload {
            c.args(["--gso", o]);
        }
        key_args(&mut c);
        let start = Instant::now();
        let tx = spawn_quiet(c, &dir.join("tx.log"))?;
        let secs = wait_all(tx, rx, Vec::new(), start, self.run_timeout, dir)?;
        Ok((secs, outs))
    }

    fn run_uftp(
        &self,
        topo: &Topology,
        subnet: u8,
        n: usize,
        dir: &Path,
    ) -> Result<(f64, Vec<PathBuf>), String> {
        let public = format!("239.255.{subnet}.1");
        let private = format!("239.255.{subnet}.2");
        let mut outs = Vec::new();
        let mut daemons = Vec::new();
        let mut ids = Vec::new();
        for i in 1..=n {
            let d = dir.join(format!("r{i}"));
            std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
            let id = format!("0x{:08x}", 0x100 + i);
            let mut c = topo.command(i, "uftpd");
            c.args([
                "-d",
                "-I",
                &topo.hosts[i].iface,
                "-M",
                &public,
                "-p",
                "1044",
            ])
            .args(["-B", "8388608", "-U", &id, "-x", "1", "-D"])
            .arg(&d);
            daemons.push(spawn_quiet(c, &dir.join(format!("rx{i}.log")))?);
            outs.push(d.join("image"));
            ids.push(id);
        }
        // Give the daemons a moment to bind before the announce starts.
        std::thread::sleep(Duration::from_millis(300));
        let src_dir = self.image_path().parent().map(Path::to_path_buf);
        let mut c = topo.command(0, "uftp");
        c.args(["-I", &topo.hosts[0].iface, "-M", &public, "-P", &private])
            .args(["-t", "1", "-p", "1044", "-B", "8388608", "-x", "1"])
            .args(["-R", &(self.rate_mbit * 1000).to_string()])
            .args(["-b", &(self.mtu.saturating_sub(200).max(512)).to_string()])
            .args(["-H", &ids.join(","), "image"]);
        if let Some(d) = src_dir {
            c.current_dir(d);
        }
        let start = Instant::now();
        let tx = spawn_quiet(c, &dir.join("tx.log"))?;
        let secs = wait_all(tx, Vec::new(), daemons, start, self.run_timeout, dir)?;
        Ok((secs, outs))
    }

    fn run_udpcast(
        &self,
        topo: &Topology,
        subnet: u8,
        tool: Tool,
        n: usize,
        dir: &Path,
    ) -> Result<(f64, Vec<PathBuf>), String> {
        let rdv = format!("239.255.{subnet}.2");
        let data = format!("239.255.{subnet}.3");
        let t = self.run_timeout.as_secs().max(1).to_string();
        let mut outs = Vec::new();
        let mut rx = Vec::new();
        for i in 1..=n {
            let out = dir.join(format!("out{i}"));
            let mut c = topo.command(i, "udp-receiver");
            c.args(["--interface", &topo.hosts[i].iface, "--nokbd"])
                .args(["--mcast-rdv-address", &rdv, "--portbase", "9000"])
                .args(["--ttl", "1", "--start-timeout", &t, "--file"])
                .arg(&out);
            rx.push(spawn_quiet(c, &dir.join(format!("rx{i}.log")))?);
            outs.push(out);
        }
        std::thread::sleep(Duration::from_millis(200));
        let mut c = topo.command(0, "udp-sender");
        c.args(["--interface", &topo.hosts[0].iface, "--nokbd"])
            .args(["--mcast-rdv-address", &rdv, "--mcast-data-address", &data])
            .args(["--portbase", "9000", "--ttl", "1"])
            .args(["--min-receivers", &n.to_string(), "--max-wait", &t])
            .args(["--max-bitrate", &format!("{}m", self.rate_mbit)])
            .arg("--file")
            .arg(self.image_path());
        if tool == Tool::UdpcastFec {
            c.args(["--fec", "8x8/128"]);
        }
        let start = Instant::now();
        let tx = spawn_quiet(c, &dir.join("tx.log"))?;
        let secs = wait_all(tx, rx, Vec::new(), start, self.run_timeout, dir)?;
        Ok((secs, outs))
    }

    /// Bytes per second the rate cap allows (for reports).
    pub fn cap_bytes_per_sec(&self) -> u64 {
        self.rate_bytes()
    }
}

fn spawn_quiet(mut c: Command, log: &Path) -> Result<Child, String> {
    let f = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let f2 = f.try_clone().map_err(|e| e.to_string())?;
    c.stdin(Stdio::null())
        .stdout(Stdio::from(f))
        .stderr(Stdio::from(f2))
        .spawn()
        .map_err(|e| format!("starting {:?}: {e}", c.get_program()))
}

/// Wait for the sender and every receiver; daemons are killed once the sender
/// exits. Returns seconds from `start` to the last exit.
fn wait_all(
    mut tx: Child,
    mut rx: Vec<Child>,
    mut daemons: Vec<Child>,
    start: Instant,
    limit: Duration,
    dir: &Path,
) -> Result<f64, String> {
    let mut tx_done: Option<(f64, bool)> = None;
    let mut rx_done: Vec<Option<(f64, bool)>> = vec![None; rx.len()];
    let mut failure = None;
    loop {
        let t = start.elapsed();
        if tx_done.is_none() {
            if let Ok(Some(st)) = tx.try_wait() {
                tx_done = Some((t.as_secs_f64(), st.success()));
            }
        }
        for (c, d) in rx.iter_mut().zip(rx_done.iter_mut()) {
            if d.is_none() {
                if let Ok(Some(st)) = c.try_wait() {
                    *d = Some((t.as_secs_f64(), st.success()));
                }
            }
        }
        if tx_done.is_some() && rx_done.iter().all(Option::is_some) {
            break;
        }
        if t > limit {
            failure = Some(format!("timed out after {} s", limit.as_secs()));
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    for c in daemons.iter_mut().chain(rx.iter_mut()) {
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = tx.kill();
    let _ = tx.wait();
    if let Some(f) = failure {
        return Err(f);
    }
    let mut end = 0.0f64;
    if let Some((t, ok)) = tx_done {
        end = end.max(t);
        if !ok {
            return Err(format!("sender failed: {}", log_tail(&dir.join("tx.log"))));
        }
    }
    for (i, d) in rx_done.iter().enumerate() {
        if let Some((t, ok)) = d {
            end = end.max(*t);
            if !ok {
                return Err(format!(
                    "receiver {} failed: {}",
                    i + 1,
                    log_tail(&dir.join(format!("rx{}.log", i + 1)))
                ));
            }
        }
    }
    Ok(end)
}

fn log_tail(p: &Path) -> String {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    let s = s.trim();
    let tail: String = s
        .chars()
        .rev()
        .take(160)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    tail.replace('\n', " | ")
}

/// CPU time of this process's reaped children (user + system), from
/// `/proc/self/stat` (fields 16 and 17, in clock ticks of 1/100 s).
fn children_cpu_secs() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name, which may contain spaces.
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field k is f[k - 3].
    let tick = |k: usize| {
        f.get(k - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (tick(16) + tick(17)) / 100.0
}

fn ip(args: &[&str]) -> io::Result<String> {
    let o = Command::new("ip").args(args).output()?;
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        )))
    }
}

/// Set the MTU of every host's interface (the bridge ports follow).
pub fn set_mtu(topo: &Topology, mtu: u32) -> io::Result<()> {
    if mtu == 1500 {
        return Ok(());
    }
    let m = mtu.to_string();
    // Bridge-side veth ends live in the bridge namespace: raise them first.
    let br = topo
        .hosts
        .first()
        .map(|h| {
            h.ns.trim_end_matches(char::is_numeric)
                .trim_end_matches('h')
                .to_string()
                + "br"
        })
        .unwrap_or_default();
    for (i, _) in topo.hosts.iter().enumerate() {
        let port = format!("p{i}");
        ip(&["-n", &br, "link", "set", &port, "mtu", &m])?;
    }
    for h in &topo.hosts {
        ip(&["-n", &h.ns, "link", "set", &h.iface, "mtu", &m])?;
    }
    Ok(())
}

fn tx_bytes(topo: &Topology) -> io::Result<u64> {
    let h = &topo.hosts[0];
    let path = format!("/sys/class/net/{}/statistics/tx_bytes", h.iface);
    let s = ip(&["netns", "exec", &h.ns, "cat", &path])?;
    s.trim()
        .parse()
        .map_err(|e| io::Error::other(format!("{path}: {e}")))
}

/// Drop `loss` percent of UDP datagrams arriving at hosts 1..=n (0 removes the rule).
fn set_loss(topo: &Topology, n: usize, loss: f64) -> io::Result<()> {
    for h in topo.hosts.iter().skip(1).take(n) {
        let _ = Command::new("ip")
            .args([
                "netns", "exec", &h.ns, "nft", "delete", "table", "inet", LOSS_TABLE,
            ])
            .stderr(Stdio::null())
            .status();
        if loss <= 0.0 {
            continue;
        }
        let permille = ((loss * 10.0).round() as u64).min(1000).to_string();
        let steps: [Vec<&str>; 3] = [
            vec!["add", "table", "inet", LOSS_TABLE],
            vec![
                "add",
                "chain",
                "inet",
                LOSS_TABLE,
                "input",
                "{ type filter hook input priority 0; policy accept; }",
            ],
            vec![
                "add", "rule", "inet", LOSS_TABLE, "input", "meta", "l4proto", "udp", "numgen",
                "random", "mod", "1000", "<", &permille, "drop",
            ],
        ];
        for s in steps {
            let o = Command::new("ip")
                .args(["netns", "exec", &h.ns, "nft"])
                .args(&s)
                .output()?;
            if !o.status.success() {
                return Err(io::Error::other(format!(
                    "nft {}: {}",
                    s.join(" "),
                    String::from_utf8_lossy(&o.stderr).trim()
                )));
            }
        }
    }
    Ok(())
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

/// Results as a Markdown table.
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
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {:.2} | {:.1} | {:.2} | {:.3} | {} |",
            r.tool.name(),
            r.receivers,
            r.loss_percent,
            r.secs,
            r.mbps(),
            r.cpu_secs,
            r.ratio(),
            if r.ok {
                "yes".to_string()
            } else {
                format!("no: {}", r.note)
            }
        );
    }
    s
}

fn find(rs: &[RunResult], tool: Tool, n: usize, loss: f64) -> Option<&RunResult> {
    rs.iter()
        .find(|r| r.tool == tool && r.receivers == n && r.loss_percent == loss && r.ok)
}

/// The issue's goals, computed from the results that exist.
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
    for m in rs.iter().filter(|r| r.ok && r.tool == Tool::Mcdist) {
        if let Some(b) = find(rs, Tool::McdistBase, m.receivers, m.loss_percent).filter(|b| b.ok) {
            let _ = writeln!(
                s,
                "N={} loss {}%: mcdist {:.2} s, {:.2} CPU s vs mcdist-base {:.2} s, {:.2} CPU s = {:.2}x time, {:.2}x CPU",
                m.receivers,
                m.loss_percent,
                m.secs,
                m.cpu_secs,
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
            Tool::Mcdist | Tool::McdistBase | Tool::McdistFec | Tool::McdistGso | Tool::McdistNoGso
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

const COLORS: [&str; 8] = [
    "#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#1f77b4", "#2ca02c", "#17becf",
];

struct Panel<'a> {
    title: String,
    x_label: &'a str,
    y_label: &'a str,
    /// (tool index, points)
    series: Vec<(usize, Vec<(f64, f64)>)>,
    log2_x: bool,
}

fn panel_svg(out: &mut String, p: &Panel<'_>, ox: f64, oy: f64, w: f64, h: f64) {
    let (l, r, t, b) = (60.0, 10.0, 28.0, 40.0);
    let pts: Vec<(f64, f64)> = p
        .series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .collect();
    let tx = |x: f64| if p.log2_x { x.max(1.0).log2() } else { x };
    let (mut x0, mut x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), (x, _)| {
        (a.min(tx(*x)), b.max(tx(*x)))
    });
    if pts.is_empty() || x1 <= x0 {
        x0 = 0.0;
        x1 = x1.max(1.0);
    }
    let y1 = pts.iter().fold(0.0f64, |a, (_, y)| a.max(*y)).max(1e-9) * 1.1;
    let px = |x: f64| ox + l + (tx(x) - x0) / (x1 - x0) * (w - l - r);
    let py = |y: f64| oy + h - b - y / y1 * (h - t - b);
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" font-size="13" font-weight="bold">{}</text>"#,
        ox + l,
        oy + 16.0,
        p.title
    );
    let _ = writeln!(
        out,
        r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="none" stroke="#888"/>"##,
        ox + l,
        oy + t,
        w - l - r,
        h - t - b
    );
    for k in 0..=4 {
        let y = y1 * f64::from(k) / 4.0;
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end">{}</text><line x1="{:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#ddd"/>"##,
            ox + l - 4.0,
            py(y) + 3.0,
            fmt_num(y),
            ox + l,
            ox + w - r,
            py(y),
            py(y)
        );
    }
    let mut xs: Vec<f64> = pts.iter().map(|(x, _)| *x).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    for x in xs {
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">{}</text>"#,
            px(x),
            oy + h - b + 14.0,
            fmt_num(x)
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text>"#,
        ox + l + (w - l - r) / 2.0,
        oy + h - 8.0,
        p.x_label
    );
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle" transform="rotate(-90 {:.1} {:.1})">{}</text>"#,
        ox + 14.0,
        oy + h / 2.0,
        ox + 14.0,
        oy + h / 2.0,
        p.y_label
    );
    for (ti, v) in &p.series {
        let c = COLORS[*ti % COLORS.len()];
        let path: Vec<String> = v
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"/>"#,
            path.join(" ")
        );
        for (x, y) in v {
            let _ = writeln!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{c}"/>"#,
                px(*x),
                py(*y)
            );
        }
    }
}

fn fmt_num(v: f64) -> String {
    if v >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// An SVG with four panels: time and server bytes versus receivers (no loss),
/// and versus loss at `loss_n` receivers.
pub fn to_svg(rs: &[RunResult], size_mib: u64, loss_n: usize) -> String {
    let series = |by_n: bool, f: &dyn Fn(&RunResult) -> f64| -> Vec<(usize, Vec<(f64, f64)>)> {
        Tool::ALL
            .iter()
            .enumerate()
            .filter_map(|(ti, t)| {
                let mut v: Vec<(f64, f64)> = rs
                    .iter()
                    .filter(|r| r.ok && r.tool == *t)
                    .filter(|r| {
                        if by_n {
                            r.loss_percent == 0.0
                        } else {
                            r.receivers == loss_n
                        }
                    })
                    .map(|r| {
                        (
                            if by_n {
                                r.receivers as f64
                            } else {
                                r.loss_percent
                            },
                            f(r),
                        )
                    })
                    .collect();
                v.sort_by(|a, b| a.0.total_cmp(&b.0));
                (!v.is_empty()).then_some((ti, v))
            })
            .collect()
    };
    let panels = [
        Panel {
            title: format!("{size_mib} MiB to N receivers, no loss: time"),
            x_label: "receivers",
            y_label: "seconds",
            series: series(true, &|r| r.secs),
            log2_x: true,
        },
        Panel {
            title: "no loss: server bytes / image bytes".into(),
            x_label: "receivers",
            y_label: "bytes / image",
            series: series(true, &|r| r.ratio()),
            log2_x: true,
        },
        Panel {
            title: format!("{loss_n} receivers: time vs loss"),
            x_label: "receive loss %",
            y_label: "seconds",
            series: series(false, &|r| r.secs),
            log2_x: false,
        },
        Panel {
            title: format!("{loss_n} receivers: server bytes / image vs loss"),
            x_label: "receive loss %",
            y_label: "bytes / image",
            series: series(false, &|r| r.ratio()),
            log2_x: false,
        },
    ];
    let (w, h) = (440.0, 300.0);
    // The legend under the panels: as many entries to a row as the width holds.
    let per_row = ((2.0 * w - 20.0) / 140.0_f64).floor().max(1.0) as usize;
    let legend_rows = Tool::ALL.len().div_ceil(per_row);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif">"#,
        2.0 * w,
        2.0 * h + 14.0 + 16.0 * legend_rows as f64
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (i, p) in panels.iter().enumerate() {
        let ox = (i % 2) as f64 * w;
        let oy = (i / 2) as f64 * h;
        panel_svg(&mut out, p, ox, oy, w, h);
    }
    for (ti, t) in Tool::ALL.iter().enumerate() {
        let x = 20.0 + (ti % per_row) as f64 * 140.0;
        let y = 2.0 * h + 16.0 + (ti / per_row) as f64 * 16.0;
        let _ = writeln!(
            out,
            r#"<rect x="{x:.1}" y="{:.1}" width="14" height="4" fill="{}"/><text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#,
            y - 4.0,
            COLORS[ti],
            x + 18.0,
            y,
            t.name()
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(tool: Tool, rep: usize, secs: f64, ok: bool) -> RunResult {
        RunResult {
            tool,
            rep,
            receivers: 8,
            loss_percent: 5.0,
            secs,
            server_bytes: (secs * 1000.0) as u64,
            cpu_secs: secs * 2.0,
            image_bytes: 1 << 20,
            ok,
            note: if ok {
                String::new()
            } else {
                "timed out, twice".into()
            },
        }
    }

    #[test]
    fn csv_round_trips_and_medians_take_the_middle_of_good_runs() {
        let rs = vec![
            run(Tool::Mcdist, 1, 3.0, true),
            run(Tool::Uftp, 1, 9.0, true),
            run(Tool::Mcdist, 2, 1.0, true),
            run(Tool::Uftp, 2, 0.0, false),
            run(Tool::Mcdist, 3, 2.0, true),
            run(Tool::Uftp, 3, 7.0, true),
        ];
        let back = from_csv(&to_csv(&rs)).expect("parse");
        assert_eq!(back.len(), rs.len());
        for (a, b) in rs.iter().zip(&back) {
            assert_eq!(
                (a.tool, a.rep, a.receivers, a.ok),
                (b.tool, b.rep, b.receivers, b.ok)
            );
            assert_eq!(
                (a.server_bytes, a.image_bytes),
                (b.server_bytes, b.image_bytes)
            );
            assert!((a.secs - b.secs).abs() < 1e-3 && (a.cpu_secs - b.cpu_secs).abs() < 1e-2);
            assert_eq!(a.note, b.note.replace('\'', "\""));
        }
        let m = medians(&back);
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].tool, m[0].rep, m[0].ok), (Tool::Mcdist, 3, true));
        assert!((m[0].secs - 2.0).abs() < 1e-9 && (m[0].cpu_secs - 4.0).abs() < 1e-9);
        // A failed repetition marks the configuration; the median is of the good runs.
        assert_eq!((m[1].tool, m[1].ok), (Tool::Uftp, false));
        assert!((m[1].secs - 8.0).abs() < 1e-9, "{}", m[1].secs);
        assert!(m[1].note.starts_with("1 of 3 runs failed"), "{}", m[1].note);
        assert!(from_csv("tool,receivers\nmcdist,1\n").is_err());
        assert!(from_csv("").is_err());
    }
}
