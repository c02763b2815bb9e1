//! A clone: QEMU started through the launcher with RAM mapped MAP_PRIVATE from the host's
//! lazy file, `-incoming defer`, device state loaded with `x-ignore-shared`, `cont`; then its
//! id goes in on the console and its result line comes out.

use super::descriptor::{DescriptorError, QemuDescriptor};
use super::guest;
use super::parent::memory_backend;
use super::qmp::QmpError;
use super::vm::QemuVm;
use super::HostError;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Errors starting a clone.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    /// Host set-up.
    #[error(transparent)]
    Host(#[from] HostError),
    /// The descriptor does not fit this host.
    #[error(transparent)]
    Descriptor(#[from] DescriptorError),
    /// QMP.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// Writing the device state or the console.
    #[error("{what}: {source}")]
    Io {
        /// What was done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// What happened to one clone.
#[derive(Debug, Clone, Default)]
pub struct CloneOutcome {
    /// Clone id.
    pub id: u32,
    /// Host index.
    pub host: usize,
    /// QEMU start → `cont` returned (ms).
    pub resume_ms: f64,
    /// `cont` → first console line of the clone (ms).
    pub first_line_ms: Option<f64>,
    /// `cont` → result line (ms).
    pub result_ms: Option<f64>,
    /// The digest the clone printed.
    pub got: Option<String>,
    /// The digest the host computed.
    pub want: String,
    /// Why the clone failed, when it did.
    pub error: Option<String>,
}

impl CloneOutcome {
    /// The clone printed the host's digest.
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.got.as_deref() == Some(self.want.as_str())
    }
}

/// Where a clone runs.
#[derive(Debug, Clone)]
pub struct CloneSpec {
    /// Clone id.
    pub id: u32,
    /// Clones in all.
    pub count: u32,
    /// Host index (for reports).
    pub host: usize,
    /// The host's lazy RAM file.
    pub ram: PathBuf,
    /// Scratch folder (QMP socket, device state).
    pub workdir: PathBuf,
    /// Bound on the whole run.
    pub timeout: Duration,
}

/// Checks the descriptor against this host: QEMU version, kernel and initramfs digests.
pub fn check_host(desc: &QemuDescriptor, qemu: &Path) -> Result<(), CloneError> {
    let version = super::qemu_version(qemu)?;
    let kernel = super::file_digest(Path::new(&desc.kernel))?;
    let initramfs = super::file_digest(Path::new(&desc.initramfs))?;
    desc.check_host(&version, &kernel, &initramfs)?;
    Ok(())
}

/// Starts clone `spec` from `desc` and runs it to its result (or failure); `on_resume` is
/// called once the clone runs.
pub fn run_clone(
    desc: &QemuDescriptor,
    qemu: &Path,
    spec: &CloneSpec,
    on_resume: &(dyn Fn() + Sync),
) -> CloneOutcome {
    let want = guest::expected(desc.workload, spec.id, spec.count);
    let mut out = CloneOutcome {
        id: spec.id,
        host: spec.host,
        want,
        ..CloneOutcome::default()
    };
    match start(desc, qemu, spec) {
        Ok((mut vm, resumed)) => {
            out.resume_ms = (resumed - vm.started).as_secs_f64() * 1e3;
            on_resume();
            collect(&mut vm, resumed, spec, &mut out);
        }
        Err(e) => out.error = Some(e.to_string()),
    }
    out
}

fn start(
    desc: &QemuDescriptor,
    qemu: &Path,
    spec: &CloneSpec,
) -> Result<(QemuVm, Instant), CloneError> {
    let io = |what| move |source| CloneError::Io { what, source };
    std::fs::create_dir_all(&spec.workdir).map_err(io("creating the clone folder"))?;
    let state = spec.workdir.join("device-state");
    std::fs::write(&state, desc.device_state()?).map_err(io("writing the device state"))?;
    let mut args = desc.machine_args.clone();
    args.extend(memory_backend(&spec.ram, desc.mem_bytes, false));
    args.extend(["-incoming".into(), "defer".into(), "-S".into()]);
    let mut vm = QemuVm::spawn(qemu, &args, &spec.workdir.join("qmp"), true)?;
    vm.qmp.ignore_shared()?;
    vm.qmp.execute(
        "migrate-incoming",
        Some(serde_json::json!({"uri": format!("exec:cat {}", state.display())})),
    )?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while vm.qmp.status()? == "inmigrate" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    vm.qmp.execute("cont", None)?;
    let resumed = Instant::now();
    vm.send(&format!("{} {}\n", spec.id, spec.count))
        .map_err(io("writing the clone id"))?;
    Ok((vm, resumed))
}

fn collect(vm: &mut QemuVm, resumed: Instant, spec: &CloneSpec, out: &mut CloneOutcome) {
    let ms = |t: Instant| (t.saturating_duration_since(resumed)).as_secs_f64() * 1e3;
    let deadline = resumed + spec.timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    match vm.wait_line(guest::CLONE_UP, left()) {
        Some((t, _)) => out.first_line_ms = Some(ms(t)),
        None => {
            out.error = Some(fail_reason(vm, "no console line after resume"));
            return;
        }
    }
    match vm.wait_line(guest::RESULT, left()) {
        Some((t, line)) => {
            out.result_ms = Some(ms(t));
            match guest::parse_result(&line) {
                Some((id, n, sha)) if id == spec.id && n == spec.count => out.got = Some(sha),
                _ => out.error = Some(format!("malformed result line {line:?}")),
            }
        }
        None => {
            out.error = Some(fail_reason(vm, "no result line"));
            return;
        }
    }
    let (exited, _) = vm.wait_exit(Duration::from_secs(30));
    if !exited {
        out.error = Some("the guest did not power off".into());
    }
}

fn fail_reason(vm: &mut QemuVm, what: &str) -> String {
    let (exited, status) = vm.wait_exit(Duration::from_millis(200));
    let how = match (exited, status) {
        (true, Some(s)) => format!("QEMU exited ({s})"),
        _ => "QEMU killed at the deadline".to_string(),
    };
    let tail = vm.stderr_tail();
    let console = vm.console.last().cloned().unwrap_or_default();
    format!("{what}: {how}; last console line {console:?}; qemu: {tail}")
}
