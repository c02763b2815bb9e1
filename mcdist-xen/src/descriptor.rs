//! The clone descriptor Memtap starts from: page size, page count, image
//! digest and the zero-page map. The Xen domain itself (vCPU state, devices)
//! is restored by the toolstack (`xl restore` / libxl); the descriptor only
//! carries what Memtap needs to page its memory.
//!
//! Format (little endian): magic `MCDXDESC`, `u16` version 1, `u32` page size,
//! `u64` page count, 32-byte BLAKE3 digest, `u64` zero-map byte length, zero-map bytes.

use mcdist::bitmap::PageBitmap;
use mcdist::PageSource;
use std::path::Path;
use thiserror::Error;

const MAGIC: &[u8; 8] = b"MCDXDESC";
const VERSION: u16 = 1;

/// Reading or writing a descriptor failed.
#[derive(Debug, Error)]
pub enum DescriptorError {
    /// Not a descriptor.
    #[error("not an mcdist-xen descriptor (bad magic)")]
    BadMagic,
    /// A version this build does not read.
    #[error("unsupported descriptor version {0}")]
    UnsupportedVersion(u16),
    /// Too short.
    #[error("descriptor truncated")]
    Truncated,
    /// Inconsistent fields.
    #[error("invalid descriptor: {0}")]
    Invalid(&'static str),
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
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DescriptorError + '_ {
        move |source| DescriptorError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// What Memtap needs to know about the frozen parent image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XenDescriptor {
    /// Page size (4096 on Xen x86).
    pub page_size: u32,
    /// Pages in the image.
    pub page_count: u64,
    /// BLAKE3 digest of the image.
    pub digest: [u8; 32],
    /// Set bit = all-zero page.
    pub zero_map: PageBitmap,
}

impl XenDescriptor {
    /// Scan a frozen image.
    pub fn from_source(source: &dyn PageSource) -> std::io::Result<XenDescriptor> {
        let info = mcdist::source::scan(source)?;
        Ok(XenDescriptor {
            page_size: info.page_size as u32,
            page_count: info.zero_map.len(),
            digest: info.digest,
            zero_map: info.zero_map,
        })
    }

    /// Serialise.
    pub fn encode(&self) -> Vec<u8> {
        let zm = self.zero_map.to_bytes();
        let mut w = Vec::with_capacity(64 + zm.len());
        w.extend_from_slice(MAGIC);
        w.extend_from_slice(&VERSION.to_le_bytes());
        w.extend_from_slice(&self.page_size.to_le_bytes());
        w.extend_from_slice(&self.page_count.to_le_bytes());
        w.extend_from_slice(&self.digest);
        w.extend_from_slice(&(zm.len() as u64).to_le_bytes());
        w.extend_from_slice(&zm);
        w
    }

    /// Parse.
    pub fn decode(b: &[u8]) -> Result<XenDescriptor, DescriptorError> {
        fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], DescriptorError> {
            if b.len() < n {
                return Err(DescriptorError::Truncated);
            }
            let (h, t) = b.split_at(n);
            *b = t;
            Ok(h)
        }
        fn arr<const N: usize>(b: &mut &[u8]) -> Result<[u8; N], DescriptorError> {
            let mut a = [0u8; N];
            a.copy_from_slice(take(b, N)?);
            Ok(a)
        }
        let mut b = b;
        if take(&mut b, 8)? != MAGIC {
            return Err(DescriptorError::BadMagic);
        }
        let version = u16::from_le_bytes(arr(&mut b)?);
        if version != VERSION {
            return Err(DescriptorError::UnsupportedVersion(version));
        }
        let page_size = u32::from_le_bytes(arr(&mut b)?);
        let page_count = u64::from_le_bytes(arr(&mut b)?);
        let digest = arr::<32>(&mut b)?;
        let zlen = u64::from_le_bytes(arr(&mut b)?);
        if page_size == 0 || !page_size.is_power_of_two() {
            return Err(DescriptorError::Invalid("page size is not a power of two"));
        }
        if zlen != page_count.div_ceil(8) {
            return Err(DescriptorError::Invalid(
                "zero map length does not match the page count",
            ));
        }
        let zm = take(&mut b, zlen as usize)?;
        Ok(XenDescriptor {
            page_size,
            page_count,
            digest,
            zero_map: PageBitmap::from_bytes(page_count, zm),
        })
    }

    /// Write to a file.
    pub fn write(&self, path: &Path) -> Result<(), DescriptorError> {
        std::fs::write(path, self.encode()).map_err(DescriptorError::io(path))
    }

    /// Read from a file.
    pub fn read(path: &Path) -> Result<XenDescriptor, DescriptorError> {
        let bytes = std::fs::read(path).map_err(DescriptorError::io(path))?;
        XenDescriptor::decode(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_round_trips_and_rejects_damage() {
        let mut img = vec![0u8; 4096 * 10];
        img[4096 * 3] = 1;
        img[4096 * 9 + 17] = 2;
        let src = mcdist::MemSource::new(img, 4096);
        let d = XenDescriptor::from_source(&src).expect("scan");
        assert_eq!(d.page_count, 10);
        assert_eq!(d.zero_map.count_ones(), 8);
        assert!(!d.zero_map.get(3) && !d.zero_map.get(9));
        let enc = d.encode();
        assert_eq!(XenDescriptor::decode(&enc).expect("decode"), d);
        assert!(matches!(
            XenDescriptor::decode(&enc[..enc.len() - 1]),
            Err(DescriptorError::Truncated)
        ));
        let mut bad = enc.clone();
        bad[0] = b'X';
        assert!(matches!(
            XenDescriptor::decode(&bad),
            Err(DescriptorError::BadMagic)
        ));
    }
}
