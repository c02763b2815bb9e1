//! Firecracker's region list: parsing both of its formats and mapping pages of the snapshot
//! memory file to host addresses of the microVM.

use serde::Deserialize;

use super::HandshakeError;

/// One guest memory region of a microVM, checked against the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Host virtual address of the region in the microVM's process.
    pub base: u64,
    /// Size in bytes.
    pub size: u64,
    /// Offset of the region's contents in the snapshot memory file.
    pub offset: u64,
    /// Page size in bytes.
    pub page_size: u64,
}

/// Firecracker's `GuestRegionUffdMapping`: `page_size` (bytes) in current versions, only
/// `page_size_kib` in older ones (which despite its name also holds bytes in the versions
/// that send both; small values are taken as KiB).
#[derive(Debug, Deserialize)]
struct Wire {
    base_host_virt_addr: u64,
    size: u64,
    offset: u64,
    page_size: Option<u64>,
    page_size_kib: Option<u64>,
}

/// Parses and checks Firecracker's region list against an image of `image_size` bytes served
/// in `page_size`-byte pages.
pub fn parse_regions(
    raw: serde_json::Value,
    page_size: usize,
    image_size: u64,
) -> Result<Vec<Region>, HandshakeError> {
    let wire: Vec<Wire> = serde_json::from_value(raw).map_err(HandshakeError::Json)?;
    if wire.is_empty() {
        return Err(HandshakeError::NoRegions);
    }
    let mut out = Vec::with_capacity(wire.len());
    for (i, w) in wire.into_iter().enumerate() {
        let ps = match (w.page_size, w.page_size_kib) {
            (Some(b), _) => b,
            (None, Some(k)) if k < 4096 => k.saturating_mul(1024),
            (None, Some(b)) => b,
            (None, None) => return Err(HandshakeError::NoPageSize(i)),
        };
        if ps != page_size as u64 {
            return Err(HandshakeError::PageSize {
                region: i,
                page_size: ps,
                supported: page_size,
            });
        }
        if w.size == 0
            || w.size % ps != 0
            || w.offset % ps != 0
            || w.base_host_virt_addr % ps != 0
            || w.base_host_virt_addr.checked_add(w.size).is_none()
        {
            return Err(HandshakeError::Misaligned(i));
        }
        let end = w.offset.saturating_add(w.size);
        if end > image_size {
            return Err(HandshakeError::PastImage {
                region: i,
                end,
                image: image_size,
            });
        }
        out.push(Region {
            base: w.base_host_virt_addr,
            size: w.size,
            offset: w.offset,
            page_size: ps,
        });
    }
    Ok(out)
}

impl Region {
    /// The image page and the page-aligned address of a fault at `addr`, if it is in here.
    pub fn page_of(&self, addr: u64) -> Option<(u64, u64)> {
        if addr < self.base || addr - self.base >= self.size {
            return None;
        }
        let off = (addr - self.base) / self.page_size * self.page_size;
        Some(((self.offset + off) / self.page_size, self.base + off))
    }

    /// The host address of image page `pfn`, if this region holds it.
    pub fn addr_of(&self, pfn: u64) -> Option<u64> {
        let pos = pfn.checked_mul(self.page_size)?;
        if pos < self.offset || pos - self.offset >= self.size {
            return None;
        }
        Some(self.base + (pos - self.offset))
    }
}
