//! Keyed sessions over the in-memory network with the threaded drivers: an
//! attacker on the network injects a forged page, a bit-flipped page, pages
//! replayed from an earlier session and requests without the key. None of
//! them reaches the client's page store or the server's request handling, and
//! the security counters show each one.

mod common;

use common::addr;
use mcdist::client::{ClientConfig, ClientStats};
use mcdist::node::{ClientNode, MemorySink, NodeConfig, ServerNode};
use mcdist::secure::{Protection, Psk, Role, Sealer, Security, SecurityStats, TRAILER_LEN};
use mcdist::server::ServerConfig;
use mcdist::source::MemSource;
use mcdist::transport::fault::{FaultConfig, FaultInjector};
use mcdist::transport::mem::{MemNetwork, MemTransport};
use mcdist::transport::Transport;
use mcdist::wire::{self, Body, Data, HeaderFlags, Kind, Message};
use mcdist::Dest;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

const PAGE: usize = 4096;

fn image(pages: usize, salt: u8) -> Vec<u8> {
    let mut v = vec![0u8; pages * PAGE];
    for (i, b) in v.iter_mut().enumerate() {
        if (i / PAGE) % 7 != 3 {
            *b = ((i as u64).wrapping_mul(0x9e37_79b9) >> 7) as u8 ^ salt;
        }
    }
    v
}

fn psk() -> Psk {
    Psk::from_bytes(*b"mcdist test key, 32 bytes long!!")
}

fn keyed_server(
    net: &MemNetwork,
    at: SocketAddr,
    img: Vec<u8>,
    sec: Option<Security>,
    sweep: bool,
) -> ServerNode {
    let cfg = ServerConfig {
        sweep,
        push_neighbors: sweep,
        ..ServerConfig::default()
    };
    ServerNode::start(
        NodeConfig::new(cfg, sec),
        net.endpoint(at, false),
        Arc::new(MemSource::new(img, PAGE)),
    )
    .unwrap()
}

fn keyed_client<T: Transport>(
    t: T,
    server: SocketAddr,
    sec: Option<Security>,
) -> (ClientNode, Arc<MemorySink>) {
    let mut c = ClientConfig::new(server);
    c.seed = rand_seed(&t);
    let store = Arc::new(MemorySink::default());
    let node = ClientNode::start(NodeConfig::new(c, sec), t, store.clone()).unwrap();
    (node, store)
}

fn rand_seed<T: Transport>(t: &T) -> u64 {
    t.local_addr().map_or(1, |a| u64::from(a.port()) ^ 0x55)
}

/// Receive on the attacker's endpoint until `pred` matches or 5 s pass.
fn capture(t: &mut MemTransport, mut pred: impl FnMut(&[u8]) -> bool) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65_536];
    while Instant::now() < deadline {
        if let Some(r) = t.recv(&mut buf, Some(Duration::from_millis(50))).unwrap() {
            if pred(&buf[..r.len]) {
                return buf[..r.len].to_vec();
            }
        }
    }
    panic!("the attacker captured nothing matching");
}

fn kind(d: &[u8]) -> u8 {
    d[3]
}

fn session_of(d: &[u8]) -> u64 {
    u64::from_be_bytes(d[8..16].try_into().unwrap())
}

/// Wait until `f` holds for the counters, or fail showing them.
fn wait_stats(what: &str, get: impl Fn() -> SecurityStats, f: impl Fn(&SecurityStats) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = get();
        if f(&s) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: counters stayed at {s:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `get()` once it reads the same for 300 ms, three reads 100 ms apart (the traffic it
/// counts has settled, also where a busy machine holds a datagram back for tens of
/// milliseconds between one node's count and the other's; at most 10 s).
fn settled<T: PartialEq + std::fmt::Debug>(get: impl Fn() -> T) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = get();
    let mut same = 0;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = get();
        if now == last {
            same += 1;
            if same == 3 {
                return now;
            }
        } else {
            same = 0;
        }
        assert!(Instant::now() < deadline, "still moving: {now:?}");
        last = now;
    }
}

/// A plain mcdist message with room for a trailer.
fn emit(m: &Message<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; m.buffer_len() + TRAILER_LEN];
    let n = m.emit(&mut buf).unwrap();
    buf.truncate(n);
    buf
}

fn sealed(s: &mut Sealer, mut plain: Vec<u8>) -> Vec<u8> {
    let n = plain.len();
    plain.resize(n + TRAILER_LEN, 0);
    let n = s.seal(&mut plain, n).unwrap();
    plain.truncate(n);
    plain
}

#[test]
fn attacks_never_reach_the_page_store() {
    let pages = 64;
    let img_a = image(pages, 0x11);
    let img_b = image(pages, 0x22);
    let net = MemNetwork::new(9000);
    let srv = addr("127.0.0.1:7001");
    let sec = Security::new(psk());
    let mut attacker = net.endpoint(addr("127.0.0.66:6666"), true);

    // An earlier session (image A): the attacker records its announce and a page.
    let server_a = keyed_server(&net, srv, img_a, Some(sec.clone()), false);
    let (c_a, _) = keyed_client(
        net.endpoint(addr("127.0.0.2:9000"), true),
        srv,
        Some(sec.clone()),
    );
    c_a.request(1);
    let old_page = capture(&mut attacker, |d| kind(d) == Kind::Data as u8);
    let old_announce = capture(&mut attacker, |d| kind(d) == Kind::Announce as u8);
    assert_eq!(session_of(&old_page), server_a.session_id());
    assert!(
        HeaderFlags::from_bits_retain(old_page[4]).contains(HeaderFlags::ENCRYPTED),
        "pages are encrypted by default"
    );
    drop(c_a);
    drop(server_a);

    // The current session (image B). A genuine client fetches page 7; the
    // attacker records that datagram to tamper with it.
    let server_b = keyed_server(&net, srv, img_b.clone(), Some(sec.clone()), false);
    let sid = server_b.session_id();
    let (c_b2, store_b2) = keyed_client(
        net.endpoint(addr("127.0.0.4:9000"), true),
        srv,
        Some(sec.clone()),
    );
    c_b2.request(7);
    let genuine_b = capture(&mut attacker, |d| {
        kind(d) == Kind::Data as u8 && session_of(d) == sid
    });
    c_b2.wait_session(Duration::from_secs(5)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while store_b2.is_empty() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(c_b2);

    // The victim joins session B and asks for nothing yet.
    let victim = addr("127.0.0.3:9000");
    let (client, store) = keyed_client(net.endpoint(victim, true), srv, Some(sec.clone()));
    let info = client.wait_session(Duration::from_secs(5)).unwrap();
    assert_eq!(info.session_id, sid);
    let cstats = || client.security_stats().expect("keyed client");
    let base = cstats();
    let to_victim = Dest::Peer(victim);

    // 1. A forged page: right session, made-up contents, sealed under a wrong key.
    let evil = vec![0xeeu8; PAGE];
    let forged = Message {
        session: sid,
        seq: 99,
        flags: HeaderFlags::empty(),
        body: Body::Data(Data {
            pfn: 0,
            frag_index: 0,
            frag_count: 1,
            flags: mcdist::wire::DataFlags::empty(),
            payload: &evil,
        }),
    };
    let mut wrong = Sealer::new(&Security::new(Psk::generate()), Role::Server);
    attacker
        .send(to_victim, &sealed(&mut wrong, emit(&forged)))
        .unwrap();
    // ... and the same page with no authentication at all.
    attacker.send(to_victim, &emit(&forged)).unwrap();
    // 2. A genuine page of this session with one bit flipped in the payload.
    let mut flipped = genuine_b.clone();
    let i = wire::HEADER_LEN + wire::DATA_FIXED_LEN + 100;
    flipped[i] ^= 0x04;
    attacker.send(to_victim, &flipped).unwrap();
    // 3. A page and an announce replayed from the earlier session, and the
    //    page again with its header rewritten to the current session.
    attacker.send(to_victim, &old_page).unwrap();
    attacker.send(to_victim, &old_announce).unwrap();
    let mut rewritten = old_page.clone();
    rewritten[8..16].copy_from_slice(&sid.to_be_bytes());
    attacker.send(to_victim, &rewritten).unwrap();

    wait_stats("victim", cstats, |s| {
        s.bad_tag - base.bad_tag == 3
            && s.unauthenticated - base.unauthenticated == 1
            && s.other_session - base.other_session == 2
    });
    let after = cstats();
    println!("victim security counters after the attack: {after:?}");
    assert_eq!(after.replayed, base.replayed);
    assert_eq!(store.len(), 0, "an injected page reached the page store");

    // 4. Requests from a sender without the key reach no request handling.
    let sstats = || server_b.security_stats().expect("keyed server");
    let sbase = sstats();
    // Requests the victim or the earlier client still had in flight are
    // counted before the attack, on both sides.
    let requests = || {
        (
            server_b.stats().stats.requests,
            client.stats().requests_sent,
        )
    };
    let (requests_before, victim_requests_before) = settled(requests);
    let ranges = [wire::PageRange { start: 0, len: 64 }];
    let mut enc = Vec::new();
    wire::encode_ranges(&ranges, &mut enc);
    let req = Message {
        session: sid,
        seq: 1,
        flags: HeaderFlags::empty(),
        body: Body::Request(wire::Request {
            rx_rate: 0,
            loss_permille: 0,
            flags: mcdist::wire::RequestFlags::empty(),
            heard_seq: 0,
            ranges: wire::ranges_from_encoded(&enc),
        }),
    };
    let mut wrong_client = Sealer::new(&Security::new(Psk::generate()), Role::Client);
    attacker.send(Dest::Peer(srv), &emit(&req)).unwrap();
    attacker
        .send(Dest::Peer(srv), &sealed(&mut wrong_client, emit(&req)))
        .unwrap();
    // A genuine client's request replayed by the attacker is a replay.
    let mut good_client = Sealer::new(&sec, Role::Client);
    let good = sealed(&mut good_client, emit(&req));
    attacker.send(Dest::Peer(srv), &good).unwrap();
    attacker.send(Dest::Peer(srv), &good).unwrap();
    wait_stats("server", sstats, |s| {
        s.unauthenticated - sbase.unauthenticated == 1
            && s.bad_tag - sbase.bad_tag == 1
            && s.replayed - sbase.replayed == 1
    });
    // The victim itself asks for the hash page above the pages the authentic request made
    // the server multicast (it was multicast before the victim joined).
    let (requests_after, victim_requests_after) = settled(requests);
    let victim_requests = victim_requests_after - victim_requests_before;
    assert_eq!(
        requests_after,
        requests_before + 1 + victim_requests,
        "only the one authentic request counts (victim sent {victim_requests}; server security \
         counters {:?})",
        sstats()
    );
    println!("server security counters: {:?}", sstats());

    // The victim still fetches the whole image, and holds only true pages.
    client.fetch_all();
    client.wait_complete(Duration::from_secs(30)).unwrap();
    let m = store.pages();
    let zero = client.zero_map().expect("zero map");
    for pfn in 0..pages as u64 {
        let want = &img_b[pfn as usize * PAGE..][..PAGE];
        match m.get(&pfn) {
            Some(got) => assert!(got == want, "page {pfn} differs from the image"),
            None => assert!(zero.get(pfn), "page {pfn} missing"),
        }
    }
    assert_eq!(cstats().bad_tag, after.bad_tag);
}

#[test]
fn clients_without_the_key_get_nothing() {
    let net = MemNetwork::new(9000);
    let srv = addr("127.0.0.1:7001");
    let server = keyed_server(&net, srv, image(16, 1), Some(Security::new(psk())), false);
    // No key at all, and a wrong key.
    let (plain, plain_store) = keyed_client(net.endpoint(addr("127.0.0.2:9000"), true), srv, None);
    let (wrong, wrong_store) = keyed_client(
        net.endpoint(addr("127.0.0.3:9000"), true),
        srv,
        Some(Security::new(Psk::generate())),
    );
    plain.request(0);
    wrong.request(0);
    assert!(plain.wait_session(Duration::from_millis(700)).is_err());
    assert!(wrong.wait_session(Duration::from_millis(10)).is_err());
    let s = server.security_stats().unwrap();
    println!("server: {s:?}; keyless client: {:?}", plain.stats());
    assert!(s.unauthenticated > 0, "the keyless joins were counted");
    assert!(s.bad_tag > 0, "the wrong-key joins were counted");
    assert_eq!(s.opened, 0);
    // The wrong-key client drops every announce of the real server.
    assert!(wrong.security_stats().unwrap().bad_tag > 0);
    assert_eq!(server.stats().clients, 0);
    assert_eq!(plain_store.len() + wrong_store.len(), 0);
}

#[test]
fn keyed_whole_image_fetch_with_loss_in_both_modes() {
    for protection in [Protection::Encrypted, Protection::AuthOnly] {
        let sec = Security {
            protection,
            ..Security::new(psk())
        };
        let cfg = ServerConfig {
            sweep: true,
            sweep_min_clients: 2,
            ..ServerConfig::default()
        };
        let faults = |i: u16| FaultConfig {
            recv_loss: 0.03,
            send_loss: 0.02,
            seed: u64::from(i) + 7,
            ..FaultConfig::default()
        };
        let (server, _) = keyed_lossy_fetch(cfg, 300, 0x33, &sec, faults);
        let s = server.security_stats().unwrap();
        println!("{protection:?}: server {s:?}");
        assert!(s.sealed > 0 && s.opened > 0);
        assert_eq!(s.bad_tag + s.unauthenticated, 0);
    }
}

/// A keyed server with `cfg` and two keyed clients behind fault injectors
/// fetch an image of `pages` pages; every copy is checked byte for byte and no
/// client saw anything forged. Returns the server and the clients' counters.
fn keyed_lossy_fetch(
    cfg: ServerConfig,
    pages: usize,
    salt: u8,
    sec: &Security,
    faults: impl Fn(u16) -> FaultConfig,
) -> (ServerNode, Vec<ClientStats>) {
    let img = image(pages, salt);
    let net = MemNetwork::new(1500);
    let srv = addr("127.0.0.1:7001");
    let server = ServerNode::start(
        NodeConfig::new(cfg, Some(sec.clone())),
        net.endpoint(srv, false),
        Arc::new(MemSource::new(img.clone(), PAGE)),
    )
    .unwrap();
    let mut clients = Vec::new();
    for i in 0..2u16 {
        let t = FaultInjector::new(
            net.endpoint(addr(&format!("127.0.0.{}:9000", i + 2)), true),
            faults(i),
        );
        let (node, store) = keyed_client(t, srv, Some(sec.clone()));
        node.fetch_all();
        clients.push((node, store));
    }
    let mut stats = Vec::new();
    for (node, store) in &clients {
        node.wait_complete(Duration::from_secs(60)).unwrap();
        let m = store.pages();
        let zero = node.zero_map().unwrap();
        for pfn in 0..pages as u64 {
            match m.get(&pfn) {
                Some(got) => assert!(got[..] == img[pfn as usize * PAGE..][..PAGE]),
                None => assert!(zero.get(pfn), "{:?}: page {pfn} missing", sec.protection),
            }
        }
        let s = node.security_stats().unwrap();
        assert!(s.opened > 0);
        // Nothing forged was on this network: only loss.
        assert_eq!(s.bad_tag + s.unauthenticated + s.malformed, 0, "{s:?}");
        stats.push(node.stats());
    }
    (server, stats)
}

#[test]
fn keyed_client_follows_a_restarted_server() {
    let img = image(32, 0x44);
    let net = MemNetwork::new(9000);
    let srv = addr("127.0.0.1:7001");
    let sec = Security::new(psk());
    let first = keyed_server(&net, srv, img.clone(), Some(sec.clone()), false);
    let (client, store) = keyed_client(
        net.endpoint(addr("127.0.0.2:9000"), true),
        srv,
        Some(sec.clone()),
    );
    let s1 = client.wait_session(Duration::from_secs(5)).unwrap();
    client.request(1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !client.is_present(1) {
        assert!(Instant::now() < deadline, "page 1 never arrived");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(first);
    // The same image served again under a new random session id.
    let second = keyed_server(&net, srv, img.clone(), Some(sec), false);
    assert_ne!(second.session_id(), s1.session_id);
    client.request(2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !client.is_present(2) {
        assert!(
            Instant::now() < deadline,
            "page 2 never arrived from the restarted server: {:?} {:?}",
            client.stats(),
            client.security_stats()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(client.stats().resumes, 1);
    let m = store.pages();
    assert!(m[&1][..] == img[PAGE..2 * PAGE]);
    assert!(m[&2][..] == img[2 * PAGE..3 * PAGE]);
}

/// FEC repair datagrams are sealed and opened like every other datagram (their
/// size leaves room for the trailer) and restore lost pages in an encrypted
/// session over threaded nodes.
#[test]
fn keyed_fetch_with_fec_repairs() {
    let sec = Security::new(psk());
    let cfg = ServerConfig {
        sweep: true,
        sweep_min_clients: 2,
        fec: true,
        fec_min_overhead: 0.2,
        fec_block_pages: 16,
        ..ServerConfig::default()
    };
    let faults = |i: u16| FaultConfig {
        recv_loss: 0.04,
        seed: u64::from(i) + 11,
        ..FaultConfig::default()
    };
    let (server, stats) = keyed_lossy_fetch(cfg, 400, 0x66, &sec, faults);
    for st in stats {
        assert!(st.fec_repairs > 0 && st.fec_pages > 0, "{st:?}");
        assert_eq!(st.fec_repairs_refused, 0, "{st:?}");
    }
    assert!(server.stats().stats.fec_repairs > 0);
}
