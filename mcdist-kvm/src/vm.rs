//! A small VMM on kvm-ioctls: guest memory in one slot, vCPUs without an in-kernel irqchip,
//! a run loop that understands the demo guest's ports, and vCPU state capture/restore.

use std::sync::Arc;

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use crate::guest::{PORT_CLONE_ME, PORT_RESULT};
use crate::lazy::LazyMemory;
use crate::source::PageSource;
use crate::sys::{self, AnonMap};

/// Errors from the VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// The operation.
        op: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be mapped or accessed.
    #[error("guest memory: {0}")]
    Memory(std::io::Error),
    /// The guest accessed an I/O port the VMM does not emulate.
    #[error("unexpected guest exit: port I/O on {0:#x}")]
    UnexpectedPort(u16),
    /// The guest stopped in a way the VMM does not handle (KVM's exit, as text: it borrows
    /// the vCPU's run area).
    #[error("unexpected guest exit: {0}")]
    UnexpectedExit(String),
    /// The lazy memory failed (fail closed): the vCPU was stopped in an unresolved fault.
    #[error("memory lost: the vCPU was stopped, its memory source failed")]
    MemoryLost,
    /// The vCPU state does not fit this VM.
    #[error("vCPU state for {got} vCPUs, VM has {want}")]
    VcpuCount {
        /// States supplied.
        got: usize,
        /// vCPUs in the VM.
        want: usize,
    },
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

/// Architectural state a restored vCPU needs to continue: general registers, segment and
/// control registers, and FPU/SSE state.
#[derive(Clone)]
pub struct VcpuState {
    /// General-purpose registers, `rip`, `rflags`.
    pub regs: kvm_regs,
    /// Segment, descriptor-table and control registers.
    pub sregs: kvm_sregs,
    /// x87/SSE state.
    pub fpu: kvm_fpu,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("cr0", &format_args!("{:#x}", self.sregs.cr0))
            .finish()
    }
}

/// Guest RAM backed by a plain anonymous mapping (the parent's memory).
#[derive(Debug)]
pub struct GuestRam {
    map: AnonMap,
    page_size: usize,
}

impl GuestRam {
    /// Maps `size` bytes (demand-zero, not reserved).
    pub fn new(size: usize) -> Result<Self, VmError> {
        Ok(Self {
            map: AnonMap::new(size).map_err(VmError::Memory)?,
            page_size: 4096,
        })
    }
    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.map.len()
    }
    /// Writes guest-physical bytes.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), VmError> {
        self.map.write(gpa as usize, data).map_err(VmError::Memory)
    }
    /// Reads guest-physical bytes.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError> {
        self.map.read(gpa as usize, buf).map_err(VmError::Memory)
    }
}

/// Once the VM that uses it is frozen, guest RAM is a page source for clones.
impl PageSource for GuestRam {
    fn page_size(&self) -> usize {
        self.page_size
    }
    fn image_size(&self) -> u64 {
        self.map.len() as u64
    }
    fn read_page(&self, pfn: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let off = usize::try_from(pfn)
            .ok()
            .and_then(|p| p.checked_mul(self.page_size))
            .ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "page out of range")
            })?;
        self.map.read(off, buf)
    }
    fn read_pages(&self, first: u64, buf: &mut [u8]) -> std::io::Result<()> {
        // Guest RAM is whole pages: a run is one copy.
        self.read_page(first, buf)
    }
}

/// Memory a [`Vm`] runs on.
#[derive(Debug, Clone)]
pub enum VmMemory {
    /// Plain memory (parent).
    Ram(Arc<GuestRam>),
    /// Lazily fetched memory (clone).
    Lazy(Arc<LazyMemory>),
}

impl VmMemory {
    pub(crate) fn host_range(&self) -> (u64, u64) {
        match self {
            VmMemory::Ram(r) => (r.map.addr() as u64, r.map.len() as u64),
            VmMemory::Lazy(l) => (l.host_addr(), l.size() as u64),
        }
    }

    /// Whether the memory failed (lazy memory whose source is lost): its vCPUs must stop.
    pub(crate) fn is_lost(&self) -> bool {
        matches!(self, VmMemory::Lazy(l) if l.is_failed())
    }
}

/// How a vCPU run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest asked to be cloned; the pending port write is completed and the VM is frozen.
    CloneMe,
    /// The guest reported a result.
    Result(u32),
    /// The guest halted.
    Halted,
}

/// A KVM VM with one memory slot that maps a [`VmMemory`] at guest physical 0, and its vCPUs.
/// Shared by the demo [`Vm`] and the Linux machine.
pub(crate) struct VmCore {
    // Field order matters: vCPUs and the VM close before the memory they use is unmapped.
    pub(crate) vcpus: Vec<VcpuFd>,
    pub(crate) vm: VmFd,
    pub(crate) kvm: Kvm,
    pub(crate) memory: VmMemory,
}

/// Completes the port I/O the vCPU exited on without running guest code, so that a state
/// captured now resumes after the instruction.
pub(crate) fn complete_io(vcpu: &mut VcpuFd) -> Result<(), kvm_ioctls::Error> {
    vcpu.set_kvm_immediate_exit(1);
    let r = vcpu.run().map(|_| ());
    vcpu.set_kvm_immediate_exit(0);
    match r {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        r => r,
    }
}

impl std::fmt::Debug for VmCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmCore")
            .field("vcpus", &self.vcpus.len())
            .field("memory", &self.memory)
            .finish()
    }
}

/// A failed KVM call while creating a VM: the call's name and its error.
pub(crate) type KvmCallError = (&'static str, kvm_ioctls::Error);

impl VmCore {
    /// Opens `/dev/kvm`, creates the VM, runs `devices` (VM-wide devices such as an in-kernel
    /// irqchip, which must exist before the vCPUs), maps `memory` as slot 0 and creates `vcpus`
    /// vCPUs with the host's supported CPUID, adjusted per vCPU by `cpuid`.
    pub(crate) fn new(
        memory: VmMemory,
        vcpus: usize,
        devices: impl FnOnce(&Kvm, &VmFd) -> Result<(), KvmCallError>,
        cpuid: impl Fn(u64, &mut kvm_bindings::CpuId),
    ) -> Result<Self, KvmCallError> {
        let kvm = Kvm::new().map_err(|e| ("open /dev/kvm", e))?;
        let vm = kvm.create_vm().map_err(|e| ("CREATE_VM", e))?;
        vm.set_tss_address(0xfffb_d000)
            .map_err(|e| ("SET_TSS_ADDR", e))?;
        devices(&kvm, &vm)?;
        let (addr, size) = memory.host_range();
        // SAFETY: the mapping is owned by `memory`, which the returned VmCore holds and drops
        // after the VM and vCPU descriptors (field order), so it outlives every use by KVM.
        unsafe { sys::set_memory_slot(&vm, 0, 0, size, addr) }
            .map_err(|e| ("SET_USER_MEMORY_REGION", e))?;
        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| ("GET_SUPPORTED_CPUID", e))?;
        let vcpus = (0..vcpus as u64)
            .map(|i| {
                let v = vm.create_vcpu(i).map_err(|e| ("CREATE_VCPU", e))?;
                let mut c = supported.clone();
                cpuid(i, &mut c);
                v.set_cpuid2(&c).map_err(|e| ("SET_CPUID2", e))?;
                Ok(v)
            })
            .collect::<Result<Vec<_>, KvmCallError>>()?;
        Ok(Self {
            vcpus,
            vm,
            kvm,
            memory,
        })
    }
}

/// A KVM virtual machine with one memory slot at guest physical 0.
#[derive(Debug)]
pub struct Vm {
    core: VmCore,
}

impl Vm {
    /// Creates a VM over `memory` with `vcpus` vCPUs (state not yet set).
    pub fn new(memory: VmMemory, vcpus: usize) -> Result<Self, VmError> {
        let core = VmCore::new(memory, vcpus, |_, _| Ok(()), |_, _| {}).map_err(
            |(op, source)| match op {
                "open /dev/kvm" => VmError::OpenKvm(source),
                _ => VmError::Kvm { op, source },
            },
        )?;
        Ok(Self { core })
    }

    /// The VM's memory.
    pub fn memory(&self) -> &VmMemory {
        &self.core.memory
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.core.vcpus.len()
    }

    /// Puts every vCPU in 32-bit flat protected mode (no paging) at `entry`.
    pub fn setup_flat32(&mut self, entry: u64) -> Result<(), VmError> {
        for v in &mut self.core.vcpus {
            let mut sregs = v.get_sregs().map_err(kvm_err("GET_SREGS"))?;
            let seg = |selector: u16, type_: u8| kvm_segment {
                base: 0,
                limit: 0xffff_ffff,
                selector,
                type_,
                present: 1,
                dpl: 0,
                db: 1,
                s: 1,
                l: 0,
                g: 1,
                avl: 0,
                unusable: 0,
                padding: 0,
            };
            sregs.cs = seg(0x08, 0xb);
            let data = seg(0x10, 0x3);
            sregs.ds = data;
            sregs.es = data;
            sregs.fs = data;
            sregs.gs = data;
            sregs.ss = data;
            sregs.cr0 = 0x11; // PE | ET
            sregs.cr4 = 0;
            sregs.efer = 0;
            v.set_sregs(&sregs).map_err(kvm_err("SET_SREGS"))?;
            let regs = kvm_regs {
                rip: entry,
                rflags: 0x2,
                ..Default::default()
            };
            v.set_regs(&regs).map_err(kvm_err("SET_REGS"))?;
        }
        Ok(())
    }

    /// Runs vCPU `idx` until the guest asks for clones, reports a result, or halts. On lazy
    /// memory whose source fails, the vCPU is kicked out of its unresolved fault and the run
    /// ends with [`VmError::MemoryLost`] (fail closed).
    pub fn run(&mut self, idx: usize) -> Result<GuestExit, VmError> {
        let VmCore { vcpus, memory, .. } = &mut self.core;
        let vcpu = vcpus
            .get_mut(idx)
            .ok_or(VmError::VcpuCount { got: idx, want: 0 })?;
        if !matches!(memory, VmMemory::Lazy(_)) {
            return run_vcpu(vcpu, memory);
        }
        sys::linux::install_kick_handler().map_err(VmError::Memory)?;
        let memory = &*memory;
        sys::linux::kicked_when(|| memory.is_lost(), || run_vcpu(vcpu, memory))
    }

    /// Captures the state of every vCPU (call while the VM is stopped).
    pub fn capture(&mut self) -> Result<Vec<VcpuState>, VmError> {
        self.core
            .vcpus
            .iter_mut()
            .map(|v| {
                Ok(VcpuState {
                    regs: v.get_regs().map_err(kvm_err("GET_REGS"))?,
                    sregs: v.get_sregs().map_err(kvm_err("GET_SREGS"))?,
                    fpu: v.get_fpu().map_err(kvm_err("GET_FPU"))?,
                })
            })
            .collect()
    }

    /// Restores vCPU states (one per vCPU).
    pub fn restore(&mut self, states: &[VcpuState]) -> Result<(), VmError> {
        if states.len() != self.core.vcpus.len() {
            return Err(VmError::VcpuCount {
                got: states.len(),
                want: self.core.vcpus.len(),
            });
        }
        for (v, s) in self.core.vcpus.iter_mut().zip(states) {
            v.set_sregs(&s.sregs).map_err(kvm_err("SET_SREGS"))?;
            v.set_fpu(&s.fpu).map_err(kvm_err("SET_FPU"))?;
            v.set_regs(&s.regs).map_err(kvm_err("SET_REGS"))?;
        }
        Ok(())
    }

    /// Sets `rbx` of vCPU 0 (the clone id, fork's return value for the demo guest).
    pub fn set_rbx(&mut self, value: u64) -> Result<(), VmError> {
        let v = self
            .core
            .vcpus
            .first_mut()
            .ok_or(VmError::VcpuCount { got: 0, want: 1 })?;
        let mut regs = v.get_regs().map_err(kvm_err("GET_REGS"))?;
        regs.rbx = value;
        v.set_regs(&regs).map_err(kvm_err("SET_REGS"))
    }
}

/// Whether `/dev/kvm` can be opened here.
pub fn kvm_available() -> bool {
    Kvm::new().is_ok()
}

/// The run loop of [`Vm::run`] on one vCPU.
fn run_vcpu(vcpu: &mut VcpuFd, memory: &VmMemory) -> Result<GuestExit, VmError> {
    loop {
        let exit = match vcpu.run() {
            Ok(e) => e,
            Err(_) if memory.is_lost() => return Err(VmError::MemoryLost),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => {
                return Err(VmError::Kvm {
                    op: "RUN",
                    source: e,
                })
            }
        };
        match exit {
            VcpuExit::IoOut(PORT_CLONE_ME, _) => {
                // Complete the port write so the captured state resumes after it.
                complete_io(vcpu).map_err(|source| VmError::Kvm {
                    op: "RUN (complete I/O)",
                    source,
                })?;
                return Ok(GuestExit::CloneMe);
            }
            VcpuExit::IoOut(PORT_RESULT, data) => {
                let mut b = [0u8; 4];
                let n = data.len().min(4);
                b[..n].copy_from_slice(&data[..n]);
                return Ok(GuestExit::Result(u32::from_le_bytes(b)));
            }
            VcpuExit::Hlt => return Ok(GuestExit::Halted),
            VcpuExit::IoOut(port, _) | VcpuExit::IoIn(port, _) => {
                return Err(VmError::UnexpectedPort(port))
            }
            other => return Err(VmError::UnexpectedExit(format!("{other:?}"))),
        }
    }
}
