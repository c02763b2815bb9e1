//! Firecracker's side of the handshake, as its `persist.rs` does it, for tests and
//! measurements where Firecracker itself cannot run: guest memory mapped anonymously region
//! by region (with an unmapped page between regions), a userfaultfd created non-blocking,
//! close-on-exec, for kernel-mode faults too, with `UFFD_FEATURE_EVENT_REMOVE`, every region
//! registered in missing mode, then one `sendmsg` of the JSON region list with the
//! userfaultfd attached. The connection stays open while the memory lives.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::sys::fcuffd::{madvise_dontneed, open_uffd_with_remove};
use crate::sys::{AnonMap, Uffd};

/// Which of Firecracker's region formats to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionFormat {
    /// Current versions: `page_size` and the deprecated `page_size_kib`, both in bytes.
    Current,
    /// Older versions: only `page_size_kib`.
    Legacy,
}

/// A "microVM"'s guest memory registered with userfaultfd.
#[derive(Debug)]
pub struct GuestMemory {
    regions: Vec<(AnonMap, u64)>,
    _guards: Vec<AnonMap>,
    uffd: Uffd,
    page_size: usize,
}

impl GuestMemory {
    /// Maps one region per entry of `sizes` (bytes, multiples of 4 KiB; file offsets follow
    /// each other from 0, as Firecracker lays them out) and registers them.
    pub fn map(sizes: &[usize]) -> io::Result<Self> {
        let uffd = open_uffd_with_remove()?;
        let mut regions = Vec::new();
        let mut guards = Vec::new();
        let mut offset = 0u64;
        for &size in sizes {
            let m = AnonMap::new(size)?;
            uffd.register_missing(m.addr(), size)?;
            regions.push((m, offset));
            offset += size as u64;
            // Keeps the next region's mapping apart from this one.
            guards.push(AnonMap::new(4096)?);
        }
        Ok(Self {
            regions,
            _guards: guards,
            uffd,
            page_size: 4096,
        })
    }

    /// The JSON region list Firecracker sends.
    pub fn mappings_json(&self, format: RegionFormat) -> String {
        let items: Vec<serde_json::Value> = self
            .regions
            .iter()
            .map(|(m, off)| match format {
                RegionFormat::Current => serde_json::json!({
                    "base_host_virt_addr": m.addr() as u64,
                    "size": m.len(),
                    "offset": off,
                    "page_size": self.page_size,
                    "page_size_kib": self.page_size,
                }),
                RegionFormat::Legacy => serde_json::json!({
                    "base_host_virt_addr": m.addr() as u64,
                    "size": m.len(),
                    "offset": off,
                    "page_size_kib": self.page_size,
                }),
            })
            .collect();
        serde_json::Value::Array(items).to_string()
    }

    /// Connects to the handler at `socket` and sends `message` with the userfaultfd in one
    /// `sendmsg`. Keep the returned connection open while the memory is in use.
    pub fn connect(&self, socket: &Path, message: &[u8]) -> io::Result<UnixStream> {
        let s = UnixStream::connect(socket)?;
        crate::sys::send_with_fd(&s, message, self.uffd.fd())?;
        Ok(s)
    }

    /// Total bytes of guest memory (= of the memory file it restores).
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|(m, _)| m.len() as u64).sum()
    }

    fn locate(&self, file_offset: u64, len: usize) -> io::Result<(&AnonMap, usize)> {
        self.regions
            .iter()
            .find(|(m, off)| {
                file_offset >= *off && file_offset + len as u64 <= *off + m.len() as u64
            })
            .map(|(m, off)| (m, (file_offset - off) as usize))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "outside guest memory"))
    }

    /// Reads guest memory holding bytes `file_offset..` of the memory file (faulting pages in;
    /// the range must lie in one region).
    pub fn read(&self, file_offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let (m, at) = self.locate(file_offset, buf.len())?;
        m.read(at, buf)
    }

    /// Writes guest memory (faulting pages in first).
    pub fn write(&self, file_offset: u64, data: &[u8]) -> io::Result<()> {
        let (m, at) = self.locate(file_offset, data.len())?;
        m.write(at, data)
    }

    /// What a balloon does: `madvise(MADV_DONTNEED)` on `len` bytes of guest memory holding
    /// `file_offset..` of the memory file.
    pub fn balloon(&self, file_offset: u64, len: usize) -> io::Result<()> {
        let (m, at) = self.locate(file_offset, len)?;
        madvise_dontneed(m, at, len)
    }
}
