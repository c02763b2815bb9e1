//! The threaded drivers over the in-memory network, with injected loss:
//! whole-image fetches and lazy demand requests deliver byte-identical pages.

mod common;

use common::addr;
use mcdist::client::ClientConfig;
use mcdist::node::{ClientNode, MemorySink, ServerNode};
use mcdist::server::ServerConfig;
use mcdist::source::MemSource;
use mcdist::transport::fault::{FaultConfig, FaultInjector};
use mcdist::transport::mem::MemNetwork;
use std::sync::Arc;
use std::time::Duration;

fn image(pages: usize) -> Vec<u8> {
    let mut v = vec![0u8; pages * 4096];
    for (i, b) in v.iter_mut().enumerate() {
        // Every fifth page stays zero.
        if (i / 4096) % 5 != 2 {
            *b = (i as u64).wrapping_mul(0x9e37_79b9) as u8 ^ (i >> 12) as u8;
        }
    }
    v
}

/// A server of `img` at `at` that sends only what is asked for (no neighbour push).
fn lazy_server(net: &MemNetwork, at: std::net::SocketAddr, img: &[u8]) -> ServerNode {
    ServerNode::start(
        ServerConfig {
            push_neighbors: false,
            ..ServerConfig::default()
        },
        net.endpoint(at, false),
        Arc::new(MemSource::new(img.to_vec(), 4096)),
    )
    .unwrap()
}

/// Waits (at most 10 s) until every page of `pages` is present at `node`.
fn wait_present(node: &ClientNode, pages: &[u64]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !pages.iter().all(|&p| node.is_present(p)) {
        assert!(std::time::Instant::now() < deadline, "pages never arrived");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn whole_image_to_three_clients_with_loss() {
    let img = image(600);
    let net = MemNetwork::new(1500);
    let server_addr = addr("127.0.0.1:7001");
    let cfg = ServerConfig {
        sweep: true,
        sweep_min_clients: 3,
        ..ServerConfig::default()
    };
    let server = ServerNode::start(
        cfg,
        net.endpoint(server_addr, false),
        Arc::new(MemSource::new(img.clone(), 4096)),
    )
    .unwrap();
    let mut clients = Vec::new();
    for i in 0..3u16 {
        let t = FaultInjector::new(
            net.endpoint(addr(&format!("127.0.0.{}:9000", i + 2)), true),
            FaultConfig {
                recv_loss: 0.05,
                send_loss: 0.02,
                seed: u64::from(i) + 1,
                ..FaultConfig::default()
            },
        );
        let mut c = ClientConfig::new(server_addr);
        c.seed = u64::from(i);
        let store = Arc::new(MemorySink::default());
        let node = ClientNode::start(c, t, store.clone()).unwrap();
        node.fetch_all();
        clients.push((node, store));
    }
    for (node, store) in &clients {
        node.wait_complete(Duration::from_secs(60)).unwrap();
        let m = store.pages();
        let zero = node.zero_map().expect("zero map");
        for pfn in 0..600u64 {
            let want = &img[pfn as usize * 4096..][..4096];
            if zero.get(pfn) {
                assert!(want.iter().all(|&b| b == 0));
                assert!(!m.contains_key(&pfn), "zero page {pfn} crossed the network");
            } else {
                assert_eq!(m.get(&pfn).map(Vec::as_slice), Some(want), "page {pfn}");
            }
        }
        let s = node.stats();
        assert!(
            s.nack_pages > 0 || s.retries > 0,
            "loss was injected but nothing was repaired: {s:?}"
        );
        node.leave(true);
    }
    let snap = server.shutdown().unwrap();
    assert_eq!(snap.stats.clients_completed, 3);
}

#[test]
fn lazy_requests_are_coalesced_and_served() {
    let img = image(64);
    let net = MemNetwork::new(9000);
    let server_addr = addr("127.0.0.1:7101");
    let server = lazy_server(&net, server_addr, &img);
    let store = Arc::new(MemorySink::default());
    let node = ClientNode::start(
        ClientConfig::new(server_addr),
        net.endpoint(addr("127.0.0.9:9000"), true),
        store.clone(),
    )
    .unwrap();
    let s = node.wait_session(Duration::from_secs(10)).unwrap();
    assert_eq!(s.page_count, 64);
    for _ in 0..5 {
        node.request(10);
    }
    node.request(11);
    wait_present(&node, &[10, 11]);
    let m = store.pages();
    assert_eq!(m[&10], img[10 * 4096..11 * 4096]);
    assert_eq!(m[&11], img[11 * 4096..12 * 4096]);
    assert_eq!(m.len(), 2, "only the requested pages arrive without push");
    drop(m);
    // A requested zero page (page 2 is zero) is satisfied locally once the map is known.
    assert!(node.zero_map().is_some_and(|z| z.get(2)));
    assert!(node.is_present(2));
    let stats = node.shutdown();
    assert_eq!(
        stats.pages_requested, 2,
        "five requests for one page make one: {stats:?}"
    );
    let snap = server.shutdown().unwrap();
    // The two pages, and the one hash page above them (sent ahead of them).
    assert_eq!(snap.stats.pages_sent, 3);
}

#[test]
fn client_fails_clearly_when_the_server_disappears() {
    let img = image(16);
    let net = MemNetwork::new(9000);
    let server_addr = addr("127.0.0.1:7201");
    let server = ServerNode::start(
        ServerConfig::default(),
        net.endpoint(server_addr, false),
        Arc::new(MemSource::new(img, 4096)),
    )
    .unwrap();
    let mut c = ClientConfig::new(server_addr);
    c.give_up_after = Duration::from_millis(400);
    let node = ClientNode::start(
        c,
        net.endpoint(addr("127.0.0.9:9100"), true),
        Arc::new(MemorySink::default()),
    )
    .unwrap();
    node.wait_session(Duration::from_secs(10)).unwrap();
    drop(server);
    node.request(3);
    // With the server gone (and End possibly seen), the session must fail, not hang.
    let err = node.wait_complete(Duration::from_secs(10)).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("silent") || msg.contains("ended"),
        "unexpected error: {msg}"
    );
}

#[test]
fn a_later_client_is_hinted_the_working_set_and_asks_for_it_in_windows() {
    let img = image(2000);
    let net = MemNetwork::new(9000);
    let server_addr = addr("127.0.0.1:7201");
    let server = lazy_server(&net, server_addr, &img);
    // Generation 1 asks for 600 pages (every fifth is zero and never sent).
    let wanted: Vec<u64> = (100..700).collect();
    let first = ClientNode::start(
        ClientConfig::new(server_addr),
        net.endpoint(addr("127.0.0.9:9000"), true),
        Arc::new(MemorySink::default()),
    )
    .unwrap();
    first.wait_session(Duration::from_secs(10)).unwrap();
    for &p in &wanted {
        first.request(p);
    }
    wait_present(&first, &wanted);
    // A later generation (past the server's generation gap) asks for nothing itself.
    std::thread::sleep(Duration::from_millis(200));
    let store = Arc::new(MemorySink::default());
    let later = ClientNode::start(
        ClientConfig::new(server_addr),
        net.endpoint(addr("127.0.0.10:9000"), true),
        store.clone(),
    )
    .unwrap();
    wait_present(&later, &wanted);
    let m = store.pages();
    for &p in wanted.iter().filter(|p| *p % 5 != 2) {
        let at = p as usize * 4096;
        assert_eq!(m[&p], img[at..at + 4096], "page {p}");
    }
    drop(m);
    let st = later.shutdown();
    assert_eq!(
        st.hint_pages, 480,
        "the non-zero pages generation 1 asked for"
    );
    assert_eq!(st.hints_refused, 0);
    // Every hinted page was asked for or came with the server's replay.
    assert!(st.pages_requested + st.push_pages >= 480, "{st:?}");
    // No hinted ask draws a second copy of a page the replay sent: an ask sent before the
    // replay's page arrived is suppressed however late it reaches the server. A page comes
    // twice only where the receiver asked for it again (a retry that a busy machine, holding
    // the answer back past the retransmission timer, made needless).
    assert!(st.duplicates <= st.retries, "{st:?}");
    assert_eq!(server.shutdown().unwrap().stats.hint_datagrams, 1);
}
