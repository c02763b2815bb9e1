//! Fail closed, on real KVM and real userfaultfd: once a clone's page source fails (a
//! source error, or its memory server killed mid-run) the clone never gets a zero-filled or
//! stale page; its vCPUs are stopped and it reports "memory lost: ...".

use std::net::{SocketAddr, SocketAddrV4};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mcdist_kvm::clone::{run_clone, CloneError, CloneOptions};
use mcdist_kvm::guest::HashJob;
use mcdist_kvm::{DescriptorFile, LazyHandle, PageFetcher, PageSource};

mod common;
use common::{assert_child_lost_memory, fork, have_kvm_and_uffd, in_child, loopback_ns};

/// Serves the first `good` requested pages from the image, then fails.
struct FailingSource {
    image: Arc<dyn PageSource>,
    handle: LazyHandle,
    good: u64,
    served: AtomicU64,
    after_failure: AtomicU64,
}

impl PageFetcher for FailingSource {
    fn request(&self, pfn: u64) {
        let n = self.served.fetch_add(1, Ordering::SeqCst);
        if n < self.good {
            let mut buf = vec![0u8; self.image.page_size()];
            match self.image.read_page(pfn, &mut buf) {
                Ok(()) => self.handle.install(pfn, &buf),
                Err(e) => self.handle.fail(format!("reading page {pfn}: {e}")),
            }
        } else if n == self.good {
            self.handle.fail("the page source failed");
        } else {
            // A request after the failure: a late (stale) page offered now must not be
            // installed either.
            self.after_failure.fetch_add(1, Ordering::SeqCst);
            let buf = vec![0xa5u8; self.image.page_size()];
            self.handle.install(pfn, &buf);
        }
    }
}

#[test]
fn a_failing_source_stops_the_vcpus_without_zero_or_late_pages() {
    if !have_kvm_and_uffd() {
        return;
    }
    if !in_child() {
        assert_child_lost_memory("a_failing_source_stops_the_vcpus_without_zero_or_late_pages");
        return;
    }
    let job = HashJob::new(16 << 20, 0.5, 0.5, 11, 4096);
    let frozen = fork(job);
    let desc = frozen.descriptor(None);
    let image = frozen.image();
    let r = run_clone(&desc, 0, &CloneOptions::default(), |h| {
        h.exit_process_on_loss().expect("watchdog");
        Ok(Arc::new(FailingSource {
            image: image.clone(),
            handle: h,
            good: 16,
            served: AtomicU64::new(0),
            after_failure: AtomicU64::new(0),
        }) as Arc<dyn PageFetcher>)
    });
    // Where the vCPU could be kicked out of its fault, the clone returns instead.
    match r {
        Err(e @ CloneError::MemoryLost { .. }) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
        other => panic!("expected memory lost, got {other:?}"),
    }
}

#[test]
fn after_a_failure_nothing_is_installed() {
    if !common::uffd_available() {
        return;
    }
    const PAGE: usize = 4096;
    let mut mem =
        mcdist_kvm::LazyMemory::new(8 * PAGE, mcdist_kvm::PageBitmap::new(8), Default::default())
            .expect("lazy memory");
    let h = mem.handle();
    struct Idle;
    impl PageFetcher for Idle {
        fn request(&self, _pfn: u64) {}
    }
    mem.start(Arc::new(Idle)).expect("start");
    h.install(1, &[7u8; PAGE]);
    assert!(h.is_installed(1));
    h.fail("the page source failed");
    assert!(h.is_failed());
    // A late page (of a lost or other session) is not installed.
    h.install(2, &[9u8; PAGE]);
    assert!(!h.is_installed(2), "a page was installed after the failure");
    let mut b = [0u8; PAGE];
    mem.read(PAGE, &mut b)
        .expect("read the page installed before");
    assert_eq!(b, [7u8; PAGE]);
}

#[test]
fn a_clone_process_whose_server_is_killed_mid_run_exits_with_memory_lost() {
    if !have_kvm_and_uffd() {
        return;
    }
    let ns = loopback_ns("kill");
    ns.enter().expect("enter netns");
    // Half of 64 MiB touched at 1 MiB/s: the run lasts far longer than it takes to kill the
    // server after its first pages.
    let job = HashJob::new(64 << 20, 0.5, 0.5, 13, 4096);
    let frozen = fork(job);
    let rate = mcdist::pacing::RateConfig {
        floor: 1 << 20,
        cap: 1 << 20,
        initial: 1 << 20,
        ..Default::default()
    };
    let cfg = mcdist::ServerConfig {
        push_neighbors: false,
        working_set_push: false,
        rate,
        ..Default::default()
    };
    let group = SocketAddrV4::new([239, 255, 77, 41].into(), 47301);
    let listen: SocketAddr = "127.0.0.1:47302".parse().expect("addr");
    let (server, desc) = frozen
        .serve(group, Some("lo"), listen, cfg)
        .expect("server");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("parent.desc");
    desc.save(&path).expect("save");
    let child = Command::new(env!("CARGO_BIN_EXE_mcdist-clone"))
        .arg("--descriptor")
        .arg(&path)
        .args(["--id", "0", "--iface", "lo", "--fetch-timeout-ms", "2000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mcdist-clone");
    let mut sent = 0;
    for _ in 0..60_000 {
        sent = server.stats().stats.pages_sent;
        if sent >= 8 {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(sent >= 8, "the clone never started fetching");
    server.shutdown().expect("kill the server");
    let out = child.wait_with_output().expect("wait");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout {stdout} stderr {stderr}"
    );
    assert!(
        !stdout.contains("MCDIST-CLONE"),
        "a result was reported: {stdout}"
    );
    let last = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    assert!(last.starts_with("memory lost: "), "stderr: {stderr}");
    eprintln!("clone process: {last}");
}
