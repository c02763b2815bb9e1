//! Lockstep suppression, observed: clones faulting on the same pages together
//! make the server send each page about once, far fewer than the requests it
//! gets, and fewer than with suppression off (the window set to zero).

use mcdist::server::ServerConfig;
use mcdist::sim::{test_image, ClientSpec, LinkConfig, Sim};
use std::time::Duration;

const PAGES: usize = 512;
const PS: usize = 4096;

struct Run {
    pages_sent: u64,
    pages_requested: u64,
    suppressed: u64,
    client_requests: u64,
}

fn lockstep(clients: usize, window: Duration, seed: u64) -> Run {
    let img = test_image(PAGES, PS, 0, seed);
    let cfg = ServerConfig {
        session_id: Some(0x10c5),
        max_datagram: 9000,
        lockstep_window: window,
        // Push off so that every page is sent only on demand.
        push_neighbors: false,
        ..ServerConfig::default()
    };
    let mut sim = Sim::new(seed, cfg, img, PS).unwrap();
    // The same fault sequence for every clone, started together: lockstep.
    let pages: Vec<u64> = (0..128u64).map(|i| (i * 37) % PAGES as u64).collect();
    for _ in 0..clients {
        let mut spec = ClientSpec::faults(0.0, pages.clone(), Duration::from_micros(50));
        // A little jitter so requests do not arrive at the very same instant.
        spec.uplink = LinkConfig {
            jitter: Duration::from_micros(300),
            ..LinkConfig::default()
        };
        spec.config.want_zero_map = false;
        sim.add_client(spec);
    }
    assert!(sim.drive(Duration::from_secs(30)).unwrap());
    sim.verify().unwrap();
    for c in sim.clients() {
        assert!(c.finished() && c.failed.is_none());
    }
    let s = sim.server().stats();
    Run {
        pages_sent: s.pages_sent,
        pages_requested: s.pages_requested,
        suppressed: s.suppressed_lockstep + s.suppressed_in_flight + s.suppressed_queued,
        client_requests: sim
            .clients()
            .iter()
            .map(|c| c.client.stats().pages_requested + c.client.stats().retries)
            .sum(),
    }
}

#[test]
fn lockstep_suppression_cuts_server_sends() {
    let on = lockstep(16, Duration::from_millis(5), 3);
    let off = lockstep(16, Duration::ZERO, 3);
    eprintln!(
        "window 5ms: sent {} for {} requested pages ({} client requests, {} suppressed); window 0: sent {} for {}",
        on.pages_sent, on.pages_requested, on.client_requests, on.suppressed, off.pages_sent, off.pages_requested
    );
    // 128 distinct pages, asked for by 16 clones each.
    assert!(
        on.pages_requested >= 16 * 128 / 2,
        "requests did not reach the server"
    );
    // With suppression the server sends each page about once.
    assert!(
        on.pages_sent <= 128 * 2,
        "sent {} pages for 128 distinct faults",
        on.pages_sent
    );
    assert!(on.pages_sent * 4 <= on.pages_requested);
    assert!(on.suppressed > 0);
    // Without the window the duplicate requests turn into duplicate sends.
    assert!(
        off.pages_sent >= on.pages_sent * 2,
        "window 0 sent {} vs {} with the window",
        off.pages_sent,
        on.pages_sent
    );
}
