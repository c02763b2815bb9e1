//! The inline fault loop: real KVM clones whose fault thread drives the mcdist client itself
//! (real userfaultfd, real UDP multicast in a network namespace this test creates).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use mcdist::secure::{Psk, Security};
use mcdist_kvm::clone::{run_clone, CloneError, CloneOptions, CloneReport};
use mcdist_kvm::guest::HashJob;
use mcdist_kvm::inline::InlineMcdist;
use mcdist_kvm::{Descriptor, FaultWait, LazyMemory};

mod common;
use common::{assert_child_lost_memory, have_kvm, in_child, loopback_ns, serve};

fn inline_clone(
    desc: &Descriptor,
    id: u32,
    opts: &CloneOptions,
    tune: impl FnOnce(&mut mcdist_kvm::session::ClientSetup),
) -> Result<CloneReport, CloneError> {
    run_clone(desc, id, opts, |h| {
        Ok(
            InlineMcdist::connect(desc, Some("lo"), &h, Duration::from_secs(5), tune)
                .map_err(CloneError::Session)?
                .into_fetcher(),
        )
    })
}

fn no_push() -> mcdist::ServerConfig {
    mcdist::ServerConfig {
        push_neighbors: false,
        working_set_push: false,
        ..Default::default()
    }
}

#[test]
fn inline_clones_compute_correct_results_in_every_wait_mode() {
    if !have_kvm() {
        return;
    }
    let ns = loopback_ns("inl");
    ns.enter().expect("enter netns");
    let s = serve(HashJob::new(32 << 20, 0.9, 0.2, 2, 4096), 47101, no_push());
    let modes = [
        (FaultWait::Block, Duration::ZERO),
        (FaultWait::Block, Duration::from_micros(200)),
        (FaultWait::Spin, Duration::ZERO),
    ];
    for (id, (wait, spin)) in modes.into_iter().enumerate() {
        let mut opts = CloneOptions::default();
        opts.lazy.wait = wait;
        opts.lazy.reply_spin = spin;
        let r = inline_clone(&s.desc, id as u32 % 2, &opts, |_| {}).expect("clone");
        assert_eq!(r.result, s.job.expected(id as u32 % 2), "{wait:?} {spin:?}");
        let st = &r.stats;
        eprintln!(
            "{wait:?} spin {spin:?}: demand faults {}, requested {}, demand {}, pushed {}, dup {}, p50 {:?}",
            st.demand_faults,
            st.pages_requested,
            st.pages_demand,
            st.pages_pushed,
            st.duplicates,
            st.fault_latency.quantile(0.5)
        );
        assert!(
            st.pages_demand >= s.job.pages_touched_per_clone(4096) - 3,
            "the slice came on demand"
        );
        // Every fetched page was asked for once and installed once (a request may still be in
        // flight when the guest exits: the stats are read while the fault thread runs).
        assert!(st.pages_fetched() <= st.pages_requested);
        assert!(st.pages_requested <= st.pages_fetched() + 2);
        assert_eq!(st.duplicates, 0);
        assert_eq!(st.fault_latency.count() as u64, st.pages_demand);
        assert_eq!(st.zero_pages_received, 0);
    }
    let snap = s.server.shutdown().expect("server");
    assert_eq!(snap.stats.zero_replies, 0, "server sent zero pages");
}

#[test]
fn lockstep_inline_clones_share_multicast_replies() {
    if !have_kvm() {
        return;
    }
    let ns = loopback_ns("inls");
    ns.enter().expect("enter netns");
    let s = serve(HashJob::new(32 << 20, 0.9, 0.2, 2, 4096), 47111, no_push());
    // Two clones with the same id touch the same pages at about the same time; both have
    // joined the group before either runs, so each sees the replies the other asked for.
    let joined = std::sync::atomic::AtomicUsize::new(0);
    let reports: Vec<CloneReport> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..2)
            .map(|_| {
                sc.spawn(|| {
                    run_clone(&s.desc, 1, &CloneOptions::default(), |h| {
                        let c = InlineMcdist::connect(
                            &s.desc,
                            Some("lo"),
                            &h,
                            Duration::from_secs(5),
                            |_| {},
                        )
                        .map_err(CloneError::Session)?;
                        // Wait for the other clone (bounded: a failed join must not hang).
                        joined.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let t0 = Instant::now();
                        while joined.load(std::sync::atomic::Ordering::SeqCst) < 2
                            && t0.elapsed() < Duration::from_secs(10)
                        {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        Ok(c.into_fetcher())
                    })
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("thread").expect("clone"))
            .collect()
    });
    let mut fetched = 0;
    for r in &reports {
        assert_eq!(r.result, s.job.expected(1));
        fetched += r.stats.pages_fetched();
    }
    let snap = s.server.shutdown().expect("server");
    eprintln!(
        "pages fetched by both clones {fetched}, server pages sent {}, pushed installs {}",
        snap.stats.pages_sent,
        reports.iter().map(|r| r.stats.pages_pushed).sum::<u64>()
    );
    // Each clone received every page of the slice, the server sent most of them once.
    assert!(
        snap.stats.pages_sent * 10 < fetched * 9,
        "server sent {} pages for {fetched} installs",
        snap.stats.pages_sent
    );
}

#[test]
fn inline_keyed_session_serves_a_clone() {
    if !have_kvm() {
        return;
    }
    let ns = loopback_ns("inlk");
    ns.enter().expect("enter netns");
    let psk = Psk::generate();
    let cfg = mcdist::node::NodeConfig::new(no_push(), Some(Security::new(psk.clone())));
    let s = serve(HashJob::new(16 << 20, 0.9, 0.1, 2, 4096), 47121, cfg);
    let r = inline_clone(&s.desc, 0, &CloneOptions::default(), |c| {
        c.security = Some(Security::new(psk))
    })
    .expect("clone");
    assert_eq!(r.result, s.job.expected(0));
    assert!(r.stats.pages_demand > 0);
    // A client without the key never joins: it sees no announce it can open.
    let lm = LazyMemory::new(
        s.desc.mem_size as usize,
        s.desc.zero_map.clone(),
        Default::default(),
    )
    .expect("lazy memory");
    let e = InlineMcdist::connect(
        &s.desc,
        Some("lo"),
        &lm.handle(),
        Duration::from_millis(500),
        |_| {},
    )
    .expect_err("keyless join");
    eprintln!("keyless client: {e}");
    drop(s.server);
}

#[test]
fn inline_clone_fails_clearly_when_its_server_disappears() {
    if !have_kvm() {
        return;
    }
    if !in_child() {
        assert_child_lost_memory("inline_clone_fails_clearly_when_its_server_disappears");
        return;
    }
    let ns = loopback_ns("inlg");
    ns.enter().expect("enter netns");
    let s = serve(HashJob::new(16 << 20, 0.5, 0.1, 5, 4096), 47131, no_push());
    let server = Mutex::new(Some(s.server));
    let mut opts = CloneOptions::default();
    opts.lazy.fetch_timeout = Duration::from_secs(4);
    let t0 = Instant::now();
    let desc = &s.desc;
    let r = run_clone(desc, 0, &opts, |h| {
        h.exit_process_on_loss().expect("watchdog");
        let f = InlineMcdist::connect(desc, Some("lo"), &h, Duration::from_secs(5), |c| {
            c.give_up_after = Duration::from_secs(2)
        })
        .map_err(CloneError::Session)?;
        // The server goes away after the clone joined, before its first fault.
        if let Some(s) = server.lock().expect("lock").take() {
            s.shutdown().expect("shutdown");
        }
        Ok(f.into_fetcher())
    });
    let took = t0.elapsed();
    match r {
        // Where the vCPU could be kicked out of its fault, the clone returns instead.
        Err(e @ CloneError::MemoryLost { id: 0, .. }) => {
            eprintln!("clone failed after {took:?}");
            eprintln!("{e}");
            std::process::exit(1);
        }
        other => panic!("expected a memory-lost error, got {other:?}"),
    }
}
