//! The file a whole-image fetch writes: pages gathered into runs and written, with a map
//! of the pages the file holds, so the copy is known complete without reading it back.

use mcdist::bitmap::PageBitmap;
use mcdist::node::{PageSink, SinkError};
use mcdist::SessionInfo;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Mutex, PoisonError};

/// Writes pages at their place in the output file. Pages that arrive in order (a sweep)
/// are gathered into aligned runs and written with one call.
///
/// The sink does not hash pages: the client hands it a page only after checking it
/// against the image's root digest (its chaining value against the verified hash pages
/// above it), so a second hash here would prove nothing more about the bytes and cost a
/// BLAKE3 of the whole image per receiver. What the sink adds is completeness: the map of
/// pages written (and zero pages left to the file's holes), which must cover the image.
pub(crate) struct FileSink {
    pub(crate) file: File,
    pub(crate) state: Mutex<SinkState>,
}

#[derive(Default)]
pub(crate) struct SinkState {
    /// Pages the file holds: written, or zero pages of the session's zero map.
    held: Option<PageBitmap>,
    /// The run being gathered: pages `first..first + n` back to back.
    first: u64,
    n: u64,
    buf: Vec<u8>,
}

/// Largest run of pages written at once.
const RUN_BYTES: usize = 256 << 10;

impl SinkState {
    /// Writes the run gathered so far.
    fn flush(&mut self, file: &File) -> io::Result<()> {
        if self.n == 0 {
            return Ok(());
        }
        let ps = self.buf.len() as u64 / self.n;
        file.write_all_at(&self.buf, self.first * ps)?;
        if let Some(held) = self.held.as_mut() {
            for pfn in self.first..self.first + self.n {
                held.set(pfn);
            }
        }
        self.n = 0;
        self.buf.clear();
        Ok(())
    }
}

impl FileSink {
    pub(crate) fn state(&self) -> std::sync::MutexGuard<'_, SinkState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes out the run gathered so far (before the file is sized and checked).
    pub(crate) fn flush(&self) -> io::Result<()> {
        self.state().flush(&self.file)
    }

    /// Marks the session's zero pages (never delivered: the sized file's holes read as
    /// zeros) once the zero map is known; marking them again changes nothing.
    pub(crate) fn add_zero_pages(&self, zero: Option<&PageBitmap>) {
        let Some(zero) = zero else { return };
        if let Some(held) = self.state().held.as_mut().filter(|h| h.len() == zero.len()) {
            held.union_with(zero);
        }
    }

    /// Pages of the image the file does not hold yet (the whole image before a session).
    pub(crate) fn missing(&self) -> Option<u64> {
        let st = self.state();
        let held = st.held.as_ref()?;
        Some(held.len() - held.count_ones())
    }
}

impl PageSink for FileSink {
    fn session_started(&self, info: &SessionInfo) {
        let mut st = self.state();
        // A resumed session (same image) keeps the pages written so far.
        let same = st.held.as_ref().is_some_and(|h| h.len() == info.page_count);
        if !same {
            st.held = Some(PageBitmap::new(info.page_count));
        }
    }

    fn page_ready(&self, pfn: u64, data: &[u8]) -> Result<(), SinkError> {
        // Pages are page_size long; the tail past the image is cut off at the end.
        let mut st = self.state();
        let st = &mut *st;
        // Pages per run (runs are aligned to it): at most RUN_BYTES.
        let run = (RUN_BYTES / data.len().max(1)).max(1) as u64;
        let follows = st.n > 0
            && pfn == st.first + st.n
            && pfn % run != 0
            && st.buf.len() == st.n as usize * data.len();
        if !follows {
            st.flush(&self.file).map_err(write_err)?;
            st.first = pfn;
        }
        st.buf.extend_from_slice(data);
        st.n += 1;
        if (pfn + 1) % run == 0 {
            st.flush(&self.file).map_err(write_err)?;
        }
        Ok(())
    }
}

fn write_err(source: io::Error) -> SinkError {
    SinkError::Io {
        what: "writing the output file",
        source,
    }
}

/// What is wrong with a finished copy, if anything: pages it lacks, or (with `read_back`)
/// a digest of the file as read back that is not the image's.
pub(crate) fn check(
    sink: &FileSink,
    path: &Path,
    expect: &[u8; 32],
    read_back: bool,
) -> io::Result<Option<String>> {
    match sink.missing() {
        Some(0) => {}
        Some(n) => return Ok(Some(format!("{n} pages were never written"))),
        None => return Ok(Some("no session was joined".into())),
    }
    if read_back && &mcdist::source::file_digest(path)? != expect {
        return Ok(Some(format!(
            "read back, it does not match the image digest {}",
            mcdist::hex(expect)
        )));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink(dir: &tempfile::TempDir) -> (FileSink, std::path::PathBuf) {
        let path = dir.path().join("copy");
        let file = File::create(&path).unwrap();
        let sink = FileSink {
            file,
            state: Mutex::default(),
        };
        (sink, path)
    }

    #[test]
    fn a_copy_is_complete_only_once_written_and_zero_pages_cover_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, path) = sink(&dir);
        let ps = 4096;
        // Pages 0, 1 and 3 carry data; page 2 is a zero page.
        let image: Vec<u8> = (0..4 * ps)
            .map(|i| if i / ps == 2 { 0 } else { (i % 251) as u8 + 1 })
            .collect();
        let digest = *blake3::hash(&image).as_bytes();
        let info = SessionInfo {
            session_id: 1,
            image_size: image.len() as u64,
            page_size: ps,
            page_count: 4,
            digest,
            zero_count: 1,
        };
        let d = &digest;
        assert_eq!(
            check(&sink, &path, d, false).unwrap().as_deref(),
            Some("no session was joined")
        );
        sink.session_started(&info);
        for pfn in [3u64, 0] {
            let at = pfn as usize * ps;
            sink.page_ready(pfn, &image[at..at + ps]).unwrap();
        }
        sink.flush().unwrap();
        let missing = check(&sink, &path, d, false).unwrap();
        assert_eq!(missing.as_deref(), Some("2 pages were never written"));
        sink.page_ready(1, &image[ps..2 * ps]).unwrap();
        sink.flush().unwrap();
        assert_eq!(sink.missing(), Some(1));
        let mut zero = PageBitmap::new(4);
        zero.set(2);
        sink.add_zero_pages(Some(&zero));
        sink.file.set_len(image.len() as u64).unwrap();
        assert_eq!(check(&sink, &path, d, false).unwrap(), None);
        assert_eq!(check(&sink, &path, d, true).unwrap(), None);
        assert_eq!(std::fs::read(&path).unwrap(), image);
        // Read back, a copy that differs from the image on disk is refused.
        sink.file.write_all_at(&[0xff], 5).unwrap();
        let wrong = check(&sink, &path, d, true).unwrap().unwrap();
        assert!(wrong.contains("does not match the image digest"), "{wrong}");
    }
}
