//! Loading a bzImage for the 64-bit Linux boot protocol: setup header, `boot_params`
//! ("zero page"), e820 map, command line, initramfs, identity page tables and a flat GDT.
//!
//! Layout in guest physical memory (the same one Firecracker uses):
//!
//! ```text
//! 0x0500 GDT   0x0520 IDT   0x7000 boot_params   0x8ff0 boot stack
//! 0x9000 PML4  0xa000 PDPT  0xb000 PD (1 GiB of 2 MiB pages)   0x20000 command line
//! 0x100000 protected-mode kernel   top of RAM (below 1 GiB): initramfs
//! ```

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use super::LinuxError;
use crate::vm::GuestRam;

/// Guest physical address of the protected-mode kernel.
pub const KERNEL_GPA: u64 = 0x10_0000;
const BOOT_PARAMS_GPA: u64 = 0x7000;
const CMDLINE_GPA: u64 = 0x2_0000;
const CMDLINE_MAX: usize = 2048;
const GDT_GPA: u64 = 0x500;
const IDT_GPA: u64 = 0x520;
const PML4_GPA: u64 = 0x9000;
const PDPT_GPA: u64 = 0xa000;
const PD_GPA: u64 = 0xb000;
const STACK_GPA: u64 = 0x8ff0;
const EBDA_START: u64 = 0x9_fc00;
const IDENTITY_MAPPED: u64 = 1 << 30;

// Offsets in the bzImage / boot_params (Documentation/arch/x86/boot.rst).
const SETUP_SECTS: usize = 0x1f1;
const BOOT_FLAG: usize = 0x1fe;
const HEADER_MAGIC: usize = 0x202;
const VERSION: usize = 0x206;
const TYPE_OF_LOADER: usize = 0x210;
const LOADFLAGS: usize = 0x211;
const RAMDISK_IMAGE: usize = 0x218;
const RAMDISK_SIZE: usize = 0x21c;
const CMD_LINE_PTR: usize = 0x228;
const INITRD_ADDR_MAX: usize = 0x22c;
const XLOADFLAGS: usize = 0x236;
const PAYLOAD_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH: usize = 0x24c;
const E820_ENTRIES: usize = 0x1e8;
const E820_TABLE: usize = 0x2d0;

/// Where the loaded kernel starts and what it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootInfo {
    /// 64-bit entry point.
    pub entry: u64,
    /// Initramfs address.
    pub initrd_gpa: u64,
    /// Initramfs size.
    pub initrd_size: u64,
}

fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Loads `bzimage`, `initrd` and `cmdline` into `ram` and returns the entry point.
pub fn load_linux(
    ram: &GuestRam,
    bzimage: &[u8],
    initrd: &[u8],
    cmdline: &str,
) -> Result<BootInfo, LinuxError> {
    let bad = LinuxError::BadKernel;
    if bzimage.len() < 0x1000 {
        return Err(bad("file too small for a bzImage"));
    }
    if &bzimage[HEADER_MAGIC..HEADER_MAGIC + 4] != b"HdrS" || le16(bzimage, BOOT_FLAG) != 0xaa55 {
        return Err(bad("no Linux boot header (HdrS)"));
    }
    let version = le16(bzimage, VERSION);
    if version < 0x020c {
        return Err(LinuxError::OldBootProtocol(version));
    }
    if bzimage[XLOADFLAGS] & 1 == 0 {
        return Err(bad("kernel has no 64-bit entry point (XLF_KERNEL_64)"));
    }
    let setup_sects = match bzimage[SETUP_SECTS] {
        0 => 4,
        n => usize::from(n),
    };
    let kernel_off = (setup_sects + 1) * 512;
    if kernel_off >= bzimage.len() {
        return Err(bad("setup sectors exceed the file"));
    }
    let kernel = &bzimage[kernel_off..];
    let mem = ram.size() as u64;
    if KERNEL_GPA + kernel.len() as u64 + initrd.len() as u64 + (64 << 20) > mem {
        return Err(LinuxError::TooLittleMemory(mem));
    }
    // The kernel proper, decompressed here, is loaded at its physical addresses and entered
    // at startup_64, skipping the in-guest decompressor (slow under shadow paging: it builds
    // its identity map page fault by page fault). Without `xz`, the decompressor runs.
    let entry = match decompress_payload(bzimage, kernel_off) {
        Some(vmlinux) => load_elf(ram, &vmlinux)?,
        None => {
            ram.write(KERNEL_GPA, kernel)?;
            KERNEL_GPA + 0x200
        }
    };

    // Initramfs: page aligned, as high as allowed (and inside the identity map).
    let initrd_max = u64::from(le32(bzimage, INITRD_ADDR_MAX)).min(IDENTITY_MAPPED - 1);
    let top = mem.min(initrd_max + 1);
    let initrd_gpa = (top - initrd.len() as u64) & !0xfff;
    ram.write(initrd_gpa, initrd)?;

    if cmdline.len() >= CMDLINE_MAX {
        return Err(bad("command line too long"));
    }
    let mut c = cmdline.as_bytes().to_vec();
    c.push(0);
    ram.write(CMDLINE_GPA, &c)?;

    // boot_params: the setup header copied from the image, then our fields.
    let mut bp = vec![0u8; 4096];
    let hdr_end = (0x202 + usize::from(bzimage[0x201])).min(bp.len());
    bp[SETUP_SECTS..hdr_end].copy_from_slice(&bzimage[SETUP_SECTS..hdr_end]);
    bp[0x1fa..0x1fc].copy_from_slice(&0xffffu16.to_le_bytes()); // vid_mode: normal
    bp[TYPE_OF_LOADER] = 0xff;
    bp[LOADFLAGS] |= 0x01; // LOADED_HIGH
    bp[RAMDISK_IMAGE..RAMDISK_IMAGE + 4].copy_from_slice(&(initrd_gpa as u32).to_le_bytes());
    bp[RAMDISK_SIZE..RAMDISK_SIZE + 4].copy_from_slice(&(initrd.len() as u32).to_le_bytes());
    bp[CMD_LINE_PTR..CMD_LINE_PTR + 4].copy_from_slice(&(CMDLINE_GPA as u32).to_le_bytes());
    let e820: [(u64, u64, u32); 2] = [(0, EBDA_START, 1), (KERNEL_GPA, mem - KERNEL_GPA, 1)];
    bp[E820_ENTRIES] = e820.len() as u8;
    for (i, (addr, size, ty)) in e820.iter().enumerate() {
        let o = E820_TABLE + i * 20;
        bp[o..o + 8].copy_from_slice(&addr.to_le_bytes());
        bp[o + 8..o + 16].copy_from_slice(&size.to_le_bytes());
        bp[o + 16..o + 20].copy_from_slice(&ty.to_le_bytes());
    }
    ram.write(BOOT_PARAMS_GPA, &bp)?;

    // Identity map of the first GiB with 2 MiB pages.
    ram.write(PML4_GPA, &(PDPT_GPA | 0x3).to_le_bytes())?;
    ram.write(PDPT_GPA, &(PD_GPA | 0x3).to_le_bytes())?;
    let pd: Vec<u8> = (0..512u64)
        .flat_map(|i| ((i << 21) | 0x83).to_le_bytes())
        .collect();
    ram.write(PD_GPA, &pd)?;

    // GDT: null, 64-bit code (0x08), data (0x10), TSS (0x18).
    let gdt: [u64; 4] = [
        0,
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ];
    let g: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
    ram.write(GDT_GPA, &g)?;
    ram.write(IDT_GPA, &0u64.to_le_bytes())?;

    Ok(BootInfo {
        entry,
        initrd_gpa,
        initrd_size: initrd.len() as u64,
    })
}

/// Decompresses the bzImage's payload (xz, as Debian builds it) with the `xz` tool.
fn decompress_payload(bzimage: &[u8], kernel_off: usize) -> Option<Vec<u8>> {
    use std::io::Write;
    let off = kernel_off + le32(bzimage, PAYLOAD_OFFSET) as usize;
    let len = le32(bzimage, PAYLOAD_LENGTH) as usize;
    let payload = bzimage.get(off..off.checked_add(len)?)?;
    if !payload.starts_with(b"\xfd7zXZ\0") {
        tracing::debug!("kernel payload is not xz; using the in-guest decompressor");
        return None;
    }
    let mut child = std::process::Command::new("xz")
        .args(["-dc", "--single-stream"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let mut stdin = child.stdin.take()?;
    let data = payload.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().ok()?;
    let _ = feeder.join();
    (out.stdout.len() > 64 && out.stdout.starts_with(b"\x7fELF")).then_some(out.stdout)
}

/// Loads an ELF64 kernel's `PT_LOAD` segments at their physical addresses; returns the
/// physical entry point.
fn load_elf(ram: &GuestRam, elf: &[u8]) -> Result<u64, LinuxError> {
    let bad = LinuxError::BadVmlinux;
    let u64_at = |o: usize| -> Result<u64, LinuxError> {
        let b = elf.get(o..o + 8).ok_or_else(|| bad("truncated"))?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    };
    let u16_at = |o: usize| -> Result<u16, LinuxError> {
        let b = elf.get(o..o + 2).ok_or_else(|| bad("truncated"))?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    };
    if elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err(bad("not a little-endian ELF64 file"));
    }
    let entry = u64_at(0x18)?;
    let phoff = u64_at(0x20)? as usize;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let ty = elf
            .get(ph..ph + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| bad("truncated program header"))?;
        if ty != 1 {
            continue;
        }
        let offset = u64_at(ph + 8)? as usize;
        let paddr = u64_at(ph + 24)?;
        let filesz = u64_at(ph + 32)? as usize;
        let data = elf
            .get(
                offset
                    ..offset
                        .checked_add(filesz)
                        .ok_or_else(|| bad("segment size"))?,
            )
            .ok_or_else(|| bad("segment outside the file"))?;
        ram.write(paddr, data)?;
    }
    if entry >= ram.size() as u64 {
        return Err(bad("entry point outside guest memory"));
    }
    Ok(entry)
}

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

fn segment(selector: u16, flags: u16) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: ((flags >> 15) & 1) as u8,
        avl: ((flags >> 12) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Sets `sregs`/returns `regs` for entering the kernel in 64-bit mode at `info.entry`.
pub fn boot_cpu_state(info: &BootInfo, sregs: &mut kvm_sregs) -> kvm_regs {
    sregs.cs = segment(0x08, 0xa09b);
    let data = segment(0x10, 0xc093);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(0x18, 0x808b);
    sregs.gdt.base = GDT_GPA;
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.idt.base = IDT_GPA;
    sregs.idt.limit = 7;
    sregs.cr3 = PML4_GPA;
    sregs.cr4 = 0x20; // PAE
    sregs.cr0 = 0x8000_0031; // PG | NE | ET | PE
    sregs.efer = 0x500; // LME | LMA
    kvm_regs {
        rip: info.entry,
        rsp: STACK_GPA,
        rbp: STACK_GPA,
        rsi: BOOT_PARAMS_GPA,
        rflags: 0x2,
        ..Default::default()
    }
}
