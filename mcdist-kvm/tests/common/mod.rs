//! Setup shared by the integration tests: device checks that skip a test (saying why) when
//! /dev/kvm or userfaultfd is absent, and network namespaces the tests create.
#![allow(dead_code)] // each test crate uses part of it

use std::net::{SocketAddr, SocketAddrV4};

use mcdist_kvm::guest::HashJob;
use mcdist_kvm::netns::Netns;
use mcdist_kvm::vm::kvm_available;
use mcdist_kvm::{Descriptor, Frozen, MemoryServer, Parent};

/// Whether /dev/kvm is usable; prints why the test is skipped if not.
pub fn have_kvm() -> bool {
    let ok = kvm_available();
    if !ok {
        eprintln!("skipping: /dev/kvm is not available");
    }
    ok
}

/// Whether userfaultfd is available; prints why the test is skipped if not.
pub fn uffd_available() -> bool {
    let ok = std::path::Path::new("/dev/userfaultfd").exists()
        || std::fs::metadata("/proc/sys/vm/unprivileged_userfaultfd").is_ok();
    if !ok {
        eprintln!("skipping: userfaultfd is not available on this kernel");
    }
    ok
}

/// Whether both /dev/kvm and userfaultfd are available.
pub fn have_kvm_and_uffd() -> bool {
    have_kvm() && uffd_available()
}

/// A new network namespace `mcdk-TAG-PID` with a multicast route on its loopback.
pub fn loopback_ns(tag: &str) -> Netns {
    let ns = Netns::create(&format!("mcdk-{tag}-{}", std::process::id())).expect("netns");
    ns.multicast_route("lo").expect("route");
    ns
}

/// Boots the demo guest with `job` and runs it to its fork point.
pub fn fork(job: HashJob) -> Frozen {
    Parent::boot(job)
        .expect("boot")
        .run_to_fork()
        .expect("fork")
}

/// A frozen parent served on loopback, and the descriptor its clones start from.
pub struct Served {
    pub job: HashJob,
    pub frozen: Frozen,
    pub server: MemoryServer,
    pub desc: Descriptor,
}

/// Forks `job` and serves it on `lo`: group 239.255.78.(`port` mod 200):`port`, requests on
/// 127.0.0.1:`port` + 1.
pub fn serve(
    job: HashJob,
    port: u16,
    cfg: impl Into<mcdist::node::NodeConfig<mcdist::ServerConfig>>,
) -> Served {
    let frozen = fork(job);
    let group = SocketAddrV4::new([239, 255, 78, (port % 200) as u8].into(), port);
    let listen: SocketAddr = format!("127.0.0.1:{}", port + 1).parse().expect("addr");
    let (server, desc) = frozen
        .serve(group, Some("lo"), listen, cfg)
        .expect("server");
    Served {
        job,
        frozen,
        server,
        desc,
    }
}

/// Whether this test process is a child started by [`run_in_child`].
pub fn in_child() -> bool {
    std::env::var_os("MCDIST_KVM_TEST_CHILD").is_some()
}

/// Runs test `name` of this test binary again, in a child process (where [`in_child`] holds),
/// and returns its exit code and the last non-empty line it wrote on standard error. A clone
/// whose memory is lost fails closed by ending its process, so tests of that run in a child.
pub fn run_in_child(name: &str) -> (Option<i32>, String) {
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([name, "--exact", "--nocapture", "--test-threads", "1"])
        .env("MCDIST_KVM_TEST_CHILD", "1")
        .output()
        .expect("run the test in a child");
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("child stderr:\n{stderr}");
    let last = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .to_string();
    (out.status.code(), last)
}

/// The parent side of a fail-closed test: the child must exit 1 with "memory lost: ...".
pub fn assert_child_lost_memory(name: &str) {
    let (code, last) = run_in_child(name);
    assert_eq!(code, Some(1), "child exit status; last line: {last}");
    assert!(last.starts_with("memory lost: "), "last line: {last}");
}
