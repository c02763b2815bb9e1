//! A KVM machine that runs Linux: in-kernel irqchip (PIC, IOAPIC, LAPIC) and PIT, host CPUID,
//! an 8250 UART on 0x3f8 (vm-superio) raising IRQ 4 through an irqfd, and the mcdist fork
//! ports. Full machine state capture and restore for clones.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_pit_config, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::state::{MachineState, VcpuFull};
use super::{boot::BootInfo, LinuxError};
use crate::sys;
use crate::vm::{KvmCallError, VmCore, VmError, VmMemory};

/// Guest writes any byte here to ask to be cloned (the fork point).
pub const PORT_FORK: u16 = 0x510;
/// Guest reads its clone id here (one byte).
pub const PORT_CLONE_ID: u16 = 0x511;
/// Guest writes its exit code here to stop the machine.
pub const PORT_EXIT: u16 = 0x512;
/// Guest reads the number of clones here (one byte).
pub const PORT_CLONE_COUNT: u16 = 0x513;
const COM1: u16 = 0x3f8;
const COM1_IRQ: u32 = 4;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> LinuxError {
    move |source| LinuxError::Kvm { op, source }
}

/// Raises the UART interrupt through an irqfd.
#[derive(Debug)]
pub struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// What the guest printed on its serial console.
#[derive(Debug)]
pub struct ConsoleLog {
    /// All bytes written.
    pub bytes: Vec<u8>,
    /// When the log was created (machine start).
    pub started: Instant,
    /// Time of the first complete line after `started`.
    pub first_line: Option<Duration>,
}

impl ConsoleLog {
    /// The output as text lines (lossy UTF-8, `\r` stripped).
    pub fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.bytes)
            .lines()
            .map(|l| l.trim_end_matches('\r').to_string())
            .collect()
    }
}

/// The UART's output side: collects into a [`ConsoleLog`] and optionally echoes lines to
/// stderr with a prefix.
#[derive(Debug, Clone)]
pub struct Console {
    log: Arc<Mutex<ConsoleLog>>,
    echo: Option<String>,
    line: Vec<u8>,
}

impl Console {
    /// A console; `echo` is the prefix for echoing to stderr (`None`: silent).
    pub fn new(echo: Option<String>) -> Self {
        Self {
            log: Arc::new(Mutex::new(ConsoleLog {
                bytes: Vec::new(),
                started: Instant::now(),
                first_line: None,
            })),
            echo,
            line: Vec::new(),
        }
    }

    /// The shared log.
    pub fn log(&self) -> Arc<Mutex<ConsoleLog>> {
        self.log.clone()
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.bytes.extend_from_slice(buf);
        if log.first_line.is_none() && buf.contains(&b'\n') {
            log.first_line = Some(log.started.elapsed());
        }
        drop(log);
        if let Some(prefix) = &self.echo {
            for &b in buf {
                if b == b'\n' {
                    let l = String::from_utf8_lossy(&self.line);
                    eprintln!("{prefix}{}", l.trim_end_matches('\r'));
                    self.line.clear();
                } else {
                    self.line.push(b);
                }
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How a run of the machine ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinuxExit {
    /// The guest asked to be cloned; the port write is complete and the vCPU is stopped.
    Fork,
    /// The guest wrote its exit code.
    Exit(u8),
    /// The guest shut down (triple fault or reset).
    Shutdown,
}

/// A KVM machine running Linux on one memory slot at guest physical 0.
pub struct LinuxVm {
    serial: Serial<IrqTrigger, NoEvents, Console>,
    core: VmCore,
    clone_id: u8,
    clone_count: u8,
}

impl std::fmt::Debug for LinuxVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinuxVm")
            .field("core", &self.core)
            .field("clone_id", &self.clone_id)
            .finish()
    }
}

impl LinuxVm {
    /// Creates the machine over `memory` with `vcpus` vCPUs; the console writes to `console`.
    pub fn new(memory: VmMemory, vcpus: usize, console: Console) -> Result<Self, LinuxError> {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(LinuxError::Io)?;
        let devices = |_: &Kvm, vm: &VmFd| -> Result<(), KvmCallError> {
            vm.create_irq_chip().map_err(|e| ("CREATE_IRQCHIP", e))?;
            let pit = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            vm.create_pit2(pit).map_err(|e| ("CREATE_PIT2", e))?;
            vm.register_irqfd(&evt, COM1_IRQ).map_err(|e| ("IRQFD", e))
        };
        let cpuid = |i: u64, c: &mut kvm_bindings::CpuId| {
            for e in c.as_mut_slice() {
                if e.function == 1 {
                    e.ebx = (e.ebx & 0x00ff_ffff) | ((i as u32) << 24);
                    // No CMPXCHG16B: KVM's instruction emulator cannot emulate it, and under
                    // shadow paging (nested hosts) accesses to write-tracked pages are
                    // emulated (SLUB's cmpxchg_double would stop the guest with an internal
                    // error).
                    // No XSAVE either (XRSTOR is not emulatable); Linux then uses FXSAVE.
                    // Where CPUID does not trap (software virtualization without CPUID
                    // faulting) the guest sees the host's bits, so the kernel command line
                    // says the same (`noxsave clearcpuid=...`, see `CMDLINE`).
                    e.ecx &= !((1 << 13) | (1 << 26) | (1 << 27));
                }
            }
        };
        let core = VmCore::new(memory, vcpus, devices, cpuid)
            .map_err(|(op, source)| LinuxError::Kvm { op, source })?;
        Ok(Self {
            serial: Serial::new(IrqTrigger(evt), console),
            core,
            clone_id: 0xff,
            clone_count: 0,
        })
    }

    /// The machine's memory.
    pub fn memory(&self) -> &VmMemory {
        &self.core.memory
    }

    /// Sets what the guest reads on [`PORT_CLONE_ID`] and [`PORT_CLONE_COUNT`].
    pub fn set_clone_identity(&mut self, id: u8, count: u8) {
        self.clone_id = id;
        self.clone_count = count;
    }

    /// Prepares vCPU 0 to enter the kernel loaded by [`super::boot::load_linux`].
    pub fn setup_boot(&mut self, info: &BootInfo) -> Result<(), LinuxError> {
        let vcpu = self.core.vcpus.first().ok_or(LinuxError::NoVcpu)?;
        let mut sregs = vcpu.get_sregs().map_err(kvm_err("GET_SREGS"))?;
        let regs = super::boot::boot_cpu_state(info, &mut sregs);
        vcpu.set_sregs(&sregs).map_err(kvm_err("SET_SREGS"))?;
        vcpu.set_regs(&regs).map_err(kvm_err("SET_REGS"))?;
        let fpu = kvm_bindings::kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        vcpu.set_fpu(&fpu).map_err(kvm_err("SET_FPU"))?;
        // LINT0 delivers the PIC's ExtINT, LINT1 NMI (as a PC's BIOS leaves them).
        let mut lapic = vcpu.get_lapic().map_err(kvm_err("GET_LAPIC"))?;
        for (reg, mode) in [(APIC_LVT0, 7u32), (APIC_LVT1, 4u32)] {
            let mut b = [0u8; 4];
            for (k, x) in b.iter_mut().enumerate() {
                *x = lapic.regs[reg + k] as u8;
            }
            let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
            for (k, x) in v.to_le_bytes().iter().enumerate() {
                lapic.regs[reg + k] = *x as _;
            }
        }
        vcpu.set_lapic(&lapic).map_err(kvm_err("SET_LAPIC"))?;
        // MTRRs on with write-back as the default type (the reset value, 0, makes all memory
        // uncacheable), and fast strings.
        let entries = [
            kvm_bindings::kvm_msr_entry {
                index: MSR_MTRR_DEF_TYPE,
                data: (1 << 11) | 6,
                ..Default::default()
            },
            kvm_bindings::kvm_msr_entry {
                index: MSR_IA32_MISC_ENABLE,
                data: 1,
                ..Default::default()
            },
        ];
        let refused = write_msrs(vcpu, &entries)?;
        if refused > 0 {
            tracing::debug!(refused, "boot MSRs refused");
        }
        Ok(())
    }

    /// Runs vCPU `idx` until the guest forks, exits or shuts down, or `deadline` passes.
    pub fn run(&mut self, idx: usize, deadline: Instant) -> Result<LinuxExit, LinuxError> {
        sys::linux::install_kick_handler().map_err(LinuxError::Io)?;
        let lost = match &self.core.memory {
            VmMemory::Lazy(m) => Some(m.clone()),
            VmMemory::Ram(_) => None,
        };
        sys::linux::kicked_when(
            move || Instant::now() >= deadline || lost.as_ref().is_some_and(|m| m.is_failed()),
            || self.run_inner(idx, deadline),
        )
    }

    fn run_inner(&mut self, idx: usize, deadline: Instant) -> Result<LinuxExit, LinuxError> {
        let Self {
            core: VmCore { vcpus, memory, .. },
            serial,
            clone_id,
            clone_count,
        } = self;
        let vcpu = vcpus.get_mut(idx).ok_or(LinuxError::NoVcpu)?;
        loop {
            if memory.is_lost() {
                // Fail closed: the caller reports the memory's failure.
                return Err(LinuxError::Vm(VmError::MemoryLost));
            }
            if Instant::now() >= deadline {
                let rip = vcpu.get_regs().map_or(0, |r| r.rip);
                return Err(LinuxError::Timeout { rip });
            }
            let exit = match vcpu.run() {
                Ok(e) => e,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(source) => return Err(LinuxError::Kvm { op: "RUN", source }),
            };
            match exit {
                VcpuExit::IoOut(port, data) if (COM1..COM1 + 8).contains(&port) => {
                    if let Some(&b) = data.first() {
                        if let Err(e) = serial.write((port - COM1) as u8, b) {
                            tracing::debug!("serial write: {e:?}");
                        }
                    }
                }
                VcpuExit::IoIn(port, data) if (COM1..COM1 + 8).contains(&port) => {
                    if let Some(b) = data.first_mut() {
                        *b = serial.read((port - COM1) as u8);
                    }
                }
                VcpuExit::IoOut(PORT_FORK, _) => {
                    // Complete the port write so the captured state resumes after it.
                    crate::vm::complete_io(vcpu).map_err(|source| LinuxError::Kvm {
                        op: "RUN (complete I/O)",
                        source,
                    })?;
                    return Ok(LinuxExit::Fork);
                }
                VcpuExit::IoOut(PORT_EXIT, data) => {
                    return Ok(LinuxExit::Exit(data.first().copied().unwrap_or(0)))
                }
                VcpuExit::IoIn(PORT_CLONE_ID, data) => data.fill(*clone_id),
                VcpuExit::IoIn(PORT_CLONE_COUNT, data) => data.fill(*clone_count),
                VcpuExit::IoIn(_, data) => data.fill(0xff),
                VcpuExit::IoOut(..) => {}
                VcpuExit::MmioRead(_, data) => data.fill(0),
                VcpuExit::MmioWrite(..) => {}
                VcpuExit::Shutdown | VcpuExit::SystemEvent(..) => return Ok(LinuxExit::Shutdown),
                VcpuExit::Hlt => {}
                VcpuExit::InternalError => {
                    let (suberror, data) = sys::linux::internal_error(vcpu);
                    let regs = vcpu.get_regs().map_err(kvm_err("GET_REGS"))?;
                    let code = vcpu
                        .translate_gva(regs.rip)
                        .ok()
                        .filter(|t| t.valid != 0)
                        .and_then(|t| {
                            let mut b = [0u8; 16];
                            read_mem(memory, t.physical_address, &mut b).then_some(b)
                        });
                    if let Some((addr, len)) = code.and_then(|c| ldmxcsr_operand(&c, &regs)) {
                        // LDMXCSR that KVM could not emulate: load MXCSR from memory.
                        let mut b = [0u8; 4];
                        let gpa = vcpu
                            .translate_gva(addr)
                            .ok()
                            .filter(|t| t.valid != 0)
                            .map(|t| t.physical_address);
                        if gpa.is_some_and(|g| read_mem(memory, g, &mut b)) {
                            let mut fpu = vcpu.get_fpu().map_err(kvm_err("GET_FPU"))?;
                            fpu.mxcsr = u32::from_le_bytes(b);
                            vcpu.set_fpu(&fpu).map_err(kvm_err("SET_FPU"))?;
                            let mut r = regs;
                            r.rip += len;
                            vcpu.set_regs(&r).map_err(kvm_err("SET_REGS"))?;
                            continue;
                        }
                    }
                    if code.is_some_and(|c| c[0] == 0x9b) {
                        // FWAIT that KVM could not emulate: the x87 state here has no pending
                        // unmasked exception to report, so it completes as a no-op.
                        let mut r = regs;
                        r.rip += 1;
                        vcpu.set_regs(&r).map_err(kvm_err("SET_REGS"))?;
                        continue;
                    }
                    if code.is_some_and(|c| c[0] == 0xcc) {
                        // KVM could not emulate an INT3 (it only decodes it; hosts without
                        // next-RIP support emulate soft interrupts). Deliver it as the CPU
                        // would: #BP, a trap, with RIP after the instruction.
                        tracing::debug!(rip = regs.rip, "delivering INT3 as #BP");
                        let mut r = regs;
                        r.rip += 1;
                        vcpu.set_regs(&r).map_err(kvm_err("SET_REGS"))?;
                        let mut ev = vcpu.get_vcpu_events().map_err(kvm_err("GET_VCPU_EVENTS"))?;
                        ev.exception.injected = 1;
                        ev.exception.nr = 3;
                        ev.exception.has_error_code = 0;
                        ev.exception.error_code = 0;
                        ev.exception.pending = 0;
                        vcpu.set_vcpu_events(&ev)
                            .map_err(kvm_err("SET_VCPU_EVENTS"))?;
                        continue;
                    }
                    return Err(LinuxError::UnexpectedExit(format!(
                        "KVM internal error {suberror} data {data:x?} at rip {:#x} code {code:02x?}",
                        regs.rip
                    )));
                }
                other => return Err(LinuxError::UnexpectedExit(format!("{other:?}"))),
            }
        }
    }

    /// Captures the whole machine (call while no vCPU runs): every vCPU's registers, FPU and
    /// XSAVE, XCRs, debug registers, MSRs, LAPIC, events and MP state; the PICs, IOAPIC, PIT,
    /// KVM clock and the UART.
    pub fn capture(&mut self) -> Result<MachineState, LinuxError> {
        let msr_list = self
            .core
            .kvm
            .get_msr_index_list()
            .map_err(kvm_err("GET_MSR_INDEX_LIST"))?;
        let indices: Vec<u32> = msr_list.as_slice().to_vec();
        let mut vcpus = Vec::new();
        for v in &self.core.vcpus {
            vcpus.push(VcpuFull {
                mp_state: v.get_mp_state().map_err(kvm_err("GET_MP_STATE"))?,
                regs: v.get_regs().map_err(kvm_err("GET_REGS"))?,
                sregs: v.get_sregs().map_err(kvm_err("GET_SREGS"))?,
                fpu: v.get_fpu().map_err(kvm_err("GET_FPU"))?,
                xsave: Arc::new(v.get_xsave().map_err(kvm_err("GET_XSAVE"))?),
                xcrs: v.get_xcrs().map_err(kvm_err("GET_XCRS"))?,
                debugregs: v.get_debug_regs().map_err(kvm_err("GET_DEBUGREGS"))?,
                lapic: v.get_lapic().map_err(kvm_err("GET_LAPIC"))?,
                msrs: read_msrs(v, &indices)?,
                events: v.get_vcpu_events().map_err(kvm_err("GET_VCPU_EVENTS"))?,
            });
        }
        let chip = |id: u32| -> Result<kvm_bindings::kvm_irqchip, LinuxError> {
            let mut c = kvm_bindings::kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.core
                .vm
                .get_irqchip(&mut c)
                .map_err(kvm_err("GET_IRQCHIP"))?;
            Ok(c)
        };
        Ok(MachineState {
            vcpus,
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.core.vm.get_pit2().map_err(kvm_err("GET_PIT2"))?,
            clock: self.core.vm.get_clock().map_err(kvm_err("GET_CLOCK"))?,
            serial: self.serial.state(),
        })
    }

    /// Restores a captured machine into this one (same vCPU count). Returns the number of
    /// MSRs KVM refused (left at their reset values).
    pub fn restore(&mut self, s: &MachineState) -> Result<usize, LinuxError> {
        if s.vcpus.len() != self.core.vcpus.len() {
            return Err(LinuxError::VcpuCount {
                got: s.vcpus.len(),
                want: self.core.vcpus.len(),
            });
        }
        self.core.vm.set_pit2(&s.pit).map_err(kvm_err("SET_PIT2"))?;
        let mut clock = s.clock;
        clock.flags = 0;
        self.core
            .vm
            .set_clock(&clock)
            .map_err(kvm_err("SET_CLOCK"))?;
        for c in [&s.pic_master, &s.pic_slave, &s.ioapic] {
            self.core
                .vm
                .set_irqchip(c)
                .map_err(kvm_err("SET_IRQCHIP"))?;
        }
        let mut refused = 0;
        for (v, st) in self.core.vcpus.iter().zip(&s.vcpus) {
            v.set_mp_state(st.mp_state)
                .map_err(kvm_err("SET_MP_STATE"))?;
            v.set_sregs(&st.sregs).map_err(kvm_err("SET_SREGS"))?;
            v.set_regs(&st.regs).map_err(kvm_err("SET_REGS"))?;
            v.set_fpu(&st.fpu).map_err(kvm_err("SET_FPU"))?;
            sys::linux::set_xsave(v, &st.xsave).map_err(kvm_err("SET_XSAVE"))?;
            v.set_xcrs(&st.xcrs).map_err(kvm_err("SET_XCRS"))?;
            v.set_debug_regs(&st.debugregs)
                .map_err(kvm_err("SET_DEBUGREGS"))?;
            v.set_lapic(&st.lapic).map_err(kvm_err("SET_LAPIC"))?;
            refused += write_msrs(v, &st.msrs)?;
            v.set_vcpu_events(&st.events)
                .map_err(kvm_err("SET_VCPU_EVENTS"))?;
        }
        let console = self.serial.writer().clone();
        let evt = self
            .serial
            .interrupt_evt()
            .0
            .try_clone()
            .map_err(LinuxError::Io)?;
        self.serial = Serial::from_state(&s.serial, IrqTrigger(evt), NoEvents, console)
            .map_err(LinuxError::UartState)?;
        Ok(refused)
    }
}

/// If `code` starts with `LDMXCSR m32` (`0f ae /2`, optional REX) with a base register and
/// displacement (no index register, not RIP-relative), its operand address and length.
fn ldmxcsr_operand(code: &[u8; 16], regs: &kvm_bindings::kvm_regs) -> Option<(u64, u64)> {
    let (rex, c) = match code[0] {
        r @ 0x40..=0x4f => (r, &code[1..]),
        _ => (0, &code[..]),
    };
    if c[0] != 0x0f || c[1] != 0xae {
        return None;
    }
    let modrm = c[2];
    let (md, reg, rm) = (modrm >> 6, (modrm >> 3) & 7, modrm & 7);
    if md == 3 || reg != 2 {
        return None;
    }
    let mut len = 3usize;
    let base = if rm == 4 {
        let sib = c[3];
        len += 1;
        if (sib >> 3) & 7 != 4 || (sib & 7 == 5 && md == 0) {
            return None; // index register or no base
        }
        sib & 7
    } else if rm == 5 && md == 0 {
        return None; // RIP-relative
    } else {
        rm
    };
    let base = base | ((rex & 1) << 3);
    let r = regs;
    let gpr = [
        r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15,
    ];
    let disp: i64 = match md {
        1 => {
            len += 1;
            i64::from(c[len - 1] as i8)
        }
        2 => {
            len += 4;
            i64::from(i32::from_le_bytes([
                c[len - 4],
                c[len - 3],
                c[len - 2],
                c[len - 1],
            ]))
        }
        _ => 0,
    };
    let addr = gpr[usize::from(base)].wrapping_add_signed(disp);
    Some((addr, (len + usize::from(rex != 0)) as u64))
}

fn read_mem(m: &VmMemory, gpa: u64, buf: &mut [u8]) -> bool {
    match m {
        VmMemory::Ram(r) => r.read(gpa, buf).is_ok(),
        VmMemory::Lazy(l) => l.read(gpa as usize, buf).is_ok(),
    }
}

fn read_msrs(v: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_bindings::kvm_msr_entry>, LinuxError> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < indices.len() {
        let chunk = &indices[i..(i + 64).min(indices.len())];
        let entries: Vec<_> = chunk
            .iter()
            .map(|&index| kvm_bindings::kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(LinuxError::MsrList)?;
        let n = v.get_msrs(&mut msrs).map_err(kvm_err("GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        // KVM stops at the first MSR it cannot read: skip that one.
        i += n + usize::from(n < chunk.len());
    }
    Ok(out)
}

fn write_msrs(v: &VcpuFd, entries: &[kvm_bindings::kvm_msr_entry]) -> Result<usize, LinuxError> {
    let mut refused = 0;
    let mut i = 0;
    while i < entries.len() {
        let chunk = &entries[i..(i + 64).min(entries.len())];
        let msrs = Msrs::from_entries(chunk).map_err(LinuxError::MsrList)?;
        let n = v.set_msrs(&msrs).map_err(kvm_err("SET_MSRS"))?;
        if n < chunk.len() {
            tracing::debug!(msr = chunk[n].index, "KVM refused MSR");
            refused += 1;
            i += n + 1;
        } else {
            i += n;
        }
    }
    Ok(refused)
}

#[cfg(test)]
mod tests {
    use super::ldmxcsr_operand;

    fn code(bytes: &[u8]) -> [u8; 16] {
        let mut c = [0x90u8; 16];
        c[..bytes.len()].copy_from_slice(bytes);
        c
    }

    #[test]
    fn decodes_ldmxcsr_operands() {
        let regs = kvm_bindings::kvm_regs {
            rsp: 0x1000,
            rdi: 0x2000,
            r9: 0x3000,
            ..Default::default()
        };
        // ldmxcsr [rsp+4] (seen in kernel_fpu_begin)
        assert_eq!(
            ldmxcsr_operand(&code(&[0x0f, 0xae, 0x54, 0x24, 0x04]), &regs),
            Some((0x1004, 5))
        );
        // ldmxcsr [rdi]
        assert_eq!(
            ldmxcsr_operand(&code(&[0x0f, 0xae, 0x17]), &regs),
            Some((0x2000, 3))
        );
        // ldmxcsr [r9-8] (REX.B, disp8)
        assert_eq!(
            ldmxcsr_operand(&code(&[0x41, 0x0f, 0xae, 0x51, 0xf8]), &regs),
            Some((0x2ff8, 5))
        );
        // stmxcsr (/3), RIP-relative and register forms are not handled.
        assert_eq!(
            ldmxcsr_operand(&code(&[0x0f, 0xae, 0x5c, 0x24, 0x04]), &regs),
            None
        );
        assert_eq!(
            ldmxcsr_operand(&code(&[0x0f, 0xae, 0x15, 0, 0, 0, 0]), &regs),
            None
        );
        assert_eq!(ldmxcsr_operand(&code(&[0x0f, 0xae, 0xd0]), &regs), None);
    }
}
