//! Spoofed sources on the real path: `mcdist serve` over real UDP in network
//! namespaces built by the test (nothing leaves them).
//!
//! An attacker in host 3 forges, with a raw socket (`IP_HDRINCL`), joins,
//! demand requests, end-game retries, NACKs, COMPLETE heartbeats and leaves
//! whose source is an address of host 2 (the victim; the attacker does not own
//! it). The victim counts every byte the server sends to each forged port and
//! every group byte other than announces. Asserted: per message type the server
//! sends the victim at most 3× the bytes forged under its address, and the
//! forgeries make it send nothing to the group; `serve --clients 2
//! --exit-when-done` does not exit on the forged COMPLETEs and leaves, and does
//! exit once two honest receivers fetched the image.

mod common;

use common::Bridge;
use mcdist::sim::Forgery;
use mcdist::wire::{Body, Kind, Message};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// First victim port; forgery kind `k` uses `VICTIM_PORT + k`.
const VICTIM_PORT: u16 = 9101;
/// Forged datagrams per kind.
const PER_KIND: u64 = 200;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_default()
}

/// A socket on the group port that joined `group` on the interface of `local`.
fn group_socket(group: SocketAddrV4, local: Ipv4Addr) -> UdpSocket {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    s.set_reuse_address(true).unwrap();
    s.bind(&SockAddr::from(SocketAddrV4::new(
        Ipv4Addr::UNSPECIFIED,
        group.port(),
    )))
    .unwrap();
    s.join_multicast_v4(group.ip(), &local).unwrap();
    let s: UdpSocket = s.into();
    s.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
    s
}

/// The victim: counts bytes the server sends to each forged port and to the group.
#[test]
fn spoof_victim_helper() {
    let Ok(me) = std::env::var("MCDIST_SPOOF_VICTIM") else {
        return; // Only meaningful inside the namespace test below.
    };
    let me: Ipv4Addr = me.parse().unwrap();
    let group: SocketAddrV4 = env("MCDIST_SPOOF_GROUP").parse().unwrap();
    let secs: u64 = env("MCDIST_SPOOF_SECS").parse().unwrap();
    let ports: Vec<UdpSocket> = (0..Forgery::ALL.len() as u16)
        .map(|k| {
            let s = UdpSocket::bind((me, VICTIM_PORT + k)).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let g = group_socket(group, me);
    println!("ready");
    let mut got = vec![0u64; ports.len()];
    let mut group_bytes = 0u64;
    let mut buf = vec![0u8; 65_536];
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        for (k, s) in ports.iter().enumerate() {
            while let Ok((n, _)) = s.recv_from(&mut buf) {
                got[k] += n as u64;
            }
        }
        if let Ok((n, _)) = g.recv_from(&mut buf) {
            if buf.get(3) != Some(&(Kind::Announce as u8)) {
                group_bytes += n as u64;
            }
        }
    }
    for (k, n) in got.iter().enumerate() {
        println!("got {k} {n}");
    }
    println!("group {group_bytes}");
}

/// An IPv4 + UDP packet from `src` to `dst` (UDP checksum 0: none; the kernel
/// fills in the IP checksum).
fn ipv4_udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[6] = 0x40; // don't fragment
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.ip().octets());
    p[16..20].copy_from_slice(&dst.ip().octets());
    p[20..22].copy_from_slice(&src.port().to_be_bytes());
    p[22..24].copy_from_slice(&dst.port().to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    p
}

/// The attacker: learns the session from a group announce, then forges every
/// kind of message under the victim's address.
#[test]
fn spoof_attacker_helper() {
    let Ok(target) = std::env::var("MCDIST_SPOOF_TARGET") else {
        return; // Only meaningful inside the namespace test below.
    };
    let target: SocketAddrV4 = target.parse().unwrap();
    let me: Ipv4Addr = env("MCDIST_SPOOF_SELF").parse().unwrap();
    let victim: Ipv4Addr = env("MCDIST_SPOOF_VICTIM_IP").parse().unwrap();
    let group: SocketAddrV4 = env("MCDIST_SPOOF_GROUP").parse().unwrap();
    let g = group_socket(group, me);
    let mut buf = vec![0u8; 65_536];
    let mut seen = None;
    for _ in 0..2_000 {
        if let Ok((n, _)) = g.recv_from(&mut buf) {
            if let Ok(Message {
                session,
                body: Body::Announce(a),
                ..
            }) = Message::parse(&buf[..n])
            {
                seen = Some((session, a.page_count));
                break;
            }
        }
    }
    let (session, pages) = seen.expect("no announce seen by the attacker");
    let raw = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::UDP)).unwrap();
    raw.set_header_included_v4(true).unwrap();
    let dst = SockAddr::from(target);
    for (k, f) in Forgery::ALL.iter().enumerate() {
        let src = SocketAddrV4::new(victim, VICTIM_PORT + k as u16);
        let mut sent = 0u64;
        for i in 0..PER_KIND {
            let d = f.datagram(session, i * 64, pages, i as u8);
            if raw.send_to(&ipv4_udp(src, target, &d), &dst).is_ok() {
                sent += d.len() as u64;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        println!("sent {k} {sent}");
    }
}

/// Re-run this test binary's `helper` in host `host`'s namespace with `envs`.
fn helper(b: &Bridge, host: usize, helper: &str, envs: &[(&str, String)]) -> Child {
    let me = std::env::current_exe().unwrap();
    let mut c = b.topo.command(host, me.to_str().unwrap());
    c.args(["--exact", helper, "--nocapture", "--test-threads=1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

/// The numbers `n` of `word k n` in `out`, by `k` (the test harness may
/// print on the same line first).
fn counts(out: &str, word: &str) -> Vec<u64> {
    let mut v: Vec<(usize, u64)> = out
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace().skip_while(|w| *w != word).skip(1);
            Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
        })
        .collect();
    v.sort_unstable();
    v.into_iter().map(|(_, n)| n).collect()
}

fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn spoofed_sources_get_at_most_three_times_and_never_complete() {
    let Some(b) = Bridge::new("mcsp", 4, 71, 16, Some(4), 0) else {
        return;
    };
    let group = b.group(1);
    let mut server = b
        .serve(&group)
        .args(["--clients", "2", "--exit-when-done", "--timeout", "120"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let first = lines.next().and_then(Result::ok).unwrap_or_default();
    assert!(first.starts_with("serving"), "server said: {first}");
    let server_out = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
    let errs = BufReader::new(server.stderr.take().unwrap()).lines();
    let server_err = std::thread::spawn(move || errs.map_while(Result::ok).collect::<Vec<_>>());

    let host = |i: usize| b.topo.hosts[i].addr.to_string();
    let mut victim = helper(
        &b,
        2,
        "spoof_victim_helper",
        &[
            ("MCDIST_SPOOF_VICTIM", host(2)),
            ("MCDIST_SPOOF_GROUP", group.clone()),
            ("MCDIST_SPOOF_SECS", "6".into()),
        ],
    );
    let mut vlines = BufReader::new(victim.stdout.take().unwrap()).lines();
    // The test harness prints its own lines first.
    let ready = vlines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l.ends_with("ready"));
    if !ready {
        let o = victim.wait_with_output().unwrap();
        panic!(
            "the victim never got ready: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let attacker = helper(
        &b,
        3,
        "spoof_attacker_helper",
        &[
            ("MCDIST_SPOOF_TARGET", b.listen.clone()),
            ("MCDIST_SPOOF_SELF", host(3)),
            ("MCDIST_SPOOF_VICTIM_IP", host(2)),
            ("MCDIST_SPOOF_GROUP", group.clone()),
        ],
    )
    .wait_with_output()
    .unwrap();
    let a_out = String::from_utf8_lossy(&attacker.stdout).to_string();
    assert!(
        attacker.status.success(),
        "attacker failed: {a_out}{}",
        String::from_utf8_lossy(&attacker.stderr)
    );
    let v_out: String = vlines.map_while(Result::ok).collect::<Vec<_>>().join("\n");
    assert!(victim.wait().unwrap().success(), "victim failed: {v_out}");
    let sent = counts(&a_out, "sent");
    let got = counts(&v_out, "got");
    let group_bytes: u64 = v_out
        .lines()
        .find_map(|l| l.rsplit_once("group ")?.1.parse().ok())
        .expect("the victim's group count");
    assert_eq!(sent.len(), Forgery::ALL.len(), "attacker said: {a_out}");
    assert_eq!(got.len(), Forgery::ALL.len(), "victim said: {v_out}");
    for (k, f) in Forgery::ALL.iter().enumerate() {
        let factor = got[k] as f64 / sent[k].max(1) as f64;
        eprintln!(
            "{f:?}: {} bytes forged, {} bytes to the spoofed address: factor {factor:.3}",
            sent[k], got[k]
        );
        assert!(got[k] <= 3 * sent[k], "{f:?}: factor {factor:.3}");
    }
    let total: u64 = sent.iter().sum();
    eprintln!(
        "group bytes (announces left out) during the attack: {group_bytes} for {total} forged"
    );
    assert!(group_bytes <= 3 * total, "group factor above 3");

    // The forged COMPLETEs and leaves did not end the server ...
    assert!(
        server.try_wait().unwrap().is_none(),
        "serve --clients 2 --exit-when-done exited on forged completions"
    );
    // ... two honest receivers do (together: the sweep waits for both).
    let fetches: Vec<_> = [1, 2]
        .into_iter()
        .map(|h| {
            let out = b.path(&format!("out{h}"));
            let child = b
                .fetch(h, &group, "120", &out)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            (child, out)
        })
        .collect();
    let want = std::fs::read(&b.img).unwrap();
    for (child, out) in fetches {
        let o = child.wait_with_output().unwrap();
        if !o.status.success() {
            let _ = server.kill();
            let out = server_out.join().unwrap_or_default().join("\n");
            let err = server_err.join().unwrap_or_default().join("\n");
            panic!(
                "fetch failed: {}\nserver: {out}\n{err}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        assert!(
            std::fs::read(&out).unwrap() == want,
            "fetched image differs"
        );
    }
    let status = wait_exit(&mut server, Duration::from_secs(60));
    if status.is_none() {
        let _ = server.kill();
    }
    let said = server_out.join().unwrap_or_default().join("\n");
    assert!(
        status.is_some_and(|s| s.success()),
        "server did not exit after two honest receivers: {said}"
    );
    assert!(said.contains("(2/2)"), "server said: {said}");
}
