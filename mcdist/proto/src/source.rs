//! Page sources: what a server serves.
//!
//! [`PageSource`] is the trait drivers implement (a frozen guest's memory, a
//! snapshot file, a copy-on-write view) to hand the server page bytes; [`MemSource`]
//! ships here, and the `mcdist` crate adds a file source. [`scan`] computes the image
//! digest, zero-page map and hash pages before a server starts (the state machine
//! never scans): on this thread here, on every core in `mcdist::source::scan`.

use crate::bitmap::PageBitmap;
use crate::integrity::{HashLayout, HashTree, TreeBuilder};
use bytes::Bytes;
use std::io;
use std::sync::Arc;

/// A read-only, page-addressed image.
pub trait PageSource: Send + Sync + 'static {
    /// Page size in bytes (a power of two).
    fn page_size(&self) -> usize;
    /// Image size in bytes. The last page may be partial; it reads as zero-padded.
    fn image_size(&self) -> u64;
    /// Fill `buf` (exactly `page_size` bytes) with page `pfn`.
    fn read_page(&self, pfn: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Fill `buf` (a whole number of pages) with the pages from `first` on, back to back.
    /// Sources that can read a run at once (one positional read, one copy) override this;
    /// the default reads page by page.
    fn read_pages(&self, first: u64, buf: &mut [u8]) -> io::Result<()> {
        let ps = self.page_size();
        for (i, page) in buf.chunks_mut(ps.max(1)).enumerate() {
            self.read_page(first + i as u64, page)?;
        }
        Ok(())
    }
    /// Number of pages.
    fn page_count(&self) -> u64 {
        self.image_size().div_ceil(self.page_size() as u64)
    }
    /// Check that the image has not changed under the server (e.g. a file that
    /// was truncated or grew). The default says it has not.
    fn check_unchanged(&self) -> io::Result<()> {
        Ok(())
    }
}

fn bad_page(pfn: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("page {pfn} is past the end of the image"),
    )
}

/// An image held in memory.
#[derive(Debug, Clone)]
pub struct MemSource {
    data: Bytes,
    page_size: usize,
}

impl MemSource {
    /// Serve `data` in pages of `page_size` bytes (a power of two).
    pub fn new(data: impl Into<Bytes>, page_size: usize) -> MemSource {
        MemSource {
            data: data.into(),
            page_size: page_size.max(1).next_power_of_two(),
        }
    }

    /// The image bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.data
    }
}

impl PageSource for MemSource {
    fn page_size(&self) -> usize {
        self.page_size
    }
    fn image_size(&self) -> u64 {
        self.data.len() as u64
    }
    fn read_page(&self, pfn: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read_pages(pfn, buf)
    }
    fn read_pages(&self, first: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = usize::try_from(first)
            .ok()
            .and_then(|p| p.checked_mul(self.page_size))
            .filter(|&s| s < self.data.len())
            .ok_or_else(|| bad_page(first))?;
        let n = buf.len().min(self.data.len() - start);
        buf[..n].copy_from_slice(&self.data[start..start + n]);
        buf[n..].fill(0);
        Ok(())
    }
}

/// What [`scan`] learns about an image.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    /// Image size in bytes.
    pub image_size: u64,
    /// Page size.
    pub page_size: usize,
    /// BLAKE3 digest of the image bytes (exactly `image_size` bytes).
    pub digest: [u8; 32],
    /// Set bit = all-zero page.
    pub zero_map: PageBitmap,
    /// The image's hash pages ([`crate::integrity`]), whose root is `digest`. `None` when
    /// not computed (an image described by a descriptor: the server builds it from the
    /// source) or when the page size cannot carry them (not a power of two of at least
    /// 1 KiB).
    pub hash_tree: Option<Arc<HashTree>>,
}

/// Read every page once, in runs, on this thread: digest, zero-page map and hash pages.
/// Drivers that can use several threads run `mcdist::source::scan` instead (same result).
pub fn scan(source: &dyn PageSource) -> io::Result<ImageInfo> {
    let Ok(layout) = HashLayout::new(source.image_size(), source.page_size()) else {
        return scan_sequential(source, &mut |_| {});
    };
    let mut part = ScanPart::new(layout.clone())?;
    let mut buf = Vec::new();
    let mut first = 0;
    while let Some(n) = part.scan_run(source, first, &mut buf)? {
        first += n;
    }
    ScanPart::finish(layout, source, vec![part])
}

/// One scanner's share of an image scan: the chaining values and zero pages of the runs
/// it read. Drivers split a scan over threads with one part each and merge them with
/// [`ScanPart::finish`].
#[derive(Debug)]
pub struct ScanPart {
    tree: TreeBuilder,
    zeros: Vec<u64>,
}

impl ScanPart {
    /// An empty part of a scan of an image laid out as `layout`.
    pub fn new(layout: HashLayout) -> io::Result<ScanPart> {
        Ok(ScanPart {
            tree: TreeBuilder::new(layout).map_err(io::Error::other)?,
            zeros: Vec::new(),
        })
    }

    /// Pages per run: [`SCAN_RUN_BYTES`] of pages of `page_size`, at least one.
    pub fn run_pages(page_size: usize) -> u64 {
        (SCAN_RUN_BYTES / page_size.max(1)).max(1) as u64
    }

    /// Read and hash the run of pages starting at `first` (in `buf`, grown as needed);
    /// the number of pages read, or `None` past the end of the image.
    pub fn scan_run(
        &mut self,
        source: &dyn PageSource,
        first: u64,
        buf: &mut Vec<u8>,
    ) -> io::Result<Option<u64>> {
        let ps = source.page_size();
        let count = source.page_count();
        if first >= count {
            return Ok(None);
        }
        let n = Self::run_pages(ps).min(count - first);
        buf.resize(n as usize * ps, 0);
        source.read_pages(first, buf)?;
        for (i, page) in buf.chunks(ps).enumerate() {
            if is_zero(page) {
                self.zeros.push(first + i as u64);
            }
        }
        self.tree.add_pages(first, buf).map_err(io::Error::other)?;
        Ok(Some(n))
    }

    /// Merge the parts of a whole scan of `source`: its [`ImageInfo`], whose digest is the
    /// hash tree's root.
    pub fn finish(
        layout: HashLayout,
        source: &dyn PageSource,
        parts: Vec<ScanPart>,
    ) -> io::Result<ImageInfo> {
        let mut tree = TreeBuilder::new(layout).map_err(io::Error::other)?;
        let mut zero_map = PageBitmap::new(source.page_count());
        for part in parts {
            tree.absorb(&part.tree);
            for p in part.zeros {
                zero_map.set(p);
            }
        }
        let tree = tree.finish().map_err(io::Error::other)?;
        Ok(ImageInfo {
            image_size: source.image_size(),
            page_size: source.page_size(),
            digest: tree.root(),
            zero_map,
            hash_tree: Some(Arc::new(tree)),
        })
    }
}

/// The hash pages of `source`'s image, read once (for an [`ImageInfo`] that came without
/// them).
pub fn hash_tree(source: &dyn PageSource) -> io::Result<HashTree> {
    let layout = HashLayout::new(source.image_size(), source.page_size())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut b = TreeBuilder::new(layout).map_err(io::Error::other)?;
    let ps = source.page_size();
    let run = (SCAN_RUN_BYTES / ps).max(1) as u64;
    let count = source.page_count();
    let mut buf = vec![0u8; run as usize * ps];
    let mut first = 0;
    while first < count {
        let n = run.min(count - first);
        let buf = &mut buf[..n as usize * ps];
        source.read_pages(first, buf)?;
        b.add_pages(first, buf).map_err(io::Error::other)?;
        first += n;
    }
    b.finish().map_err(io::Error::other)
}

/// Largest run of pages a scan reads and hashes at once.
pub const SCAN_RUN_BYTES: usize = 256 << 10;

/// One pass, page by page, on this thread (page sizes that are not BLAKE3 subtrees: no
/// hash pages).
pub fn scan_sequential(
    source: &dyn PageSource,
    progress: &mut dyn FnMut(u64),
) -> io::Result<ImageInfo> {
    let ps = source.page_size();
    let size = source.image_size();
    let count = source.page_count();
    let mut zero_map = PageBitmap::new(count);
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; ps];
    for pfn in 0..count {
        source.read_page(pfn, &mut buf)?;
        let n = (size - pfn * ps as u64).min(ps as u64) as usize;
        hasher.update(&buf[..n]);
        if is_zero(&buf) {
            zero_map.set(pfn);
        }
        if pfn % 4096 == 4095 {
            progress(pfn + 1);
        }
    }
    progress(count);
    Ok(ImageInfo {
        image_size: size,
        page_size: ps,
        digest: *hasher.finalize().as_bytes(),
        zero_map,
        hash_tree: None,
    })
}

/// The zero-page map alone.
pub fn zero_map(source: &dyn PageSource) -> io::Result<PageBitmap> {
    Ok(scan(source)?.zero_map)
}

/// The image digest alone.
pub fn image_digest(source: &dyn PageSource) -> io::Result<[u8; 32]> {
    Ok(scan(source)?.digest)
}

/// True when every byte is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    chunks
        .by_ref()
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
        && chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_in_runs_matches_the_hash_of_the_image() {
        for (len, ps) in [
            (0usize, 4096usize),
            (1, 4096),
            (100_000, 4096),
            (300_000, 1024),
        ] {
            let mut img: Vec<u8> = (0..len).map(|i| (i % 251) as u8 | 1).collect();
            if len > 3 * ps {
                img[ps..2 * ps].fill(0);
            }
            let src = MemSource::new(img.clone(), ps);
            let info = scan(&src).unwrap();
            assert_eq!(info.digest, *blake3::hash(&img).as_bytes(), "len {len}");
            assert_eq!(info.zero_map.get(1), len > 3 * ps, "len {len}");
        }
    }
}
