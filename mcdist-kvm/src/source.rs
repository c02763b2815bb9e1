//! Page sources and page maps used by the KVM backend.
//!
//! [`PageSource`] is the core crate's page-source trait (a frozen image read page by page).
//! [`PageBits`] is a compact set of page numbers (zero-page maps, installed-page maps).

use std::io;

pub use mcdist::source::{FileSource, MemSource, PageSource};

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
