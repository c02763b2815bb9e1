//! Real QEMU clones over a real FUSE lazy memory file, pages multicast by mcdist between
//! network namespaces: boot Debian's cloud kernel, fork 2 clones on 2 hosts, check every
//! result against the host's computation, that FUSE reads stay at 4 KiB and that no zero page
//! crosses the network; then refuse a descriptor from another QEMU or kernel; then kill the
//! memory server as the clones resume and check they fail closed (EIO, QEMU exits) instead of
//! hanging or printing a result; then fork eagerly (hosts fetch the whole image first,
//! together) and check each host got the image once.
//!
//! Skips (printing why) only when QEMU or /dev/fuse is absent. Needs root for namespaces and
//! Debian's cloud kernel, which `examples/qemu-setup.sh` fetches when it is missing.

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

fn skip_reason() -> Option<String> {
    if mcdist_kvm::qemu::find_qemu().is_err() {
        return Some("qemu-system-x86_64 is not installed (Debian's qemu-system-x86)".into());
    }
    if let Some(why) = mcdist_kvm::fuse::unavailable() {
        return Some(why.into());
    }
    None
}

fn ensure_kernel() {
    if mcdist_kvm::qemu::find_kernel().is_ok() {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/qemu-setup.sh");
    let st = Command::new("bash").arg(&script).status().unwrap();
    assert!(st.success(), "{} failed", script.display());
    mcdist_kvm::qemu::find_kernel().expect("the setup script fetched the cloud kernel");
}

fn qemu_cli(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_mcdist-qemu"))
        .args(args)
        .output()
        .unwrap();
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn summary(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .expect("a JSON summary line");
    serde_json::from_str(line).unwrap()
}

fn u64s(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

#[test]
fn qemu_clones_fork_check_and_fail_closed() {
    if let Some(why) = skip_reason() {
        eprintln!("skipping: {why}");
        return;
    }
    ensure_kernel();
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("fork");
    let work_s = work.to_str().unwrap();
    let base = [
        "fork",
        "--clones",
        "2",
        "--hosts",
        "2",
        "--mem-mib",
        "128",
        "--table-mib",
        "8",
    ];

    // 1. A real fork, keyed with authentication only (the server and every host's FUSE
    // file get the key): every clone's digest matches the host's computation.
    let key = dir.path().join("key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let mut args = base.to_vec();
    args.extend([
        "--workdir",
        work_s,
        "--key",
        key.to_str().unwrap(),
        "--auth-only",
    ]);
    let out = qemu_cli(&args);
    assert!(out.status.success(), "fork failed");
    let s = summary(&out);
    assert_eq!(s["ok"], 2);
    assert_eq!(s["clones"], 2);
    let reads = u64s(&s["fuse_reads"]);
    let page_reads = u64s(&s["fuse_page_reads"]);
    let max_read = u64s(&s["fuse_max_read"]);
    assert_eq!(reads.len(), 2);
    for h in 0..2 {
        assert!(reads[h] > 0, "host {h} served no READ");
        assert_eq!(reads[h], page_reads[h], "host {h}: every READ is one page");
        assert_eq!(max_read[h], 4096, "host {h}: READs stay at 4 KiB");
    }
    assert_eq!(
        u64s(&s["zero_pages_received"]),
        vec![0, 0],
        "zero pages crossed"
    );
    assert_eq!(u64s(&s["eio"]), vec![0, 0]);
    // Pages fetched per host: at most the image's non-zero pages.
    let desc =
        mcdist_kvm::qemu::descriptor::QemuDescriptor::load(&work.join("descriptor.json")).unwrap();
    let nonzero = desc.page_count() - desc.zero_map().unwrap().count_ones();
    // The descriptor records the keying, never the key; a host without the key is refused
    // with one line before it mounts anything.
    assert_eq!(
        desc.keying,
        Some(mcdist_kvm::qemu::descriptor::Keying::AuthOnly)
    );
    assert!(!std::fs::read_to_string(work.join("descriptor.json"))
        .unwrap()
        .contains(&"07".repeat(32)));
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mcdist-fuse"))
        .arg("--descriptor")
        .arg(work.join("descriptor.json"))
        .arg("--mount")
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a keyed session joined without its key"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("keyed"), "{err}");
    for p in u64s(&s["host_pages_fetched"]) {
        assert!(
            p > 0 && p <= nonzero,
            "{p} pages fetched of {nonzero} non-zero"
        );
    }

    // 2. A descriptor from another QEMU, or for another kernel, is refused with one line.
    for (field, value) in [
        ("qemu_version", Value::from("QEMU emulator version 0.0.1")),
        ("kernel_digest", Value::from("00".repeat(32))),
    ] {
        let mut d: Value =
            serde_json::from_str(&std::fs::read_to_string(work.join("descriptor.json")).unwrap())
                .unwrap();
        d[field] = value;
        let bad = dir.path().join(format!("bad-{field}.json"));
        std::fs::write(&bad, d.to_string()).unwrap();
        let out = qemu_cli(&[
            "clone",
            "--descriptor",
            bad.to_str().unwrap(),
            "--ram",
            "/nonexistent",
        ]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("refusing to clone"), "{err}");
    }

    // 3. The memory server dies as the clones resume: they fail closed.
    let mut args = base.to_vec();
    let work2 = dir.path().join("kill");
    args.extend([
        "--workdir",
        work2.to_str().unwrap(),
        "--kill-server-at-resume",
    ]);
    let out = qemu_cli(&args);
    assert!(!out.status.success(), "a fork without its server must fail");
    let s = summary(&out);
    assert_eq!(s["ok"], 0, "no clone may print a result without its memory");
    assert!(
        u64s(&s["eio"]).iter().sum::<u64>() > 0,
        "the lazy files answered EIO"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("FAILED").count(), 2, "{text}");

    // 4. Eager: every host fetches the whole image before its clones start, the hosts
    // together (one multicast for all): each host gets every non-zero page, and about
    // the image's bytes, not one copy per host (hosts started one after another each
    // received every other host's fetch too). The memory server sends at most 400
    // Mbit/s here (the parent host's uplink, `--rate`), as the server says.
    let mut args = base.to_vec();
    let work3 = dir.path().join("eager");
    args.extend([
        "--workdir",
        work3.to_str().unwrap(),
        "--memory",
        "eager",
        "--rate",
        "400",
    ]);
    let out = qemu_cli(&args);
    assert!(out.status.success(), "eager fork failed");
    let s = summary(&out);
    assert_eq!(s["ok"], 2);
    let server = s["server"].as_str().unwrap_or_default();
    assert!(server.contains("at most 400 Mbit/s"), "server: {server}");
    // The server multicast the image once for both hosts: what it sent is about what
    // each host received, not one copy per host.
    let sent = s["server_bytes_sent"]
        .as_u64()
        .expect("the server's byte count");
    let most = u64s(&s["host_bytes_received"])
        .into_iter()
        .max()
        .unwrap_or(0);
    assert!(
        sent >= most && sent < most + most / 2,
        "the server sent {sent} bytes, a host received {most}"
    );
    let desc =
        mcdist_kvm::qemu::descriptor::QemuDescriptor::load(&work3.join("descriptor.json")).unwrap();
    let nonzero = desc.page_count() - desc.zero_map().unwrap().count_ones();
    assert_eq!(u64s(&s["host_pages_fetched"]), vec![nonzero, nonzero]);
    // The clones started on each host's local copy of the fetched image, not through
    // the lazy file.
    assert_eq!(u64s(&s["fuse_reads"]), vec![0, 0]);
    for b in u64s(&s["host_bytes_received"]) {
        let per_page = b as f64 / nonzero as f64;
        assert!(
            per_page < 1.5 * 4096.0,
            "a host received {b} bytes for {nonzero} pages ({per_page:.0} per page)"
        );
    }
    assert_eq!(u64s(&s["eio"]), vec![0, 0]);
}
