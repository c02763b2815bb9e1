//! Domain-level calls a dom0 needs around a memtap (cargo feature `xen`):
//! read a paused parent's memory into an image file, and give a clone domain
//! the parent's vCPU state (`xc_domain_hvm_getcontext` / `setcontext`), with
//! chosen registers changed so each clone learns who it is.

use crate::hypervisor::HypervisorError;
use crate::sys::xen::XenHandles;
use std::io::{self, Write};

/// `HVM_SAVE_CODE(CPU)` in `xen/arch-x86/hvm/save.h`.
const HVM_SAVE_CODE_CPU: u16 = 2;
/// `HVM_SAVE_CODE(END)`.
const HVM_SAVE_CODE_END: u16 = 0;
/// Offset of `rax` in `struct hvm_hw_cpu` (after the 512-byte FXSAVE area).
const HVM_HW_CPU_RAX: usize = 512;
/// Offset of `rip` (after the 16 general-purpose registers).
const HVM_HW_CPU_RIP: usize = HVM_HW_CPU_RAX + 16 * 8;
/// Offset of `cs_sel` (after rip, rflags, cr0, cr2, cr3, cr4 and six debug registers).
const HVM_HW_CPU_CS_SEL: usize = HVM_HW_CPU_RIP + 12 * 8;

/// A general-purpose register of `struct hvm_hw_cpu`, in the struct's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuReg {
    /// rax
    Rax = 0,
    /// rbx
    Rbx = 1,
    /// rcx
    Rcx = 2,
    /// rdx
    Rdx = 3,
}

/// libxenctrl for domain-level work in dom0.
pub struct XenControl {
    h: XenHandles,
}

impl std::fmt::Debug for XenControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenControl").finish_non_exhaustive()
    }
}

/// Where a vCPU record lives in an HVM save buffer.
fn find_cpu_record(ctx: &[u8], vcpu: u16) -> Option<usize> {
    let mut off = 0usize;
    while off + 8 <= ctx.len() {
        let code = u16::from_le_bytes([ctx[off], ctx[off + 1]]);
        let inst = u16::from_le_bytes([ctx[off + 2], ctx[off + 3]]);
        let len = u32::from_le_bytes(ctx[off + 4..off + 8].try_into().ok()?) as usize;
        let body = off + 8;
        if body.checked_add(len)? > ctx.len() {
            return None;
        }
        if code == HVM_SAVE_CODE_CPU && inst == vcpu && len >= HVM_HW_CPU_CS_SEL + 4 {
            return Some(body);
        }
        if code == HVM_SAVE_CODE_END {
            return None;
        }
        off = body.checked_add(len)?;
    }
    None
}

impl XenControl {
    /// Open libxenctrl (and the other handles).
    pub fn open() -> Result<XenControl, HypervisorError> {
        let h = XenHandles::open().map_err(|(call, e)| HypervisorError::new(0, call, e))?;
        Ok(XenControl { h })
    }

    /// A copy of page `gfn` of paused domain `domid`.
    pub fn read_page(&mut self, domid: u32, gfn: u64) -> Result<Vec<u8>, HypervisorError> {
        let map = self
            .h
            .map_page(domid, gfn)
            .map_err(|e| HypervisorError::new(domid, "xenforeignmemory_map", e))?;
        // The domain is paused and nobody else maps this page, so reading it
        // as a slice sees a stable copy.
        let page = map.as_slice().to_vec();
        self.h
            .unmap_page(map)
            .map_err(|e| HypervisorError::new(domid, "xenforeignmemory_unmap", e))?;
        Ok(page)
    }

    /// Write gfns `0..pages` of paused domain `domid` to `out`; gfns that
    /// cannot be mapped (holes) are written as zeros. Returns how many were holes.
    pub fn read_memory(
        &mut self,
        domid: u32,
        pages: u64,
        out: &mut dyn Write,
    ) -> Result<u64, HypervisorError> {
        let zero = vec![0u8; crate::abi::XC_PAGE_SIZE];
        let mut holes = 0u64;
        for gfn in 0..pages {
            match self.h.map_page(domid, gfn) {
                Ok(map) => {
                    // The domain is paused and nobody else maps this page, so
                    // reading it as a slice sees a stable copy.
                    let res = out.write_all(map.as_slice());
                    self.h
                        .unmap_page(map)
                        .map_err(|e| HypervisorError::new(domid, "xenforeignmemory_unmap", e))?;
                    res.map_err(|e| HypervisorError::new(domid, "write", e))?;
                }
                Err(_) => {
                    holes += 1;
                    out.write_all(&zero)
                        .map_err(|e| HypervisorError::new(domid, "write", e))?;
                }
            }
        }
        Ok(holes)
    }

    /// The HVM context of paused domain `domid` and the offset of vCPU 0's
    /// `struct hvm_hw_cpu` in it.
    fn vcpu0_context(&mut self, domid: u32) -> Result<(Vec<u8>, usize), HypervisorError> {
        let ctx = self
            .h
            .hvm_getcontext(domid)
            .map_err(|e| HypervisorError::new(domid, "xc_domain_hvm_getcontext", e))?;
        let body = find_cpu_record(&ctx, 0).ok_or_else(|| {
            HypervisorError::new(
                domid,
                "xc_domain_hvm_getcontext",
                io::Error::new(io::ErrorKind::InvalidData, "no vCPU 0 record"),
            )
        })?;
        Ok((ctx, body))
    }

    /// Where vCPU 0 of paused domain `domid` stands: its `rip` and the
    /// privilege level of its code selector (3: user mode).
    pub fn vcpu_position(&mut self, domid: u32) -> Result<(u64, u8), HypervisorError> {
        let (ctx, body) = self.vcpu0_context(domid)?;
        let at = body + HVM_HW_CPU_RIP;
        let rip = u64::from_le_bytes(ctx[at..at + 8].try_into().unwrap_or_default());
        let cs = ctx[body + HVM_HW_CPU_CS_SEL];
        Ok((rip, cs & 3))
    }

    /// Load `parent`'s HVM context (vCPUs, local APICs, ...) into `clone`
    /// with vCPU 0's registers in `set` changed. Both domains must be paused
    /// and built from the same configuration.
    pub fn copy_context(
        &mut self,
        parent: u32,
        clone: u32,
        set: &[(CpuReg, u64)],
    ) -> Result<(), HypervisorError> {
        let (mut ctx, body) = self.vcpu0_context(parent)?;
        for &(reg, v) in set {
            let at = body + HVM_HW_CPU_RAX + 8 * reg as usize;
            ctx[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        self.h
            .hvm_setcontext(clone, &mut ctx)
            .map_err(|e| HypervisorError::new(clone, "xc_domain_hvm_setcontext", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cpu_record_after_other_records() {
        let mut ctx = Vec::new();
        // HEADER, 24 bytes.
        ctx.extend_from_slice(&1u16.to_le_bytes());
        ctx.extend_from_slice(&0u16.to_le_bytes());
        ctx.extend_from_slice(&24u32.to_le_bytes());
        ctx.extend_from_slice(&[0u8; 24]);
        // CPU 0.
        ctx.extend_from_slice(&2u16.to_le_bytes());
        ctx.extend_from_slice(&0u16.to_le_bytes());
        ctx.extend_from_slice(&1024u32.to_le_bytes());
        let body = ctx.len();
        ctx.extend_from_slice(&[0u8; 1024]);
        ctx.extend_from_slice(&[0u8; 8]);
        assert_eq!(find_cpu_record(&ctx, 0), Some(body));
        assert_eq!(find_cpu_record(&ctx, 1), None);
        assert_eq!(find_cpu_record(&ctx[..40], 0), None);
    }
}
