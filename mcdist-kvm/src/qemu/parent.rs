//! The parent: boot the guest with RAM in a shared file, wait for its fork marker, stop,
//! save device state with `x-ignore-shared`, quit, and describe the frozen RAM file.

use super::descriptor::{QemuDescriptor, Workload, FORMAT};
use super::guest;
use super::qmp::QmpError;
use super::vm::QemuVm;
use super::HostError;
use mcdist::source::FileSource;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Errors of the parent.
#[derive(Debug, thiserror::Error)]
pub enum ParentError {
    /// Host set-up.
    #[error(transparent)]
    Host(#[from] HostError),
    /// Building the initramfs.
    #[error("initramfs: {0}")]
    Initramfs(#[from] crate::linux::LinuxError),
    /// QMP.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// A file in the work folder.
    #[error("{what}: {source}")]
    Io {
        /// What was done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The guest never asked to be forked.
    #[error("the guest did not reach its fork marker ({0})")]
    NoMarker(String),
    /// Bad options.
    #[error("--table-mib {table} needs more guest memory than --mem-mib {mem}")]
    TooSmall {
        /// Table MiB.
        table: u32,
        /// Guest MiB.
        mem: u32,
    },
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> ParentError {
    move |source| ParentError::Io { what, source }
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct ParentOptions {
    /// Guest RAM in MiB.
    pub mem_mib: u32,
    /// The guest's work.
    pub workload: Workload,
    /// Work folder (RAM file, initramfs, sockets).
    pub workdir: PathBuf,
    /// mcdist page size.
    pub page_size: usize,
    /// How long the guest may take to reach its fork marker.
    pub boot_timeout: Duration,
}

/// A frozen parent: its descriptor (without the session fields) and timings.
#[derive(Debug)]
pub struct FrozenParent {
    /// The descriptor; `session_id`, `group`, `server` and `keying` are filled in by the caller.
    pub desc: QemuDescriptor,
    /// The frozen RAM file.
    pub ram: PathBuf,
    /// QEMU start → fork marker.
    pub boot: Duration,
    /// Fork marker → device state saved.
    pub freeze: Duration,
    /// The guest's console up to the marker.
    pub console: Vec<String>,
}

/// The host's CPU clock in kHz (from `/proc/cpuinfo`), 2 GHz if unknown.
fn host_khz() -> u64 {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("cpu MHz"))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .map_or(2_000_000, |mhz| (mhz * 1000.0) as u64)
}

/// The kernel command line. Under TCG on a loaded host the kernel's TSC calibration
/// against the PIT fails and boot stalls, so the TSC rate and delay loop are given.
pub fn cmdline(accel: &str) -> String {
    let mut s = String::from("console=ttyS0 panic=-1 quiet");
    if accel == "tcg" {
        let khz = host_khz();
        s.push_str(&format!(
            " tsc_early_khz={khz} lpj={} no_timer_check",
            khz * 4
        ));
    }
    s
}

/// The arguments parent and clones share.
pub fn machine_args(accel: &str, mem_mib: u32, kernel: &Path, initramfs: &Path) -> Vec<String> {
    let cpu = if accel == "kvm" { "host" } else { "max" };
    let cmdline = cmdline(accel);
    [
        "-M",
        "microvm,memory-backend=mem",
        "-accel",
        accel,
        "-cpu",
        cpu,
        "-nodefaults",
        "-no-user-config",
        "-nic",
        "none",
        "-no-reboot",
        "-smp",
        "1",
        "-m",
        &format!("{mem_mib}M"),
        "-kernel",
        &kernel.display().to_string(),
        "-initrd",
        &initramfs.display().to_string(),
        "-append",
        &cmdline,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The memory backend object for a RAM file.
pub fn memory_backend(path: &Path, bytes: u64, shared: bool) -> Vec<String> {
    vec![
        "-object".into(),
        format!(
            "memory-backend-file,id=mem,size={bytes},mem-path={},share={}",
            path.display(),
            if shared { "on" } else { "off" }
        ),
    ]
}

/// Boots the parent and freezes it at its fork marker.
pub fn boot_and_freeze(opts: &ParentOptions) -> Result<FrozenParent, ParentError> {
    if u64::from(opts.workload.table_mib) + 96 > u64::from(opts.mem_mib) {
        return Err(ParentError::TooSmall {
            table: opts.workload.table_mib,
            mem: opts.mem_mib,
        });
    }
    let qemu = super::find_qemu()?;
    let kernel = super::find_kernel()?;
    let busybox = super::find_busybox()?;
    let version = super::qemu_version(&qemu)?;
    let (accel, why) = super::detect_accel();
    println!(
        "accelerator: {accel} ({why}); {version}; kernel {}",
        kernel.display()
    );
    std::fs::create_dir_all(&opts.workdir).map_err(io("creating the work folder"))?;
    let bb = std::fs::read(&busybox).map_err(io("reading busybox"))?;
    let initramfs = opts.workdir.join("initramfs.cpio");
    std::fs::write(&initramfs, guest::initramfs(&bb, opts.workload)?)
        .map_err(io("writing the initramfs"))?;
    let ram = opts.workdir.join("parent-ram");
    let mem_bytes = u64::from(opts.mem_mib) << 20;
    let _ = std::fs::remove_file(&ram);
    let f = std::fs::File::create(&ram).map_err(io("creating the RAM file"))?;
    f.set_len(mem_bytes).map_err(io("sizing the RAM file"))?;
    drop(f);
    let margs = machine_args(accel, opts.mem_mib, &kernel, &initramfs);
    let mut args = margs.clone();
    args.extend(memory_backend(&ram, mem_bytes, true));
    let mut vm = QemuVm::spawn(&qemu, &args, &opts.workdir.join("parent.qmp"), false)?;
    let Some((marked, _)) = vm.wait_line(guest::FORK_MARKER, opts.boot_timeout) else {
        return Err(ParentError::NoMarker(format!(
            "console: {:?}; qemu: {}",
            vm.console.iter().rev().take(3).collect::<Vec<_>>(),
            vm.stderr_tail()
        )));
    };
    let boot = marked - vm.started;
    vm.qmp.execute("stop", None)?;
    vm.qmp.ignore_shared()?;
    let state = opts.workdir.join("device-state");
    let _ = std::fs::remove_file(&state);
    vm.qmp.execute(
        "migrate",
        Some(serde_json::json!({"uri": format!("exec:cat > {}", state.display())})),
    )?;
    vm.qmp.wait_migration(Duration::from_secs(60))?;
    let freeze = marked.elapsed();
    let _ = vm.qmp.execute("quit", None);
    vm.wait_exit(Duration::from_secs(10));
    let blob = std::fs::read(&state).map_err(io("reading the device state"))?;
    let source = FileSource::open(&ram, opts.page_size).map_err(io("opening the RAM file"))?;
    let info = mcdist::source::scan(&source).map_err(io("scanning the RAM file"))?;
    let desc = QemuDescriptor {
        format: FORMAT,
        qemu_version: version,
        accel: accel.to_string(),
        machine_args: margs,
        mem_bytes,
        kernel: kernel.display().to_string(),
        kernel_digest: super::file_digest(&kernel)?,
        initramfs: initramfs.display().to_string(),
        initramfs_digest: super::file_digest(&initramfs)?,
        device_state: mcdist::hex(&blob),
        image_digest: mcdist::hex(&info.digest),
        zero_map: mcdist::hex(&info.zero_map.to_bytes()),
        page_size: opts.page_size,
        session_id: 0,
        group: String::new(),
        server: String::new(),
        workload: opts.workload,
        keying: None,
    };
    Ok(FrozenParent {
        desc,
        ram,
        boot,
        freeze,
        console: std::mem::take(&mut vm.console),
    })
}

/// Time since `t`, in milliseconds.
pub fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}
