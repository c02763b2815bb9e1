//! Record and prefetch: a clone reports the pages it ended with, and a later clone of the same
//! parent fetches them in bulk before its first instruction. On real userfaultfd, real KVM,
//! and a real mcdist server over UDP multicast in a network namespace this test creates.

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mcdist_kvm::clone::{run_clone, CloneError, CloneOptions, CloneReport};
use mcdist_kvm::guest::HashJob;
use mcdist_kvm::inline::InlineMcdist;
use mcdist_kvm::lazy::{LazyConfig, LazyMemory, PageFetcher};
use mcdist_kvm::source::{zero_map, MemSource, PageSource};
use mcdist_kvm::{Descriptor, DescriptorFile, LazyHandle};

mod common;
use common::{have_kvm, loopback_ns, serve, uffd_available, Served};
use mcdist_kvm::netns::Netns;

const PAGE: usize = 4096;

/// Pages `p` with `p % 4 == 0` are zero, the others hold `p`.
fn image(pages: usize) -> Arc<dyn PageSource> {
    let mut v = vec![0u8; pages * PAGE];
    for p in (0..pages).filter(|p| p % 4 != 0) {
        v[p * PAGE..(p + 1) * PAGE].fill(p as u8);
    }
    Arc::new(MemSource::new(v, PAGE))
}

/// Takes requests and leaves delivery to the test (a server the test plays).
struct Held {
    asked: Mutex<Vec<u64>>,
}

impl PageFetcher for Held {
    fn request(&self, pfn: u64) {
        self.asked.lock().unwrap().push(pfn);
    }
}

/// Lazy memory of `pages` pages of [`image`] with a prefetch window of `window`, started
/// with a [`Held`] fetcher: the test delivers what it asks for.
fn held_memory(pages: usize, window: usize) -> (LazyMemory, Arc<dyn PageSource>, Arc<Held>) {
    let src = image(pages);
    let cfg = LazyConfig {
        prefetch_window: window,
        ..LazyConfig::default()
    };
    let mut mem = LazyMemory::new(pages * PAGE, zero_map(&*src).expect("zero map"), cfg)
        .expect("lazy memory");
    let held = Arc::new(Held {
        asked: Mutex::new(Vec::new()),
    });
    mem.start(held.clone()).expect("start");
    (mem, src, held)
}

#[test]
fn prefetched_pages_are_asked_in_windows_and_installed_before_any_fault() {
    if !uffd_available() {
        return;
    }
    let (pages, window) = (256, 16);
    const PUSHED: [u64; 3] = [197, 198, 199];
    let (mem, src, held) = held_memory(pages, window);
    let h: LazyHandle = mem.handle();
    // Plays the page source: delivers what was asked, checking that never more than the
    // window is outstanding. Once the prefetch is under way it first pushes the last pages
    // of the list, which still wait in the queue: they are never asked for.
    let server = std::thread::spawn(move || {
        let (mut delivered, mut most) = (Vec::new(), 0);
        let mut buf = vec![0u8; PAGE];
        while held.asked.lock().unwrap().is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
        for pfn in PUSHED {
            src.read_page(pfn, &mut buf).expect("read");
            h.install(pfn, &buf);
        }
        while delivered.len() < 150 - PUSHED.len() {
            let batch: Vec<u64> = std::mem::take(&mut *held.asked.lock().unwrap());
            most = most.max(batch.len());
            for pfn in batch {
                src.read_page(pfn, &mut buf).expect("read");
                h.install(pfn, &buf);
                delivered.push(pfn);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        (delivered, most)
    });
    // Pages 0..200 (50 of them zero) and two beyond the memory.
    let list: Vec<u64> = (0..200).chain([pages as u64, u64::MAX]).collect();
    let p = mem
        .prefetch(&list, Duration::from_secs(20))
        .expect("prefetch");
    let (delivered, most) = server.join().expect("source thread");
    assert_eq!(p.asked, 150, "the non-zero pages in range");
    assert_eq!(p.missing, 0);
    assert!(
        most <= window,
        "{most} pages asked at once, window {window}"
    );
    let want: Vec<u64> = (0..200)
        .filter(|p| p % 4 != 0 && !PUSHED.contains(p))
        .collect();
    assert_eq!(delivered, want, "asked once each, in the list's order");
    // Touching them all now faults on nothing.
    let mut b = vec![0u8; PAGE];
    for pfn in 0..200 {
        mem.read(pfn * PAGE, &mut b).expect("read");
        let v = if pfn % 4 == 0 { 0 } else { pfn as u8 };
        assert!(b.iter().all(|&x| x == v), "page {pfn}");
    }
    let st = mem.stats();
    assert_eq!(
        st.pages_prefetched, 150,
        "pushed ones included: they were asked for"
    );
    assert_eq!(st.demand_faults, 0);
    assert_eq!(st.pages_demand, 0);
    assert_eq!(st.pages_requested, 150);
    // A second prefetch of the same pages asks for nothing.
    let again = mem.prefetch(&list, Duration::from_secs(1)).expect("again");
    assert_eq!((again.asked, again.missing), (0, 0));
}

#[test]
fn a_prefetch_that_times_out_reports_what_is_missing_and_a_failure_ends_it() {
    if !uffd_available() {
        return;
    }
    let (mem, _src, _held) = held_memory(64, 8);
    let p = mem
        .prefetch(&[1, 2, 3], Duration::from_millis(50))
        .expect("prefetch");
    assert_eq!((p.asked, p.missing), (3, 3), "nothing was delivered");
    let h = mem.handle();
    let failer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        h.fail("the page source failed");
    });
    let r = mem.prefetch(&[5, 6], Duration::from_secs(20));
    failer.join().expect("thread");
    let e = r.expect_err("a failed memory fails the prefetch");
    assert!(e.to_string().contains("the page source failed"), "{e}");
    assert_eq!(mem.stats().pages_prefetched, 0, "no page was installed");
}

/// A parent served on loopback in a network namespace of its own, without neighbour push;
/// with `working_set` the server records, replays and hints the working set (its
/// defaults), without it every page a clone gets is one it asked for. `None` without KVM.
fn served(tag: &str, seed: u32, port: u16, working_set: bool) -> Option<(Netns, Served)> {
    if !have_kvm() {
        return None;
    }
    let ns = loopback_ns(tag);
    ns.enter().expect("enter netns");
    let cfg = mcdist::ServerConfig {
        push_neighbors: false,
        working_set_push: working_set,
        ..Default::default()
    };
    let s = serve(HashJob::new(32 << 20, 0.9, 0.2, seed, 4096), port, cfg);
    Some((ns, s))
}

/// The server's pages sent once its counters stop changing: they are a snapshot refreshed
/// every few milliseconds, which may not hold the last pages of a clone that just ended.
fn settled_pages_sent(server: &mcdist_kvm::MemoryServer) -> u64 {
    let mut last = server.stats().stats.pages_sent;
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(50));
        let now = server.stats().stats.pages_sent;
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("the server kept sending");
}

fn inline_clone(desc: &Descriptor, id: u32, opts: &CloneOptions) -> CloneReport {
    run_clone(desc, id, opts, |h| {
        Ok(
            InlineMcdist::connect(desc, Some("lo"), &h, Duration::from_secs(5), |_| {})
                .map_err(CloneError::Session)?
                .into_fetcher(),
        )
    })
    .expect("clone")
}

#[test]
fn a_clone_that_prefetches_the_recorded_working_set_faults_on_nothing() {
    let Some((_ns, s)) = served("pref", 5, 47121, false) else {
        return;
    };
    let first = inline_clone(
        &s.desc,
        1,
        &CloneOptions {
            record_working_set: true,
            ..Default::default()
        },
    );
    assert_eq!(first.result, s.job.expected(1));
    let ws = first.working_set.clone();
    assert_eq!(ws.len() as u64, first.stats.pages_fetched());
    assert!(first.stats.demand_faults >= s.job.pages_touched_per_clone(4096) - 3);
    assert!(first.prefetched.is_none());
    let sent_before = settled_pages_sent(&s.server);

    let second = inline_clone(
        &s.desc,
        1,
        &CloneOptions {
            prefetch: Some(ws.clone().into()),
            prefetch_before_start: true,
            ..Default::default()
        },
    );
    assert_eq!(second.result, s.job.expected(1));
    let p = second.prefetched.expect("a prefetch ran");
    eprintln!(
        "first clone: {} demand faults, {} ms; second: {} pages prefetched in {:?}, {} demand faults, {} ms",
        first.stats.demand_faults,
        first.total.as_millis(),
        p.asked,
        p.elapsed,
        second.stats.demand_faults,
        second.total.as_millis()
    );
    assert_eq!((p.asked, p.missing), (ws.len() as u64, 0));
    assert_eq!(second.stats.pages_prefetched, ws.len() as u64);
    assert_eq!(
        second.stats.demand_faults, 0,
        "it touched only prefetched pages"
    );
    assert!(second.working_set.is_empty(), "not asked to record");
    let sent = settled_pages_sent(&s.server) - sent_before;
    assert!(
        sent >= ws.len() as u64 && sent <= ws.len() as u64 + ws.len() as u64 / 20,
        "the server sent {sent} pages for a prefetch of {}",
        ws.len()
    );

    // The default: the prefetch runs alongside the guest, whose faults on pages still
    // waiting their turn are asked for at once.
    let third = inline_clone(
        &s.desc,
        1,
        &CloneOptions {
            prefetch: Some(ws.clone().into()),
            ..Default::default()
        },
    );
    assert_eq!(third.result, s.job.expected(1));
    let p = third.prefetched.expect("a prefetch started");
    assert_eq!(p.asked, ws.len() as u64);
    let st = &third.stats;
    eprintln!(
        "in the background: {} demand faults, {} pages prefetched, {} ms",
        st.demand_faults,
        st.pages_prefetched,
        third.total.as_millis()
    );
    assert!(st.demand_faults <= first.stats.demand_faults);
    assert!(st.pages_prefetched + st.pages_demand <= ws.len() as u64);
    assert_eq!(st.duplicates, 0, "every page came once");
    s.server.shutdown().expect("server");
}

#[test]
fn a_fault_on_a_page_waiting_its_turn_in_the_prefetch_asks_for_it_at_once() {
    if !uffd_available() {
        return;
    }
    let (mem, src, held) = held_memory(64, 1);
    // Window 1: page 1 is asked for, 2, 3 and 5..=7 wait their turn (4 is zero).
    assert_eq!(mem.prefetch_start(&[1, 2, 3, 4, 5, 6, 7]), 6);
    let mem = Arc::new(mem);
    let reader = {
        let mem = mem.clone();
        std::thread::spawn(move || {
            let mut b = vec![0u8; PAGE];
            mem.read(6 * PAGE, &mut b).expect("read");
            b[0]
        })
    };
    let mut asked = Vec::new();
    for _ in 0..10_000 {
        asked = held.asked.lock().unwrap().clone();
        if asked.contains(&6) {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(asked, [1, 6], "the faulted page went ahead of the queue");
    let mut buf = vec![0u8; PAGE];
    src.read_page(6, &mut buf).expect("read");
    mem.handle().install(6, &buf);
    assert_eq!(reader.join().expect("reader"), 6);
    let st = mem.stats();
    assert_eq!(
        (st.demand_faults, st.pages_demand, st.pages_prefetched),
        (1, 1, 0)
    );
}

#[test]
fn mcdist_clone_records_a_working_set_file_and_prefetches_from_it() {
    let Some((_ns, s)) = served("prefc", 6, 47131, false) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let desc_path = dir.path().join("parent.desc");
    s.desc.save(&desc_path).expect("save");
    let ws_path = dir.path().join("parent.ws");
    let clone = |extra: &[&std::ffi::OsStr]| {
        let out = Command::new(env!("CARGO_BIN_EXE_mcdist-clone"))
            .arg("--descriptor")
            .arg(&desc_path)
            .args(["--id", "2", "--iface", "lo"])
            .args(extra)
            .output()
            .expect("run mcdist-clone");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let field = |line: &str, k: &str| -> u64 {
        let r = CloneReport::from_line(line.lines().last().unwrap_or("")).expect("report line");
        match k {
            "faults" => r.stats.demand_faults,
            "prefetched" => r.stats.pages_prefetched,
            _ => r.result.into(),
        }
    };
    let (code, out, err) = clone(&["--record-working-set".as_ref(), ws_path.as_os_str()]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(field(&out, "result"), u64::from(s.job.expected(2)));
    let text = std::fs::read_to_string(&ws_path).expect("working-set file");
    assert!(
        text.starts_with(&format!(
            "mcdist-working-set 1 pages={}\n",
            s.desc.page_count()
        )),
        "{text}"
    );
    let recorded = mcdist_kvm::clone::load_working_set(&ws_path, s.desc.page_count())
        .expect("the file reads back");
    assert!(recorded.len() as u64 >= s.job.pages_touched_per_clone(4096) - 3);

    let (code, out, err) = clone(&[
        "--prefetch".as_ref(),
        ws_path.as_os_str(),
        "--prefetch-before-start".as_ref(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(field(&out, "result"), u64::from(s.job.expected(2)));
    assert_eq!(field(&out, "prefetched"), recorded.len() as u64);
    assert_eq!(field(&out, "faults"), 0);

    // A file that is not a working set is refused with one line naming it.
    let bad = dir.path().join("bad.ws");
    std::fs::write(&bad, "hello\n").expect("write");
    let (code, out, err) = clone(&["--prefetch".as_ref(), bad.as_os_str()]);
    assert_eq!(code, Some(1));
    assert!(!out.contains("MCDIST-CLONE"), "{out}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("bad.ws") && err.contains("not a working-set file"),
        "{err}"
    );
    s.server.shutdown().expect("server");
}

#[test]
fn a_later_clone_prefetches_what_the_server_hints_it_recorded() {
    // The recorded working set is replayed and hinted (the defaults); no neighbour push, so
    // what generation 1 got is what it asked for.
    let Some((_ns, s)) = served("hint", 7, 47141, true) else {
        return;
    };
    let opts = CloneOptions {
        record_working_set: true,
        ..Default::default()
    };
    let first = inline_clone(&s.desc, 2, &opts);
    assert_eq!(first.result, s.job.expected(2));
    assert_eq!(
        s.server.stats().stats.hint_datagrams,
        0,
        "nothing recorded yet"
    );
    // A later generation (past the server's generation gap).
    std::thread::sleep(Duration::from_millis(200));
    let second = inline_clone(&s.desc, 2, &CloneOptions::default());
    assert_eq!(second.result, s.job.expected(2));
    let st = &second.stats;
    eprintln!(
        "generation 1: {} demand faults; generation 2: {} demand faults, {} prefetched, {} pushed",
        first.stats.demand_faults, st.demand_faults, st.pages_prefetched, st.pages_pushed
    );
    assert!(st.pages_prefetched > 0, "the hint was not acted on");
    assert_eq!(st.duplicates, 0);
    let snap = s.server.shutdown().expect("server");
    assert!(snap.stats.hint_datagrams >= 1);
    assert_eq!(snap.stats.hint_pages, first.working_set.len() as u64);
}
