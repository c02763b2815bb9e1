//! Per-host sharing: real KVM clones on two namespace hosts of a private bridge, three clones
//! per host sharing one mcdist client and page cache (real userfaultfd, real multicast).

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use mcdist_kvm::clone::{CloneOptions, CloneReport};
use mcdist_kvm::guest::HashJob;
use mcdist_kvm::netns::{BridgeNet, Netns};
use mcdist_kvm::share::HostCacheProcess;
use mcdist_kvm::DescriptorFile;
use mcdist_kvm::{CloneTicket, Descriptor, Frozen, HostCache};

mod common;
use common::{assert_child_lost_memory, fork, have_kvm_and_uffd, in_child};

/// Joins the session from inside `host` (the client's socket lives in that namespace).
fn host_cache(host: &Netns, desc: &Descriptor) -> Arc<HostCache> {
    std::thread::scope(|s| {
        s.spawn(|| {
            host.enter().expect("enter clone host");
            HostCache::connect(desc, Some("eth0"), Duration::from_secs(5), |_| {})
                .expect("host cache joins the session")
        })
        .join()
        .expect("host thread")
    })
}

/// Runs `ticket`'s clones on `cache` and checks every result against the host's computation.
fn run_checked(
    frozen: &Frozen,
    ticket: &CloneTicket,
    desc: &Arc<Descriptor>,
    cache: &Arc<HostCache>,
) -> Vec<CloneReport> {
    let launcher = cache.launcher(CloneOptions::default());
    join_checked(frozen.clone_vms(ticket, desc, &launcher), frozen.job())
}

/// Server counters once they stopped moving (the server publishes them as it runs).
fn settled(server: &mcdist_kvm::MemoryServer) -> mcdist::node::ServerSnapshot {
    let mut last = server.stats();
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let now = server.stats();
        if now.stats == last.stats {
            return now;
        }
        last = now;
    }
    last
}

/// A parent frozen on host 0 of a three-host bridge, serving its image there with demand
/// paging only (so every page on the wire was asked for by some clone).
struct Bridge {
    net: BridgeNet,
    job: HashJob,
    frozen: Frozen,
    server: mcdist_kvm::MemoryServer,
    desc: Arc<Descriptor>,
    nonzero: u64,
}

fn bridge(prefix: &str, seed: u32, port: u16) -> Bridge {
    let net =
        BridgeNet::create(&format!("{prefix}{}", std::process::id() % 10000), 3).expect("net");
    net.hosts[0].enter().expect("enter server host");
    let job = HashJob::new(64 << 20, 0.5, 0.05, seed, 4096);
    let frozen = fork(job);
    let group = SocketAddrV4::new([239, 255, 79, (port % 200) as u8].into(), port);
    let listen = SocketAddr::new(BridgeNet::addr(0).into(), port + 1);
    let scfg = mcdist::ServerConfig {
        push_neighbors: false,
        working_set_push: false,
        ..Default::default()
    };
    let (server, desc) = frozen
        .serve(group, Some("eth0"), listen, scfg)
        .expect("server");
    let nonzero = desc.page_count() - desc.zero_map.count_ones();
    Bridge {
        net,
        job,
        frozen,
        server,
        desc: Arc::new(desc),
        nonzero,
    }
}

/// Waits for the clones of `set` and checks every result against the host's computation.
fn join_checked(set: mcdist_kvm::CloneSet, job: &HashJob) -> Vec<CloneReport> {
    set.join(Duration::from_secs(120))
        .into_iter()
        .map(|(id, r)| {
            let r = r.unwrap_or_else(|e| panic!("clone {id}: {e}"));
            assert_eq!(r.result, job.expected(id), "clone {id}'s result");
            assert_eq!(r.stats.zero_pages_received, 0, "clone {id} got a zero page");
            r
        })
        .collect()
}

fn installed(reports: &[CloneReport]) -> u64 {
    reports.iter().map(|r| r.stats.pages_fetched()).sum()
}

#[test]
fn two_hosts_of_three_clones_share_one_client_and_cache_each() {
    if !have_kvm_and_uffd() {
        return;
    }
    let Bridge {
        net,
        job,
        mut frozen,
        server,
        desc,
        nonzero,
    } = bridge("mcds", 31, 47101);
    let hosts = [
        host_cache(&net.hosts[1], &desc),
        host_cache(&net.hosts[2], &desc),
    ];
    let tickets = [
        frozen.request_ticket(3).expect("ticket"),
        frozen.request_ticket(3).expect("ticket"),
    ];

    // Generation 1: three clones per host, each hashing its own slice, all running at once.
    let sets: Vec<_> = hosts
        .iter()
        .zip(&tickets)
        .map(|(cache, t)| frozen.clone_vms(t, &desc, &cache.launcher(CloneOptions::default())))
        .collect();
    let gen1: Vec<Vec<CloneReport>> = sets.into_iter().map(|s| join_checked(s, &job)).collect();

    let s1 = settled(&server);
    eprintln!(
        "server after generation 1: {} receivers, {} pages sent, {} request datagrams, {} pages asked",
        s1.clients, s1.stats.pages_sent, s1.stats.requests, s1.stats.pages_requested
    );
    // One receiver per host, not one per clone.
    assert_eq!(s1.clients, 2, "the server must see one receiver per host");
    let mut st1 = Vec::new();
    for (h, (cache, reports)) in hosts.iter().zip(&gen1).enumerate() {
        let st = cache.stats();
        let cs = cache.client_stats();
        eprintln!(
            "host {h}: {st:?}; client received {} pages, {} bytes, {} requests sent; clones installed {}",
            cs.pages_received,
            cs.bytes_received,
            cs.requests_sent,
            installed(reports)
        );
        assert_eq!(st.clones_attached, 3);
        // Each page was stored once per host (a page the server resent after a lost or late
        // reply reaches the socket again and is dropped there), and no more than the image holds.
        assert_eq!(st.network_pages, cs.pages_received);
        assert!(st.network_pages <= nonzero);
        assert_eq!(cache.resident_bytes(), st.network_pages * 4096);
        // Every page a clone installed came through the cache.
        assert_eq!(installed(reports), st.pages_installed());
        // The host asked the network once for pages its three clones all needed (the guest's
        // code and mailbox pages at least): the other clones joined the wait or hit the cache.
        assert!(
            st.cache_hits + st.joined_waits >= 2 * 2,
            "clones of one host shared no page: {st:?}"
        );
        let faults: u64 = reports.iter().map(|r| r.stats.pages_requested).sum();
        assert!(
            st.host_requests < faults,
            "host requests {} not fewer than clone requests {faults}",
            st.host_requests
        );
        // The host also holds the pages the other host's clones asked for (multicast).
        assert!(
            st.network_pages > installed(reports),
            "the other host's pages were not kept"
        );
        st1.push(st);
    }

    // Generation 2 on host 1: the same six jobs again (its own three and the other host's
    // three). Every page is already in host 1's cache: no request, no page on the wire.
    let mut gen2 = run_checked(&frozen, &tickets[0], &desc, &hosts[0]);
    gen2.extend(run_checked(&frozen, &tickets[1], &desc, &hosts[0]));
    let s2 = settled(&server);
    let st = hosts[0].stats();
    eprintln!(
        "host 0 after generation 2: {st:?}; clones installed {} (generation 1: {})",
        installed(&gen2),
        installed(&gen1[0])
    );
    assert_eq!(st.network_pages, st1[0].network_pages, "pages came again");
    assert_eq!(
        st.host_requests, st1[0].host_requests,
        "pages were asked again"
    );
    assert_eq!(
        s2.stats.pages_sent, s1.stats.pages_sent,
        "the server sent pages again"
    );
    assert_eq!(s2.stats.pages_requested, s1.stats.pages_requested);
    assert!(installed(&gen2) > 0);
    assert_eq!(st.cache_hits - st1[0].cache_hits, installed(&gen2));
    // Nine clones installed more pages than crossed the network to their host.
    let all_installed = installed(&gen1[0]) + installed(&gen2);
    assert!(
        all_installed > st.network_pages,
        "installed {all_installed}, network {}",
        st.network_pages
    );
    assert_eq!(st.clones_attached, 9);
    drop(hosts);
    let s = server.shutdown().expect("server stats");
    assert_eq!(s.stats.zero_replies, 0);
}

#[test]
fn every_clone_of_a_host_fails_clearly_when_the_server_disappears() {
    if !have_kvm_and_uffd() {
        return;
    }
    if !in_child() {
        assert_child_lost_memory("every_clone_of_a_host_fails_clearly_when_the_server_disappears");
        return;
    }
    let ns = Netns::create(&format!("mcds-gone-{}", std::process::id())).expect("netns");
    ns.multicast_route("lo").expect("route");
    ns.enter().expect("enter netns");
    let job = HashJob::new(16 << 20, 0.5, 0.1, 5, 4096);
    let mut frozen = fork(job);
    let group = SocketAddrV4::new([239, 255, 79, 2].into(), 47111);
    let listen: SocketAddr = "127.0.0.1:47112".parse().expect("addr");
    let (server, desc) = frozen
        .serve(group, Some("lo"), listen, mcdist::ServerConfig::default())
        .expect("server");
    let desc = Arc::new(desc);
    let cache = HostCache::connect(&desc, Some("lo"), Duration::from_secs(5), |c| {
        c.give_up_after = Duration::from_secs(2)
    })
    .expect("host cache");
    // The server goes away after the host joined, before any clone faults.
    server.shutdown().expect("shutdown");
    let ticket = frozen.request_ticket(3).expect("ticket");
    let mut opts = CloneOptions::default();
    opts.lazy.fetch_timeout = Duration::from_secs(6);
    // Fail closed: a lost memory ends this (child) process with "memory lost: ...".
    let host = cache.clone();
    let launcher = mcdist_kvm::clone::ThreadLauncher {
        make_fetcher: Arc::new(move |_id, _d: &Descriptor, h: mcdist_kvm::LazyHandle| {
            h.exit_process_on_loss().expect("watchdog");
            Ok(host.fetcher(h))
        }),
        opts,
    };
    let results = frozen
        .clone_vms(&ticket, &desc, &launcher)
        .join(Duration::from_secs(60));
    assert_eq!(results.len(), 3);
    for (id, r) in results {
        match r {
            Err(mcdist_kvm::CloneError::MemoryLost { id: i, failure }) => {
                assert_eq!(i, id);
                eprintln!("clone {id}: {failure}");
            }
            other => panic!("clone {id}: expected a memory-lost error, got {other:?}"),
        }
    }
    // A clone attached after the failure fails at once instead of waiting.
    let late = frozen.request_ticket(1).expect("ticket");
    let results = frozen
        .clone_vms(&late, &desc, &cache.launcher(CloneOptions::default()))
        .join(Duration::from_secs(60));
    assert!(
        matches!(results[0].1, Err(mcdist_kvm::CloneError::MemoryLost { .. })),
        "late clone: {:?}",
        results[0].1
    );
    assert_eq!(cache.stats().network_pages, 0);
    // Where the vCPUs could be kicked out of their faults, the clones returned instead.
    eprintln!("memory lost: every clone of the host");
    std::process::exit(1);
}

#[test]
fn clone_processes_share_one_cache_process_per_host() {
    if !have_kvm_and_uffd() {
        return;
    }
    let Bridge {
        net,
        job,
        mut frozen,
        server,
        desc,
        nonzero,
    } = bridge("mcdp", 41, 47121);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("parent.desc");
    desc.save(&path).expect("save descriptor");
    let caches: Vec<HostCacheProcess> = (1..=2)
        .map(|h| {
            HostCacheProcess::start(
                std::path::Path::new(env!("CARGO_BIN_EXE_mcdist-host-cache")),
                net.hosts[h].name(),
                &path,
                dir.path().join(format!("h{h}.sock")),
                "eth0",
            )
            .expect("mcdist-host-cache")
        })
        .collect();
    let sets: Vec<_> = caches
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let ticket = frozen.request_ticket(3).expect("ticket");
            let host = net.hosts[i + 1].name().to_string();
            let launcher = mcdist_kvm::clone::ProcessLauncher {
                command: |id: u32| {
                    let mut cmd = std::process::Command::new("ip");
                    cmd.args(["netns", "exec", &host])
                        .arg(env!("CARGO_BIN_EXE_mcdist-clone"))
                        .arg("--descriptor")
                        .arg(&path)
                        .args(["--id", &id.to_string()])
                        .arg("--host-cache")
                        .arg(c.socket());
                    cmd
                },
            };
            frozen.clone_vms(&ticket, &desc, &launcher)
        })
        .collect();
    let per_host: Vec<Vec<CloneReport>> = sets.into_iter().map(|s| join_checked(s, &job)).collect();
    let s = settled(&server);
    eprintln!(
        "server: {} receivers, {} pages sent, {} request datagrams",
        s.clients, s.stats.pages_sent, s.stats.requests
    );
    assert_eq!(s.clients, 2, "the server must see one receiver per host");
    for (h, (cache, reports)) in caches.into_iter().zip(&per_host).enumerate() {
        let st = cache.finish().expect("host cache counters");
        let faults: u64 = reports.iter().map(|r| r.stats.pages_requested).sum();
        eprintln!(
            "host {h}: {st:?}; clones installed {}, asked for {faults}",
            installed(reports)
        );
        assert_eq!(st["clones"], 3);
        assert_eq!(st["malformed"], 0);
        assert!(st["network_pages"] <= nonzero);
        // The host holds the pages the other host's clones asked for too.
        assert!(st["network_pages"] > installed(reports));
        // Every page a clone installed came from the host's cache: installed when it arrived,
        // announced from the cache, or taken by the clone from the shared mapping after seeing
        // its presence bit (those the cache process does not count).
        // A repeated request that crossed its page's delivery is dropped, not served twice.
        assert!(
            installed(reports) >= st["waiter_installs"] + st["cache_hits"],
            "host {h}: the cache counted more deliveries than the clones installed: {st:?}"
        );
        // Pages that several clones needed were asked for once.
        assert!(st["host_requests"] < faults, "no page shared: {st:?}");
    }
    server.shutdown().expect("server stats");
}

#[test]
fn cache_socket_drops_malformed_frames_and_serves_pages_from_shared_memory() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let uffd = std::path::Path::new("/dev/userfaultfd").exists()
        || std::fs::metadata("/proc/sys/vm/unprivileged_userfaultfd").is_ok();
    if !uffd {
        eprintln!("skipping: userfaultfd is not available on this kernel");
        return;
    }
    let ns = Netns::create(&format!("mcds-frames-{}", std::process::id())).expect("netns");
    ns.multicast_route("lo").expect("route");
    ns.enter().expect("enter netns");
    // A 64-page image: page p is filled with byte p + 1 (page 10 is all zero).
    const PAGE: usize = 4096;
    let mut image = vec![0u8; 64 * PAGE];
    for (p, page) in image.chunks_mut(PAGE).enumerate() {
        if p != 10 {
            page.fill(p as u8 + 1);
        }
    }
    let src = Arc::new(mcdist_kvm::source::MemSource::new(image.clone(), PAGE));
    let info = mcdist_kvm::source::scan(&*src).expect("scan");
    let server = mcdist_kvm::MemoryServer::start(
        src,
        &info.zero_map,
        info.digest,
        SocketAddrV4::new([239, 255, 79, 4].into(), 47131),
        Some("lo"),
        "127.0.0.1:47132".parse().expect("addr"),
        mcdist::ServerConfig {
            push_neighbors: false,
            working_set_push: false,
            ..Default::default()
        },
    )
    .expect("server");
    let desc = Descriptor {
        mem_size: image.len() as u64,
        page_size: PAGE as u32,
        digest: info.digest,
        session: Some(server.session().clone()),
        vcpus: Vec::new(),
        zero_map: info.zero_map.clone(),
    };
    let cache = HostCache::connect(&desc, Some("lo"), Duration::from_secs(5), |c| {
        c.give_up_after = Duration::from_secs(1)
    })
    .expect("host cache");
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = cache
        .serve_unix(&dir.path().join("cache.sock"))
        .expect("serve");
    assert_sealed_and_private(sock.path(), dir.path());

    // A raw peer: the hello names the image, junk is dropped, a request is answered.
    let mut raw = UnixStream::connect(sock.path()).expect("connect");
    raw.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut hello = [0u8; 56];
    raw.read_exact(&mut hello).expect("hello");
    assert_eq!(&hello[0..4], b"MDHC");
    assert_eq!(u64::from_le_bytes(hello[8..16].try_into().expect("8")), 64);
    assert_eq!(&hello[24..56], &info.digest);
    let frame = |kind: u32, value: u64| {
        let mut f = [0u8; 16];
        f[0..4].copy_from_slice(&kind.to_le_bytes());
        f[8..16].copy_from_slice(&value.to_le_bytes());
        f
    };
    raw.write_all(&frame(9, 3)).expect("unknown kind");
    raw.write_all(&frame(1, 1 << 40))
        .expect("page out of range");
    raw.write_all(&frame(1, 7)).expect("request");
    let mut reply = [0u8; 16];
    raw.read_exact(&mut reply).expect("ready");
    assert_eq!(reply, frame(2, 7), "expected Ready(7)");
    // Asked again (a repeated request that crossed the reply): answered again from the
    // cache, no second request to the server, and not counted as a second delivery.
    raw.write_all(&frame(1, 7)).expect("request again");
    raw.read_exact(&mut reply).expect("ready again");
    assert_eq!(reply, frame(2, 7));
    let st = cache.stats();
    assert_eq!(st.malformed_frames, 2, "{st:?}");
    assert_eq!(st.host_requests, 1);
    assert_eq!(st.cache_hits, 0);
    assert_eq!(st.stale_requests, 1);
    assert!(cache.is_cached(7));

    // A real clone-side fetcher: lazy memory faults, pages come from the shared mapping.
    let mut mem =
        mcdist_kvm::LazyMemory::new(image.len(), info.zero_map.clone(), Default::default())
            .expect("lazy memory");
    let fetcher = mcdist_kvm::share::connect_host_cache(sock.path(), &desc, mem.handle())
        .expect("attach to the host cache");
    mem.start(fetcher).expect("start");
    let mut got = vec![0u8; image.len()];
    mem.read(0, &mut got).expect("read all pages");
    assert!(got == image, "pages differ from the image");
    // The snapshot includes the install that woke the reader last.
    let lazy = mem.stats();
    assert_eq!(lazy.zero_pages, 1);
    assert_eq!(lazy.pages_fetched(), 63, "{lazy:?}");
    let st = cache.stats();
    assert_eq!(st.network_pages, 63, "each page crossed the network once");
    // Page 7 was already cached: the clone saw its presence bit and took it from the shared
    // mapping without asking; it asked for the 62 others.
    assert_eq!(st.cache_hits, 0, "{st:?}");
    assert_eq!(st.host_requests, 63, "{st:?}");
    drop(mem);
    // The raw peer asks for a page another clone brought in: a hit, straight from the cache.
    raw.write_all(&frame(1, 8)).expect("request a cached page");
    raw.read_exact(&mut reply).expect("ready from the cache");
    assert_eq!(reply, frame(2, 8));
    let st = cache.stats();
    assert_eq!((st.cache_hits, st.host_requests), (1, 63), "{st:?}");

    // The server goes away; a request that needs it fails the host's session, and every
    // clone process attached (or attaching later) is told.
    server.shutdown().expect("server");
    raw.write_all(&frame(1, 10))
        .expect("request for an uncached page");
    raw.read_exact(&mut reply).expect("failure notice");
    assert_eq!(reply, frame(3, 0), "expected Failed");
    let mut late = UnixStream::connect(sock.path()).expect("connect");
    late.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    late.read_exact(&mut hello).expect("hello");
    late.read_exact(&mut reply).expect("failure notice");
    assert_eq!(
        reply,
        frame(3, 0),
        "a late clone process must be told at once"
    );
}

/// The cache's memfd cannot be written or resized by anyone it is handed to (sealed: even
/// a descriptor reopened for writing fails), and its socket is the owner's only, with no
/// private directory left behind.
fn assert_sealed_and_private(sock: &std::path::Path, dir: &std::path::Path) {
    use std::io::Write;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let meta = std::fs::symlink_metadata(sock).expect("socket");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "socket mode");
    let left: Vec<_> = std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 1, "only the socket is left: {left:?}");
    // Find the memfd among this process's descriptors (the cache runs in-process here; a
    // clone process receives the same file).
    let memfd = std::fs::read_dir("/proc/self/fd")
        .expect("fds")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            std::fs::read_link(p)
                .map(|t| t.to_string_lossy().contains("memfd:mcdist-host-cache"))
                .unwrap_or(false)
        })
        .expect("the host cache's memfd");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&memfd)
        .expect("reopen the memfd");
    let len = f.metadata().expect("meta").len();
    // EPERM or EACCES.
    let denied = |e: &std::io::Error| matches!(e.raw_os_error(), Some(1) | Some(13));
    let w = f
        .write_all(&[0xffu8; 4096])
        .expect_err("a write into the cache succeeded");
    assert!(denied(&w), "write: {w}");
    let t = f.set_len(0).expect_err("the cache was truncated");
    assert!(denied(&t), "truncate: {t}");
    let g = f.set_len(len + 4096).expect_err("the cache was grown");
    assert!(denied(&g), "grow: {g}");
    assert_eq!(f.metadata().expect("meta").len(), len);
}
