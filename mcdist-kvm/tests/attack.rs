//! Forged pages at a lazy clone, on the real path: a network namespace this test creates,
//! UDP multicast on its loopback, a real memory server, a clone's lazy memory on real
//! userfaultfd fed by the inline mcdist client. An attacker inside the namespace reads the
//! session id from a captured announce and multicasts forged Data datagrams for every page
//! while the clone faults them in. The clone's memory must be the image (no forged page
//! installed) or fail closed.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use mcdist::transport::udp::{UdpConfig, UdpTransport};
use mcdist::transport::Transport;
use mcdist::wire::{Body, Data, HeaderFlags, Kind, Message, Packet};
use mcdist::Dest;
use mcdist_kvm::inline::InlineMcdist;
use mcdist_kvm::source::MemSource;
use mcdist_kvm::{Descriptor, LazyMemory, MemoryServer};

mod common;
use common::{loopback_ns, uffd_available};

const PAGE: usize = 4096;
const PAGES: usize = 256;

/// Reads the session id from the first announce seen on `group`, then multicasts forged
/// pages (every page, filled with 0xEE) until `stop`; returns the datagrams sent.
fn attacker(
    group: SocketAddrV4,
    server: SocketAddr,
    ready: mpsc::Sender<u64>,
    stop: &AtomicBool,
) -> u64 {
    let mut cfg = UdpConfig::new(group);
    cfg.iface = Some("lo".into());
    cfg.server = Some(server);
    let mut t = UdpTransport::client(&cfg).expect("attacker socket");
    let mut buf = vec![0u8; 65_536];
    let mut session = None;
    for _ in 0..500 {
        if let Ok(Some(r)) = t.recv(&mut buf, Some(Duration::from_millis(20))) {
            if let Ok(p) = Packet::new_checked(&buf[..r.len]) {
                if p.kind() == Kind::Announce {
                    session = Some(p.session());
                    break;
                }
            }
        }
    }
    let session = session.expect("no announce captured");
    let payload = vec![0xEEu8; PAGE];
    let mut sent = 0u64;
    let mut seq = 1u64 << 40;
    let mut out = vec![0u8; 65_536];
    let _ = ready.send(session);
    for _round in 0..2000 {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        for pfn in 0..PAGES as u64 {
            seq += 1;
            let m = Message {
                session,
                seq,
                flags: HeaderFlags::empty(),
                body: Body::Data(Data {
                    pfn,
                    frag_index: 0,
                    frag_count: 1,
                    flags: Data::DEMAND,
                    payload: &payload,
                }),
            };
            let n = m.emit(&mut out).expect("emit");
            if t.send(Dest::Group, &out[..n]).is_ok() {
                sent += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    sent
}

/// Runs the attack against an unkeyed or keyed session; returns the forged pages installed
/// (`None`: the clone failed closed).
fn forged_installs(keyed: bool, port: u16) -> Option<usize> {
    let ns = loopback_ns(if keyed { "atk" } else { "atu" });
    ns.enter().expect("enter netns");
    let mut image = vec![0u8; PAGES * PAGE];
    for (p, page) in image.chunks_mut(PAGE).enumerate() {
        for (i, b) in page.iter_mut().enumerate() {
            *b = (p * 7 + i % 251 + 1) as u8;
        }
    }
    let src = Arc::new(MemSource::new(image.clone(), PAGE));
    let info = mcdist_kvm::source::scan(&*src).expect("scan");
    let security = keyed.then(|| mcdist::secure::Security::new(mcdist::secure::Psk::generate()));
    let group = SocketAddrV4::new([239, 255, 77, (port % 200) as u8].into(), port);
    let listen: SocketAddr = format!("127.0.0.1:{}", port + 1).parse().expect("addr");
    let server = MemoryServer::start(
        src,
        &info.zero_map,
        info.digest,
        group,
        Some("lo"),
        listen,
        mcdist::node::NodeConfig::new(
            mcdist::ServerConfig {
                push_neighbors: false,
                working_set_push: false,
                ..Default::default()
            },
            security.clone(),
        ),
    )
    .expect("server");
    let desc = Descriptor {
        mem_size: image.len() as u64,
        page_size: PAGE as u32,
        digest: info.digest,
        session: Some(server.session().clone()),
        vcpus: Vec::new(),
        zero_map: info.zero_map.clone(),
    };
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        let atk = s.spawn(|| {
            ns.enter().expect("the attacker enters the netns");
            attacker(group, listen, tx, &stop)
        });
        let session = rx.recv().expect("attacker ready");
        assert_eq!(session, desc.session.as_ref().map_or(0, |s| s.session_id));

        let mut mem = LazyMemory::new(image.len(), info.zero_map.clone(), Default::default())
            .expect("lazy memory");
        let h = mem.handle();
        let f = InlineMcdist::connect(&desc, Some("lo"), &h, Duration::from_secs(5), |c| {
            c.security = security.clone();
        })
        .expect("join");
        mem.start(f.into_fetcher()).expect("start");
        let mem = Arc::new(mem);
        let (done_tx, done_rx) = mpsc::channel();
        {
            let mem = mem.clone();
            std::thread::spawn(move || {
                let mut got = vec![0u8; PAGES * PAGE];
                // Page by page, so that each fault races the attacker's datagrams.
                for (p, chunk) in got.chunks_mut(PAGE).enumerate() {
                    if mem.read(p * PAGE, chunk).is_err() {
                        return;
                    }
                }
                let _ = done_tx.send(got);
            });
        }
        let mut result = None;
        for _ in 0..6000 {
            match done_rx.recv_timeout(Duration::from_millis(10)) {
                Ok(got) => {
                    result = Some(got);
                    break;
                }
                Err(_) if h.is_failed() => break,
                Err(_) => {}
            }
        }
        stop.store(true, Ordering::SeqCst);
        let sent = atk.join().expect("attacker");
        let _ = server.shutdown();
        match result {
            Some(got) => {
                let forged = got
                    .chunks(PAGE)
                    .zip(image.chunks(PAGE))
                    .filter(|(a, b)| a != b)
                    .count();
                eprintln!(
                    "keyed={keyed}: {sent} forged datagrams sent, {forged} forged pages installed"
                );
                Some(forged)
            }
            None => {
                assert!(h.is_failed(), "the clone neither finished nor failed");
                eprintln!(
                    "keyed={keyed}: {sent} forged datagrams sent, the clone failed closed: {:?}",
                    h.failure()
                );
                // The reader stays blocked in its unresolved fault: keep the memory mapped.
                std::mem::forget(mem);
                None
            }
        }
    })
}

#[test]
fn forged_pages_are_never_installed_in_a_keyed_session() {
    if !uffd_available() {
        return;
    }
    if let Some(forged) = forged_installs(true, 47401) {
        assert_eq!(forged, 0, "forged pages installed");
    }
}

#[test]
fn forged_pages_are_never_installed_in_an_unkeyed_session() {
    if !uffd_available() {
        return;
    }
    if let Some(forged) = forged_installs(false, 47411) {
        assert_eq!(forged, 0, "forged pages installed");
    }
}
