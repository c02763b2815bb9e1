//! Page sources and page maps used by the KVM backend.
//!
//! [`PageSource`] has the same shape as the core crate's page-source trait: a frozen image
//! read page by page. [`PageBits`] is a compact set of page numbers (zero-page maps,
//! installed-page maps).

use std::io;
use std::sync::Arc;

/// A frozen memory image read one page at a time.
pub trait PageSource: Send + Sync + 'static {
    /// Page size in bytes (4096 normally).
    fn page_size(&self) -> usize;
    /// Number of pages in the image.
    fn page_count(&self) -> u64;
    /// Copies page `pfn` into `buf` (`buf.len() == page_size()`).
    fn read_page(&self, pfn: u64, buf: &mut [u8]) -> io::Result<()>;
}

impl<T: PageSource + ?Sized> PageSource for Arc<T> {
    fn page_size(&self) -> usize {
        (**self).page_size()
    }
    fn page_count(&self) -> u64 {
        (**self).page_count()
    }
    fn read_page(&self, pfn: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_page(pfn, buf)
    }
}

/// An in-memory image.
#[derive(Debug, Clone)]
pub struct VecSource {
    bytes: Arc<Vec<u8>>,
    page_size: usize,
}

impl VecSource {
    /// Wraps `bytes` (its length is rounded up to whole pages with zeros).
    pub fn new(mut bytes: Vec<u8>, page_size: usize) -> Self {
        let rem = bytes.len() % page_size;
        if rem != 0 {
            bytes.resize(bytes.len() + page_size - rem, 0);
        }
        Self {
            bytes: Arc::new(bytes),
            page_size,
        }
    }
}

impl PageSource for VecSource {
    fn page_size(&self) -> usize {
        self.page_size
    }
    fn page_count(&self) -> u64 {
        (self.bytes.len() / self.page_size) as u64
    }
    fn read_page(&self, pfn: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = usize::try_from(pfn)
            .ok()
            .and_then(|p| p.checked_mul(self.page_size))
            .filter(|s| s + self.page_size <= self.bytes.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "page out of range"))?;
        buf.copy_from_slice(&self.bytes[start..start + self.page_size]);
        Ok(())
    }
}

/// A snapshot file read with positioned reads (the page cache backs it like a mapping).
#[derive(Debug)]
pub struct FileSnapshot {
    file: std::fs::File,
    page_size: usize,
    pages: u64,
}

impl FileSnapshot {
    /// Opens a snapshot file; its length must be a whole number of pages.
    pub fn open(path: &std::path::Path, page_size: usize) -> io::Result<Self> {
        let file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        if page_size == 0 || len % page_size as u64 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("snapshot of {len} bytes is not a whole number of {page_size}-byte pages"),
            ));
        }
        Ok(Self {
            file,
            page_size,
            pages: len / page_size as u64,
        })
    }
}

impl PageSource for FileSnapshot {
    fn page_size(&self) -> usize {
        self.page_size
    }
    fn page_count(&self) -> u64 {
        self.pages
    }
    fn read_page(&self, pfn: u64, buf: &mut [u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        if pfn >= self.pages {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "page out of range",
            ));
        }
        self.file.read_exact_at(buf, pfn * self.page_size as u64)
    }
}

/// A fixed-size set of page numbers.
#[derive(Clone, PartialEq, Eq)]
pub struct PageBits {
    words: Vec<u64>,
    len: u64,
}

impl std::fmt::Debug for PageBits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PageBits({} of {})", self.count_ones(), self.len)
    }
}

impl PageBits {
    /// An empty set over `len` pages.
    pub fn new(len: u64) -> Self {
        Self {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }
    /// Number of pages covered.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Whether the set covers no pages.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Whether page `i` is in the set (false out of range).
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }
    /// Adds page `i`; returns whether it was newly added (false out of range).
    pub fn set(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let bit = 1 << (i % 64);
        let new = *w & bit == 0;
        *w |= bit;
        new
    }
    /// Number of pages in the set.
    pub fn count_ones(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }
    /// Little-endian bytes, 8 per 64 pages.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }
    /// Inverse of [`PageBits::to_bytes`]; `None` if `bytes` has the wrong length.
    pub fn from_bytes(len: u64, bytes: &[u8]) -> Option<Self> {
        if bytes.len() as u64 != len.div_ceil(64) * 8 {
            return None;
        }
        let mut words: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                u64::from_le_bytes(a)
            })
            .collect();
        if len % 64 != 0 {
            if let Some(last) = words.last_mut() {
                *last &= (1u64 << (len % 64)) - 1;
            }
        }
        Some(Self { words, len })
    }
}

/// Scans `source` for all-zero pages.
pub fn zero_map(source: &dyn PageSource) -> io::Result<PageBits> {
    let mut map = PageBits::new(source.page_count());
    let mut buf = vec![0u8; source.page_size()];
    let zero = vec![0u8; source.page_size()];
    for pfn in 0..source.page_count() {
        source.read_page(pfn, &mut buf)?;
        if buf == zero {
            map.set(pfn);
        }
    }
    Ok(map)
}

/// blake3 of the whole image.
pub fn image_digest(source: &dyn PageSource) -> io::Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; source.page_size()];
    for pfn in 0..source.page_count() {
        source.read_page(pfn, &mut buf)?;
        h.update(&buf);
    }
    Ok(*h.finalize().as_bytes())
}
