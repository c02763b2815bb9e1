//! The file a whole-image fetch writes: pages gathered into windows and written, with a map
//! of the pages the file holds, so the copy is known complete without reading it back.

use mcdist::bitmap::PageBitmap;
use mcdist::node::{PageSink, SinkError};
use mcdist::SessionInfo;
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Mutex, PoisonError};

/// Writes pages at their place in the output file. Pages are gathered in aligned windows
/// of [`RUN_BYTES`], several open at once, and a window is written with one call once it
/// holds all its pages: pages that arrive in order (a sweep) and pages that come late (a
/// fragment lost and resent, a page recovered by FEC after its block) alike join the
/// window they belong to. A window that is pushed out by newer ones before it fills (it
/// holds zero pages, which never arrive, or waits for a page that comes much later) is
/// written as the runs of pages it holds.
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
    /// Windows being gathered, oldest first.
    open: VecDeque<Window>,
    /// Buffers of windows written, for the next ones.
    spare: Vec<Vec<u8>>,
}

/// Pages `first..first + len` of the image, gathered before they are written.
struct Window {
    first: u64,
    len: u64,
    /// Bit `i`: page `first + i` is in `buf`.
    have: u64,
    /// `len` pages back to back.
    buf: Vec<u8>,
}

/// Largest run of pages written at once.
const RUN_BYTES: usize = 256 << 10;
/// Windows gathered at once: 4 MiB, a span of 1,024 pages of 4 KiB (FEC blocks are 256).
const WINDOWS: usize = 16;

impl SinkState {
    /// Pages per window for pages of `ps` bytes: [`RUN_BYTES`] of them, 1 to 64.
    fn run(ps: usize) -> u64 {
        (RUN_BYTES / ps.max(1)).clamp(1, 64) as u64
    }

    /// Takes in page `pfn` (`data`, one page): into its window, which is written when
    /// full; the oldest window is written first when all are in use.
    fn put(&mut self, file: &File, pfn: u64, data: &[u8]) -> io::Result<()> {
        let ps = data.len();
        let run = Self::run(ps);
        let first = pfn - pfn % run;
        let at = match self.open.iter().position(|w| w.first == first) {
            Some(at) => at,
            None => {
                if self.open.len() >= WINDOWS {
                    if let Some(old) = self.open.pop_front() {
                        self.write(file, old)?;
                    }
                }
                // The last window stops at the image's end.
                let pages = self.held.as_ref().map_or(u64::MAX, PageBitmap::len);
                let len = run.min(pages.saturating_sub(first)).max(1);
                let mut buf = self.spare.pop().unwrap_or_default();
                buf.resize(len as usize * ps, 0);
                self.open.push_back(Window {
                    first,
                    len,
                    have: 0,
                    buf,
                });
                self.open.len() - 1
            }
        };
        let w = &mut self.open[at];
        let i = pfn - w.first;
        let off = i as usize * ps;
        if i >= w.len || w.buf.len() != w.len as usize * ps {
            // A page past the image's end, or of another size: written alone.
            file.write_all_at(data, pfn * ps as u64)?;
            self.mark(pfn, pfn + 1);
            return Ok(());
        }
        w.buf[off..off + ps].copy_from_slice(data);
        w.have |= 1 << i;
        if w.have.count_ones() as u64 == w.len {
            if let Some(full) = self.open.remove(at) {
                self.write(file, full)?;
            }
        }
        Ok(())
    }

    /// Writes the pages `w` holds, one call per run of them, and keeps its buffer.
    fn write(&mut self, file: &File, w: Window) -> io::Result<()> {
        let ps = w.buf.len() / w.len.max(1) as usize;
        let mut i = 0;
        while i < w.len {
            if w.have & (1 << i) == 0 {
                i += 1;
                continue;
            }
            let end = (i..w.len)
                .find(|&j| w.have & (1 << j) == 0)
                .unwrap_or(w.len);
            let bytes = &w.buf[i as usize * ps..end as usize * ps];
            file.write_all_at(bytes, (w.first + i) * ps as u64)?;
            self.mark(w.first + i, w.first + end);
            i = end;
        }
        // Kept as it is: only the pages a window is given are ever written from it.
        self.spare.push(w.buf);
        Ok(())
    }

    fn mark(&mut self, from: u64, to: u64) {
        if let Some(held) = self.held.as_mut() {
            for pfn in from..to.min(held.len()) {
                held.set(pfn);
            }
        }
    }

    /// Writes every window gathered so far.
    fn flush(&mut self, file: &File) -> io::Result<()> {
        while let Some(w) = self.open.pop_front() {
            self.write(file, w)?;
        }
        Ok(())
    }
}

impl FileSink {
    pub(crate) fn state(&self) -> std::sync::MutexGuard<'_, SinkState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes out the pages gathered so far (before the file is sized and checked).
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
        // A resumed session (same image) keeps the pages written and gathered so far;
        // another image's pages gathered but not written are dropped, not written over it.
        let same = st.held.as_ref().is_some_and(|h| h.len() == info.page_count);
        if !same {
            st.held = Some(PageBitmap::new(info.page_count));
            st.open.clear();
        }
    }

    fn page_ready(&self, pfn: u64, data: &[u8]) -> Result<(), SinkError> {
        // Pages are page_size long; the tail past the image is cut off at the end.
        self.state().put(&self.file, pfn, data).map_err(write_err)
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

    #[test]
    fn pages_out_of_order_join_their_window_and_a_window_pushed_out_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, path) = sink(&dir);
        let ps = 4096;
        let run = SinkState::run(ps) as usize;
        let pages = run * (WINDOWS + 2);
        let page = |pfn: usize| vec![(pfn % 251) as u8 + 1; ps];
        let on_disk = |pfn: usize| {
            let file = std::fs::read(&path).unwrap();
            file.get(pfn * ps..)
                .map_or(vec![], |b| b[..b.len().min(ps)].to_vec())
        };
        let info = |page_count: usize| SessionInfo {
            session_id: 1,
            image_size: (page_count * ps) as u64,
            page_size: ps,
            page_count: page_count as u64,
            digest: [0; 32],
            zero_count: 0,
        };
        sink.session_started(&info(pages));
        // The first window, last page first: written once it is whole, without a flush.
        for pfn in (0..run).rev() {
            assert!(on_disk(0).is_empty(), "written before page {pfn}");
            sink.page_ready(pfn as u64, &page(pfn)).unwrap();
        }
        assert!((0..run).all(|p| on_disk(p) == page(p)));
        assert_eq!(sink.missing(), Some((pages - run) as u64));
        // One page in each of the next WINDOWS windows: all gathered, none written.
        for w in 1..=WINDOWS {
            sink.page_ready((w * run + 5) as u64, &page(w * run + 5))
                .unwrap();
        }
        assert_eq!(std::fs::metadata(&path).unwrap().len(), (run * ps) as u64);
        assert_eq!(sink.missing(), Some((pages - run) as u64));
        // One more window pushes the oldest gathered out: its page is written.
        let last = (WINDOWS + 1) * run;
        sink.page_ready(last as u64, &page(last)).unwrap();
        assert!(on_disk(run + 5) == page(run + 5));
        assert!(
            on_disk(run + 4) == vec![0u8; ps],
            "a page never given is a hole"
        );
        assert_eq!(sink.missing(), Some((pages - run - 1) as u64));
        // Another image: what was gathered for the first is dropped, never written.
        sink.session_started(&info(pages / 2));
        sink.flush().unwrap();
        assert_eq!(sink.missing(), Some((pages / 2) as u64));
        let written = std::fs::metadata(&path).unwrap().len();
        assert_eq!(
            written,
            ((run + 6) * ps) as u64,
            "nothing after page {}",
            run + 5
        );
    }
}
