//! Hostile and bad input on the real path: the `mcdist` binary over real UDP
//! in network namespaces built by the test (nothing leaves them).
//!
//! - A rogue unicast source floods the server with 50,000 requests per second;
//!   an honest `mcdist fetch` still completes. Its time with and without the
//!   flood is measured in the same run and printed (not asserted).
//! - `mcdist serve`: a nonexistent image, an unreadable one, and an image that
//!   changes size while served all end in a clear error.
//! - `mcdist fetch` of pages that do not match the announced digest (the image changed
//!   under the server): refused, and the copy removed.
//! - `mcdist fetch` onto a full disk: a clear error and no partial file left.
//! - A hijacker in the test's namespace announces the real session id with its own digest
//!   and multicasts its own (self-consistent) pages: `mcdist fetch --digest <real>` ends
//!   with the real image or fails; it never writes the hijacker's image.

mod common;

use common::{Bridge, BIN};
use mcdist::integrity::HashTree;
use mcdist::testnet::unavailable;
use mcdist::wire::{
    encode_ranges, ranges_from_encoded, Announce, Body, Data, HeaderFlags, Join, Message,
    PageRange, Request,
};
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `serve` arguments for the cases that fail before any traffic (on loopback).
const LO_ARGS: [&str; 6] = [
    "--group",
    "239.255.63.1:7000",
    "--iface",
    "lo",
    "--listen",
    "127.0.0.1:0",
];

/// Start `mcdist serve` in host 0 and wait for its "serving" line.
fn serve(b: &Bridge, group: &str) -> Child {
    let mut child = b
        .serve(group)
        .args(["--clients", "1", "--timeout", "120"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    let first = lines.next().and_then(Result::ok).unwrap_or_default();
    assert!(first.starts_with("serving"), "server said: {first}");
    // Keep draining so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    child
}

fn fetch(b: &Bridge, host: usize, group: &str, out: &Path) -> (bool, String, Duration) {
    let t0 = Instant::now();
    let o = b.fetch(host, group, "120", out).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text, t0.elapsed())
}

/// The rogue, run inside its namespace by re-executing this test binary.
/// It learns the session id from the server's answer to a join, then sends
/// `MCDIST_ROGUE_RATE` requests per second for `MCDIST_ROGUE_SECS` seconds,
/// each a retry for 64 pages, from one socket.
#[test]
fn rogue_flood_helper() {
    let Ok(target) = std::env::var("MCDIST_ROGUE_TARGET") else {
        // Only meaningful inside the namespace test below.
        return;
    };
    let target: SocketAddr = target.parse().unwrap();
    let rate: u64 = std::env::var("MCDIST_ROGUE_RATE").unwrap().parse().unwrap();
    let secs: u64 = std::env::var("MCDIST_ROGUE_SECS").unwrap().parse().unwrap();
    let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = vec![0u8; 65_536];
    let (session, _) = learn_session(&sock, target);

    let total = rate * secs;
    let t0 = Instant::now();
    let mut raw = Vec::new();
    let mut sent = 0u64;
    for k in 0..total {
        encode_ranges(
            &[PageRange {
                start: (k * 64) % 8192,
                len: 64,
            }],
            &mut raw,
        );
        let m = Message {
            session,
            seq: k + 2,
            flags: HeaderFlags::empty(),
            body: Body::Request(Request {
                rx_rate: 1,
                loss_permille: 999,
                flags: Request::RETRY,
                heard_seq: u64::MAX,
                ranges: ranges_from_encoded(&raw),
            }),
        };
        let n = m.emit(&mut buf).unwrap();
        if sock.send_to(&buf[..n], target).is_ok() {
            sent += 1;
        }
        // Pace: stay on the schedule of `rate` per second.
        let due = Duration::from_nanos((k + 1) * 1_000_000_000 / rate);
        let el = t0.elapsed();
        if due > el + Duration::from_micros(500) {
            std::thread::sleep(due - el);
        }
    }
    println!(
        "rogue sent {sent} requests in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn honest_fetch_completes_under_a_request_flood() {
    let Some(b) = Bridge::new("mchf", 3, 62, 32, None, 0) else {
        return;
    };
    let want = std::fs::read(&b.img).unwrap();
    let mut times = Vec::new();
    for (round, flood) in [false, true].into_iter().enumerate() {
        let group = b.group(round + 1);
        let mut server = serve(&b, &group);
        let rogue = flood.then(|| {
            let me = std::env::current_exe().unwrap();
            let me = me.to_str().unwrap();
            let child = b
                .topo
                .command(2, me)
                .args([
                    "--exact",
                    "rogue_flood_helper",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("MCDIST_ROGUE_TARGET", &b.listen)
                .env("MCDIST_ROGUE_RATE", "50000")
                .env("MCDIST_ROGUE_SECS", "8")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            // Let the flood start before the honest client joins.
            std::thread::sleep(Duration::from_millis(500));
            child
        });
        let out = b.path(&format!("out{round}"));
        let (ok, text, took) = fetch(&b, 1, &group, &out);
        assert!(ok, "fetch failed (flood {flood}): {text}");
        assert!(
            std::fs::read(&out).unwrap() == want,
            "fetched image differs"
        );
        times.push(took);
        if let Some(r) = rogue {
            let o = r.wait_with_output().unwrap();
            let t = String::from_utf8_lossy(&o.stdout);
            let line = t
                .lines()
                .find(|l| l.contains("rogue sent"))
                .unwrap_or("rogue said nothing");
            eprintln!("{line}");
            assert!(
                o.status.success(),
                "rogue failed: {t}{}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let _ = server.kill();
        let _ = server.wait();
    }
    eprintln!(
        "honest 32 MiB fetch: {:.2} s without the flood, {:.2} s with 50,000 requests/s from one rogue source",
        times[0].as_secs_f64(),
        times[1].as_secs_f64()
    );
}

fn serve_error(args: &[&str]) -> String {
    let o = Command::new(BIN)
        .arg("serve")
        .args(args)
        .args(LO_ARGS)
        .output()
        .unwrap();
    assert!(!o.status.success(), "serve succeeded with {args:?}");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn serve_refuses_missing_and_unreadable_images() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-image");
    let e = serve_error(&["--image", missing.to_str().unwrap()]);
    assert!(
        e.contains("cannot open image") && e.contains("No such file"),
        "{e}"
    );
    let e = serve_error(&["--image", dir.path().to_str().unwrap()]);
    assert!(e.contains("not a regular file"), "{e}");
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    let e = serve_error(&["--image", empty.to_str().unwrap()]);
    assert!(e.contains("is empty"), "{e}");
    // Unreadable: mode 000 and served by an unprivileged user (root reads anything).
    let locked = dir.path().join("locked");
    std::fs::write(&locked, [1u8; 8192]).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let has_setpriv = Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let root = unavailable().is_none();
    if has_setpriv && root {
        let o = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                BIN,
                "serve",
                "--image",
            ])
            .arg(&locked)
            .args(LO_ARGS)
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && e.contains("Permission denied"),
            "{e}"
        );
    } else {
        eprintln!("skipping the unreadable-image case: needs root and setpriv");
    }
}

#[test]
fn serve_detects_an_image_changing_size() {
    let Some(b) = Bridge::new("mchc", 1, 63, 2, None, 0) else {
        return;
    };
    let img = &b.img;
    let mut child = b
        .serve(&b.group(2))
        .args(["--timeout", "30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().and_then(Result::ok).unwrap_or_default();
    assert!(first.starts_with("serving"), "{first}");
    // Grow the image under the server.
    std::fs::OpenOptions::new()
        .append(true)
        .open(img)
        .unwrap()
        .write_all(&[7u8; 4096])
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "server kept serving a changed image");
    assert!(e.contains("changed size"), "stderr: {e}");
}

#[test]
fn fetch_rejects_pages_that_do_not_match_the_announced_digest() {
    let Some(b) = Bridge::new("mchd", 2, 65, 2, None, 0) else {
        return;
    };
    let group = &b.group(2);
    let mut server = serve(&b, group);
    // Same size, other contents: the announce still carries the old digest, and every page
    // the receiver gets is what the file holds now.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&b.img)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x5a; 4096], 4096 * 100).unwrap();
    drop(f);
    let out = b.path("copy");
    let (ok, text, _) = fetch(&b, 1, group, &out);
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        !ok,
        "fetch accepted a copy that does not match the digest: {text}"
    );
    // Each page is verified as it arrives: the changed page never verifies, and the fetch
    // fails on it (or, failing that, on the whole-image digest).
    assert!(
        text.contains("failed verification") || text.contains("does not match the image digest"),
        "{text}"
    );
    assert!(!out.exists(), "the mismatching copy was left behind");
}

#[test]
fn fetch_onto_a_full_disk_fails_clearly_and_leaves_no_partial_file() {
    let Some(b) = Bridge::new("mcdf", 2, 64, 4, None, 0) else {
        return;
    };
    if !Command::new("unshare")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("skipping: needs unshare (util-linux) for a private small tmpfs");
        return;
    }
    let mnt = b.path("small");
    std::fs::create_dir(&mnt).unwrap();
    let group = &b.group(1);
    let listen = &b.listen;
    let mut server = serve(&b, group);
    // A 256 KiB tmpfs, private to the fetch's own mount namespace: the 4 MiB
    // image cannot fit. The shell lists the directory after the fetch.
    let script = format!(
        "mount -t tmpfs -o size=256k tmpfs '{m}' && {BIN} fetch --group {group} --iface {i} --server {listen} --timeout 60 --out '{m}/out'; rc=$?; echo \"left: $(ls '{m}')\"; exit $rc",
        m = mnt.display(),
        i = b.topo.hosts[1].iface,
    );
    let o = b
        .topo
        .command(1, "unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        !o.status.success(),
        "fetch onto a full disk succeeded: {text}"
    );
    assert!(
        text.contains("No space left on device"),
        "unclear error: {text}"
    );
    assert!(text.contains("removed partial"), "{text}");
    let left = text
        .lines()
        .find(|l| l.starts_with("left:"))
        .unwrap_or("left: ?");
    assert_eq!(left.trim(), "left:", "partial file left behind: {text}");
}

/// Asks `target` to join (session 0) until it answers with an announce: the session id and
/// the announce.
fn learn_session(sock: &UdpSocket, target: SocketAddr) -> (u64, Announce) {
    let mut buf = vec![0u8; 65_536];
    let join = Message {
        session: 0,
        seq: 1,
        flags: HeaderFlags::empty(),
        body: Body::Join(Join {
            flags: mcdist::wire::JoinFlags::empty(),
            token: [0; mcdist::wire::TOKEN_LEN],
        }),
    };
    let n = join.emit(&mut buf).unwrap();
    for _ in 0..50 {
        sock.send_to(&buf[..n], target).unwrap();
        let mut rb = vec![0u8; 65_536];
        if let Ok((k, _)) = sock.recv_from(&mut rb) {
            if let Ok(Message {
                session,
                body: Body::Announce(a),
                ..
            }) = Message::parse(&rb[..k])
            {
                return (session, a);
            }
        }
    }
    panic!("no announce for the hijacker");
}

/// The hijacker, run inside its namespace by re-executing this test binary: it learns the
/// real session from the server, then for `MCDIST_HIJACK_SECS` seconds multicasts, under
/// that session id, an announce of its own image (same size and geometry, its own digest)
/// and every page of that image, hash pages included, fragmented like the server's.
#[test]
fn hijack_helper() {
    let Ok(target) = std::env::var("MCDIST_HIJACK_TARGET") else {
        // Only meaningful inside the namespace test below.
        return;
    };
    let target: SocketAddr = target.parse().unwrap();
    let group: SocketAddrV4 = std::env::var("MCDIST_HIJACK_GROUP")
        .unwrap()
        .parse()
        .unwrap();
    let ifaddr: Ipv4Addr = std::env::var("MCDIST_HIJACK_IFADDR")
        .unwrap()
        .parse()
        .unwrap();
    let secs: u64 = std::env::var("MCDIST_HIJACK_SECS")
        .unwrap()
        .parse()
        .unwrap();
    let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    socket2::SockRef::from(&sock)
        .set_multicast_if_v4(&ifaddr)
        .unwrap();
    sock.set_multicast_ttl_v4(1).unwrap();
    let (session, real) = learn_session(&sock, target);
    let ps = real.page_size as usize;
    let evil: Vec<u8> = (0..real.image_size)
        .map(|i| (i % 253) as u8 | 0x80)
        .collect();
    let tree = HashTree::from_image(&evil, ps).unwrap();
    let forged = Announce {
        digest: tree.root(),
        ..real
    };
    let frag = usize::from(real.frag_payload).max(1);
    let frags = ps.div_ceil(frag) as u16;
    let mut buf = vec![0u8; 65_536];
    let mut seq = 1u64;
    let mut send = |body: Body<'_>, seq: &mut u64| {
        *seq += 1;
        let m = Message {
            session,
            seq: *seq,
            flags: HeaderFlags::empty(),
            body,
        };
        let n = m.emit(&mut buf).unwrap();
        let _ = sock.send_to(&buf[..n], group);
    };
    let t0 = Instant::now();
    let mut datagrams = 0u64;
    while t0.elapsed() < Duration::from_secs(secs) {
        send(Body::Announce(forged), &mut seq);
        for pfn in tree.layout().sweep_order() {
            let page: Vec<u8> = match tree.page(pfn) {
                Some(h) => h.to_vec(),
                None => {
                    let at = pfn as usize * ps;
                    let mut p = evil[at..(at + ps).min(evil.len())].to_vec();
                    p.resize(ps, 0);
                    p
                }
            };
            for i in 0..frags {
                let start = usize::from(i) * frag;
                let end = (start + frag).min(ps);
                send(
                    Body::Data(Data {
                        pfn,
                        frag_index: i,
                        frag_count: frags,
                        flags: Data::SWEEP,
                        payload: &page[start..end],
                    }),
                    &mut seq,
                );
                datagrams += 1;
                if datagrams % 64 == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            if t0.elapsed() >= Duration::from_secs(secs) {
                break;
            }
        }
    }
    println!("hijacker sent {datagrams} forged data datagrams");
}

#[test]
fn fetch_with_a_pinned_digest_never_takes_a_hijackers_image() {
    let Some(b) = Bridge::new("mchj", 3, 66, 2, None, 0) else {
        return;
    };
    let want = std::fs::read(&b.img).unwrap();
    let real = mcdist::hex(&mcdist::source::file_digest(&b.img).unwrap());
    let group = b.group(1);
    let mut server = serve(&b, &group);
    let me = std::env::current_exe().unwrap();
    let hijacker = b
        .topo
        .command(2, me.to_str().unwrap())
        .args([
            "--exact",
            "hijack_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MCDIST_HIJACK_TARGET", &b.listen)
        .env("MCDIST_HIJACK_GROUP", &group)
        .env("MCDIST_HIJACK_IFADDR", b.topo.hosts[2].addr.to_string())
        .env("MCDIST_HIJACK_SECS", "6")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Let the forged announces and pages flow before the fetch joins.
    std::thread::sleep(Duration::from_millis(300));
    let out = b.path("copy");
    let o = b
        .fetch(1, &group, "60", &out)
        .args(["--digest", &real])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let h = hijacker.wait_with_output().unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let said = String::from_utf8_lossy(&h.stdout);
    eprintln!(
        "{}",
        said.lines()
            .find(|l| l.contains("hijacker sent"))
            .unwrap_or("hijacker said nothing")
    );
    assert!(h.status.success(), "hijacker failed: {said}");
    eprintln!("fetch: {}", text.trim());
    if o.status.success() {
        assert!(text.contains("digest ok"), "{text}");
        assert!(
            std::fs::read(&out).unwrap() == want,
            "fetch reported success with another image: {text}"
        );
    } else {
        assert!(!text.contains("digest ok"), "{text}");
        assert!(!out.exists(), "a refused copy was left behind: {text}");
        assert!(
            text.contains("changed")
                || text.contains("expected")
                || text.contains("failed verification"),
            "unclear refusal: {text}"
        );
    }
}
