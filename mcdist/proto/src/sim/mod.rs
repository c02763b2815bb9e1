//! A deterministic, virtual-time network for testing the sans-IO state machines.
//!
//! [`Sim`] drives one [`Server`] and many [`Client`]s directly, in the style of
//! quinn's `tests/util.rs` and smoltcp's `netsim`: time is virtual (a base
//! [`Instant`] plus offsets), datagrams travel through an event queue, and every
//! link has its own seeded random generator for loss (Bernoulli or
//! Gilbert–Elliott bursts), duplication, reordering and delay jitter. A client
//! may have a bounded receive capacity (a slow receiver whose queue overflows
//! drops datagrams). The same seed always gives the same run.
//!
//! Each simulated client keeps track of the pages it was handed and checks each
//! one, as it arrives, byte for byte against the image of the session it joined;
//! [`Sim::verify`] then checks completeness (zero pages included).
//!
//! Topology: the server's group traffic reaches every started, live client over
//! that client's own downlink (so loss is independent per client); unicast goes
//! over the same downlink; client requests go over the client's uplink.
//!
//! A shared bottleneck ([`Sim::set_bottleneck`]) may sit between the server and
//! every client: a queue of bounded size drained at a fixed rate, which every
//! datagram of the server crosses and which drops it for everyone when full.
//!
//! What it does not model: bandwidth of each client's own link (the server
//! paces itself; receivers may be given a capacity, and their queue's drops are
//! handed to the client as a socket's drop count), IP fragmentation, or the kernel.
//!
//! | module     | owns                                                              |
//! |------------|-------------------------------------------------------------------|
//! | `link`     | links and loss models ([`LinkConfig`], [`Loss`], [`RxCapacity`])  |
//! | `node`     | simulated clients ([`ClientSpec`], [`Workload`], [`SimClient`])   |
//! | `driver`   | virtual time, the event queue, the step loop ([`Sim::drive`])     |
//! | `scenario` | adding clients, restarts, crashes, injection, recording           |
//! | `check`    | [`Sim::verify`], [`SimError`], test images                        |
//! | `adversary`| forged sources ([`Sim::spoof`], [`Forgery`]), amplification       |

use crate::client::Client;
use crate::server::{Server, ServerConfig, ServerEvent};
use crate::source::MemSource;
use bytes::Bytes;
use driver::Ev;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod adversary;
mod check;
mod driver;
mod link;
mod node;
mod scenario;

pub use adversary::Forgery;
pub use check::{page_matches, test_image, SimError, SimNode};
pub use link::{LinkConfig, LinkStats, Loss, RxCapacity, Stalls};
pub use node::{ClientSpec, ClientState, SimClient, Workload};
pub use scenario::Recorded;

/// The simulated network, server and clients. See the module docs.
pub struct Sim {
    base: Instant,
    now: Instant,
    seed: u64,
    server: Server,
    server_image: Bytes,
    images: Vec<([u8; 32], Bytes)>,
    page_size: usize,
    clients: Vec<SimClient>,
    by_addr: HashMap<SocketAddr, usize>,
    queue: BinaryHeap<Ev>,
    ev_seq: u64,
    buf: Vec<u8>,
    /// Pages a client lent during one datagram.
    lent: Vec<(u64, Bytes)>,
    /// Server events with their virtual time since start.
    pub server_events: Vec<(Duration, ServerEvent)>,
    /// Datagrams sent to addresses nobody listens on.
    pub undeliverable: u64,
    /// Group datagrams the server sent (each counts once, whatever the receiver count).
    pub group_datagrams: u64,
    /// Unicast datagrams the server sent.
    pub server_unicast_datagrams: u64,
    /// Datagrams all clients sent.
    pub client_datagrams: u64,
    /// Datagrams that reached the server (after uplink loss), forged ones included.
    pub server_rx_datagrams: u64,
    steps: u64,
    record: Option<(usize, Vec<Recorded>)>,
    /// Bytes the server sent by unicast, per address.
    unicast_bytes: HashMap<SocketAddr, u64>,
    /// Group bytes the server sent other than announces.
    group_data_bytes: u64,
    /// Bytes forged per source address ([`Sim::spoof`]).
    spoofed_in: HashMap<SocketAddr, u64>,
    /// The shared bottleneck between the server and every client, if any.
    bottleneck: Option<RxCapacity>,
    bottleneck_busy_until: Instant,
    /// Datagrams the shared bottleneck dropped.
    pub bottleneck_drops: u64,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim")
            .field("elapsed", &self.elapsed())
            .field("clients", &self.clients.len())
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl Sim {
    /// The simulated server's address.
    pub const SERVER_ADDR: SocketAddr =
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 7000);

    /// A simulation serving `image` in pages of `page_size` with `cfg`, seeded by `seed`.
    pub fn new(
        seed: u64,
        mut cfg: ServerConfig,
        image: impl Into<Bytes>,
        page_size: usize,
    ) -> Result<Sim, SimError> {
        let base = Instant::now();
        // The same seed always gives the same run: the server's too.
        cfg.seed.get_or_insert(seed ^ 0x5e5e_5e5e);
        let image = image.into();
        let server = serve_image(cfg, image.clone(), page_size, base)?;
        Ok(Sim {
            base,
            now: base,
            seed,
            server,
            server_image: image.clone(),
            images: vec![(*blake3::hash(&image).as_bytes(), image)],
            page_size,
            clients: Vec::new(),
            by_addr: HashMap::new(),
            queue: BinaryHeap::new(),
            ev_seq: 0,
            buf: vec![0u8; 65_536],
            lent: Vec::new(),
            server_events: Vec::new(),
            undeliverable: 0,
            group_datagrams: 0,
            server_unicast_datagrams: 0,
            client_datagrams: 0,
            server_rx_datagrams: 0,
            steps: 0,
            record: None,
            unicast_bytes: HashMap::new(),
            group_data_bytes: 0,
            spoofed_in: HashMap::new(),
            bottleneck: None,
            bottleneck_busy_until: base,
            bottleneck_drops: 0,
        })
    }

    /// Put a shared bottleneck between the server and every client (`None`:
    /// none): every datagram the server sends waits in its queue, drained at
    /// `bytes_per_sec`, and is dropped for every receiver when `queue_bytes`
    /// are already waiting.
    pub fn set_bottleneck(&mut self, bottleneck: Option<RxCapacity>) {
        self.bottleneck = bottleneck;
    }

    /// Current virtual time.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Virtual time since the simulation began.
    pub fn elapsed(&self) -> Duration {
        self.now.duration_since(self.base)
    }

    /// The server state machine.
    pub fn server(&self) -> &Server {
        &self.server
    }

    /// Mutable access to the server (e.g. to close it).
    pub fn server_mut(&mut self) -> &mut Server {
        &mut self.server
    }

    /// The clients.
    pub fn clients(&self) -> &[SimClient] {
        &self.clients
    }

    /// One client.
    pub fn client(&self, i: usize) -> &SimClient {
        &self.clients[i]
    }

    /// Mutable access to one client's state machine.
    pub fn client_mut(&mut self, i: usize) -> &mut Client {
        &mut self.clients[i].client
    }

    /// The image the server currently serves.
    pub fn image(&self) -> &Bytes {
        &self.server_image
    }

    /// Pages of the current image that are not all zero.
    pub fn nonzero_pages(&self) -> u64 {
        let z = self.server.image_info().zero_map.count_ones();
        self.server.image_info().zero_map.len() - z
    }
}

/// A server for `image`, scanned first as a driver would.
pub(crate) fn serve_image(
    cfg: ServerConfig,
    image: Bytes,
    page_size: usize,
    now: Instant,
) -> Result<Server, SimError> {
    let source = Arc::new(MemSource::new(image, page_size));
    let info = crate::source::scan(source.as_ref()).map_err(crate::server::ConfigError::from)?;
    Ok(Server::with_info(cfg, source, info, now)?)
}
