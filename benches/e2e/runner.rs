//! Launching a tool: each tool's command lines become a [`Launch`] plan (receivers
//! in hosts 1..=N, the sender in host 0), and one runner starts any plan, waits
//! for every process and times the run.

use super::pressure::Stalls;
use super::tool::serve_help_has;
use super::{Bench, Tool};
use mcdist::testnet::Topology;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where a run happens: the topology, its multicast subnet (`239.255.<subnet>.x`),
/// the receiver count and the run's scratch directory.
#[derive(Clone, Copy)]
pub(super) struct Site<'a> {
    pub(super) topo: &'a Topology,
    pub(super) subnet: u8,
    pub(super) n: usize,
    pub(super) dir: &'a Path,
}

/// What one run of a tool starts.
pub(super) struct Launch {
    /// One receiver per host 1..=N (logs `rx<i>.log`).
    receivers: Vec<Command>,
    /// The copy each receiver leaves, checked afterwards.
    outs: Vec<PathBuf>,
    /// The receivers are daemons that never exit by themselves: the run ends with
    /// the sender, and they are stopped then.
    daemons: bool,
    /// Pause between starting the receivers and the sender (for them to bind).
    settle: Duration,
    /// The sender in host 0 (logs `tx.log`); the clock starts when it does.
    sender: Command,
}

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

impl Bench {
    /// The plan of `tool` to the site's receivers.
    pub(super) fn launch_plan(&self, site: Site<'_>, tool: Tool) -> Result<Launch, String> {
        match tool {
            Tool::Mcdist
            | Tool::McdistBase
            | Tool::McdistBaseFec
            | Tool::McdistFec
            | Tool::McdistGso
            | Tool::McdistNoGso
            | Tool::McdistUnicast
            | Tool::McdistAuth
            | Tool::McdistEnc => self.mcdist_plan(site, tool),
            Tool::Uftp => self.uftp_plan(site),
            Tool::Udpcast | Tool::UdpcastFec => Ok(self.udpcast_plan(site, tool)),
        }
    }

    /// Start `plan`, wait for it, and return the seconds from starting the sender
    /// to the last exit, with the copies to check.
    pub(super) fn launch(&self, plan: Launch, dir: &Path) -> Result<(f64, Vec<PathBuf>), String> {
        let mut started = Vec::new();
        for (i, c) in plan.receivers.into_iter().enumerate() {
            started.push(spawn_quiet(c, &dir.join(format!("rx{}.log", i + 1)))?);
        }
        // Stopped in turn until every process is waited for (dropped last).
        let _stalls = self
            .stalls
            .map(|spec| Stalls::start(started.iter().map(Child::id).collect(), spec));
        if !plan.settle.is_zero() {
            std::thread::sleep(plan.settle);
        }
        let (rx, daemons) = if plan.daemons {
            (Vec::new(), started)
        } else {
            (started, Vec::new())
        };
        let start = Instant::now();
        let tx = spawn_quiet(plan.sender, &dir.join("tx.log"))?;
        let secs = wait_all(tx, rx, daemons, start, self.run_timeout, dir)?;
        Ok((secs, plan.outs))
    }

    fn mcdist_plan(&self, site: Site<'_>, tool: Tool) -> Result<Launch, String> {
        let Site {
            topo,
            subnet,
            n,
            dir,
        } = site;
        let group = format!("239.255.{subnet}.1:7000");
        // UDP GSO/GRO: forced by the two variants that name it, otherwise the binary's
        // default. Injected loss drops single frames even with GSO on (see `set_loss`).
        let offload = match tool {
            Tool::McdistGso => Some("on"),
            Tool::McdistNoGso => Some("off"),
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
        let bin_path = match &self.baseline {
            Some(b) if tool.runs_baseline() => b,
            _ => &self.mcdist,
        };
        let bin = bin_path.to_string_lossy().into_owned();
        let mut outs = Vec::new();
        let mut receivers = Vec::new();
        for i in 1..=n {
            let out = self.receiver_dir(dir, i).join(format!("out{i}"));
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
            receivers.push(c);
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
        if tool.fec() {
            c.arg("--fec");
        } else if !unicast && serve_help_has(bin_path, "--fec [<FEC>]") == Some(true) {
            // FEC is `serve`'s default since it takes a value; the rows without "fec" in
            // their name stay without it, so a row means the same for every build.
            c.args(["--fec", "off"]);
        }
        if let Some(o) = offload {
            c.args(["--gso", o]);
        }
        key_args(&mut c);
        Ok(Launch {
            receivers,
            outs,
            daemons: false,
            settle: Duration::ZERO,
            sender: c,
        })
    }

    fn uftp_plan(&self, site: Site<'_>) -> Result<Launch, String> {
        let Site {
            topo,
            subnet,
            n,
            dir,
        } = site;
        let public = format!("239.255.{subnet}.1");
        let private = format!("239.255.{subnet}.2");
        let mut outs = Vec::new();
        let mut receivers = Vec::new();
        let mut ids = Vec::new();
        for i in 1..=n {
            let d = self.receiver_dir(dir, i).join(format!("r{i}"));
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
            receivers.push(c);
            outs.push(d.join("image"));
            ids.push(id);
        }
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
        Ok(Launch {
            receivers,
            outs,
            // The daemons stay up; give them a moment to bind before the announce starts.
            daemons: true,
            settle: Duration::from_millis(300),
            sender: c,
        })
    }

    fn udpcast_plan(&self, site: Site<'_>, tool: Tool) -> Launch {
        let Site {
            topo,
            subnet,
            n,
            dir,
        } = site;
        let rdv = format!("239.255.{subnet}.2");
        let data = format!("239.255.{subnet}.3");
        let t = self.run_timeout.as_secs().max(1).to_string();
        let mut outs = Vec::new();
        let mut receivers = Vec::new();
        for i in 1..=n {
            let out = self.receiver_dir(dir, i).join(format!("out{i}"));
            let mut c = topo.command(i, "udp-receiver");
            c.args(["--interface", &topo.hosts[i].iface, "--nokbd"])
                .args(["--mcast-rdv-address", &rdv, "--portbase", "9000"])
                .args(["--ttl", "1", "--start-timeout", &t, "--file"])
                .arg(&out);
            receivers.push(c);
            outs.push(out);
        }
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
        Launch {
            receivers,
            outs,
            daemons: false,
            settle: Duration::from_millis(200),
            sender: c,
        }
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
