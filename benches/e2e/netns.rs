//! The namespace side of a run: link MTU, injected receive loss (nftables
//! `numgen random`), the sender's interface byte counter and the CPU time of
//! the reaped tool processes.

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

pub(super) fn tx_bytes(topo: &Topology) -> io::Result<u64> {
    let h = &topo.hosts[0];
    let path = format!("/sys/class/net/{}/statistics/tx_bytes", h.iface);
    let s = ip(&["netns", "exec", &h.ns, "cat", &path])?;
    s.trim()
        .parse()
        .map_err(|e| io::Error::other(format!("{path}: {e}")))
}

/// Drop `loss` percent of UDP datagrams arriving at hosts 1..=n (0 removes the rule).
pub(super) fn set_loss(topo: &Topology, n: usize, loss: f64) -> io::Result<()> {
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
