//! Throw-away network topologies for tests and benchmarks: network namespaces
//! joined by veth pairs to a bridge that itself lives in a namespace, so
//! nothing is created in (or sent on) the host's own network namespace.
//!
//! Needs root and `ip` (iproute2). Addresses come from 198.18.0.0/15, the range
//! reserved for network benchmarking; multicast stays inside the bridge.
//! Everything is deleted when the [`Topology`] is dropped.

use std::io;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

/// One host of a topology.
#[derive(Debug, Clone)]
pub struct Host {
    /// Network namespace name.
    pub ns: String,
    /// Interface name inside the namespace.
    pub iface: String,
    /// IPv4 address of `iface`.
    pub addr: Ipv4Addr,
}

/// Namespaces on a bridge; deleted on drop.
#[derive(Debug)]
pub struct Topology {
    bridge_ns: String,
    /// The hosts, in creation order.
    pub hosts: Vec<Host>,
}

/// Why a topology cannot be built here, if it cannot.
pub fn unavailable() -> Option<String> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .unwrap_or_default();
    if uid != "0" {
        return Some("network namespaces need root".into());
    }
    match Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => None,
        _ => Some("the `ip` command (iproute2) is not installed".into()),
    }
}

fn run(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl Topology {
    /// Build `n` hosts named `<tag><pid>h<i>` on a bridge. `tag` must be short
    /// (names are limited to 15 characters); `subnet` picks `198.18.<subnet>.0/24`.
    pub fn create(tag: &str, n: usize, subnet: u8) -> io::Result<Topology> {
        let pid = std::process::id() % 100_000;
        let bridge_ns = format!("{tag}{pid}br");
        let mut topo = Topology {
            bridge_ns: bridge_ns.clone(),
            hosts: Vec::new(),
        };
        run(&["netns", "add", &bridge_ns])?;
        run(&["-n", &bridge_ns, "link", "set", "lo", "up"])?;
        run(&["-n", &bridge_ns, "link", "add", "br0", "type", "bridge"])?;
        // Flood multicast to every port: no IGMP querier lives on this bridge.
        run(&[
            "-n",
            &bridge_ns,
            "link",
            "set",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        run(&["-n", &bridge_ns, "link", "set", "br0", "up"])?;
        // A switch does not run IP firewalling: where the kernel passes bridged frames
        // through the IP hooks (br_netfilter), turn that off for this bridge's namespace.
        // Absent (no br_netfilter), there is nothing to turn off.
        let _ = Command::new("ip")
            .args(["netns", "exec", &bridge_ns, "sh", "-c"])
            .arg(
                "for f in /proc/sys/net/bridge/bridge-nf-call-*; do \
                 [ -e \"$f\" ] && echo 0 > \"$f\"; done; true",
            )
            .stderr(Stdio::null())
            .status();
        for i in 0..n {
            let ns = format!("{tag}{pid}h{i}");
            let addr = Ipv4Addr::new(198, 18, subnet, (i + 1) as u8);
            run(&["netns", "add", &ns])?;
            topo.hosts.push(Host {
                ns: ns.clone(),
                iface: "eth0".into(),
                addr,
            });
            let port = format!("p{i}");
            run(&[
                "-n", &bridge_ns, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ])?;
            run(&["-n", &bridge_ns, "link", "set", &port, "master", "br0"])?;
            run(&["-n", &bridge_ns, "link", "set", &port, "up"])?;
            run(&["-n", &ns, "link", "set", "lo", "up"])?;
            run(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            run(&["-n", &ns, "link", "set", "eth0", "up"])?;
            run(&["-n", &ns, "link", "set", "eth0", "multicast", "on"])?;
        }
        Ok(topo)
    }

    /// The namespace the bridge and its ports (`p0`, `p1`, ... for host 0, 1, ...) live in.
    pub fn bridge_ns(&self) -> &str {
        &self.bridge_ns
    }

    /// A command that runs `program` inside host `i`'s namespace.
    pub fn command(&self, i: usize, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[i].ns, program]);
        c
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = run(&["netns", "del", &h.ns]);
        }
        let _ = run(&["netns", "del", &self.bridge_ns]);
    }
}

/// Write a test image of `mib` MiB of pseudo-random bytes (xorshift, seeded)
/// followed by `tail` more bytes (a partial last page). With `zero_every = Some(k)`
/// every k-th MiB (from the second) is all zero, for zero-page elision.
pub fn write_test_image(
    path: &std::path::Path,
    mib: usize,
    zero_every: Option<usize>,
    tail: usize,
) -> io::Result<()> {
    use std::io::Write;
    let mut f = io::BufWriter::new(std::fs::File::create(path)?);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut buf = vec![0u8; 1 << 20];
    for m in 0..mib {
        if zero_every.is_some_and(|k| k > 0 && m % k == 1) {
            buf.fill(0);
        } else {
            for c in buf.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes());
            }
        }
        f.write_all(&buf)?;
    }
    f.write_all(&buf[..tail.min(buf.len())])?;
    f.flush()
}
