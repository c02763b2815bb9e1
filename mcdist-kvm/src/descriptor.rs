//! The clone descriptor: everything a clone needs besides memory contents.
//!
//! Versioned little-endian binary format:
//!
//! ```text
//! magic "MCDKDESC" | version u16 (=1) | mem_size u64 | page_size u32 | digest [32]
//! | session flag u8 [group ip4 (4) port u16 | server: len u8, UTF-8 socket address | session_id u64]
//!   (flag 0: no session; 1: unkeyed; 2: keyed, encrypted; 3: keyed, authenticated only —
//!   the descriptor says whether the session is keyed, never the key)
//! | vcpus u16 | per vCPU: regs (18 x u64) | sregs | fpu
//! | zero map: pages u64 | byte length u64 | bytes
//! ```

use std::net::{SocketAddr, SocketAddrV4};

use kvm_bindings::{kvm_dtable, kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use mcdist::secure::Protection;

use crate::source::PageBitmap;
use crate::vm::VcpuState;

const MAGIC: &[u8; 8] = b"MCDKDESC";
const VERSION: u16 = 1;

/// Errors decoding a descriptor.
#[derive(Debug, thiserror::Error)]
pub enum DescriptorError {
    /// Not a descriptor.
    #[error("not an mcdist-kvm descriptor (bad magic)")]
    BadMagic,
    /// Written by an unknown format version.
    #[error("unsupported descriptor version {0}")]
    UnsupportedVersion(u16),
    /// Ended early.
    #[error("descriptor truncated at byte {0}")]
    Truncated(usize),
    /// Memory size and page size do not fit together.
    #[error(
        "invalid descriptor: memory size {mem_size} is not a multiple of page size {page_size}"
    )]
    Sizes {
        /// Memory size.
        mem_size: u64,
        /// Page size.
        page_size: u32,
    },
    /// The server address is not UTF-8.
    #[error("invalid descriptor: server address is not UTF-8")]
    ServerNotUtf8(#[source] std::str::Utf8Error),
    /// The server address does not parse.
    #[error("invalid descriptor: bad server address {text:?}")]
    ServerAddress {
        /// What the descriptor holds.
        text: String,
        /// Why it does not parse.
        #[source]
        source: std::net::AddrParseError,
    },
    /// Unknown session flag.
    #[error("invalid descriptor: session flag {0}")]
    SessionFlag(u8),
    /// No vCPU state.
    #[error("invalid descriptor: no vCPUs")]
    NoVcpus,
    /// The zero map does not cover the memory.
    #[error("invalid descriptor: zero map of {map} pages for {memory} pages of memory")]
    ZeroMapPages {
        /// Pages in the zero map.
        map: u64,
        /// Pages of memory.
        memory: u64,
    },
    /// A length field does not match what follows or what this build expects.
    #[error("invalid descriptor: {what}: bad length")]
    Length {
        /// Which field.
        what: &'static str,
    },
    /// A fixed-size state has another size than this build's.
    #[error("invalid descriptor: {what}: {got} bytes, this build expects {expected}")]
    StateSize {
        /// Which state.
        what: &'static str,
        /// Its size in the descriptor.
        got: usize,
        /// Its size here.
        expected: usize,
    },
    /// The full machine state does not match the base descriptor's vCPUs.
    #[error("invalid descriptor: {states} full vCPU states for {vcpus} vCPUs")]
    VcpuStates {
        /// Full states.
        states: usize,
        /// vCPUs of the base descriptor.
        vcpus: usize,
    },
    /// More MSRs than any vCPU has.
    #[error("invalid descriptor: {0} MSRs")]
    TooManyMsrs(usize),
    /// Reading or writing the descriptor file failed.
    #[error("descriptor {}: {source}", path.display())]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl DescriptorError {
    /// The error of a failed read or write of the descriptor file `path`.
    fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> DescriptorError + '_ {
        move |source| DescriptorError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Multicast session parameters for clones that fetch memory with mcdist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionParams {
    /// Multicast group the server answers on.
    pub group: SocketAddrV4,
    /// Unicast address the server takes requests on.
    pub server: SocketAddr,
    /// Session id (clones accept announces of this session only).
    pub session_id: u64,
    /// Whether the session is keyed, and how (never the key itself). A clone of a keyed
    /// session needs the key; `None`: unkeyed.
    pub protection: Option<Protection>,
}

/// A frozen VM's descriptor.
#[derive(Debug, Clone)]
pub struct Descriptor {
    /// Guest memory size in bytes.
    pub mem_size: u64,
    /// Page size in bytes.
    pub page_size: u32,
    /// blake3 of the memory image.
    pub digest: [u8; 32],
    /// The memory server, if any.
    pub session: Option<SessionParams>,
    /// vCPU states at the fork point.
    pub vcpus: Vec<VcpuState>,
    /// Pages that are all zero (filled locally, never fetched).
    pub zero_map: PageBitmap,
}

/// A descriptor kept in a file: what [`Descriptor`] and
/// [`crate::linux::LinuxDescriptor`] share.
pub trait DescriptorFile: Sized {
    /// Serializes the descriptor.
    fn encode(&self) -> Vec<u8>;

    /// Parses a descriptor.
    fn decode(bytes: &[u8]) -> Result<Self, DescriptorError>;

    /// Writes the descriptor to a file.
    fn save(&self, path: &std::path::Path) -> Result<(), DescriptorError> {
        std::fs::write(path, self.encode()).map_err(DescriptorError::io(path))
    }

    /// Reads a descriptor file.
    fn load(path: &std::path::Path) -> Result<Self, DescriptorError> {
        let bytes = std::fs::read(path).map_err(DescriptorError::io(path))?;
        Self::decode(&bytes)
    }
}

impl Descriptor {
    /// Pages of guest memory.
    pub fn page_count(&self) -> u64 {
        self.mem_size / u64::from(self.page_size)
    }
}

impl DescriptorFile for Descriptor {
    /// Serializes the descriptor.
    fn encode(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(4096 + self.zero_map.len() as usize / 8);
        w.extend_from_slice(MAGIC);
        w.extend_from_slice(&VERSION.to_le_bytes());
        w.extend_from_slice(&self.mem_size.to_le_bytes());
        w.extend_from_slice(&self.page_size.to_le_bytes());
        w.extend_from_slice(&self.digest);
        match &self.session {
            None => w.push(0),
            Some(s) => {
                w.push(match s.protection {
                    None => 1,
                    Some(Protection::Encrypted) => 2,
                    Some(Protection::AuthOnly) => 3,
                });
                w.extend_from_slice(&s.group.ip().octets());
                w.extend_from_slice(&s.group.port().to_le_bytes());
                let server = s.server.to_string();
                w.push(server.len() as u8);
                w.extend_from_slice(server.as_bytes());
                w.extend_from_slice(&s.session_id.to_le_bytes());
            }
        }
        w.extend_from_slice(&(self.vcpus.len() as u16).to_le_bytes());
        for v in &self.vcpus {
            put_regs(&mut w, &v.regs);
            put_sregs(&mut w, &v.sregs);
            put_fpu(&mut w, &v.fpu);
        }
        let zm = self.zero_map.to_bytes();
        w.extend_from_slice(&self.zero_map.len().to_le_bytes());
        w.extend_from_slice(&(zm.len() as u64).to_le_bytes());
        w.extend_from_slice(&zm);
        w
    }

    /// Parses a descriptor.
    fn decode(bytes: &[u8]) -> Result<Self, DescriptorError> {
        let mut r = Reader::open(bytes, MAGIC, VERSION)?;
        let mem_size = r.u64()?;
        let page_size = r.u32()?;
        if page_size == 0 || mem_size == 0 || mem_size % u64::from(page_size) != 0 {
            return Err(DescriptorError::Sizes {
                mem_size,
                page_size,
            });
        }
        let mut digest = [0u8; 32];
        digest.copy_from_slice(r.take(32)?);
        let session = match r.u8()? {
            0 => None,
            f @ 1..=3 => {
                let ip = r.take(4)?;
                let group = SocketAddrV4::new([ip[0], ip[1], ip[2], ip[3]].into(), r.u16()?);
                let n = r.u8()? as usize;
                let s = std::str::from_utf8(r.take(n)?).map_err(DescriptorError::ServerNotUtf8)?;
                let server = s.parse().map_err(|source| DescriptorError::ServerAddress {
                    text: s.to_string(),
                    source,
                })?;
                Some(SessionParams {
                    group,
                    server,
                    session_id: r.u64()?,
                    protection: match f {
                        1 => None,
                        2 => Some(Protection::Encrypted),
                        _ => Some(Protection::AuthOnly),
                    },
                })
            }
            f => return Err(DescriptorError::SessionFlag(f)),
        };
        let n = r.u16()? as usize;
        if n == 0 {
            return Err(DescriptorError::NoVcpus);
        }
        let mut vcpus = Vec::with_capacity(n);
        for _ in 0..n {
            vcpus.push(VcpuState {
                regs: get_regs(&mut r)?,
                sregs: get_sregs(&mut r)?,
                fpu: get_fpu(&mut r)?,
            });
        }
        let pages = r.u64()?;
        if pages != mem_size / u64::from(page_size) {
            return Err(DescriptorError::ZeroMapPages {
                map: pages,
                memory: mem_size / u64::from(page_size),
            });
        }
        let len =
            usize::try_from(r.u64()?).map_err(|_| DescriptorError::Length { what: "zero map" })?;
        if len as u64 != pages.div_ceil(8) {
            return Err(DescriptorError::Length { what: "zero map" });
        }
        let zero_map = PageBitmap::from_bytes(pages, r.take(len)?);
        Ok(Self {
            mem_size,
            page_size,
            digest,
            session,
            vcpus,
            zero_map,
        })
    }
}

/// A bounds-checked little-endian reader over descriptor bytes.
pub(crate) struct Reader<'a> {
    pub(crate) b: &'a [u8],
    pub(crate) pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader after the `magic` and `version` that open a descriptor of one kind.
    pub(crate) fn open(b: &'a [u8], magic: &[u8], version: u16) -> Result<Self, DescriptorError> {
        let mut r = Reader { b, pos: 0 };
        if r.take(magic.len())? != magic {
            return Err(DescriptorError::BadMagic);
        }
        let v = r.u16()?;
        if v != version {
            return Err(DescriptorError::UnsupportedVersion(v));
        }
        Ok(r)
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], DescriptorError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or(DescriptorError::Truncated(self.pos))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], DescriptorError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, DescriptorError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, DescriptorError> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, DescriptorError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, DescriptorError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
}

fn put_regs(w: &mut Vec<u8>, r: &kvm_regs) {
    for v in [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15, r.rip, r.rflags,
    ] {
        w.extend_from_slice(&v.to_le_bytes());
    }
}

fn get_regs(r: &mut Reader<'_>) -> Result<kvm_regs, DescriptorError> {
    let mut v = [0u64; 18];
    for x in &mut v {
        *x = r.u64()?;
    }
    Ok(kvm_regs {
        rax: v[0],
        rbx: v[1],
        rcx: v[2],
        rdx: v[3],
        rsi: v[4],
        rdi: v[5],
        rsp: v[6],
        rbp: v[7],
        r8: v[8],
        r9: v[9],
        r10: v[10],
        r11: v[11],
        r12: v[12],
        r13: v[13],
        r14: v[14],
        r15: v[15],
        rip: v[16],
        rflags: v[17],
    })
}

fn put_seg(w: &mut Vec<u8>, s: &kvm_segment) {
    w.extend_from_slice(&s.base.to_le_bytes());
    w.extend_from_slice(&s.limit.to_le_bytes());
    w.extend_from_slice(&s.selector.to_le_bytes());
    w.extend_from_slice(&[
        s.type_, s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl, s.unusable,
    ]);
}

fn get_seg(r: &mut Reader<'_>) -> Result<kvm_segment, DescriptorError> {
    let base = r.u64()?;
    let limit = r.u32()?;
    let selector = r.u16()?;
    let f: [u8; 9] = r.arr()?;
    Ok(kvm_segment {
        base,
        limit,
        selector,
        type_: f[0],
        present: f[1],
        dpl: f[2],
        db: f[3],
        s: f[4],
        l: f[5],
        g: f[6],
        avl: f[7],
        unusable: f[8],
        padding: 0,
    })
}

fn put_sregs(w: &mut Vec<u8>, s: &kvm_sregs) {
    for seg in [&s.cs, &s.ds, &s.es, &s.fs, &s.gs, &s.ss, &s.tr, &s.ldt] {
        put_seg(w, seg);
    }
    for t in [&s.gdt, &s.idt] {
        w.extend_from_slice(&t.base.to_le_bytes());
        w.extend_from_slice(&t.limit.to_le_bytes());
    }
    for v in [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base] {
        w.extend_from_slice(&v.to_le_bytes());
    }
    for v in s.interrupt_bitmap {
        w.extend_from_slice(&v.to_le_bytes());
    }
}

fn get_sregs(r: &mut Reader<'_>) -> Result<kvm_sregs, DescriptorError> {
    let mut segs = [kvm_segment::default(); 8];
    for s in &mut segs {
        *s = get_seg(r)?;
    }
    let mut tables = [kvm_dtable::default(); 2];
    for t in &mut tables {
        t.base = r.u64()?;
        t.limit = r.u16()?;
    }
    let mut c = [0u64; 7];
    for x in &mut c {
        *x = r.u64()?;
    }
    let mut ib = [0u64; 4];
    for x in &mut ib {
        *x = r.u64()?;
    }
    Ok(kvm_sregs {
        cs: segs[0],
        ds: segs[1],
        es: segs[2],
        fs: segs[3],
        gs: segs[4],
        ss: segs[5],
        tr: segs[6],
        ldt: segs[7],
        gdt: tables[0],
        idt: tables[1],
        cr0: c[0],
        cr2: c[1],
        cr3: c[2],
        cr4: c[3],
        cr8: c[4],
        efer: c[5],
        apic_base: c[6],
        interrupt_bitmap: ib,
    })
}

fn put_fpu(w: &mut Vec<u8>, f: &kvm_fpu) {
    for r in &f.fpr {
        w.extend_from_slice(r);
    }
    w.extend_from_slice(&f.fcw.to_le_bytes());
    w.extend_from_slice(&f.fsw.to_le_bytes());
    w.push(f.ftwx);
    w.extend_from_slice(&f.last_opcode.to_le_bytes());
    w.extend_from_slice(&f.last_ip.to_le_bytes());
    w.extend_from_slice(&f.last_dp.to_le_bytes());
    for r in &f.xmm {
        w.extend_from_slice(r);
    }
    w.extend_from_slice(&f.mxcsr.to_le_bytes());
}

fn get_fpu(r: &mut Reader<'_>) -> Result<kvm_fpu, DescriptorError> {
    let mut f = kvm_fpu::default();
    for x in &mut f.fpr {
        *x = r.arr()?;
    }
    f.fcw = r.u16()?;
    f.fsw = r.u16()?;
    f.ftwx = r.u8()?;
    f.last_opcode = r.u16()?;
    f.last_ip = r.u64()?;
    f.last_dp = r.u64()?;
    for x in &mut f.xmm {
        *x = r.arr()?;
    }
    f.mxcsr = r.u32()?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Descriptor {
        let mut regs = kvm_regs {
            rip: 0x202a,
            rflags: 2,
            rbx: 7,
            ..Default::default()
        };
        regs.r15 = u64::MAX;
        let mut sregs = kvm_sregs {
            cr0: 0x11,
            efer: 0x500,
            ..Default::default()
        };
        sregs.cs.limit = 0xffff_ffff;
        sregs.cs.db = 1;
        sregs.ldt.unusable = 1;
        sregs.interrupt_bitmap[3] = 9;
        let mut fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fpu.xmm[15][0] = 0xab;
        let mut zero_map = PageBitmap::new(100);
        zero_map.set(0);
        zero_map.set(99);
        Descriptor {
            mem_size: 100 * 4096,
            page_size: 4096,
            digest: [5; 32],
            session: Some(SessionParams {
                group: "239.255.1.2:4000".parse().expect("group"),
                server: "[::1]:4001".parse().expect("server"),
                session_id: 0xdead_beef,
                protection: Some(Protection::AuthOnly),
            }),
            vcpus: vec![VcpuState { regs, sregs, fpu }],
            zero_map,
        }
    }

    #[test]
    fn round_trips_every_field() {
        let d = sample();
        let e = Descriptor::decode(&d.encode()).expect("decode");
        assert_eq!(e.encode(), d.encode());
        assert_eq!(e.session, d.session);
        assert_eq!(e.zero_map, d.zero_map);
        assert_eq!(e.vcpus[0].regs.r15, u64::MAX);
        assert_eq!(e.vcpus[0].sregs.interrupt_bitmap[3], 9);
        assert_eq!(e.vcpus[0].fpu.xmm[15][0], 0xab);
    }

    #[test]
    fn rejects_damaged_input_without_panicking() {
        let bytes = sample().encode();
        for n in 0..bytes.len() {
            assert!(
                Descriptor::decode(&bytes[..n]).is_err(),
                "prefix of {n} bytes"
            );
        }
        let mut bad = bytes.clone();
        bad[0] ^= 1;
        assert!(matches!(
            Descriptor::decode(&bad),
            Err(DescriptorError::BadMagic)
        ));
        let mut v2 = bytes.clone();
        v2[8] = 2;
        assert!(matches!(
            Descriptor::decode(&v2),
            Err(DescriptorError::UnsupportedVersion(2))
        ));
    }
}
