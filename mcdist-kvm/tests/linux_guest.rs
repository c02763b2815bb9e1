//! A real Linux guest (Debian's kernel, a busybox initramfs built at run time) on KVM: boot
//! to init with a serial console, fork it into two clones in namespace hosts that fetch memory
//! over mcdist, and check what each prints.
//!
//! These tests need /dev/kvm (they skip, saying why, when it is absent), Debian's
//! `linux-image-amd64` and `busybox-static` (installed by the CI script), and root for network
//! namespaces and userfaultfd.

use std::process::Command;

use mcdist_kvm::linux::{
    expected_sum, find_busybox, find_kernel, init_script, initramfs::build_initramfs, GuestPlan,
    PORT_CLONE_ID, PORT_FORK,
};

mod common;
use common::have_kvm;

#[test]
fn initramfs_holds_busybox_init_and_console() {
    let busybox =
        std::fs::read(find_busybox().expect("busybox-static is installed")).expect("read busybox");
    let script = init_script(GuestPlan::Fork { lines: 10 });
    assert!(
        script.contains(&format!("port_out {PORT_FORK} 1")),
        "no fork port write in {script}"
    );
    assert!(script.contains(&format!("port_in {PORT_CLONE_ID}")));
    let cpio = build_initramfs(&busybox, &script).expect("initramfs");
    let find = |name: &[u8]| cpio.windows(name.len()).any(|w| w == name);
    assert!(find(b"bin/busybox\0"));
    assert!(find(b"dev/console\0"));
    assert!(find(b"init\0"));
    assert!(find(script.as_bytes()));
    assert!(cpio.len() > busybox.len());
    assert!(build_initramfs(b"not elf", &script).is_err());
}

#[test]
#[ignore = "boots a whole Linux guest: needs hardware virtualization (on a PVM host the kernel \
            reaches /init in minutes but guest system calls fail, see mcdist-kvm/LINUX.md); run \
            with `cargo test -p mcdist-kvm --test linux_guest -- --ignored`"]
fn forks_two_linux_clones_over_mcdist_in_namespace_hosts() {
    if !have_kvm() {
        return;
    }
    let lines = 20_000;
    let out = Command::new(env!("CARGO_BIN_EXE_mcdist-linux"))
        .args(["fork", "--clones", "2", "--mem-mib", "128"])
        .args(["--lines", &lines.to_string(), "--timeout-s", "1200"])
        .args(["--group", "239.255.78.9:47191", "--port", "47192"])
        .output()
        .expect("run mcdist-linux");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}\n{stderr}");
    assert!(out.status.success(), "mcdist-linux fork failed: {stderr}");
    assert!(stdout.contains("MCDIST-LINUX-FORK ok clones=2"));
    // The parent booted Debian's kernel to our init, on the serial console.
    let release = find_kernel()
        .expect("kernel")
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .map(str::to_string)
        .expect("vmlinuz-RELEASE");
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("guest| MCDIST-BOOTED ") && l.contains(&release)),
        "the parent's init did not print MCDIST-BOOTED for kernel {release}"
    );
    for id in 0..2u32 {
        let want = format!(
            "MCDIST-RESULT id={id} n=2 sum={}",
            expected_sum(lines, id, 2)
        );
        assert!(
            stdout.lines().any(|l| l.contains(&want)),
            "clone {id} did not print {want}"
        );
        let up = format!("MCDIST-CLONE-UP id={id} of=2");
        assert!(stdout.contains(&up), "clone {id} did not resume: {up}");
    }
}
