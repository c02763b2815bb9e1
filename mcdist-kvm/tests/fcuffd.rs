//! The Firecracker page-fault handler against Firecracker's side of the contract, played as
//! its `persist.rs` does (anonymous regions with a hole between them, a userfaultfd with
//! `UFFD_FEATURE_EVENT_REMOVE`, one `sendmsg` of the JSON and the fd), in "microVM" child
//! processes; real userfaultfd, real multicast inside network namespaces.

use std::io::Write;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mcdist::source::{image_digest, zero_map, FileSource, PageSource};
use mcdist_kvm::descriptor::SessionParams;
use mcdist_kvm::fcuffd::firecracker_side::{GuestMemory, RegionFormat};
use mcdist_kvm::fcuffd::{Backend, Handler, HandlerConfig, HandshakeError, ServedVmm, VmmEnd};
use mcdist_kvm::netns::{BridgeNet, Netns};
use mcdist_kvm::{Descriptor, HostCache, MemoryServer};

mod common;
use common::uffd_available;

const PS: usize = 4096;
/// Region sizes of the "microVMs": two regions, as guest memory split around a hole.
const SIZES: [usize; 2] = [3 << 20, 5 << 20];
const IMAGE_MIB: usize = 8;

/// Whether namespaces and userfaultfd are usable; prints why the test is skipped if not.
fn runnable() -> bool {
    if let Some(why) = mcdist::testnet::unavailable() {
        eprintln!("skipping: {why}");
        return false;
    }
    uffd_available()
}

/// The pages a "microVM" with `seed` touches: about one in `every`.
fn touched(seed: u64, every: u64) -> Vec<u64> {
    let pages = (IMAGE_MIB << 20) as u64 / PS as u64;
    (0..pages)
        .filter(|p| {
            let mut x = (p + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed;
            x ^= x >> 29;
            x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x ^= x >> 32;
            x % every == 0
        })
        .collect()
}

/// The "microVM" process: maps guest memory, hands it to the handler, touches its pages from
/// four threads, compares them with the image, optionally balloons a range and reads zeros
/// there, and prints its fault latencies. Runs only when started by the tests below.
#[test]
fn microvm_child() {
    let Ok(socket) = std::env::var("FC_SOCKET") else {
        return;
    };
    let image = std::fs::read(std::env::var("FC_IMAGE").expect("image")).expect("read image");
    let seed: u64 = std::env::var("FC_SEED")
        .expect("seed")
        .parse()
        .expect("seed");
    let every: u64 = std::env::var("FC_EVERY")
        .expect("every")
        .parse()
        .expect("every");
    let legacy = std::env::var("FC_LEGACY").is_ok();
    let mem = Arc::new(GuestMemory::map(&SIZES).expect("map guest memory"));
    let fmt = if legacy {
        RegionFormat::Legacy
    } else {
        RegionFormat::Current
    };
    let _conn = mem
        .connect(Path::new(&socket), mem.mappings_json(fmt).as_bytes())
        .expect("handshake");
    if let Ok(go) = std::env::var("FC_GO") {
        // Wait (bounded) until the test says go, the memory handed over and untouched.
        for _ in 0..6000 {
            if Path::new(&go).exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let pages = Arc::new(touched(seed, every));
    let image = Arc::new(image);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (mem, pages, image) = (mem.clone(), pages.clone(), image.clone());
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                let mut buf = vec![0u8; PS];
                for &p in pages.iter().skip(t).step_by(4) {
                    let off = p * PS as u64;
                    let t0 = Instant::now();
                    mem.read(off, &mut buf).expect("read guest memory");
                    lat.push(t0.elapsed().as_nanos() as u64);
                    assert!(
                        buf[..] == image[off as usize..off as usize + PS],
                        "page {p} differs from the image"
                    );
                }
                lat
            })
        })
        .collect();
    let mut lat: Vec<u64> = Vec::new();
    for t in threads {
        lat.extend(t.join().expect("toucher"));
    }
    if std::env::var("FC_BALLOON").is_ok() {
        // A balloon takes 64 pages of the second region, then the guest touches them again.
        let off = SIZES[0] as u64 + (1 << 20);
        mem.balloon(off, 64 * PS).expect("madvise");
        let mut buf = vec![0u8; PS];
        for i in 0..64u64 {
            mem.read(off + i * PS as u64, &mut buf).expect("read");
            assert!(
                buf.iter().all(|&b| b == 0),
                "ballooned page {i} is not zero"
            );
        }
        println!("FC-BALLOON ok");
    }
    let lat: Vec<String> = lat.iter().map(u64::to_string).collect();
    println!("FC-LATENCY {}", lat.join(","));
}

/// Starts a "microVM" child process.
fn microvm(socket: &Path, image: &Path, seed: u64, every: u64, extra: &[&str]) -> Child {
    microvm_env(socket, image, seed, every, extra, &[])
}

/// [`microvm`] with more environment variables.
fn microvm_env(
    socket: &Path,
    image: &Path,
    seed: u64,
    every: u64,
    extra: &[&str],
    vars: &[(&str, &Path)],
) -> Child {
    let mut c = Command::new(std::env::current_exe().expect("test binary"));
    c.args([
        "microvm_child",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("FC_SOCKET", socket)
    .env("FC_IMAGE", image)
    .env("FC_SEED", seed.to_string())
    .env("FC_EVERY", every.to_string())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    for e in extra {
        c.env(e, "1");
    }
    for (k, v) in vars {
        c.env(k, v);
    }
    c.spawn().expect("spawn microVM")
}

/// Waits (bounded: 120 s) for `child`; returns its status and stdout.
fn finish(mut child: Child) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(_st) = child.try_wait().expect("wait") {
            let out = child.wait_with_output().expect("output");
            return (
                out.status,
                String::from_utf8_lossy(&out.stdout).into_owned()
                    + &String::from_utf8_lossy(&out.stderr),
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("microVM hung: {}", String::from_utf8_lossy(&out.stdout));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn latencies(out: &str) -> Vec<u64> {
    out.lines()
        .find_map(|l| l.split_once("FC-LATENCY ").map(|(_, v)| v))
        .map(|l| l.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_default()
}

fn pct(v: &mut [u64], p: f64) -> u64 {
    v.sort_unstable();
    v.get(((v.len() as f64 - 1.0) * p) as usize)
        .copied()
        .unwrap_or(0)
}

/// The image file, served by an mcdist server inside `ns` (multicast on `iface`).
struct Served {
    _dir: tempfile::TempDir,
    image: PathBuf,
    server: Option<MemoryServer>,
    desc: Descriptor,
}

fn serve(
    ns: &Netns,
    iface: &str,
    listen: SocketAddr,
    group: SocketAddrV4,
    security: Option<mcdist::secure::Security>,
) -> Served {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("mem");
    mcdist::testnet::write_test_image(&image, IMAGE_MIB, Some(3), 0).expect("image");
    let src: Arc<dyn PageSource> = Arc::new(FileSource::open(&image, PS).expect("open"));
    let zero = zero_map(&*src).expect("zero map");
    let digest = image_digest(&*src).expect("digest");
    let server = std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter().expect("enter server host");
            let cfg = mcdist::node::NodeConfig::new(
                mcdist::ServerConfig {
                    push_neighbors: false,
                    working_set_push: false,
                    ..Default::default()
                },
                security.clone(),
            );
            MemoryServer::start(src.clone(), &zero, digest, group, Some(iface), listen, cfg)
                .expect("server")
        })
        .join()
        .expect("server thread")
    });
    let desc = Descriptor {
        mem_size: (IMAGE_MIB << 20) as u64,
        page_size: PS as u32,
        digest,
        session: Some(SessionParams {
            group,
            server: listen,
            session_id: server.session().session_id,
            protection: security.as_ref().map(|s| s.protection),
        }),
        vcpus: Vec::new(),
        zero_map: zero,
    };
    Served {
        _dir: dir,
        image,
        server: Some(server),
        desc,
    }
}

/// A handler on host `ns` (its client joins there), listening at `socket`.
fn handler(
    ns: &Netns,
    iface: &str,
    desc: &Descriptor,
    cfg: HandlerConfig,
) -> (Handler, Arc<HostCache>) {
    let cache = std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter().expect("enter clone host");
            HostCache::connect(desc, Some(iface), Duration::from_secs(5), |_| {})
                .expect("host cache joins the session")
        })
        .join()
        .expect("host thread")
    });
    let backend = Backend::Host {
        cache: cache.clone(),
        zero: Arc::new(desc.zero_map.clone()),
    };
    (Handler::new(backend, cfg), cache)
}

/// Accepts `n` microVMs on `socket` in a thread.
fn accept(handler: Handler, socket: &Path, n: usize) -> std::thread::JoinHandle<Vec<ServedVmm>> {
    let l = UnixListener::bind(socket).expect("bind");
    std::thread::spawn(move || handler.serve(&l, |s| s.len() < n).expect("accept"))
}

fn nonzero(desc: &Descriptor, pages: &[u64]) -> std::collections::BTreeSet<u64> {
    pages
        .iter()
        .copied()
        .filter(|&p| !desc.zero_map.get(p))
        .collect()
}

#[test]
fn microvms_restore_over_mcdist_with_balloon_and_both_formats() {
    if !runnable() {
        return;
    }
    let ns = common::loopback_ns("fc1");
    let port = 47310;
    let group = SocketAddrV4::new([239, 255, 81, 10].into(), port);
    let s = serve(
        &ns,
        "lo",
        format!("127.0.0.1:{}", port + 1).parse().unwrap(),
        group,
        None,
    );
    let (h, cache) = handler(&ns, "lo", &s.desc, HandlerConfig::default());
    let sock = s._dir.path().join("uffd.sock");
    let acc = accept(h, &sock, 2);
    let a = microvm(&sock, &s.image, 1, 3, &["FC_BALLOON"]);
    let b = microvm(&sock, &s.image, 2, 5, &["FC_LEGACY"]);
    let (sa, oa) = finish(a);
    let (sb, ob) = finish(b);
    assert!(sa.success(), "microVM a: {oa}");
    assert!(sb.success(), "microVM b: {ob}");
    assert!(oa.contains("FC-BALLOON ok"), "{oa}");
    let served = acc.join().expect("acceptor");
    for v in served {
        let st = v.stats();
        println!("microVM {}: {st:?}", v.pid());
        assert!(st.faults > 0 && st.copies > 0, "{st:?}");
        assert!(matches!(v.wait(), VmmEnd::Exited));
    }
    let union: std::collections::BTreeSet<u64> = nonzero(&s.desc, &touched(1, 3))
        .union(&nonzero(&s.desc, &touched(2, 5)))
        .copied()
        .collect();
    let hs = cache.stats();
    assert!(
        hs.host_requests <= union.len() as u64,
        "{hs:?} vs {}",
        union.len()
    );
    assert!(
        hs.network_pages <= union.len() as u64,
        "{hs:?} vs {}",
        union.len()
    );
}

#[test]
fn a_lost_server_kills_the_microvm_instead_of_hanging_it() {
    if !runnable() {
        return;
    }
    let ns = common::loopback_ns("fc2");
    let port = 47320;
    let group = SocketAddrV4::new([239, 255, 81, 20].into(), port);
    let mut s = serve(
        &ns,
        "lo",
        format!("127.0.0.1:{}", port + 1).parse().unwrap(),
        group,
        None,
    );
    let cfg = HandlerConfig {
        fetch_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let (h, _cache) = handler(&ns, "lo", &s.desc, cfg);
    s.server
        .take()
        .expect("server")
        .shutdown()
        .expect("shutdown");
    let sock = s._dir.path().join("uffd.sock");
    let acc = accept(h, &sock, 1);
    let (status, out) = finish(microvm(&sock, &s.image, 3, 2, &[]));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "microVM not killed: {out}");
    let end = acc.join().expect("acceptor").pop().expect("served").wait();
    assert!(matches!(end, VmmEnd::Lost { killed: true, .. }), "{end:?}");
}

#[test]
fn bad_handshakes_get_one_clear_error_each() {
    if !uffd_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("mem");
    mcdist::testnet::write_test_image(&image, IMAGE_MIB, None, 0).expect("image");
    let src: Arc<dyn PageSource> = Arc::new(FileSource::open(&image, PS).expect("open"));
    let h = Handler::new(
        Backend::Local(src),
        HandlerConfig {
            handshake_timeout: Duration::from_millis(500),
            ..Default::default()
        },
    );
    let sock = dir.path().join("s");
    let l = UnixListener::bind(&sock).expect("bind");
    let mem = GuestMemory::map(&SIZES).expect("map");
    let try_one = |send: &dyn Fn() -> UnixStream| {
        let c = send();
        let (conn, _) = l.accept().expect("accept");
        let r = h.handshake(conn).map(|_| ()).expect_err("refused");
        drop(c);
        r
    };
    let e = try_one(&|| {
        mem.connect(&sock, b"[{\"base_host_virt_addr\": 12,")
            .expect("send")
    });
    assert!(matches!(e, HandshakeError::Timeout(_)), "{e}");
    let e = try_one(&|| mem.connect(&sock, b"{\"regions\": 1}").expect("send"));
    assert!(matches!(e, HandshakeError::Json(_)), "{e}");
    let e = try_one(&|| {
        let mut c = UnixStream::connect(&sock).expect("connect");
        c.write_all(mem.mappings_json(RegionFormat::Current).as_bytes())
            .expect("write");
        c
    });
    assert!(matches!(e, HandshakeError::NoUffd), "{e}");
    let big = GuestMemory::map(&[4 << 20, 6 << 20]).expect("map");
    let e = try_one(&|| {
        big.connect(&sock, big.mappings_json(RegionFormat::Current).as_bytes())
            .expect("send")
    });
    assert!(
        matches!(e, HandshakeError::PastImage { region: 1, .. }),
        "{e}"
    );
    println!("errors: {e}");
}

#[test]
fn two_hosts_two_microvms_each_restore_one_snapshot_and_measure() {
    if !runnable() {
        return;
    }
    let net = BridgeNet::create(&format!("fcu{}", std::process::id() % 10000), 4).expect("net");
    let port = 47330;
    let group = SocketAddrV4::new([239, 255, 81, 30].into(), port);
    let listen = SocketAddr::new(BridgeNet::addr(0).into(), port + 1);
    let s = serve(&net.hosts[0], "eth0", listen, group, None);
    let mut results = Vec::new();
    let mut children = Vec::new();
    let mut acceptors = Vec::new();
    for host in 1..3 {
        let (h, cache) = handler(&net.hosts[host], "eth0", &s.desc, HandlerConfig::default());
        let sock = s._dir.path().join(format!("h{host}.sock"));
        acceptors.push(accept(h, &sock, 2));
        let seeds = [host as u64 * 10, host as u64 * 10 + 1];
        for seed in seeds {
            children.push((host, microvm(&sock, &s.image, seed, 4, &[])));
        }
        results.push((host, cache, seeds));
    }
    let mut lat = Vec::new();
    for (host, c) in children {
        let (st, out) = finish(c);
        assert!(st.success(), "microVM on host {host}: {out}");
        lat.extend(latencies(&out));
    }
    for a in acceptors {
        a.join().expect("acceptor");
    }
    let all: std::collections::BTreeSet<u64> = results
        .iter()
        .flat_map(|(_, _, seeds)| {
            seeds
                .iter()
                .flat_map(|&sd| nonzero(&s.desc, &touched(sd, 4)))
        })
        .collect();
    for (host, cache, seeds) in &results {
        let here: std::collections::BTreeSet<u64> = seeds
            .iter()
            .flat_map(|&sd| nonzero(&s.desc, &touched(sd, 4)))
            .collect();
        let hs = cache.stats();
        let cs = cache.client_stats();
        println!(
            "host {host}: touched here {} (all hosts {}), asked {} pages, received {} pages, {} bytes on its socket",
            here.len(), all.len(), hs.host_requests, hs.network_pages, cs.bytes_received
        );
        assert!(hs.host_requests <= here.len() as u64, "{hs:?}");
        assert!(hs.network_pages <= all.len() as u64, "{hs:?}");
    }
    let (p50, p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
    println!(
        "mcdist handler, 4 microVMs on 2 hosts: fault p50 {p50} ns, p99 {p99} ns over {} faults",
        lat.len()
    );
    // One microVM alone, over mcdist (a fresh host cache on host 3, joined now) and against
    // Firecracker's on_demand logic (a local file read per fault), with the same touches.
    let (h, _cache3) = handler(&net.hosts[3], "eth0", &s.desc, HandlerConfig::default());
    one_microvm(
        h,
        &s._dir.path().join("h3.sock"),
        &s.image,
        "mcdist handler",
    );
    let src: Arc<dyn PageSource> = Arc::new(FileSource::open(&s.image, PS).expect("open"));
    let h = Handler::new(Backend::Local(src), HandlerConfig::default());
    one_microvm(
        h,
        &s._dir.path().join("local.sock"),
        &s.image,
        "local-file handler",
    );
}

/// One microVM alone restores through `h` on `sock` and touches pages from 4 threads; its
/// fault latency is printed under `label`.
fn one_microvm(h: Handler, sock: &Path, image: &Path, label: &str) {
    let acc = accept(h, sock, 1);
    let (st, out) = finish(microvm(sock, image, 99, 4, &[]));
    assert!(st.success(), "{out}");
    acc.join().expect("acceptor");
    let mut l = latencies(&out);
    println!(
        "{label}, 1 microVM: fault p50 {} ns, p99 {} ns over {} faults",
        pct(&mut l, 0.5),
        pct(&mut l, 0.99),
        l.len()
    );
}

#[test]
fn both_region_formats_parse_and_map_pages_to_addresses() {
    use mcdist_kvm::fcuffd::parse_regions;
    let cur = serde_json::json!([
        {"base_host_virt_addr": 0x7f00_0000_0000u64, "size": 8192, "offset": 0,
         "page_size": 4096, "page_size_kib": 4096},
        {"base_host_virt_addr": 0x7e00_0000_0000u64, "size": 4096, "offset": 8192,
         "page_size": 4096, "page_size_kib": 4096}
    ]);
    let old = serde_json::json!([
        {"base_host_virt_addr": 0x7f00_0000_0000u64, "size": 8192, "offset": 0, "page_size_kib": 4},
        {"base_host_virt_addr": 0x7e00_0000_0000u64, "size": 4096, "offset": 8192, "page_size_kib": 4096}
    ]);
    let a = parse_regions(cur, 4096, 3 * 4096).expect("current format");
    let b = parse_regions(old, 4096, 3 * 4096).expect("legacy format");
    assert_eq!(a, b);
    assert_eq!(a[1].page_of(0x7e00_0000_0123), Some((2, 0x7e00_0000_0000)));
    assert_eq!(a[0].page_of(0x7f00_0000_1fff), Some((1, 0x7f00_0000_1000)));
    assert_eq!(a[0].addr_of(2), None);
    assert_eq!(a[1].addr_of(2), Some(0x7e00_0000_0000));
    let huge = serde_json::json!([{"base_host_virt_addr": 0, "size": 2097152, "offset": 0,
        "page_size": 2097152}]);
    assert!(matches!(
        parse_regions(huge, 4096, 1 << 22),
        Err(HandshakeError::PageSize {
            page_size: 2097152,
            ..
        })
    ));
}

#[test]
fn the_binary_serves_a_plain_memory_file_and_reports_cli_errors_in_one_line() {
    let bin = env!("CARGO_BIN_EXE_mcdist-uffd");
    let out = Command::new(bin)
        .args([
            "--socket",
            "/nonexistent-dir/s",
            "--group",
            "239.255.81.40:1",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let out = Command::new(bin)
        .args(["--socket", "x.sock", "--local", "/nonexistent-image"])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.lines().count() == 1, "{err}");
    if !runnable() {
        return;
    }
    let ns = common::loopback_ns("fc5");
    let port = 47340;
    let group = SocketAddrV4::new([239, 255, 81, 40].into(), port);
    let listen = format!("127.0.0.1:{}", port + 1);
    // The session is keyed: the handler gets the key file, as `mcdist serve --key`.
    let keydir = tempfile::tempdir().expect("tempdir");
    let key = keydir.path().join("key");
    std::fs::write(&key, mcdist::secure::Psk::generate().to_hex()).expect("key");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let psk = mcdist::secure::Psk::load(&key).expect("load key").psk;
    let sec = mcdist::secure::Security::new(psk);
    let s = serve(&ns, "lo", listen.parse().unwrap(), group, Some(sec));
    let sock = s._dir.path().join("bin.sock");
    let digest = mcdist::hex(&s.desc.digest);
    let mut h = Command::new("ip")
        .args(["netns", "exec", ns.name(), bin, "--socket"])
        .arg(&sock)
        .args([
            "--group",
            &group.to_string(),
            "--server",
            &listen,
            "--iface",
            "lo",
        ])
        .args(["--digest", &digest, "--vmms", "1", "--key"])
        .arg(&key)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mcdist-uffd");
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(h.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ready line");
    assert!(line.starts_with("MCDIST-UFFD ready"), "{line}");
    let (st, out) = finish(microvm(&sock, &s.image, 7, 3, &["FC_BALLOON"]));
    assert!(st.success(), "{out}");
    let (st, out) = finish(h);
    assert!(st.success(), "mcdist-uffd: {out}");
    assert!(out.contains("exited"), "{out}");
}

#[test]
fn pages_another_microvm_brought_are_installed_ahead_of_faults() {
    if !runnable() {
        return;
    }
    let ns = common::loopback_ns("fc6");
    let port = 47350;
    let group = SocketAddrV4::new([239, 255, 81, 50].into(), port);
    let listen = format!("127.0.0.1:{}", port + 1).parse().unwrap();
    let s = serve(&ns, "lo", listen, group, None);
    let (h, _cache) = handler(&ns, "lo", &s.desc, HandlerConfig::default());
    let sock = s._dir.path().join("ahead.sock");
    let l = UnixListener::bind(&sock).expect("bind");
    // B connects first and waits; A then touches the pages B will touch.
    let go = s._dir.path().join("go");
    let b = microvm_env(&sock, &s.image, 5, 3, &[], &[("FC_GO", &go)]);
    let vb = h.handshake(l.accept().expect("accept b").0).expect("b");
    let a = microvm(&sock, &s.image, 5, 3, &[]);
    let va = h.handshake(l.accept().expect("accept a").0).expect("a");
    let (st, out) = finish(a);
    assert!(st.success(), "{out}");
    let wanted = nonzero(&s.desc, &touched(5, 3)).len() as u64;
    for _ in 0..1000 {
        if vb.stats().ahead >= wanted {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::write(&go, b"go").expect("go");
    let (st, out) = finish(b);
    assert!(st.success(), "{out}");
    let (sa, sb) = (va.stats(), vb.stats());
    println!("a: {sa:?}\nb: {sb:?}");
    assert_eq!(sb.ahead, wanted, "{sb:?}");
    // B faulted only on its zero pages: every other page was there before it touched it.
    assert_eq!(sb.faults, sb.zero_fills, "{sb:?}");
    assert_eq!(sa.faults - sa.zero_fills, wanted, "{sa:?}");
}
