//! Benchmarks for mcdist: criterion benches and the end-to-end bench binary.
//!
//! - `cargo bench -p mcdist-benches --bench wire`: datagram encode and decode.
//! - `cargo bench -p mcdist-benches --bench state_machines`: server and client
//!   state-machine throughput (pages/s) and fault-to-install latency through a
//!   sans-IO server/client pair.
//! - `mcdist-bench` (binary): whole-image distribution over network namespaces,
//!   mcdist against uftp and udpcast; see `benches/README.md`.
//!
//! This library holds the helpers the benches share: a deterministic image
//! generator and a sans-IO server/client pair wired back to back; [`e2e`]
//! holds the end-to-end bench's runners and reports.

pub mod e2e;

use mcdist::client::{Client, ClientConfig, ClientEvent};
use mcdist::server::{Server, ServerConfig};
use mcdist::source::MemSource;
use mcdist::Dest;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A deterministic image of `pages` pages of `page_size` bytes; every
/// `zero_every`-th page (if nonzero) is all zero.
pub fn image(pages: usize, page_size: usize, zero_every: usize) -> Vec<u8> {
    let mut v = vec![0u8; pages * page_size];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for (i, page) in v.chunks_exact_mut(page_size).enumerate() {
        if zero_every != 0 && i % zero_every == zero_every - 1 {
            continue;
        }
        for c in page.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
    }
    v
}

/// The server's request address used by [`Pair`].
pub const SERVER_ADDR: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    7001,
));
/// The client's address used by [`Pair`].
pub const CLIENT_ADDR: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    7002,
));

/// A server configuration with pacing effectively off (for throughput benches).
pub fn unpaced_server_config() -> ServerConfig {
    let mut cfg = ServerConfig {
        session_id: Some(0x1234_5678_9abc_def1),
        max_datagram: 8192,
        ..ServerConfig::default()
    };
    cfg.rate.cap = u64::MAX / 4;
    cfg.rate.initial = u64::MAX / 8;
    cfg.rate.floor = u64::MAX / 8;
    cfg.per_source_page_rate = u64::MAX / 8;
    cfg
}

/// A sans-IO server and client connected back to back with no loss; the
/// driver moves datagrams between them in the caller's virtual time.
pub struct Pair {
    /// The server.
    pub server: Server,
    /// The client.
    pub client: Client,
    /// Virtual now.
    pub now: Instant,
    buf: Vec<u8>,
    /// Pages the client lent during the last step: (pfn, length).
    lent: Vec<(u64, usize)>,
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair").field("now", &self.now).finish()
    }
}

impl Pair {
    /// A pair serving `image` in 4 KiB pages, with the client joined and
    /// holding the session and zero map. Push and sweep are off so only
    /// demand moves pages.
    pub fn new(image: Vec<u8>) -> Pair {
        Pair::with_config(image, unpaced_server_config())
    }

    /// A pair like [`Pair::new`] whose server otherwise runs `cfg` (its
    /// datagram size and FEC setting are what the client joins with), so a
    /// client can be fed datagrams recorded from a server of the same `cfg`.
    pub fn with_config(image: Vec<u8>, cfg: ServerConfig) -> Pair {
        let now = Instant::now();
        let cfg = ServerConfig {
            push_neighbors: false,
            working_set_push: false,
            sweep: false,
            lockstep_window: Duration::ZERO,
            ..cfg
        };
        let source = Arc::new(MemSource::new(image, 4096));
        let server = Server::with_info(
            cfg,
            source.clone(),
            mcdist::source::scan(source.as_ref()).expect("an in-memory image scans"),
            now,
        )
        .expect("valid bench server configuration");
        let mut ccfg = ClientConfig::new(SERVER_ADDR);
        ccfg.max_datagram = 8192;
        let client = Client::new(ccfg, now);
        let mut p = Pair {
            server,
            client,
            now,
            buf: vec![0u8; 65_536],
            lent: Vec::new(),
        };
        for _ in 0..64 {
            p.step();
            if p.client.zero_map_complete() && p.client.session().is_some() {
                break;
            }
        }
        while p.client.poll_event().is_some() {}
        p
    }

    /// Move every datagram each side has to send to the other side once.
    /// Returns the number of datagrams moved.
    pub fn step(&mut self) -> usize {
        let mut moved = 0;
        self.now += Duration::from_micros(1);
        self.client.handle_timeout(self.now);
        while let Some(t) = self.client.poll_transmit(self.now, &mut self.buf) {
            if t.dest == Dest::Peer(SERVER_ADDR) || t.dest == Dest::Group {
                self.server
                    .handle_datagram(self.now, CLIENT_ADDR, &self.buf[..t.len]);
            }
            moved += 1;
        }
        self.server.handle_timeout(self.now);
        while let Some(t) = self.server.poll_transmit(self.now, &mut self.buf) {
            // The drivers' entry point: a page that arrived whole is lent.
            let (now, lent) = (self.now, &mut self.lent);
            self.client.handle_datagram_borrowed(
                now,
                SERVER_ADDR,
                &self.buf[..t.len],
                &mut |pfn, p| lent.push((pfn, p.len())),
            );
            moved += 1;
        }
        moved
    }

    /// Fault on `pfn`: request it and drive the pair until the client reports
    /// it ready. Returns the page's length, or `None` if it never arrived.
    pub fn fault(&mut self, pfn: u64) -> Option<usize> {
        self.client.request_page(self.now, pfn);
        for _ in 0..16 {
            self.step();
            if let Some(&(_, len)) = self.lent.iter().find(|(p, _)| *p == pfn) {
                self.lent.clear();
                return Some(len);
            }
            self.lent.clear();
            while let Some(ev) = self.client.poll_event() {
                if let ClientEvent::PageReady { pfn: p, data } = ev {
                    if p == pfn {
                        return Some(data.len());
                    }
                }
            }
        }
        None
    }
}
