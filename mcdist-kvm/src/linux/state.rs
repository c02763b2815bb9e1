//! Full machine state of a Linux guest at its fork point, and the Linux clone descriptor.
//!
//! Format (little endian), after the base [`Descriptor`]:
//!
//! ```text
//! magic "MCDKLNX1" | version u16 (=1) | base length u64 | base descriptor
//! | clone count u8 | vcpus u16 | per vCPU: mp_state regs sregs xsave xcrs debugregs
//! |   lapic events (each: length u32 | bytes of the KVM struct) | msrs u32 | 16 bytes each
//! | pic master | pic slave | ioapic | pit2 | clock (length-prefixed KVM structs)
//! | UART: 9 register bytes | fifo length u8 | fifo bytes
//! ```
//!
//! KVM structs are stored as their in-memory bytes (the KVM ABI), so a descriptor is read by
//! the same architecture it was written on.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use vm_superio::serial::SerialState;
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::descriptor::{Descriptor, DescriptorError, DescriptorFile, Reader};

const MAGIC: &[u8; 8] = b"MCDKLNX1";
const VERSION: u16 = 1;

/// Everything one vCPU needs to continue running Linux.
#[derive(Clone)]
pub struct VcpuFull {
    /// Multiprocessing state (runnable, halted...).
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// Legacy FPU/SSE view (also in `xsave`; kept for the base descriptor).
    pub fpu: kvm_fpu,
    /// XSAVE area (x87, SSE, AVX...).
    pub xsave: std::sync::Arc<kvm_xsave>,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Local APIC registers (timer, LVTs, ISR/IRR).
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM saves (TSC, syscall MSRs, KVM clock MSRs, TSC deadline...).
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub events: kvm_vcpu_events,
}

impl std::fmt::Debug for VcpuFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuFull")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("msrs", &self.msrs.len())
            .finish()
    }
}

/// The whole machine at the fork point.
#[derive(Clone)]
pub struct MachineState {
    /// Per-vCPU state.
    pub vcpus: Vec<VcpuFull>,
    /// Master 8259.
    pub pic_master: kvm_irqchip,
    /// Slave 8259.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// 8254 PIT.
    pub pit: kvm_pit_state2,
    /// KVM clock.
    pub clock: kvm_clock_data,
    /// 8250 UART.
    pub serial: SerialState,
}

impl std::fmt::Debug for MachineState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MachineState")
            .field("vcpus", &self.vcpus)
            .field("clock", &self.clock.clock)
            .finish()
    }
}

/// A Linux clone descriptor: the base descriptor (memory layout, zero map, digest, session)
/// plus the full machine state.
#[derive(Debug, Clone)]
pub struct LinuxDescriptor {
    /// Memory, session and basic vCPU state.
    pub base: Descriptor,
    /// Number of clones the parent asked for (what clones read on the count port).
    pub clone_count: u8,
    /// Full machine state.
    pub machine: MachineState,
}

fn put<T: IntoBytes + Immutable + ?Sized>(w: &mut Vec<u8>, v: &T) {
    let b = v.as_bytes();
    w.extend_from_slice(&(b.len() as u32).to_le_bytes());
    w.extend_from_slice(b);
}

impl Reader<'_> {
    fn get<T: FromBytes>(&mut self, what: &'static str) -> Result<T, DescriptorError> {
        let n = self.u32()? as usize;
        if n != std::mem::size_of::<T>() {
            return Err(DescriptorError::StateSize {
                what,
                got: n,
                expected: std::mem::size_of::<T>(),
            });
        }
        T::read_from_bytes(self.take(n)?).map_err(|_| DescriptorError::Length { what })
    }
}

impl DescriptorFile for LinuxDescriptor {
    /// Serializes the descriptor.
    fn encode(&self) -> Vec<u8> {
        let base = self.base.encode();
        let mut w = Vec::with_capacity(base.len() + 16 * 1024);
        w.extend_from_slice(MAGIC);
        w.extend_from_slice(&VERSION.to_le_bytes());
        w.extend_from_slice(&(base.len() as u64).to_le_bytes());
        w.extend_from_slice(&base);
        w.push(self.clone_count);
        let m = &self.machine;
        w.extend_from_slice(&(m.vcpus.len() as u16).to_le_bytes());
        for v in &m.vcpus {
            put(&mut w, &v.mp_state);
            put(&mut w, &v.regs);
            put(&mut w, &v.sregs);
            put(&mut w, &*v.xsave);
            put(&mut w, &v.xcrs);
            put(&mut w, &v.debugregs);
            put(&mut w, &v.lapic);
            put(&mut w, &v.events);
            w.extend_from_slice(&(v.msrs.len() as u32).to_le_bytes());
            for e in &v.msrs {
                w.extend_from_slice(&e.index.to_le_bytes());
                w.extend_from_slice(&e.reserved.to_le_bytes());
                w.extend_from_slice(&e.data.to_le_bytes());
            }
        }
        put(&mut w, &m.pic_master);
        put(&mut w, &m.pic_slave);
        put(&mut w, &m.ioapic);
        put(&mut w, &m.pit);
        put(&mut w, &m.clock);
        let s = &m.serial;
        w.extend_from_slice(&[
            s.baud_divisor_low,
            s.baud_divisor_high,
            s.interrupt_enable,
            s.interrupt_identification,
            s.line_control,
            s.line_status,
            s.modem_control,
            s.modem_status,
            s.scratch,
        ]);
        let fifo = &s.in_buffer[..s.in_buffer.len().min(255)];
        w.push(fifo.len() as u8);
        w.extend_from_slice(fifo);
        w
    }

    /// Parses a descriptor.
    fn decode(bytes: &[u8]) -> Result<Self, DescriptorError> {
        let mut r = Reader::open(bytes, MAGIC, VERSION)?;
        let n = usize::try_from(r.u64()?).map_err(|_| DescriptorError::Length { what: "base" })?;
        let base = Descriptor::decode(r.take(n)?)?;
        let clone_count = r.u8()?;
        let nv = r.u16()? as usize;
        if nv != base.vcpus.len() {
            return Err(DescriptorError::VcpuStates {
                states: nv,
                vcpus: base.vcpus.len(),
            });
        }
        let mut vcpus = Vec::with_capacity(nv);
        for i in 0..nv {
            let fpu = base.vcpus[i].fpu;
            let mp_state = r.get("mp_state")?;
            let regs = r.get("regs")?;
            let sregs = r.get("sregs")?;
            let xsave = std::sync::Arc::new(r.get::<kvm_xsave>("xsave")?);
            let xcrs = r.get("xcrs")?;
            let debugregs = r.get("debugregs")?;
            let lapic = r.get("lapic")?;
            let events = r.get("vcpu_events")?;
            let nm = r.u32()? as usize;
            if nm > 4096 {
                return Err(DescriptorError::TooManyMsrs(nm));
            }
            let mut msrs = Vec::with_capacity(nm);
            for _ in 0..nm {
                msrs.push(kvm_msr_entry {
                    index: r.u32()?,
                    reserved: r.u32()?,
                    data: r.u64()?,
                });
            }
            vcpus.push(VcpuFull {
                mp_state,
                regs,
                sregs,
                fpu,
                xsave,
                xcrs,
                debugregs,
                lapic,
                msrs,
                events,
            });
        }
        let pic_master = r.get("pic master")?;
        let pic_slave = r.get("pic slave")?;
        let ioapic = r.get("ioapic")?;
        let pit = r.get("pit2")?;
        let clock = r.get("clock")?;
        let regs = r.take(9)?;
        let fifo_len = r.u8()? as usize;
        let serial = SerialState {
            baud_divisor_low: regs[0],
            baud_divisor_high: regs[1],
            interrupt_enable: regs[2],
            interrupt_identification: regs[3],
            line_control: regs[4],
            line_status: regs[5],
            modem_control: regs[6],
            modem_status: regs[7],
            scratch: regs[8],
            in_buffer: r.take(fifo_len)?.to_vec(),
        };
        Ok(Self {
            base,
            clone_count,
            machine: MachineState {
                vcpus,
                pic_master,
                pic_slave,
                ioapic,
                pit,
                clock,
                serial,
            },
        })
    }
}
