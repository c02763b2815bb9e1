//! The file a whole-image fetch writes: pages gathered into runs, written, and hashed as
//! they arrive, so the copy is checked against the image's digest without reading it back.

use mcdist::bitmap::PageBitmap;
use mcdist::digest::PageDigest;
use mcdist::node::{PageSink, SinkError};
use mcdist::SessionInfo;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Mutex, PoisonError};

/// Writes pages at their place in the output file and hashes each as it lands, so the
/// copy is checked against the image digest without reading it back. Pages that arrive in
/// order (a sweep) are gathered into aligned runs, written with one call and hashed as one
/// BLAKE3 subtree.
pub(crate) struct FileSink {
    pub(crate) file: File,
    pub(crate) state: Mutex<SinkState>,
}

#[derive(Default)]
pub(crate) struct SinkState {
    digest: Option<PageDigest>,
    /// The session's zero pages were hashed.
    zeros_hashed: bool,
    /// The run being gathered: pages `first..first + n` back to back.
    first: u64,
    n: u64,
    buf: Vec<u8>,
}

/// Largest run of pages written and hashed at once.
const RUN_BYTES: usize = 256 << 10;

impl SinkState {
    /// Writes and hashes the run gathered so far.
    fn flush(&mut self, file: &File) -> io::Result<()> {
        if self.n == 0 {
            return Ok(());
        }
        let ps = self.buf.len() as u64 / self.n;
        file.write_all_at(&self.buf, self.first * ps)?;
        if let Some(d) = self.digest.as_mut() {
            d.add_run(self.first, &self.buf);
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

    /// Hashes the session's zero pages (filled locally, never delivered) once the zero map
    /// is known, the first time it is called with one; a few pages per lock, so that pages
    /// arriving meanwhile are not held up.
    pub(crate) fn add_zero_pages(&self, zero: Option<&PageBitmap>) {
        let Some(zero) = zero else { return };
        if std::mem::replace(&mut self.state().zeros_hashed, true) {
            return;
        }
        for start in (0..zero.len()).step_by(1024) {
            if let Some(d) = self.state().digest.as_mut() {
                for pfn in (start..(start + 1024).min(zero.len())).filter(|&p| zero.get(p)) {
                    d.add_zero_page(pfn);
                }
            }
        }
    }
}

impl PageSink for FileSink {
    fn session_started(&self, info: &SessionInfo) {
        let mut st = self.state();
        // A resumed session (same image) keeps the pages hashed so far.
        let same = st
            .digest
            .as_ref()
            .is_some_and(|d| d.page_count() == info.page_count);
        if !same {
            st.digest = PageDigest::new(info.image_size, info.page_size);
            st.zeros_hashed = false;
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

/// Whether the fetched copy has the image's digest: from the pages hashed as they arrived
/// when the page size allows it, otherwise by reading the file back.
pub(crate) fn verify(sink: &FileSink, path: &Path, expect: &[u8; 32]) -> io::Result<bool> {
    if let Some(got) = sink.state().digest.as_ref().and_then(PageDigest::finalize) {
        return Ok(&got == expect);
    }
    Ok(&mcdist::source::file_digest(path)? == expect)
}
