//! mcdist-xen on a real Xen 4.17 hypervisor, booted under QEMU (TCG, `-cpu max`,
//! nested SVM with NPT) with a PV dom0 that `examples/xen-dom0.sh` assembles
//! from Debian's packages and mcdist's binaries.
//!
//! Needs `qemu-system-x86_64` and a hypervisor built with memory paging by
//! `examples/xen-build.sh` (found in the mcdist cache folder, or at
//! `$MCDIST_XEN_GZ`); skips, saying why, when either is absent. Root (apt-get
//! download of the dom0 packages, the first time).
//!
//! The guest gets no network (`-nic none`); dom0's only interface is its loopback.

#![cfg(feature = "xen")]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// One boot at a time: each test boots a whole Xen (2 vCPUs under TCG), and
/// cargo runs a binary's tests in parallel.
static QEMU: Mutex<()> = Mutex::new(());

/// A hang guard, not a performance limit: a boot that prints nothing new for
/// this long is stuck (`MCDIST_XEN_SILENCE_SECS` sets another, to see what the
/// harness reports of a silent machine).
fn silence_limit() -> Duration {
    let secs = std::env::var("MCDIST_XEN_SILENCE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(420);
    Duration::from_secs(secs)
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn cache_dir() -> PathBuf {
    if let Some(c) = std::env::var_os("MCDIST_CACHE") {
        return c.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache")
        });
    base.join("mcdist")
}

fn find_xen_gz() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MCDIST_XEN_GZ") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(cache_dir().join("xen"))
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("xen.gz"))
        .filter(|p| p.is_file())
        .collect();
    found.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    found.pop()
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// What a boot printed on the serial console.
struct Boot {
    lines: Vec<String>,
    /// Seconds from QEMU's start to each `MCDIST_*` marker.
    marks: Vec<(String, f64)>,
    /// The boot was stopped after [`silence_limit`] without console output.
    silent: bool,
}

impl Boot {
    fn line(&self, prefix: &str) -> Option<&str> {
        self.lines
            .iter()
            .find_map(|l| l.find(prefix).map(|i| &l[i..]))
    }
    fn lines_with(&self, prefix: &str) -> Vec<&str> {
        self.lines
            .iter()
            .filter_map(|l| l.find(prefix).map(|i| &l[i..]))
            .collect()
    }
    fn mark(&self, name: &str) -> Option<f64> {
        self.marks.iter().find(|(m, _)| m == name).map(|m| m.1)
    }
}

/// Boot Xen + dom0 and run `examples/xen-dom0-test.sh TEST` in dom0 with the
/// given binaries in its initramfs (and the Linux guest, for the `linux*`
/// tests). `None` (with the reason printed) when QEMU or the hypervisor is
/// absent.
fn boot(test: &str, bins: &[PathBuf]) -> Option<Boot> {
    let Some(qemu) = find_in_path("qemu-system-x86_64") else {
        eprintln!("skipping: qemu-system-x86_64 is not installed");
        return None;
    };
    let Some(xen_gz) = find_xen_gz() else {
        eprintln!(
            "skipping: no hypervisor with memory paging under {}/xen (run examples/xen-build.sh)",
            cache_dir().display()
        );
        return None;
    };
    // Held to the end: the dom0 assembly (which fills a shared cache) and QEMU.
    let _one_at_a_time = QEMU.lock().unwrap_or_else(PoisonError::into_inner);
    let dir = tempfile::tempdir().expect("temp dir");
    let initrd = dir.path().join("dom0.cpio.gz");
    let mut assemble = Command::new("bash");
    assemble.arg(repo_root().join("examples/xen-dom0.sh"));
    if test.starts_with("linux") {
        assemble.arg("--linux");
    }
    let out = assemble
        .arg(&initrd)
        .args(bins)
        .stderr(Stdio::inherit())
        .output()
        .expect("run examples/xen-dom0.sh");
    assert!(out.status.success(), "examples/xen-dom0.sh failed");
    let printed = String::from_utf8_lossy(&out.stdout);
    let kernel = printed
        .lines()
        .rev()
        .nth(1)
        .expect("xen-dom0.sh prints the kernel's path")
        .to_string();
    // QEMU's multiboot loader wants the ELF, not the gzip.
    let xen_elf = dir.path().join("xen.elf");
    let elf = Command::new("gzip")
        .arg("-dc")
        .arg(&xen_gz)
        .output()
        .expect("gzip -dc xen.gz");
    assert!(elf.status.success(), "gzip -dc {}", xen_gz.display());
    std::fs::write(&xen_elf, elf.stdout).expect("write xen.elf");

    let monitor = dir.path().join("monitor.sock");
    eprintln!("booting {} + dom0 {kernel}, test {test}", xen_gz.display());
    let start = Instant::now();
    let mut child = Command::new(qemu)
        .args(["-M", "q35", "-accel", "tcg,thread=multi", "-cpu", "max,-fsgsbase"])
        .args(["-smp", "2"])
        .args(["-m", "2048", "-nographic", "-nodefaults", "-serial", "stdio"])
        .args(["-nic", "none", "-no-reboot", "-kernel"])
        .arg(&xen_elf)
        // smap/smep for Xen itself only: with them on, TCG faults dom0's first exception
        // bounce (a #PF on a present guest stack page in create_bounce_frame). One dom0
        // vCPU: with two, dom0's processes crashed now and then (segfaults in libc and
        // busybox, a Vec found empty), as if their memory were corrupted; with one, none
        // did in the runs measured (dom0's own work is about 2x slower).
        .args([
            "-append",
            "console=com1 com1=115200 dom0_mem=512M,max:512M dom0_max_vcpus=1 loglvl=all \
             guest_loglvl=all hap=1 noreboot smap=hvm smep=hvm",
        ])
        .arg("-initrd")
        .arg(format!(
            "{kernel} console=hvc0 earlyprintk=xen rdinit=/init printk.devkmsg=on nofsgsbase mcdist.test={test},{}",
            initrd.display()
        ))
        .arg("-monitor")
        .arg(format!("unix:{},server=on,wait=off", monitor.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start qemu-system-x86_64");
    // The serial console's input: Xen's debug keys, should the machine fall silent.
    let mut console_in = child.stdin.take();
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut boot = Boot {
        lines: Vec::new(),
        marks: Vec::new(),
        silent: false,
    };
    let silence = silence_limit();
    loop {
        match rx.recv_timeout(silence) {
            Ok(line) => {
                let line = line.trim_end_matches('\r').to_string();
                if let Some(i) = line.find("MCDIST_") {
                    let name: String = line[i..]
                        .chars()
                        .take_while(|c| !c.is_whitespace())
                        .collect();
                    boot.marks.push((name, start.elapsed().as_secs_f64()));
                    eprintln!("[{:7.2}] {}", start.elapsed().as_secs_f64(), &line[i..]);
                } else if line.starts_with("(d") || line.starts_with("(XEN) (d") {
                    eprintln!("[{:7.2}] {line}", start.elapsed().as_secs_f64());
                }
                let end = line.contains("MCDIST_DOM0_EXIT") || line.contains("Dom0 crashed");
                boot.lines.push(line);
                if end {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                eprintln!("no console output for {silence:?}: stopping QEMU");
                boot.silent = true;
                describe_silence(child.id(), &monitor, console_in.as_mut(), &rx);
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    if boot.line("MCDIST_DOM0_EXIT 0").is_none() {
        let tail = boot.lines.len().saturating_sub(120);
        eprintln!(
            "--- last console lines ---\n{}",
            boot.lines[tail..].join("\n")
        );
    }
    Some(boot)
}

/// What a silent machine was doing, for the log: whether QEMU spun or idled, where its
/// vCPUs were (its monitor), and what Xen says of itself through its debug keys on the
/// serial console (run queues, registers, domains), if it still answers.
fn describe_silence(
    pid: u32,
    monitor: &Path,
    console_in: Option<&mut std::process::ChildStdin>,
    rx: &mpsc::Receiver<String>,
) {
    let cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let after = stat.rsplit(')').next().unwrap_or("");
        let f: Vec<u64> = after
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        // utime and stime: fields 14 and 15 of the line, 12 and 13 after the name.
        f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0)
    };
    let before = cpu();
    std::thread::sleep(Duration::from_secs(2));
    eprintln!(
        "QEMU used {:.2} CPU s in the last 2 s of the silence",
        (cpu() - before) as f64 / 100.0
    );
    use std::io::{Read, Write};
    if let Ok(mut m) = std::os::unix::net::UnixStream::connect(monitor) {
        let _ = m.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = m.write_all(b"info cpus\ninfo registers -a\n");
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = m.read(&mut buf) {
            if n == 0 || out.len() > 64 * 1024 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        eprintln!("--- QEMU monitor ---\n{}", String::from_utf8_lossy(&out));
    }
    if let Some(input) = console_in {
        // Three CTRL-A switch the console's input to Xen; r, d and q dump its run
        // queues, the registers of each CPU and each domain's vCPUs.
        let _ = input.write_all(b"\x01\x01\x01rdq");
        let _ = input.flush();
        let end = Instant::now() + Duration::from_secs(10);
        let mut lines = 0;
        eprintln!("--- Xen's debug keys r, d, q ---");
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            let Ok(line) = rx.recv_timeout(left) else {
                break;
            };
            lines += 1;
            if lines <= 400 {
                eprintln!("{}", line.trim_end_matches('\r'));
            }
        }
        if lines == 0 {
            eprintln!("(no answer)");
        }
    }
}

#[test]
fn real_xen_paging_enable() {
    let dom0_tool = PathBuf::from(env!("CARGO_BIN_EXE_mcdist-xen-dom0"));
    let Some(boot) = boot("paging", &[dom0_tool]) else {
        return;
    };
    let caps = boot.line("virt_caps").unwrap_or("virt_caps: (not printed)");
    eprintln!("{caps}");
    assert!(caps.contains("hap"), "Xen did not detect HAP: {caps}");
    let enabled = boot
        .line("PAGING_ENABLED")
        .expect("mem_paging was not enabled on the domU (see the console above)");
    let roundtrip = boot
        .line("PAGING_ROUNDTRIP")
        .expect("no page went out and back in");
    eprintln!("{enabled}\n{roundtrip}");
    assert!(roundtrip.contains("8 evicted") && roundtrip.contains("8 reloaded intact"));
    assert!(boot.line("MCDIST_PAGING_OK").is_some());
    assert!(boot.line("MCDIST_DOM0_EXIT 0").is_some());
    if let (Some(up), Some(done)) = (
        boot.mark("MCDIST_TOOLSTACK_UP"),
        boot.mark("MCDIST_PAGING_OK"),
    ) {
        eprintln!("Xen + dom0 + toolstack up after {up:.1} s (QEMU start); paging test done at {done:.1} s");
    }
}

/// The guest's table (examples/xen-guest.S): TABLE_PAGES pages of 1024 words,
/// word i = i * 0x9e3779b1.
const TABLE_PAGES: u32 = 2048;

/// What clone `id` of `n` must print: the wrapping sum of its pages' words.
fn expected_sum(id: u32, n: u32) -> u32 {
    let mut sum = 0u32;
    let mut page = id;
    while page < TABLE_PAGES {
        for w in 0..1024 {
            sum = sum.wrapping_add((page * 1024 + w).wrapping_mul(0x9e37_79b1));
        }
        page += n;
    }
    sum
}

fn hex_field(line: &str, key: &str) -> Option<u32> {
    let at = line.find(key)? + key.len();
    let digits: String = line[at..]
        .chars()
        .take_while(|c| c.is_ascii_hexdigit())
        .collect();
    u32::from_str_radix(&digits, 16).ok()
}

/// Boot for a fork test, with the binaries a fork needs in dom0 (mcdist's
/// server and the memtap must be built first).
fn boot_fork(test: &str) -> Option<Boot> {
    if find_in_path("qemu-system-x86_64").is_none() || find_xen_gz().is_none() {
        // boot() prints which one is missing.
        assert!(boot(test, &[]).is_none());
        return None;
    }
    let dom0_tool = PathBuf::from(env!("CARGO_BIN_EXE_mcdist-xen-dom0"));
    let profile_dir = dom0_tool
        .parent()
        .expect("target profile dir")
        .to_path_buf();
    let mcdist = profile_dir.join("mcdist");
    let memtap = profile_dir.join("examples").join("xen_memtap");
    for b in [&mcdist, &memtap] {
        assert!(
            b.is_file(),
            "{} is not built: cargo build -p mcdist --bin mcdist -p mcdist-examples \
             --example xen_memtap --features mcdist-xen/xen,mcdist-examples/xen",
            b.display()
        );
    }
    boot(test, &[dom0_tool, mcdist, memtap])
}

/// A clone's `MCDIST_RESULT` line with its id, 2 clones and the right sum of its half.
fn result_is_right(line: &str) -> bool {
    let id = hex_field(line, "id=");
    id.is_some_and(|id| id < 2)
        && hex_field(line, "n=") == Some(2)
        && hex_field(line, "sum=") == id.map(|id| expected_sum(id, 2))
}

/// Both clones printed their right result and dom0 finished the test.
fn fork_succeeded(boot: &Boot) -> bool {
    let results = boot.lines_with("MCDIST_RESULT");
    (0..2u32).all(|id| {
        results
            .iter()
            .any(|l| hex_field(l, "id=") == Some(id) && result_is_right(l))
    }) && boot.line("MCDIST_FORK_OK").is_some()
        && boot.line("MCDIST_DOM0_EXIT 0").is_some()
}

/// Why a fork boot failed in the emulated machine rather than in what it tests, if it
/// did: a domain that triple-faulted, or the whole machine silent for [`silence_limit`].
/// Xen runs under QEMU's TCG emulation of SVM with nested paging here, and two CI runs
/// in twelve lost a fork that way: once a clone triple-faulted about 25 s after it
/// started, at an address inside the guest's data table with registers that match no
/// state of its program (the other clone summed its half correctly), once the emulated
/// machine stopped printing altogether. A wrong result is never such a failure.
fn emulator_fault(boot: &Boot) -> Option<String> {
    let results = boot.lines_with("MCDIST_RESULT");
    if results.iter().any(|l| !result_is_right(l)) {
        return None;
    }
    if let Some(l) = boot.line("Triple fault") {
        return Some(format!("a domain triple-faulted ({l})"));
    }
    boot.silent.then(|| {
        format!(
            "the emulated machine printed nothing for {:?}",
            silence_limit()
        )
    })
}

/// [`boot_fork`], booted once more when the first boot failed in the emulated machine
/// ([`emulator_fault`]); a failure of any other kind is judged on the first boot.
fn boot_fork_once_more_on_emulator_fault(test: &str) -> Option<Boot> {
    let first = boot_fork(test)?;
    if fork_succeeded(&first) {
        return Some(first);
    }
    let Some(why) = emulator_fault(&first) else {
        return Some(first);
    };
    eprintln!("the first boot failed in the emulator, not in the fork: {why}; booting once more");
    boot_fork(test)
}

/// Each clone's `MCDIST_RESULT` line holds its id, 2 clones, and the sum of
/// its half of the parent's table.
fn assert_clone_results(boot: &Boot) {
    let results = boot.lines_with("MCDIST_RESULT");
    for id in 0..2u32 {
        let line = results
            .iter()
            .find(|l| hex_field(l, "id=") == Some(id))
            .unwrap_or_else(|| panic!("clone {id} printed no result"));
        assert_eq!(hex_field(line, "n="), Some(2), "{line}");
        let sum = hex_field(line, "sum=").expect("sum printed");
        assert_eq!(sum, expected_sum(id, 2), "clone {id}: {line}");
    }
    for l in boot.lines_with("MCDIST_MEMTAP") {
        eprintln!("{l}");
    }
    assert!(boot.line("MCDIST_FORK_OK").is_some());
    assert!(boot.line("MCDIST_DOM0_EXIT 0").is_some());
}

/// Only an emulator failure boots again: a triple fault or a silent machine, never a
/// wrong result, and never a run that succeeded.
#[test]
fn only_an_emulator_failure_boots_a_fork_again() {
    let lines = |l: &[&str], silent| Boot {
        lines: l.iter().map(|s| s.to_string()).collect(),
        marks: Vec::new(),
        silent,
    };
    let right = |id| {
        format!(
            "(d2) MCDIST_RESULT id={id:08x} n=00000002 sum={:08x}",
            expected_sum(id, 2)
        )
    };
    let (r0, r1) = (right(0), right(1));
    let triple = "(XEN) d3v0 Triple fault - invoking HVM shutdown action 1";
    let ok = lines(&[&r0, &r1, "MCDIST_FORK_OK", "MCDIST_DOM0_EXIT 0"], false);
    assert!(fork_succeeded(&ok) && emulator_fault(&ok).is_none());
    let faulted = lines(&[&r0, triple, "MCDIST_FAIL clone1 gave no result"], false);
    assert!(!fork_succeeded(&faulted));
    assert!(emulator_fault(&faulted).is_some_and(|w| w.contains("triple-faulted")));
    let silent = lines(&["MCDIST_CLONE_STARTED id=1"], true);
    assert!(emulator_fault(&silent).is_some_and(|w| w.contains("printed nothing")));
    let wrong = format!(
        "(d3) MCDIST_RESULT id=00000001 n=00000002 sum={:08x}",
        expected_sum(1, 2) ^ 1
    );
    assert!(!result_is_right(&wrong));
    assert!(emulator_fault(&lines(&[&r0, &wrong, triple], true)).is_none());
    let memtap_died = lines(&[&r0, "MCDIST_FAIL clone1 gave no result"], false);
    assert!(emulator_fault(&memtap_died).is_none());
}

#[test]
fn real_xen_fork_two_clones() {
    let Some(boot) = boot_fork_once_more_on_emulator_fault("fork") else {
        return;
    };
    assert_clone_results(&boot);
}

/// A Linux PVH domU (Debian's kernel, the dom0 kernel's package, with a
/// busybox initramfs) boots under Xen to its /init, which prints a marker.
#[test]
fn real_xen_linux_guest_boots() {
    let dom0_tool = PathBuf::from(env!("CARGO_BIN_EXE_mcdist-xen-dom0"));
    let Some(boot) = boot("linux", &[dom0_tool]) else {
        return;
    };
    let up = boot
        .line("MCDIST_LINUX_UP")
        .expect("the Linux domU printed no MCDIST_LINUX_UP (see the console above)");
    eprintln!("{up}");
    assert!(up.contains("kernel="), "{up}");
    assert!(boot.line("MCDIST_LINUX_BOOTED").is_some());
    assert!(boot.line("MCDIST_DOM0_EXIT 0").is_some());
    if let (Some(created), Some(booted)) = (
        boot.mark("MCDIST_LINUX_CREATED"),
        boot.mark("MCDIST_LINUX_BOOTED"),
    ) {
        eprintln!(
            "Linux domU created at {created:.1} s (QEMU start), its /init printed by {booted:.1} s"
        );
    }
}

/// The Linux domU as fork parent: its userspace fills the table and spins;
/// dom0 pauses it in user mode and starts 2 clones, empty PVH domains of its
/// shape with its whole HVM context, every gfn paged out. Each clone resumes
/// the parent's Linux userspace, which sums its half of the table and prints
/// the result through the clone's kernel (write(2) to /dev/kmsg); every page
/// it touches, kernel and user, is paged in by the memtap over mcdist.
#[test]
fn real_xen_linux_fork_two_clones() {
    let Some(boot) = boot_fork_once_more_on_emulator_fault("linux_fork") else {
        return;
    };
    assert_clone_results(&boot);
    let marks = [
        "MCDIST_PARENT_FROZEN",
        "MCDIST_CLONE_STARTED",
        "MCDIST_FORK_OK",
    ];
    if let [Some(frozen), Some(started), Some(done)] = marks.map(|m| boot.mark(m)) {
        eprintln!(
            "parent frozen at {frozen:.1} s (QEMU start), first clone started at {started:.1} s, both results by {done:.1} s"
        );
    }
}
