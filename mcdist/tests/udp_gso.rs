//! UDP GSO on the server's batch sends and UDP GRO on the client's
//! receives, on real sockets in two network namespaces joined by a bridge:
//! every datagram arrives intact and in its own boundaries (runs of equal
//! datagrams, a short final datagram of a run, lone datagrams of other
//! sizes), GRO really coalesces, and when the kernel refuses GSO (the link
//! MTU shrank below the segment size) the transport falls back to plain
//! `sendmmsg` without losing a datagram.
//!
//! The test re-runs this test binary inside each namespace (`ip netns exec`)
//! with `MCDIST_GSO_ROLE` set: one process receives, one sends.

use mcdist::testnet::{unavailable, Topology};
use mcdist::transport::udp::{UdpConfig, UdpTransport};
use mcdist::transport::{Received, Transport};
use mcdist::{Dest, Transmit};
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ROLE: &str = "MCDIST_GSO_ROLE";
const BATCHES: usize = 8;
const FULL: usize = 1405;

/// Lengths of one batch: a run of full datagrams ending in a short one, a
/// run of small equal ones, lone ones of other sizes, another full run.
fn batch_lengths() -> Vec<usize> {
    let mut v = vec![FULL; 40];
    v.push(700);
    v.extend([300; 3]);
    v.push(1000);
    v.push(64);
    v.extend([FULL; 18]);
    v
}

fn fill(index: usize, len: usize, out: &mut [u8]) {
    out[..4].copy_from_slice(&(index as u32).to_be_bytes());
    out[4..6].copy_from_slice(&(len as u16).to_be_bytes());
    for (k, b) in out[6..len].iter_mut().enumerate() {
        *b = (index as u8).wrapping_mul(13).wrapping_add(k as u8);
    }
}

fn group(subnet: u8) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(239, 255, subnet, 9), 47_100)
}

/// Receiver half: joins the group with GRO, prints `ready`, checks every
/// datagram and prints `ok <datagrams> <coalesced buffers> <gro>`.
fn receive(subnet: u8, gro: bool) {
    let mut cfg = UdpConfig::new(group(subnet));
    cfg.iface = Some("eth0".into());
    cfg.gro = gro;
    let mut t = UdpTransport::client(&cfg).expect("client transport");
    println!("ready");
    let lens = batch_lengths();
    let count = lens.len() * BATCHES;
    let slot = 65_536;
    let mut inbuf = vec![0u8; slot * 32];
    let mut seen = vec![false; count];
    let mut got = 0;
    let mut expect = vec![0u8; slot];
    let deadline = Instant::now() + Duration::from_secs(20);
    while got < count && Instant::now() < deadline {
        let mut rec: Vec<Received> = Vec::new();
        let n = t
            .recv_batch(&mut inbuf, slot, &mut rec, Some(Duration::from_millis(200)))
            .expect("recv_batch");
        assert_eq!(n, rec.len());
        for (k, r) in rec.iter().enumerate() {
            let d = &inbuf[k * slot..k * slot + r.len];
            assert!(d.len() >= 6, "datagram of {} bytes", d.len());
            let i = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize;
            assert!(i < count && !seen[i], "datagram {i} unexpected or twice");
            let len = lens[i % lens.len()];
            assert_eq!(d.len(), len, "datagram {i} keeps its own boundaries");
            fill(i, len, &mut expect);
            assert_eq!(d, &expect[..len], "datagram {i} intact");
            seen[i] = true;
            got += 1;
        }
    }
    println!("ok {got} {} {}", t.coalesced_buffers(), t.gro_active());
}

/// Sender half: sends the batches to the group with GSO; with `shrink`,
/// lowers the link MTU below the segment size first so the kernel refuses
/// GSO. Prints `sent <gso still active>`.
fn send(subnet: u8, shrink: bool) {
    let mut cfg = UdpConfig::new(group(subnet));
    cfg.iface = Some("eth0".into());
    cfg.listen = Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)));
    cfg.gso = true;
    let mut t = UdpTransport::server(&cfg).expect("server transport");
    assert!(t.capabilities().max_datagram >= FULL);
    let gso_at_start = t.gso_active();
    if shrink {
        let st = Command::new("ip")
            .args(["link", "set", "eth0", "mtu", "1000"])
            .status()
            .expect("ip");
        assert!(st.success(), "lowering the MTU");
    }
    let lens = batch_lengths();
    let slot = 2048;
    let mut out = vec![0u8; slot * lens.len()];
    for b in 0..BATCHES {
        let mut items = Vec::new();
        for (k, &len) in lens.iter().enumerate() {
            fill(b * lens.len() + k, len, &mut out[k * slot..]);
            items.push(Transmit {
                dest: Dest::Group,
                len,
            });
        }
        t.send_batch(&out, slot, &items).expect("send_batch");
        // Stay well inside the receiver's socket buffer.
        std::thread::sleep(Duration::from_millis(5));
    }
    println!("sent {gso_at_start} {}", t.gso_active());
}

fn role_main() -> bool {
    let Ok(role) = std::env::var(ROLE) else {
        return false;
    };
    let mut parts = role.split(':');
    let what = parts.next().unwrap_or_default();
    let subnet: u8 = parts.next().and_then(|s| s.parse().ok()).expect("subnet");
    let flag = parts.next() == Some("1");
    match what {
        "recv" => receive(subnet, flag),
        "send" => send(subnet, flag),
        other => panic!("unknown role {other}"),
    }
    true
}

/// The halves run as ignored tests of this binary inside the namespaces.
#[test]
#[ignore = "run inside a namespace by the tests below"]
fn gso_role() {
    assert!(role_main(), "{ROLE} is not set");
}

fn spawn_role(topo: &Topology, host: usize, role: String) -> Child {
    let exe = std::env::current_exe().expect("test binary");
    topo.command(host, &exe.to_string_lossy())
        .args(["--exact", "gso_role", "--ignored", "--nocapture"])
        .env(ROLE, role)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn")
}

fn finish(mut c: Child, what: &str) -> String {
    let status = c.wait().expect("wait");
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = c.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = c.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(status.success(), "{what} failed:\n{out}\n{err}");
    out
}

fn line_after<'a>(out: &'a str, tag: &str) -> Vec<&'a str> {
    out.lines()
        .find_map(|l| l.strip_prefix(tag))
        .unwrap_or_else(|| panic!("no {tag:?} line in {out:?}"))
        .split_whitespace()
        .collect()
}

/// Runs one sender and one receiver; returns (receiver fields, sender fields).
fn exchange(tag: &str, subnet: u8, gro: bool, shrink: bool) -> Option<(Vec<String>, Vec<String>)> {
    if let Some(why) = unavailable() {
        eprintln!("skipping: {why}");
        return None;
    }
    let topo = Topology::create(tag, 2, subnet).expect("topology");
    let mut rx = spawn_role(&topo, 1, format!("recv:{subnet}:{}", u8::from(gro)));
    let mut first = String::new();
    let stdout = rx.stdout.take().expect("stdout");
    let mut reader = BufReader::new(stdout);
    while !first.starts_with("ready") {
        first.clear();
        if reader.read_line(&mut first).expect("receiver output") == 0 {
            break;
        }
    }
    assert!(first.starts_with("ready"), "receiver did not start");
    let tx = spawn_role(&topo, 0, format!("send:{subnet}:{}", u8::from(shrink)));
    let sent = finish(tx, "sender");
    let mut rest = String::new();
    reader.read_to_string(&mut rest).expect("receiver output");
    rx.stdout = None;
    let _ = finish(rx, "receiver");
    let r = line_after(&rest, "ok ")
        .iter()
        .map(|s| s.to_string())
        .collect();
    let s = line_after(&sent, "sent ")
        .iter()
        .map(|s| s.to_string())
        .collect();
    Some((r, s))
}

#[test]
fn gso_sends_and_gro_receives_keep_every_datagram() {
    let Some((r, s)) = exchange("gso", 71, true, false) else {
        return;
    };
    let count = batch_lengths().len() * BATCHES;
    assert_eq!(r[0], count.to_string(), "every datagram arrived");
    if s[0] == "true" && r[2] == "true" {
        assert_eq!(s[1], "true", "GSO stayed on");
        let coalesced: u64 = r[1].parse().expect("count");
        assert!(coalesced > 0, "GRO handed over coalesced buffers");
    } else {
        eprintln!("note: this kernel lacks UDP GSO or GRO; only the plain path ran");
    }
}

#[test]
fn refused_gso_falls_back_to_plain_sends() {
    let Some((r, s)) = exchange("gsf", 72, false, true) else {
        return;
    };
    let count = batch_lengths().len() * BATCHES;
    assert_eq!(r[0], count.to_string(), "every datagram arrived");
    assert_eq!(r[1], "0", "without GRO nothing is coalesced");
    assert_eq!(s[1], "false", "GSO was switched off after the refusal");
}
