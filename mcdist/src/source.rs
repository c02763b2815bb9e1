//! Page sources and the image scan as drivers run them: the core's
//! ([`mcdist_proto::source`]: the [`PageSource`] trait, [`MemSource`], [`ImageInfo`])
//! plus [`FileSource`], which reads an image file with positional reads, and [`scan`],
//! which reads the image on one thread per core. Detecting an image that changes while
//! it is served ([`PageSource::check_unchanged`]) is the server thread's job.

pub use mcdist_proto::source::*;

use mcdist_proto::integrity::HashLayout;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

fn bad_page(pfn: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("page {pfn} is past the end of the image"),
    )
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

/// Read every page once: digest, zero-page map and hash pages, on every core.
pub fn scan(source: &dyn PageSource) -> io::Result<ImageInfo> {
    scan_with_progress(source, &mut |_| {})
}

/// [`scan`] with a progress callback (pages done).
///
/// The image is read in runs of pages ([`PageSource::read_pages`], up to [`SCAN_RUN_BYTES`]
/// each) by one thread per core (at most [`SCAN_MAX_THREADS`]); each worker fills its own
/// [`ScanPart`] (chaining values and zero pages), the parts are merged by
/// [`ScanPart::finish`], and the hash tree's root is the image's digest.
/// Page sizes that are not a power of two of at least 1 KiB are hashed in one pass, without
/// hash pages.
pub fn scan_with_progress(
    source: &dyn PageSource,
    progress: &mut dyn FnMut(u64),
) -> io::Result<ImageInfo> {
    let count = source.page_count();
    let Ok(layout) = HashLayout::new(source.image_size(), source.page_size()) else {
        return scan_sequential(source, progress);
    };
    let run = ScanPart::run_pages(source.page_size());
    let runs = count.div_ceil(run);
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(1, SCAN_MAX_THREADS)
        .min(usize::try_from(runs).unwrap_or(1).max(1));
    let next = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    // Each worker takes the next run until none is left: its own part of the scan.
    let work = |tick: &mut dyn FnMut()| -> io::Result<ScanPart> {
        let mut part = ScanPart::new(layout.clone())?;
        let mut buf = Vec::new();
        loop {
            let r = next.fetch_add(1, Ordering::Relaxed);
            match part.scan_run(source, r.saturating_mul(run), &mut buf)? {
                Some(n) => {
                    done.fetch_add(n, Ordering::Relaxed);
                    tick();
                }
                None => return Ok(part),
            }
        }
    };
    let parts = std::thread::scope(|scope| -> io::Result<Vec<ScanPart>> {
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
        let mut parts = Vec::with_capacity(threads);
        let mut first_err = None;
        match mine {
            Ok(part) => parts.push(part),
            Err(e) => first_err = Some(e),
        }
        for h in helpers {
            match h.join() {
                Ok(Ok(part)) => parts.push(part),
                Ok(Err(e)) => first_err = first_err.or(Some(e)),
                Err(_) => {
                    first_err = first_err.or(Some(io::Error::other("a scan thread panicked")))
                }
            }
        }
        first_err.map_or(Ok(parts), Err)
    })?;
    progress(count);
    ScanPart::finish(layout, source, parts)
}

/// Most threads [`scan_with_progress`] uses.
pub const SCAN_MAX_THREADS: usize = 8;

/// BLAKE3 digest of a whole file, the same digest [`scan`] computes for an image.
pub fn file_digest(path: &Path) -> io::Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    h.update_reader(File::open(path)?)?;
    Ok(*h.finalize().as_bytes())
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
