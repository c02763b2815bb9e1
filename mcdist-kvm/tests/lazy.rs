//! LazyMemory against real userfaultfd.

use std::sync::Arc;
use std::time::Duration;

use mcdist_kvm::lazy::{LazyConfig, LazyFailure, LazyMemory, PageFetcher, SourceFetcher};
use mcdist_kvm::source::{zero_map, MemSource, PageSource};

mod common;
use common::uffd_available;

const PAGE: usize = 4096;

fn image(pages: usize) -> Vec<u8> {
    let mut v = vec![0u8; pages * PAGE];
    for p in 0..pages {
        if p % 3 != 0 {
            // every third page stays zero
            for (i, b) in v[p * PAGE..(p + 1) * PAGE].iter_mut().enumerate() {
                *b = (p as u8).wrapping_mul(31).wrapping_add(i as u8);
            }
        }
    }
    v
}

/// Lazy memory of `pages` pages of [`image`], each fetched on the fault thread from memory.
fn served_from_memory(pages: usize) -> LazyMemory {
    let src: Arc<dyn PageSource> = Arc::new(MemSource::new(image(pages), PAGE));
    let zero = zero_map(&*src).expect("zero map");
    let mut mem = LazyMemory::new(pages * PAGE, zero, LazyConfig::default()).expect("lazy memory");
    mem.start(Arc::new(SourceFetcher::new(src, mem.handle())))
        .expect("start");
    mem
}

#[test]
fn faults_fetch_pages_and_fill_zero_pages_locally() {
    if !uffd_available() {
        return;
    }
    let pages = 64;
    let mem = served_from_memory(pages);
    // Touch half of the pages from two threads at once.
    let mem = Arc::new(mem);
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let mem = mem.clone();
            std::thread::spawn(move || {
                let mut out = vec![0u8; PAGE];
                for p in 0..pages / 2 {
                    mem.read(p * PAGE, &mut out).expect("read");
                    assert_eq!(&out[..], &img_page(p)[..], "page {p}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("reader");
    }
    let s = mem.stats();
    let nonzero_touched = (0..pages / 2).filter(|p| p % 3 != 0).count() as u64;
    let zero_touched = (0..pages / 2).filter(|p| p % 3 == 0).count() as u64;
    assert_eq!(
        s.pages_requested, nonzero_touched,
        "one request per missing page"
    );
    assert_eq!(s.pages_fetched(), nonzero_touched);
    assert_eq!(s.zero_pages, zero_touched);
    assert_eq!(s.zero_pages_received, 0);
    assert_eq!(s.bytes_received, nonzero_touched * PAGE as u64);
    assert!(s.fault_latency.count() as u64 >= nonzero_touched);
    assert!(mem.failure().is_none());

    fn img_page(p: usize) -> Vec<u8> {
        image(64)[p * PAGE..(p + 1) * PAGE].to_vec()
    }
}

#[test]
fn pushed_pages_are_installed_before_faults() {
    if !uffd_available() {
        return;
    }
    let pages = 16;
    let img = image(pages);
    let src = MemSource::new(img.clone(), PAGE);
    let zero = zero_map(&src).expect("zero map");
    let mut mem = LazyMemory::new(pages * PAGE, zero, LazyConfig::default()).expect("lazy memory");
    struct Never;
    impl PageFetcher for Never {
        fn request(&self, _pfn: u64) {}
    }
    mem.start(Arc::new(Never)).expect("start");
    let h = mem.handle();
    let mut buf = vec![0u8; PAGE];
    src.read_page(1, &mut buf).expect("page");
    h.install(1, &buf);
    h.install(1, &buf); // a duplicate delivery is not an error
    let mut out = vec![0u8; PAGE];
    mem.read(PAGE, &mut out).expect("read pushed page");
    assert_eq!(out, buf);
    let s = mem.stats();
    assert_eq!(s.pages_pushed, 1);
    assert_eq!(s.duplicates, 1);
    assert_eq!(s.demand_faults, 0);
}

#[test]
fn missing_server_fails_with_timeout_and_no_zero_page() {
    if !uffd_available() {
        return;
    }
    let pages = 8;
    let zero = mcdist_kvm::PageBitmap::new(pages);
    let cfg = LazyConfig {
        fetch_timeout: Duration::from_millis(300),
        rerequest_interval: Duration::from_millis(50),
        ..LazyConfig::default()
    };
    let mut mem = LazyMemory::new(pages as usize * PAGE, zero, cfg).expect("lazy memory");
    struct Never;
    impl PageFetcher for Never {
        fn request(&self, _pfn: u64) {}
    }
    mem.start(Arc::new(Never)).expect("start");
    let mem = Arc::new(mem);
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let mem = mem.clone();
        std::thread::spawn(move || {
            let mut out = vec![1u8; 8];
            let r = mem.read(3 * PAGE, &mut out).map(|()| out);
            let _ = tx.send(r);
        });
    }
    let mut failure = None;
    for _ in 0..1000 {
        failure = mem.failure();
        if failure.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    match failure {
        Some(LazyFailure::FetchTimeout { pfn, .. }) => assert_eq!(pfn, 3),
        other => panic!("expected a fetch timeout, got {other:?}"),
    }
    // Fail closed: the reader's fault stays unresolved, it never reads a zero-filled page.
    assert!(
        rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "the reader got a page after the failure"
    );
    assert!(!mem.handle().is_installed(3));
    // The reader stays blocked in its fault: the memory stays mapped for it (it holds a
    // reference) until the process exits.
}

#[test]
fn statistics_count_every_page_a_reader_has_waited_for() {
    if !uffd_available() {
        return;
    }
    // `UFFDIO_COPY` wakes the reader before the installing thread counts the page; a
    // snapshot taken right after the read returns must still count it.
    let pages = 16384;
    let mem = served_from_memory(pages);
    let mut out = vec![0u8; PAGE];
    let mut fetched = 0;
    for p in (0..pages).filter(|p| p % 3 != 0) {
        mem.read(p * PAGE, &mut out).expect("read");
        fetched += 1;
        let s = mem.stats();
        assert_eq!(s.pages_demand, fetched, "after reading page {p}: {s:?}");
    }
}

/// With `trace_faults`, every demand fault leaves one record whose stamps are in the order
/// of the fault path; without it, none.
#[test]
fn the_fault_trace_keeps_one_ordered_record_per_demand_page() {
    if !uffd_available() {
        return;
    }
    let pages = 32;
    for trace in [true, false] {
        let src: Arc<dyn PageSource> = Arc::new(MemSource::new(image(pages), PAGE));
        let zero = zero_map(&*src).expect("zero map");
        let cfg = LazyConfig {
            trace_faults: trace,
            ..LazyConfig::default()
        };
        let mut mem = LazyMemory::new(pages * PAGE, zero, cfg).expect("lazy memory");
        mem.start(Arc::new(SourceFetcher::new(src, mem.handle())))
            .expect("start");
        let mut b = [0u8; 1];
        for p in 0..pages {
            mem.read(p * PAGE, &mut b).expect("read");
        }
        let demand = mem.stats().pages_demand;
        let t = mem.fault_trace();
        if !trace {
            assert!(t.is_empty());
            continue;
        }
        assert_eq!(t.len() as u64, demand, "one record per demand page");
        let mut pfns: Vec<u64> = t.iter().map(|s| s.pfn).collect();
        pfns.sort_unstable();
        pfns.dedup();
        assert_eq!(pfns.len(), t.len(), "one record per page");
        for s in &t {
            assert!(s.pfn % 3 != 0, "zero pages are filled locally, not traced");
            assert!(s.read <= s.asked && s.asked <= s.delivered && s.delivered <= s.installed);
            // The local fetcher installs before its request returns; it receives no datagram.
            assert!(s.sent.is_none() && s.received.is_none());
        }
        assert!(mem.fault_trace().is_empty(), "the trace is handed out once");
    }
}
