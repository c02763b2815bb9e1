//! The namespace side of a run: link MTU, injected receive loss (nftables
//! `numgen random`), slower links to some receivers (a token bucket filter), the
//! sender's interface byte counter and the CPU time of the reaped tool processes.

use super::pressure::SlowLink;
use mcdist::testnet::Topology;
use std::io;
use std::process::{Command, Stdio};

const LOSS_TABLE: &str = "mcdistbench";

/// CPU time of this process's reaped children (user + system), from
/// `/proc/self/stat` (fields 16 and 17, in clock ticks of 1/100 s).
pub(super) fn children_cpu_secs() -> f64 {
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
    for (i, _) in topo.hosts.iter().enumerate() {
        let port = format!("p{i}");
        ip(&["-n", topo.bridge_ns(), "link", "set", &port, "mtu", &m])?;
    }
    for h in &topo.hosts {
        ip(&["-n", &h.ns, "link", "set", &h.iface, "mtu", &m])?;
    }
    Ok(())
}

pub(super) fn tx_bytes(topo: &Topology) -> io::Result<u64> {
    let h = &topo.hosts[0];
    let path = format!("/sys/class/net/{}/statistics/tx_bytes", h.iface);
    let s = ip(&["netns", "exec", &h.ns, "cat", &path])?;
    s.trim()
        .parse()
        .map_err(|e| io::Error::other(format!("{path}: {e}")))
}

/// Run `args` in namespace `ns` (through [`ip`], whose error names the command).
fn in_ns(ns: &str, args: &[&str]) -> io::Result<()> {
    ip(&[&["netns", "exec", ns], args].concat()).map(drop)
}

/// Drop `loss` percent of the UDP frames the bridge forwards to each of hosts 1..=n, each
/// port drawing its own random numbers (0 removes the rule and restores the offloads).
///
/// The loss sits where a wire loses frames: on the bridge's ports, after the sender's
/// interface cut its UDP GSO buffers into frames and before the receivers' interfaces
/// coalesce them again (GRO). For a loss run the sender's interface therefore segments
/// in software (`tx-udp-segmentation off`, so a GSO buffer leaves as frames, as a NIC
/// segments it) and the receivers' interfaces do GRO (`gro on`, which a veth does only when
/// asked). Every tool gets the same frames lost; GRO only coalesces for sockets that ask.
pub(super) fn set_loss(topo: &Topology, n: usize, loss: f64) -> io::Result<()> {
    let br = topo.bridge_ns();
    let _ = Command::new("ip")
        .args([
            "netns", "exec", br, "nft", "delete", "table", "bridge", LOSS_TABLE,
        ])
        .stderr(Stdio::null())
        .status();
    let on = loss > 0.0;
    let flag = if on { "off" } else { "on" };
    in_ns(
        &topo.hosts[0].ns,
        &[
            "ethtool",
            "-K",
            &topo.hosts[0].iface,
            "tx-udp-segmentation",
            flag,
        ],
    )?;
    let gro = if on { "on" } else { "off" };
    for h in topo.hosts.iter().skip(1).take(n) {
        in_ns(&h.ns, &["ethtool", "-K", &h.iface, "gro", gro])?;
    }
    if !on {
        return Ok(());
    }
    let permille = ((loss * 10.0).round() as u64).min(1000).to_string();
    let chain = "{ type filter hook forward priority 0; policy accept; }";
    in_ns(br, &["nft", "add", "table", "bridge", LOSS_TABLE])?;
    in_ns(
        br,
        &["nft", "add", "chain", "bridge", LOSS_TABLE, "ports", chain],
    )?;
    // One rule for all the lossy ports (a set lookup per frame and port), not one rule
    // per port that every frame to every port is matched against: the switch's own
    // cost is counted as the sender's CPU, and should not grow with the receiver count.
    let ports: Vec<String> = (1..=n.min(topo.hosts.len() - 1))
        .map(|i| format!("p{i}"))
        .collect();
    let ports = format!("{{ {} }}", ports.join(", "));
    in_ns(
        br,
        &[
            "nft", "add", "rule", "bridge", LOSS_TABLE, "ports", "oifname", &ports, "meta",
            "l4proto", "udp", "numgen", "random", "mod", "1000", "<", &permille, "drop",
        ],
    )?;
    Ok(())
}

/// Limit the bridge's ports to the first `spec.receivers` receiver hosts to `spec.mbit`
/// Mbit/s (a token bucket: 64 KiB of burst, frames that would wait more than 20 ms
/// dropped), as hosts behind a slower link; for every run on `topo`.
pub fn set_slow_link(topo: &Topology, spec: SlowLink) -> io::Result<()> {
    let br = topo.bridge_ns();
    let rate = format!("{}mbit", spec.mbit);
    for i in 1..=spec.receivers.min(topo.hosts.len() - 1) {
        let port = format!("p{i}");
        in_ns(
            br,
            &[
                "tc", "qdisc", "replace", "dev", &port, "root", "tbf", "rate", &rate, "burst",
                "64kb", "latency", "20ms",
            ],
        )?;
    }
    Ok(())
}
