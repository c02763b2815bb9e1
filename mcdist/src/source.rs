//! Page sources: what a server serves.
//!
//! [`PageSource`] is the trait embedders implement (a frozen guest's memory, a
//! snapshot file, a copy-on-write view). [`MemSource`] and [`FileSource`] ship
//! here. [`scan`] computes the image digest and zero-page map in one pass.

use crate::bitmap::PageBitmap;
use bytes::Bytes;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A read-only, page-addressed image.
pub trait PageSource: Send + Sync + 'static {
    /// Page size in bytes (a power of two).
    fn page_size(&self) -> usize;
    /// Image size in bytes. The last page may be partial; it reads as zero-padded.
    fn image_size(&self) -> u64;
    /// Fill `buf` (exactly `page_size` bytes) with page `pfn`.
    fn read_page(&self, pfn: u64, buf: &mut [u8]) -> io::Result<()>;
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
        let start = usize::try_from(pfn)
            .ok()
            .and_then(|p| p.checked_mul(self.page_size))
            .filter(|&s| s < self.data.len())
            .ok_or_else(|| bad_page(pfn))?;
        let end = (start + self.page_size).min(self.data.len());
        let n = end - start;
        buf[..n].copy_from_slice(&self.data[start..end]);
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
        let off = pfn
            .checked_mul(self.page_size as u64)
            .filter(|&o| o < self.size)
            .ok_or_else(|| bad_page(pfn))?;
        let n = (self.size - off).min(self.page_size as u64) as usize;
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
}

/// Read every page once: digest and zero-page map.
pub fn scan(source: &dyn PageSource) -> io::Result<ImageInfo> {
    scan_with_progress(source, &mut |_| {})
}

/// [`scan`] with a progress callback (pages done).
pub fn scan_with_progress(
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
}
