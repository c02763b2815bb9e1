//! Page sources: what a server serves.
//!
//! [`PageSource`] is the trait embedders implement (a frozen guest's memory, a
//! snapshot file, a copy-on-write view). [`MemSource`] and [`FileSource`] ship
//! here. [`scan`] computes the image digest and zero-page map in one pass.

use crate::bitmap::PageBitmap;
use crate::integrity::{HashLayout, HashTree, TreeBuilder};
use bytes::Bytes;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
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

/// An image file, read with positional reads.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    path: PathBuf,
    size: u64,
    page_size: usize,
}

impl FileSource {
    /// Open `path` for serving.
    pub fn open(path: impl AsRef<Path>, page_size: usize) -> io::Result<FileSource> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", path.display()),
            ));
        }
        Ok(FileSource {
            file,
            path,
            size: meta.len(),
            page_size: page_size.max(1).next_power_of_two(),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl PageSource for FileSource {
    fn page_size(&self) -> usize {
        self.page_size
    }
    fn image_size(&self) -> u64 {
        self.size
    }
    fn read_page(&self, pfn: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read_pages(pfn, buf)
    }
    fn read_pages(&self, first: u64, buf: &mut [u8]) -> io::Result<()> {
        let off = first
            .checked_mul(self.page_size as u64)
            .filter(|&o| o < self.size)
            .ok_or_else(|| bad_page(first))?;
        let n = (self.size - off).min(buf.len() as u64) as usize;
        let mut done = 0;
        while done < n {
            match self.file.read_at(&mut buf[done..n], off + done as u64) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("{} shrank while being served", self.path.display()),
                    ))
                }
                Ok(k) => done += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf[n..].fill(0);
        Ok(())
    }
    fn check_unchanged(&self) -> io::Result<()> {
        let now = self.file.metadata()?.len();
        if now != self.size {
            return Err(io::Error::other(format!(
                "{} changed size while being served ({} -> {} bytes)",
                self.path.display(),
                self.size,
                now
            )));
        }
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

/// Read every page once: digest and zero-page map.
pub fn scan(source: &dyn PageSource) -> io::Result<ImageInfo> {
    scan_with_progress(source, &mut |_| {})
}

/// [`scan`] with a progress callback (pages done).
///
/// The image is read in runs of pages ([`PageSource::read_pages`], up to [`SCAN_RUN_BYTES`]
/// each) by one thread per core (at most [`SCAN_MAX_THREADS`]); each worker adds its pages'
/// chaining values to its own [`TreeBuilder`], the builders are merged with
/// [`TreeBuilder::absorb`], and the finished [`HashTree`]'s root is the image's digest.
/// Page sizes that are not a power of two of at least 1 KiB are hashed in one pass, without
/// hash pages.
pub fn scan_with_progress(
    source: &dyn PageSource,
    progress: &mut dyn FnMut(u64),
) -> io::Result<ImageInfo> {
    let ps = source.page_size();
    let size = source.image_size();
    let count = source.page_count();
    let Ok(layout) = HashLayout::new(size, ps) else {
        return scan_sequential(source, progress);
    };
    let mut tree = TreeBuilder::new(layout.clone()).map_err(io::Error::other)?;
    let run = (SCAN_RUN_BYTES / ps.max(1)).max(1) as u64;
    let runs = count.div_ceil(run);
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(1, SCAN_MAX_THREADS)
        .min(usize::try_from(runs).unwrap_or(1).max(1));
    let next = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    // Each worker takes the next run until none is left: its own chaining values and zero
    // pages.
    let work = |tick: &mut dyn FnMut()| -> io::Result<(TreeBuilder, Vec<u64>)> {
        let mut b = TreeBuilder::new(layout.clone()).map_err(io::Error::other)?;
        let mut zeros = Vec::new();
        let mut buf = vec![0u8; run as usize * ps];
        loop {
            let r = next.fetch_add(1, Ordering::Relaxed);
            if r >= runs {
                return Ok((b, zeros));
            }
            let first = r * run;
            let n = run.min(count - first);
            let buf = &mut buf[..n as usize * ps];
            source.read_pages(first, buf)?;
            for (i, page) in buf.chunks(ps).enumerate() {
                if is_zero(page) {
                    zeros.push(first + i as u64);
                }
            }
            b.add_pages(first, buf).map_err(io::Error::other)?;
            done.fetch_add(n, Ordering::Relaxed);
            tick();
        }
    };
    let mut zero_map = PageBitmap::new(count);
    let mut absorb = |(b, zeros): (TreeBuilder, Vec<u64>)| {
        tree.absorb(&b);
        for p in zeros {
            zero_map.set(p);
        }
    };
    std::thread::scope(|scope| -> io::Result<()> {
        let helpers: Vec<_> = (1..threads)
            .map(|_| scope.spawn(|| work(&mut || {})))
            .collect();
        // This thread works too, and reports progress between its runs.
        let mut last = 0;
        let mine = work(&mut || {
            let now = done.load(Ordering::Relaxed);
            if now >= last + 4096 {
                last = now;
                progress(now);
            }
        });
        let mut first_err = None;
        match mine {
            Ok(part) => absorb(part),
            Err(e) => first_err = Some(e),
        }
        for h in helpers {
            match h.join() {
                Ok(Ok(part)) => absorb(part),
                Ok(Err(e)) => first_err = first_err.or(Some(e)),
                Err(_) => {
                    first_err = first_err.or(Some(io::Error::other("a scan thread panicked")))
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    })?;
    progress(count);
    let tree = tree.finish().map_err(io::Error::other)?;
    Ok(ImageInfo {
        image_size: size,
        page_size: ps,
        digest: tree.root(),
        zero_map,
        hash_tree: Some(Arc::new(tree)),
    })
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

/// Largest run of pages [`scan_with_progress`] reads and hashes at once.
pub const SCAN_RUN_BYTES: usize = 256 << 10;
/// Most threads [`scan_with_progress`] uses.
pub const SCAN_MAX_THREADS: usize = 8;

/// One pass, page by page, on this thread (page sizes that are not BLAKE3 subtrees).
fn scan_sequential(
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

/// BLAKE3 digest of a whole file, the same digest [`scan`] computes for an image.
pub fn file_digest(path: &Path) -> io::Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    h.update_reader(File::open(path)?)?;
    Ok(*h.finalize().as_bytes())
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
    fn mem_and_file_sources_agree() {
        let mut data = vec![0u8; 4096 * 3 + 100];
        data[5000] = 7;
        data[4096 * 3 + 50] = 1;
        let mem = MemSource::new(data.clone(), 4096);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, &data).unwrap();
        let file = FileSource::open(&p, 4096).unwrap();
        assert_eq!(mem.page_count(), 4);
        let a = scan(&mem).unwrap();
        let b = scan(&file).unwrap();
        assert_eq!(a.digest, b.digest);
        assert_eq!(a.digest, *blake3::hash(&data).as_bytes());
        assert!(a.zero_map.get(0) && !a.zero_map.get(1) && a.zero_map.get(2) && !a.zero_map.get(3));
        assert_eq!(a.zero_map, b.zero_map);
        let mut buf = vec![0xffu8; 4096];
        file.read_page(3, &mut buf).unwrap();
        assert_eq!(buf[50], 1);
        assert!(buf[100..].iter().all(|&x| x == 0));
        assert!(file.read_page(4, &mut buf).is_err());
        std::fs::write(&p, [1u8; 10]).unwrap();
        assert!(file.check_unchanged().is_err());
    }

    /// A source that only reads page by page (the trait's default `read_pages`).
    struct PageByPage(MemSource);

    impl PageSource for PageByPage {
        fn page_size(&self) -> usize {
            self.0.page_size()
        }
        fn image_size(&self) -> u64 {
            self.0.image_size()
        }
        fn read_page(&self, pfn: u64, buf: &mut [u8]) -> io::Result<()> {
            self.0.read_page(pfn, buf)
        }
    }

    #[test]
    fn scan_in_runs_matches_one_pass_for_every_source_and_size() {
        let dir = tempfile::tempdir().unwrap();
        for &(len, ps) in &[
            (0usize, 4096usize),
            (100, 4096),
            (4096, 4096),
            (64 * 4096, 4096),
            (300 * 4096 + 123, 4096),
            (1000 * 1024, 1024),
            (70 * 4096, 6000),
        ] {
            // Zero pages at every 7th page, the rest patterned.
            let data: Vec<u8> = (0..len)
                .map(|i| {
                    if (i / 4096) % 7 == 3 {
                        0
                    } else {
                        (i % 253) as u8 | 1
                    }
                })
                .collect();
            let p = dir.path().join(format!("img-{len}-{ps}"));
            std::fs::write(&p, &data).unwrap();
            let mem = MemSource::new(data.clone(), ps);
            let file = FileSource::open(&p, ps).unwrap();
            let slow = PageByPage(mem.clone());
            let one_pass = scan_sequential(&mem, &mut |_| {}).unwrap();
            assert_eq!(one_pass.digest, *blake3::hash(&data).as_bytes());
            let mut seen = Vec::new();
            for (name, src) in [
                ("mem", &mem as &dyn PageSource),
                ("file", &file),
                ("page by page", &slow),
            ] {
                seen.clear();
                let got = scan_with_progress(src, &mut |n| seen.push(n)).unwrap();
                assert_eq!(
                    got.digest, one_pass.digest,
                    "{name}: {len} bytes, pages of {ps}"
                );
                assert_eq!(
                    got.zero_map, one_pass.zero_map,
                    "{name}: {len} bytes, pages of {ps}"
                );
                assert_eq!(
                    seen.last(),
                    Some(&src.page_count()),
                    "{name}: progress ends at the page count"
                );
                assert!(
                    seen.windows(2).all(|w| w[0] <= w[1]),
                    "{name}: progress goes forward"
                );
            }
        }
    }

    #[test]
    fn read_pages_reads_runs_and_refuses_pages_past_the_end() {
        let data: Vec<u8> = (0..3 * 4096 + 10).map(|i| (i / 4096) as u8 + 1).collect();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, &data).unwrap();
        let file = FileSource::open(&p, 4096).unwrap();
        let mem = MemSource::new(data, 4096);
        for src in [&file as &dyn PageSource, &mem] {
            let mut buf = vec![0xffu8; 3 * 4096];
            src.read_pages(1, &mut buf).unwrap();
            assert!(buf[..4096].iter().all(|&b| b == 2));
            assert!(buf[4096..8192].iter().all(|&b| b == 3));
            assert!(buf[8192..8202].iter().all(|&b| b == 4));
            assert!(
                buf[8202..].iter().all(|&b| b == 0),
                "the tail past the image reads as zero"
            );
            assert!(src.read_pages(4, &mut buf[..4096]).is_err());
        }
    }
}
