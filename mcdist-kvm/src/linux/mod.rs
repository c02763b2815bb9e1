//! Real Linux guests: boot Debian's bzImage with a busybox initramfs built at run time, fork
//! the running kernel at a point its init chooses, and resume clones from the descriptor with
//! lazy memory (locally or over mcdist).
//!
//! The guest side is a shell script ([`init_script`]): it prepares a workload, writes a byte to
//! port [`PORT_FORK`] through `/dev/port` (the fork point), then reads its clone id and the
//! clone count from [`PORT_CLONE_ID`] / [`PORT_CLONE_COUNT`], runs its share, prints a
//! `MCDIST-RESULT` line on the serial console and writes its exit code to [`PORT_EXIT`].
//!
//! What it does not do: SMP guests (one vCPU; no MP table or ACPI), PCI or virtio devices,
//! guest-side page-avoidance heuristics.

pub mod boot;
pub mod initramfs;
pub mod machine;
pub mod state;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use machine::{
    Console, ConsoleLog, LinuxExit, LinuxVm, PORT_CLONE_COUNT, PORT_CLONE_ID, PORT_EXIT, PORT_FORK,
};
pub use state::{LinuxDescriptor, MachineState};

use crate::descriptor::{Descriptor, SessionParams};
use crate::lazy::{
    LazyConfig, LazyFailure, LazyHandle, LazyMemory, LazyStats, PageFetcher, UffdSetupError,
};
use crate::source::{PageBitmap, PageSource};
use crate::vm::{GuestRam, VcpuState, VmError, VmMemory};

/// Errors of the Linux guest support.
#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// The operation.
        op: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// The kernel image cannot be booted.
    #[error("bad kernel image: {0}")]
    BadKernel(&'static str),
    /// The kernel's boot protocol is older than 2.12.
    #[error("bad kernel image: boot protocol {0:#x} < 2.12")]
    OldBootProtocol(u16),
    /// The uncompressed kernel (vmlinux) cannot be loaded.
    #[error("bad kernel image: vmlinux: {0}")]
    BadVmlinux(&'static str),
    /// The busybox binary is unusable.
    #[error("bad busybox binary: {0}")]
    BadBusybox(&'static str),
    /// No kernel or busybox was found.
    #[error("{0} not found (install Debian's linux-image-amd64 and busybox-static)")]
    Missing(&'static str),
    /// The kernel or busybox file could not be read.
    #[error("{}: {source} (install Debian's linux-image-amd64 and busybox-static)", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Guest memory is too small for kernel and initramfs.
    #[error("{0} bytes of guest memory are too few for this kernel")]
    TooLittleMemory(u64),
    /// The machine has no vCPU.
    #[error("the machine has no vCPU")]
    NoVcpu,
    /// State for a different number of vCPUs.
    #[error("machine state for {got} vCPUs, machine has {want}")]
    VcpuCount {
        /// States supplied.
        got: usize,
        /// vCPUs in the machine.
        want: usize,
    },
    /// The captured UART state is unusable.
    #[error("bad machine state: UART state: {0}")]
    UartState(#[source] vm_superio::serial::Error<std::io::Error>),
    /// An MSR list does not fit KVM's array.
    #[error("bad machine state: MSR list: {0}")]
    MsrList(#[source] vmm_sys_util::fam::Error),
    /// The guest stopped in a way the VMM does not handle.
    #[error("unexpected guest exit: {0}")]
    UnexpectedExit(String),
    /// The guest stopped before its fork point.
    #[error("guest: stopped before forking: {0:?}")]
    StoppedBeforeFork(LinuxExit),
    /// A clone stopped without its exit code.
    #[error("guest: clone {id} stopped: {exit:?}")]
    CloneStopped {
        /// Clone id.
        id: u32,
        /// How it stopped.
        exit: LinuxExit,
    },
    /// Clone ids are one byte in the guest.
    #[error("guest: clone id {0} > 255")]
    CloneId(u32),
    /// The run deadline passed.
    #[error("the guest did not finish before its deadline (vCPU at rip {rip:#x})")]
    Timeout {
        /// Where the vCPU was.
        rip: u64,
    },
    /// Guest memory or host I/O.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Base VMM error.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Lazy memory setup.
    #[error(transparent)]
    Uffd(#[from] UffdSetupError),
    /// The clone's memory stopped arriving.
    #[error("memory lost: {0}")]
    MemoryLost(#[source] LazyFailure),
    /// Descriptor problem.
    #[error(transparent)]
    Descriptor(#[from] crate::descriptor::DescriptorError),
    /// Connecting to the mcdist session failed.
    #[error("page source: {0}")]
    Session(#[from] crate::session::SessionError),
    /// Scanning the frozen image failed.
    #[error("page source: {0}")]
    Scan(#[source] std::io::Error),
}

/// Finds Debian's kernel: `$MCDIST_KERNEL`, else the newest `/boot/vmlinuz-*`.
pub fn find_kernel() -> Result<PathBuf, LinuxError> {
    if let Some(p) = std::env::var_os("MCDIST_KERNEL") {
        return Ok(PathBuf::from(p));
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir("/boot")
        .map_err(|_| LinuxError::Missing("/boot"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    v.sort();
    v.pop()
        .ok_or(LinuxError::Missing("a kernel in /boot/vmlinuz-*"))
}

/// Finds a static busybox: `$MCDIST_BUSYBOX`, else `/bin/busybox` (busybox-static).
pub fn find_busybox() -> Result<PathBuf, LinuxError> {
    if let Some(p) = std::env::var_os("MCDIST_BUSYBOX") {
        return Ok(PathBuf::from(p));
    }
    for p in ["/bin/busybox", "/usr/bin/busybox"] {
        if Path::new(p).exists() {
            return Ok(PathBuf::from(p));
        }
    }
    Err(LinuxError::Missing("busybox"))
}

/// What the guest's init does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestPlan {
    /// Print a line and exit (boot check).
    Boot,
    /// Build a table of `lines` numbers, fork, and let each clone sum its share.
    Fork {
        /// Numbers 1..=lines written to a file before the fork.
        lines: u32,
    },
}

/// The `/init` script for `plan`.
pub fn init_script(plan: GuestPlan) -> String {
    let mut s = String::from(
        "#!/bin/sh\n\
         /bin/busybox mount -t proc proc /proc\n\
         /bin/busybox --install -s\n\
         mount -t sysfs sys /sys\n\
         mount -t devtmpfs dev /dev\n\
         echo \"MCDIST-BOOTED uptime=$(cut -d' ' -f1 /proc/uptime) kernel=$(uname -r)\"\n\
         port_in() { dd if=/dev/port bs=1 skip=$1 count=1 2>/dev/null | od -An -tu1 | tr -d ' \\n'; }\n\
         port_out() { printf \"\\\\$(printf %o $2)\" | dd of=/dev/port bs=1 seek=$1 count=1 2>/dev/null; }\n",
    );
    match plan {
        GuestPlan::Boot => {}
        GuestPlan::Fork { lines } => {
            s.push_str(&format!(
                "seq 1 {lines} > /tmp/data\n\
                 echo \"MCDIST-WORKLOAD lines=$(wc -l < /tmp/data) md5=$(md5sum < /tmp/data | cut -c1-12)\"\n\
                 port_out {fork} 1\n\
                 id=$(port_in {id})\n\
                 n=$(port_in {count})\n\
                 echo \"MCDIST-CLONE-UP id=$id of=$n uptime=$(cut -d' ' -f1 /proc/uptime)\"\n\
                 sum=$(awk -v id=$id -v n=$n 'NR % n == id {{ s += $1 }} END {{ printf \"%.0f\", s }}' /tmp/data)\n\
                 t0=$(cut -d' ' -f1 /proc/uptime)\n\
                 sleep 0.3\n\
                 t1=$(cut -d' ' -f1 /proc/uptime)\n\
                 echo \"MCDIST-RESULT id=$id n=$n sum=$sum slept_from=$t0 slept_to=$t1\"\n",
                fork = PORT_FORK,
                id = PORT_CLONE_ID,
                count = PORT_CLONE_COUNT,
            ));
        }
    }
    s.push_str(&format!("port_out {} 0\nsleep 1000\n", PORT_EXIT));
    s
}

/// The expected `sum` of clone `id` of `n` for [`GuestPlan::Fork`] with `lines`.
pub fn expected_sum(lines: u32, id: u32, n: u32) -> u64 {
    (1..=u64::from(lines))
        .filter(|k| n > 0 && k % u64::from(n) == u64::from(id))
        .sum()
}

/// Kernel command line used for guests.
pub const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 acpi=off pci=off \
    i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd tsc=reliable no_timer_check \
    mitigations=off random.trust_cpu=on init_on_alloc=0 nowatchdog nosoftlockup \
    cryptomgr.notests ipv6.disable=1 lsm=capability rodata=off \
    initcall_blacklist=ftrace_check_for_weak_functions,load_system_certificate_list,\
tracer_init_tracefs,init_kprobe_trace,slab_sysfs_init,blake2s_mod_init,btf_vmlinux_init,\
cubictcp_register,bpf_rstat_kfunc_init,bpf_key_sig_kfuncs_init,init_blk_tracer,perf_event_sysfs_init \
    noxsave clearcpuid=cx16,smap,popcnt,fsgsbase,rdpid,pcid,invpcid,ssse3,pclmulqdq,aes,sha_ni,\
gfni,rdrand,rdseed,movbe,110,111 rdinit=/init";

/// Options for booting a parent.
#[derive(Debug, Clone)]
pub struct BootOptions {
    /// Kernel bzImage.
    pub kernel: PathBuf,
    /// Static busybox.
    pub busybox: PathBuf,
    /// Guest memory in bytes.
    pub mem_size: u64,
    /// What init does.
    pub plan: GuestPlan,
    /// Extra kernel command line (appended).
    pub extra_cmdline: String,
    /// Echo the console to stderr with this prefix.
    pub echo: Option<String>,
}

impl BootOptions {
    /// Defaults: Debian's kernel and busybox, 256 MiB.
    pub fn new(plan: GuestPlan) -> Result<Self, LinuxError> {
        Ok(Self {
            kernel: find_kernel()?,
            busybox: find_busybox()?,
            mem_size: 256 << 20,
            plan,
            extra_cmdline: "quiet".into(),
            echo: None,
        })
    }
}

/// A Linux parent VM.
#[derive(Debug)]
pub struct LinuxParent {
    vm: LinuxVm,
    ram: Arc<GuestRam>,
    console: Arc<std::sync::Mutex<ConsoleLog>>,
    booted: Instant,
}

impl LinuxParent {
    /// Loads kernel and initramfs and sets up the boot vCPU.
    pub fn boot(opts: &BootOptions) -> Result<Self, LinuxError> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| LinuxError::Unreadable {
                path: path.clone(),
                source,
            })
        };
        let kernel = read(&opts.kernel)?;
        let busybox = read(&opts.busybox)?;
        let initrd = initramfs::build_initramfs(&busybox, &init_script(opts.plan))?;
        let ram = Arc::new(GuestRam::new(opts.mem_size as usize)?);
        let cmdline = format!("{CMDLINE} {}", opts.extra_cmdline);
        let info = boot::load_linux(&ram, &kernel, &initrd, cmdline.trim())?;
        let console = Console::new(opts.echo.clone());
        let log = console.log();
        let mut vm = LinuxVm::new(VmMemory::Ram(ram.clone()), 1, console)?;
        vm.setup_boot(&info)?;
        Ok(Self {
            vm,
            ram,
            console: log,
            booted: Instant::now(),
        })
    }

    /// The console output so far.
    pub fn console(&self) -> Arc<std::sync::Mutex<ConsoleLog>> {
        self.console.clone()
    }

    /// Runs until the guest exits, forks or `timeout` passes.
    pub fn run(&mut self, timeout: Duration) -> Result<LinuxExit, LinuxError> {
        self.vm.run(0, Instant::now() + timeout)
    }

    /// Runs to the fork point and freezes the VM: captures the machine, scans for zero pages
    /// and digests the image.
    pub fn run_to_fork(mut self, timeout: Duration) -> Result<FrozenLinux, LinuxError> {
        match self.run(timeout)? {
            LinuxExit::Fork => {}
            other => return Err(LinuxError::StoppedBeforeFork(other)),
        }
        let fork_after = self.booted.elapsed();
        let t = Instant::now();
        let machine = self.vm.capture()?;
        // One pass over the frozen image: digest and zero map.
        let mcdist::source::ImageInfo {
            digest, zero_map, ..
        } = crate::source::scan(&*self.ram).map_err(LinuxError::Scan)?;
        Ok(FrozenLinux {
            _vm: self.vm,
            image: self.ram,
            machine,
            zero_map,
            digest,
            console: self.console,
            fork_after,
            freeze_time: t.elapsed(),
        })
    }
}

/// A Linux parent frozen at its fork point.
#[derive(Debug)]
pub struct FrozenLinux {
    _vm: LinuxVm,
    image: Arc<GuestRam>,
    machine: MachineState,
    zero_map: PageBitmap,
    digest: [u8; 32],
    console: Arc<std::sync::Mutex<ConsoleLog>>,
    /// Boot → fork point.
    pub fork_after: Duration,
    /// Time to capture state, scan zero pages and digest the image.
    pub freeze_time: Duration,
}

impl FrozenLinux {
    /// The frozen memory image.
    pub fn image(&self) -> Arc<dyn PageSource> {
        self.image.clone()
    }
    /// Zero pages.
    pub fn zero_map(&self) -> &PageBitmap {
        &self.zero_map
    }
    /// Image digest.
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }
    /// The parent's console up to the fork.
    pub fn console_lines(&self) -> Vec<String> {
        self.console
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .lines()
    }
    /// The descriptor for `clone_count` clones, with `session` if served by mcdist.
    pub fn descriptor(&self, clone_count: u8, session: Option<SessionParams>) -> LinuxDescriptor {
        let vcpus = self
            .machine
            .vcpus
            .iter()
            .map(|v| VcpuState {
                regs: v.regs,
                sregs: v.sregs,
                fpu: v.fpu,
            })
            .collect();
        LinuxDescriptor {
            base: Descriptor {
                mem_size: self.image.size() as u64,
                page_size: self.image.page_size() as u32,
                digest: self.digest,
                session,
                vcpus,
                zero_map: self.zero_map.clone(),
            },
            clone_count,
            machine: self.machine.clone(),
        }
    }
}

/// What one Linux clone did.
#[derive(Debug, Clone)]
pub struct LinuxCloneReport {
    /// Clone id.
    pub id: u32,
    /// The guest's exit code.
    pub exit_code: u8,
    /// Console lines printed after the fork.
    pub console: Vec<String>,
    /// Lazy-memory statistics.
    pub stats: LazyStats,
    /// Pages of guest memory.
    pub pages: u64,
    /// Clone start (descriptor in hand) → first instruction.
    pub time_to_resume: Duration,
    /// Clone start → first complete console line.
    pub time_to_first_line: Option<Duration>,
    /// Clone start → guest exit.
    pub total: Duration,
    /// MSRs KVM refused on restore.
    pub msrs_refused: usize,
}

impl LinuxCloneReport {
    /// The `MCDIST-RESULT` line's `sum`, if the guest printed one.
    pub fn sum(&self) -> Option<u64> {
        self.console
            .iter()
            .find(|l| l.starts_with("MCDIST-RESULT "))
            .and_then(|l| {
                l.split_whitespace()
                    .find_map(|kv| kv.strip_prefix("sum="))
                    .and_then(|v| v.parse().ok())
            })
    }

    /// One-line summary (`MCDIST-LINUX-CLONE k=v ...`).
    pub fn to_line(&self) -> String {
        let q = |x: f64| self.stats.fault_latency.quantile_ns(x);
        format!(
            "MCDIST-LINUX-CLONE id={} exit={} sum={} pages={} fetched={} demand={} pushed={} zero={} faults={} p50_ns={} p99_ns={} resume_ns={} first_line_ns={} total_ns={} msrs_refused={}",
            self.id,
            self.exit_code,
            self.sum().map_or_else(|| "none".to_string(), |s| s.to_string()),
            self.pages,
            self.stats.pages_fetched(),
            self.stats.pages_demand,
            self.stats.pages_pushed,
            self.stats.zero_pages,
            self.stats.demand_faults,
            q(0.5),
            q(0.99),
            self.time_to_resume.as_nanos(),
            self.time_to_first_line.map_or(0, |d| d.as_nanos()),
            self.total.as_nanos(),
            self.msrs_refused,
        )
    }
}

/// Parsed fields of a [`LinuxCloneReport::to_line`] line.
pub fn parse_report_line(line: &str) -> Option<std::collections::HashMap<String, String>> {
    let rest = line.trim().strip_prefix("MCDIST-LINUX-CLONE ")?;
    Some(
        rest.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// Runs Linux clone `id` from `desc` in the calling thread with lazy memory; `make_fetcher`
/// connects the memory to its page provider.
pub fn run_linux_clone(
    desc: &LinuxDescriptor,
    id: u32,
    lazy: LazyConfig,
    timeout: Duration,
    echo: Option<String>,
    make_fetcher: impl FnOnce(LazyHandle) -> Result<Arc<dyn PageFetcher>, LinuxError>,
) -> Result<LinuxCloneReport, LinuxError> {
    let t0 = Instant::now();
    let cfg = LazyConfig {
        page_size: desc.base.page_size as usize,
        ..lazy
    };
    let mut mem = LazyMemory::new(desc.base.mem_size as usize, desc.base.zero_map.clone(), cfg)?;
    let fetcher = make_fetcher(mem.handle())?;
    mem.start(fetcher)?;
    let mem = Arc::new(mem);
    let console = Console::new(echo);
    let log = console.log();
    let mut vm = LinuxVm::new(
        VmMemory::Lazy(mem.clone()),
        desc.machine.vcpus.len(),
        console,
    )?;
    let msrs_refused = vm.restore(&desc.machine)?;
    let clone_id = u8::try_from(id).map_err(|_| LinuxError::CloneId(id))?;
    vm.set_clone_identity(clone_id, desc.clone_count);
    let time_to_resume = t0.elapsed();
    let exit = vm.run(0, t0 + timeout);
    let total = t0.elapsed();
    if let Some(f) = mem.failure() {
        return Err(LinuxError::MemoryLost(f));
    }
    let exit_code = match exit? {
        LinuxExit::Exit(c) => c,
        other => return Err(LinuxError::CloneStopped { id, exit: other }),
    };
    drop(vm);
    let log = log.lock().unwrap_or_else(|p| p.into_inner());
    let first = log
        .first_line
        .map(|d| d + (log.started - t0.min(log.started)));
    Ok(LinuxCloneReport {
        id,
        exit_code,
        console: log.lines(),
        stats: mem.stats(),
        pages: desc.base.page_count(),
        time_to_resume,
        time_to_first_line: first,
        total,
        msrs_refused,
    })
}
