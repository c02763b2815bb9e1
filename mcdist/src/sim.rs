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
//! What it does not model: bandwidth of the links themselves (the server paces
//! itself; receivers may be given a capacity), IP fragmentation, or the kernel.

use crate::bitmap::PageBitmap;
use crate::client::{Client, ClientConfig, ClientError, ClientEvent};
use crate::server::{ConfigError, Server, ServerConfig, ServerEvent};
use crate::source::MemSource;
use crate::Dest;
use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Loss model of one link direction.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Loss {
    /// Nothing is lost.
    #[default]
    None,
    /// Each datagram is lost independently with this probability.
    Bernoulli(f64),
    /// Gilbert–Elliott two-state burst loss.
    GilbertElliott {
        /// Probability per datagram of moving from the good to the bad state.
        p_good_to_bad: f64,
        /// Probability per datagram of moving from the bad to the good state.
        p_bad_to_good: f64,
        /// Loss probability in the good state.
        loss_good: f64,
        /// Loss probability in the bad state.
        loss_bad: f64,
    },
}

impl Loss {
    /// Long-run average loss rate of the model.
    pub fn mean(&self) -> f64 {
        match *self {
            Loss::None => 0.0,
            Loss::Bernoulli(p) => p,
            Loss::GilbertElliott {
                p_good_to_bad,
                p_bad_to_good,
                loss_good,
                loss_bad,
            } => {
                let denom = p_good_to_bad + p_bad_to_good;
                if denom <= 0.0 {
                    return loss_good;
                }
                let bad = p_good_to_bad / denom;
                bad * loss_bad + (1.0 - bad) * loss_good
            }
        }
    }
}

/// Impairments of one link direction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkConfig {
    /// Loss model.
    pub loss: Loss,
    /// Probability that a datagram is delivered twice.
    pub duplicate: f64,
    /// Probability that a datagram is held back by [`LinkConfig::reorder_delay`].
    pub reorder: f64,
    /// Extra delay of a reordered datagram.
    pub reorder_delay: Duration,
    /// Fixed one-way delay.
    pub delay: Duration,
    /// Extra delay drawn uniformly from `0..jitter` for every datagram.
    pub jitter: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            loss: Loss::None,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_delay: Duration::from_millis(1),
            delay: Duration::from_micros(100),
            jitter: Duration::ZERO,
        }
    }
}

impl LinkConfig {
    /// A link with independent loss probability `p` and default delay.
    pub fn lossy(p: f64) -> LinkConfig {
        LinkConfig {
            loss: if p > 0.0 {
                Loss::Bernoulli(p)
            } else {
                Loss::None
            },
            ..LinkConfig::default()
        }
    }
}

/// A receiver that processes at most `bytes_per_sec` and queues at most
/// `queue_bytes`; datagrams arriving at a full queue are dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxCapacity {
    /// Processing rate, bytes per second.
    pub bytes_per_sec: u64,
    /// Receive queue (socket buffer) size in bytes.
    pub queue_bytes: u64,
}

/// What a simulated client does once started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Workload {
    /// Fetch the whole image ([`Client::fetch_all`]).
    FetchAll,
    /// Fault on these pages one after another, like a vCPU: each fault waits for
    /// its page, then the next comes `think` later.
    Faults {
        /// Pages in fault order.
        pages: Vec<u64>,
        /// Time between getting one page and faulting on the next.
        think: Duration,
    },
    /// Join and do nothing else.
    Idle,
}

/// How one simulated client is set up.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    /// Client settings; `server` is overwritten with the simulated server's address.
    pub config: ClientConfig,
    /// Server → client impairments (group and unicast).
    pub downlink: LinkConfig,
    /// Client → server impairments.
    pub uplink: LinkConfig,
    /// Receive capacity; `None` is unlimited.
    pub rx_capacity: Option<RxCapacity>,
    /// What the client does.
    pub workload: Workload,
    /// Virtual time at which the client starts.
    pub start_at: Duration,
    /// Virtual time at which the client crashes (stops sending and receiving).
    pub crash_at: Option<Duration>,
}

impl ClientSpec {
    /// A whole-image fetch over links with loss `p`, both ways, starting at once.
    pub fn fetch_all(loss: f64) -> ClientSpec {
        ClientSpec {
            config: ClientConfig::new(Sim::SERVER_ADDR),
            downlink: LinkConfig::lossy(loss),
            uplink: LinkConfig::lossy(loss),
            rx_capacity: None,
            workload: Workload::FetchAll,
            start_at: Duration::ZERO,
            crash_at: None,
        }
    }

    /// A demand-fault workload over links with loss `p`.
    pub fn faults(loss: f64, pages: Vec<u64>, think: Duration) -> ClientSpec {
        ClientSpec {
            workload: Workload::Faults { pages, think },
            ..ClientSpec::fetch_all(loss)
        }
    }
}

/// Per-link counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Datagrams offered to the link.
    pub offered: u64,
    /// Datagrams the loss model dropped.
    pub lost: u64,
    /// Extra copies delivered.
    pub duplicated: u64,
    /// Datagrams held back for reordering.
    pub reordered: u64,
}

#[derive(Debug)]
struct Link {
    cfg: LinkConfig,
    rng: SmallRng,
    bad: bool,
    stats: LinkStats,
}

impl Link {
    fn new(cfg: LinkConfig, seed: u64) -> Link {
        Link {
            cfg,
            rng: SmallRng::seed_from_u64(seed),
            bad: false,
            stats: LinkStats::default(),
        }
    }

    /// Arrival offsets (from now) of the copies of one datagram that survive.
    fn transmit(&mut self) -> ([Option<Duration>; 2], usize) {
        self.stats.offered += 1;
        let lost = match self.cfg.loss {
            Loss::None => false,
            Loss::Bernoulli(p) => self.rng.random_bool(p.clamp(0.0, 1.0)),
            Loss::GilbertElliott {
                p_good_to_bad,
                p_bad_to_good,
                loss_good,
                loss_bad,
            } => {
                let flip = if self.bad {
                    p_bad_to_good
                } else {
                    p_good_to_bad
                };
                if self.rng.random_bool(flip.clamp(0.0, 1.0)) {
                    self.bad = !self.bad;
                }
                let p = if self.bad { loss_bad } else { loss_good };
                self.rng.random_bool(p.clamp(0.0, 1.0))
            }
        };
        if lost {
            self.stats.lost += 1;
            return ([None, None], 0);
        }
        let copies = if self.rng.random_bool(self.cfg.duplicate.clamp(0.0, 1.0)) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        let mut out = [None, None];
        for slot in out.iter_mut().take(copies) {
            let mut d = self.cfg.delay;
            if !self.cfg.jitter.is_zero() {
                d += self.cfg.jitter.mul_f64(self.rng.random_range(0.0..1.0f64));
            }
            if self.rng.random_bool(self.cfg.reorder.clamp(0.0, 1.0)) {
                self.stats.reordered += 1;
                d += self.cfg.reorder_delay;
            }
            *slot = Some(d);
        }
        (out, copies)
    }
}

/// Lifecycle of a simulated client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    /// Not started yet (late joiner).
    Waiting,
    /// Running.
    Running,
    /// Crashed: sends and receives nothing.
    Crashed,
}

/// A simulated client: the state machine, its links and what it was handed.
#[derive(Debug)]
pub struct SimClient {
    /// Its address.
    pub addr: SocketAddr,
    /// The state machine.
    pub client: Client,
    /// Lifecycle.
    pub state: ClientState,
    /// Pages handed over by [`ClientEvent::PageReady`].
    pub ready: PageBitmap,
    /// Pages whose bytes differed from the source (must stay empty).
    pub mismatches: Vec<u64>,
    /// Pages reported ready more than once (must stay zero).
    pub double_ready: u64,
    /// Virtual time of [`ClientEvent::Complete`] (or of the last fault of a
    /// fault workload), since the client started.
    pub finished_after: Option<Duration>,
    /// The failure, if any, and when (since the simulation began).
    pub failed: Option<(Duration, ClientError)>,
    /// Fault latencies of a fault workload, in order.
    pub fault_latencies: Vec<Duration>,
    /// Datagrams dropped at a full receive queue.
    pub rx_overflows: u64,
    /// Datagrams received by this client (after the receive queue).
    pub rx_datagrams: u64,
    /// Times the client saw a session resume.
    pub resumes: u64,
    spec: ClientSpec,
    down: Link,
    up: Link,
    busy_until: Instant,
    image: Option<Bytes>,
    started_at: Option<Instant>,
    fault_idx: usize,
    fault_started: Option<Instant>,
    next_fault_at: Option<Instant>,
}

impl SimClient {
    /// The spec it was built from.
    pub fn spec(&self) -> &ClientSpec {
        &self.spec
    }
    /// Downlink counters.
    pub fn downlink_stats(&self) -> LinkStats {
        self.down.stats
    }
    /// Uplink counters.
    pub fn uplink_stats(&self) -> LinkStats {
        self.up.stats
    }
    /// True when the client completed its workload.
    pub fn finished(&self) -> bool {
        self.finished_after.is_some()
    }
    /// True once the client needs no more driving: finished, failed or crashed.
    pub fn settled(&self) -> bool {
        self.state == ClientState::Crashed || self.finished() || self.failed.is_some()
    }
}

/// A problem the simulation found.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SimError {
    /// The server could not be built.
    #[error("server configuration: {0}")]
    Config(String),
    /// A client was handed bytes that differ from the source.
    #[error("client {client}: page {pfn} differs from the source")]
    PageMismatch {
        /// Client index.
        client: usize,
        /// Page.
        pfn: u64,
    },
    /// A client was handed a page twice.
    #[error("client {client}: {count} page(s) reported ready twice")]
    DoubleReady {
        /// Client index.
        client: usize,
        /// How many.
        count: u64,
    },
    /// A client claims completion but a page is neither handed over nor a verified zero page.
    #[error("client {client}: complete but page {pfn} is missing or wrongly marked zero")]
    MissingPage {
        /// Client index.
        client: usize,
        /// Page.
        pfn: u64,
    },
    /// The simulation stopped making progress (time does not advance).
    #[error("simulation stalled at {at:?}: the {who} keeps asking to run now")]
    Stalled {
        /// Virtual time since the start.
        at: Duration,
        /// Which node's timeout stays in the past.
        who: String,
    },
}

impl From<ConfigError> for SimError {
    fn from(e: ConfigError) -> Self {
        SimError::Config(e.to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    Server,
    Client(usize),
}

#[derive(Debug)]
struct Ev {
    at: Instant,
    seq: u64,
    to: Node,
    from: SocketAddr,
    data: Bytes,
    /// Already passed the receiver's queue.
    queued: bool,
}

impl PartialEq for Ev {
    fn eq(&self, o: &Self) -> bool {
        self.at == o.at && self.seq == o.seq
    }
}
impl Eq for Ev {}
impl PartialOrd for Ev {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Ev {
    fn cmp(&self, o: &Self) -> Ordering {
        // Min-heap on (time, insertion order).
        o.at.cmp(&self.at).then(o.seq.cmp(&self.seq))
    }
}

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
    steps: u64,
    record: Option<(usize, Vec<Recorded>)>,
}

/// A datagram captured by [`Sim::record`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// True when the server sent it, false when a client did.
    pub from_server: bool,
    /// The datagram.
    pub data: Bytes,
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
        cfg: ServerConfig,
        image: impl Into<Bytes>,
        page_size: usize,
    ) -> Result<Sim, SimError> {
        let base = Instant::now();
        let image = image.into();
        let server = Server::new(
            cfg,
            Arc::new(MemSource::new(image.clone(), page_size)),
            base,
        )?;
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
            server_events: Vec::new(),
            undeliverable: 0,
            group_datagrams: 0,
            server_unicast_datagrams: 0,
            client_datagrams: 0,
            steps: 0,
            record: None,
        })
    }

    /// Capture the first `max` datagrams sent from now on (e.g. for a fuzzing corpus).
    pub fn record(&mut self, max: usize) {
        self.record = Some((max, Vec::new()));
    }

    /// Datagrams captured since [`Sim::record`].
    pub fn recorded(&self) -> &[Recorded] {
        self.record.as_ref().map_or(&[], |r| &r.1)
    }

    fn capture(&mut self, from_server: bool, data: &Bytes) {
        if let Some((max, v)) = &mut self.record {
            if v.len() < *max {
                v.push(Recorded {
                    from_server,
                    data: data.clone(),
                });
            }
        }
    }

    /// Add a client; returns its index. Its address is derived from the index.
    pub fn add_client(&mut self, mut spec: ClientSpec) -> usize {
        let i = self.clients.len();
        let addr = SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(10, 1, (i / 250) as u8, (i % 250) as u8 + 2)),
            9000,
        );
        spec.config.server = Sim::SERVER_ADDR;
        let mix = |k: u64| {
            self.seed
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add((i as u64) << 8 | k)
        };
        spec.config.seed = mix(1);
        let start = self.base + spec.start_at;
        let client = Client::new(spec.config.clone(), start.max(self.now));
        self.clients.push(SimClient {
            addr,
            client,
            state: ClientState::Waiting,
            ready: PageBitmap::new(0),
            mismatches: Vec::new(),
            double_ready: 0,
            finished_after: None,
            failed: None,
            fault_latencies: Vec::new(),
            rx_overflows: 0,
            rx_datagrams: 0,
            resumes: 0,
            down: Link::new(spec.downlink, mix(2)),
            up: Link::new(spec.uplink, mix(3)),
            busy_until: self.now,
            image: None,
            started_at: None,
            fault_idx: 0,
            fault_started: None,
            next_fault_at: None,
            spec,
        });
        self.by_addr.insert(addr, i);
        i
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

    /// Crash client `i` now: it sends and receives nothing from here on.
    pub fn crash_client(&mut self, i: usize) {
        self.clients[i].state = ClientState::Crashed;
    }

    /// Replace the server with a fresh one serving `image` (same address), as if
    /// the server process restarted. Datagrams in flight reach the new server.
    pub fn restart_server(
        &mut self,
        cfg: ServerConfig,
        image: impl Into<Bytes>,
    ) -> Result<(), SimError> {
        let image = image.into();
        self.server = Server::new(
            cfg,
            Arc::new(MemSource::new(image.clone(), self.page_size)),
            self.now,
        )?;
        self.server_image = image.clone();
        self.images.push((*blake3::hash(&image).as_bytes(), image));
        Ok(())
    }

    /// Schedule an arbitrary datagram to the server (`to == None`) or to client
    /// `to`, from `from`, after `delay`. For hostile-input tests.
    pub fn inject(&mut self, to: Option<usize>, from: SocketAddr, data: Bytes, delay: Duration) {
        let node = to.map_or(Node::Server, Node::Client);
        let at = self.now + delay;
        self.push(at, node, from, data, false);
    }

    fn push(&mut self, at: Instant, to: Node, from: SocketAddr, data: Bytes, queued: bool) {
        self.ev_seq += 1;
        self.queue.push(Ev {
            at,
            seq: self.ev_seq,
            to,
            from,
            data,
            queued,
        });
    }

    /// Run until every client is settled (finished, failed or crashed) or until
    /// `limit` of virtual time has passed since the simulation began. Returns
    /// true when every client settled.
    pub fn drive(&mut self, limit: Duration) -> Result<bool, SimError> {
        let deadline = self.base + limit;
        loop {
            if self.all_settled() {
                return Ok(true);
            }
            if !self.step(deadline)? {
                return Ok(self.all_settled());
            }
        }
    }

    /// Run until `at` (virtual time since the simulation began), whatever the clients do.
    pub fn run_until(&mut self, at: Duration) -> Result<(), SimError> {
        let deadline = self.base + at;
        while self.step(deadline)? {}
        Ok(())
    }

    /// True when every client is finished, failed or crashed.
    pub fn all_settled(&self) -> bool {
        self.clients.iter().all(SimClient::settled)
    }

    /// One step: flush outputs, advance to the next instant that matters, feed
    /// inputs. Returns false when the deadline was reached.
    fn step(&mut self, deadline: Instant) -> Result<bool, SimError> {
        self.steps += 1;
        self.flush();
        let mut next = deadline;
        if let Some(ev) = self.queue.peek() {
            next = next.min(ev.at);
        }
        if let Some(t) = self.server.poll_timeout() {
            next = next.min(t);
        }
        for c in &self.clients {
            match c.state {
                ClientState::Waiting => next = next.min(self.base + c.spec.start_at),
                ClientState::Running => {
                    if let Some(t) = c.client.poll_timeout() {
                        next = next.min(t);
                    }
                    if let Some(t) = c.next_fault_at {
                        next = next.min(t);
                    }
                    if let Some(t) = c.spec.crash_at {
                        next = next.min(self.base + t);
                    }
                }
                ClientState::Crashed => {}
            }
        }
        if next >= deadline && self.queue.peek().is_none_or(|e| e.at > deadline) {
            self.now = self.now.max(deadline);
            self.fire_timers();
            self.flush();
            return Ok(false);
        }
        if next <= self.now {
            // Something wants to run now; time must still move after a
            // bounded number of steps at one instant.
            if self.steps > 200_000 {
                return Err(SimError::Stalled {
                    at: self.elapsed(),
                    who: self.stale_node(),
                });
            }
        } else {
            self.now = next;
            self.steps = 0;
        }
        // Deliver datagrams due now.
        while self.queue.peek().is_some_and(|e| e.at <= self.now) {
            let Some(ev) = self.queue.pop() else { break };
            self.deliver(ev);
        }
        self.fire_timers();
        Ok(true)
    }

    fn stale_node(&self) -> String {
        if self.server.poll_timeout().is_some_and(|t| t <= self.now) {
            return "server".into();
        }
        for (i, c) in self.clients.iter().enumerate() {
            if c.state == ClientState::Running
                && (c.client.poll_timeout().is_some_and(|t| t <= self.now)
                    || c.next_fault_at.is_some_and(|t| t <= self.now))
            {
                return format!("client {i}");
            }
        }
        "event queue".into()
    }

    fn fire_timers(&mut self) {
        let now = self.now;
        if self.server.poll_timeout().is_some_and(|t| t <= now) {
            self.server.handle_timeout(now);
        }
        for i in 0..self.clients.len() {
            let c = &mut self.clients[i];
            match c.state {
                ClientState::Waiting if self.base + c.spec.start_at <= now => {
                    c.state = ClientState::Running;
                    c.started_at = Some(now);
                    c.busy_until = now;
                    if c.spec.workload == Workload::FetchAll {
                        c.client.fetch_all(now);
                    }
                    if let Workload::Faults { .. } = c.spec.workload {
                        c.next_fault_at = Some(now);
                    }
                }
                ClientState::Running => {}
                _ => continue,
            }
            if c.spec.crash_at.is_some_and(|t| self.base + t <= now) {
                c.state = ClientState::Crashed;
                continue;
            }
            if c.client.poll_timeout().is_some_and(|t| t <= now) {
                c.client.handle_timeout(now);
            }
            if c.next_fault_at.is_some_and(|t| t <= now) {
                c.next_fault_at = None;
                Self::next_fault(c, now);
            }
            self.drain_client_events(i);
        }
    }

    /// Issue the client's next fault (or finish its workload).
    fn next_fault(c: &mut SimClient, now: Instant) {
        let Workload::Faults { pages, .. } = &c.spec.workload else {
            return;
        };
        let Some(&pfn) = pages.get(c.fault_idx) else {
            if c.finished_after.is_none() {
                c.finished_after = c.started_at.map(|s| now.duration_since(s));
                c.client.leave(now, true);
            }
            return;
        };
        c.fault_started = Some(now);
        if c.client.session().is_some() && c.client.has_page(pfn) {
            Self::fault_resolved(c, now);
        } else {
            c.client.request_page(now, pfn);
        }
    }

    fn fault_resolved(c: &mut SimClient, now: Instant) {
        let Workload::Faults { think, .. } = c.spec.workload else {
            return;
        };
        if let Some(t0) = c.fault_started.take() {
            c.fault_latencies.push(now.duration_since(t0));
        }
        c.fault_idx += 1;
        c.next_fault_at = Some(now + think);
    }

    fn drain_client_events(&mut self, i: usize) {
        let now = self.now;
        let elapsed = self.elapsed();
        let page_size = self.page_size;
        let c = &mut self.clients[i];
        while let Some(e) = c.client.poll_event() {
            match e {
                ClientEvent::SessionStarted(s) => {
                    c.ready = PageBitmap::new(s.page_count);
                    c.image = self
                        .images
                        .iter()
                        .rev()
                        .find(|(d, _)| *d == s.digest)
                        .map(|(_, img)| img.clone());
                }
                ClientEvent::SessionResumed(_) => c.resumes += 1,
                ClientEvent::PageReady { pfn, data } => {
                    if !c.ready.set(pfn) {
                        c.double_ready += 1;
                    }
                    let ok = c
                        .image
                        .as_ref()
                        .is_some_and(|img| page_matches(img, page_size, pfn, &data));
                    if !ok {
                        c.mismatches.push(pfn);
                    }
                    if let Workload::Faults { pages, .. } = &c.spec.workload {
                        if c.fault_started.is_some() && pages.get(c.fault_idx) == Some(&pfn) {
                            Self::fault_resolved(c, now);
                        }
                    }
                }
                ClientEvent::Complete => {
                    if c.spec.workload == Workload::FetchAll && c.finished_after.is_none() {
                        c.finished_after = c.started_at.map(|s| now.duration_since(s));
                        c.client.leave(now, true);
                    }
                }
                ClientEvent::Failed(err) => {
                    if c.failed.is_none() {
                        c.failed = Some((elapsed, err));
                    }
                }
            }
        }
    }

    fn deliver(&mut self, ev: Ev) {
        let now = self.now;
        match ev.to {
            Node::Server => {
                self.server.handle_datagram(now, ev.from, &ev.data);
            }
            Node::Client(i) => {
                let c = &mut self.clients[i];
                if c.state != ClientState::Running {
                    return;
                }
                if let (Some(cap), false) = (c.spec.rx_capacity, ev.queued) {
                    let rate = cap.bytes_per_sec.max(1) as f64;
                    let start = c.busy_until.max(now);
                    let backlog = start.duration_since(now).as_secs_f64() * rate;
                    let len = ev.data.len() as f64;
                    if backlog + len > cap.queue_bytes as f64 {
                        c.rx_overflows += 1;
                        return;
                    }
                    let done = start + Duration::from_secs_f64(len / rate);
                    c.busy_until = done;
                    if done > now {
                        self.push(done, ev.to, ev.from, ev.data, true);
                        return;
                    }
                }
                c.rx_datagrams += 1;
                c.client.handle_datagram(now, ev.from, ev.data);
                self.drain_client_events(i);
            }
        }
    }

    /// Hand every pending transmit of every node to the links.
    fn flush(&mut self) {
        let now = self.now;
        let mut buf = std::mem::take(&mut self.buf);
        while let Some(t) = self.server.poll_transmit(now, &mut buf) {
            let data = Bytes::copy_from_slice(&buf[..t.len]);
            self.capture(true, &data);
            match t.dest {
                Dest::Group => {
                    self.group_datagrams += 1;
                    for i in 0..self.clients.len() {
                        if self.clients[i].state == ClientState::Running {
                            self.send_down(i, data.clone());
                        }
                    }
                }
                Dest::Peer(a) => {
                    self.server_unicast_datagrams += 1;
                    match self.by_addr.get(&a).copied() {
                        Some(i) if self.clients[i].state == ClientState::Running => {
                            self.send_down(i, data)
                        }
                        _ => self.undeliverable += 1,
                    }
                }
            }
        }
        while let Some(e) = self.server.poll_event() {
            self.server_events.push((self.elapsed(), e));
        }
        for i in 0..self.clients.len() {
            if self.clients[i].state != ClientState::Running {
                continue;
            }
            while let Some(t) = self.clients[i].client.poll_transmit(now, &mut buf) {
                self.client_datagrams += 1;
                let data = Bytes::copy_from_slice(&buf[..t.len]);
                self.capture(false, &data);
                if t.dest != Dest::Peer(Sim::SERVER_ADDR) {
                    self.undeliverable += 1;
                    continue;
                }
                let from = self.clients[i].addr;
                let (arrivals, n) = self.clients[i].up.transmit();
                for d in arrivals.iter().take(n).flatten() {
                    self.push(now + *d, Node::Server, from, data.clone(), false);
                }
            }
            self.drain_client_events(i);
        }
        self.buf = buf;
    }

    fn send_down(&mut self, i: usize, data: Bytes) {
        let (arrivals, n) = self.clients[i].down.transmit();
        for d in arrivals.iter().take(n).flatten() {
            self.push(
                self.now + *d,
                Node::Client(i),
                Sim::SERVER_ADDR,
                data.clone(),
                false,
            );
        }
    }

    /// Check every client: no page differed from the source, none was handed
    /// over twice, and a client that reports completion holds every page (each
    /// non-zero page handed over, each other page a zero page of the source).
    pub fn verify(&self) -> Result<(), SimError> {
        for (i, c) in self.clients.iter().enumerate() {
            if let Some(&pfn) = c.mismatches.first() {
                return Err(SimError::PageMismatch { client: i, pfn });
            }
            if c.double_ready > 0 {
                return Err(SimError::DoubleReady {
                    client: i,
                    count: c.double_ready,
                });
            }
            if c.client.is_complete() {
                let Some(img) = &c.image else {
                    return Err(SimError::MissingPage { client: i, pfn: 0 });
                };
                let zero = c.client.zero_map();
                let count = c.ready.len();
                for pfn in 0..count {
                    if c.ready.get(pfn) {
                        continue;
                    }
                    if !zero.get(pfn) || !page_is_zero(img, self.page_size, pfn) {
                        return Err(SimError::MissingPage { client: i, pfn });
                    }
                }
            }
        }
        Ok(())
    }

    /// Pages of the current image that are not all zero.
    pub fn nonzero_pages(&self) -> u64 {
        let z = self.server.image_info().zero_map.count_ones();
        self.server.image_info().zero_map.len() - z
    }
}

/// True when `data` equals page `pfn` of `image` (zero-padded at the end).
pub fn page_matches(image: &[u8], page_size: usize, pfn: u64, data: &[u8]) -> bool {
    if data.len() != page_size {
        return false;
    }
    let Some(start) = usize::try_from(pfn)
        .ok()
        .and_then(|p| p.checked_mul(page_size))
    else {
        return false;
    };
    if start >= image.len() {
        return false;
    }
    let end = (start + page_size).min(image.len());
    let n = end - start;
    data[..n] == image[start..end] && data[n..].iter().all(|&b| b == 0)
}

fn page_is_zero(image: &[u8], page_size: usize, pfn: u64) -> bool {
    let start = (pfn as usize).saturating_mul(page_size).min(image.len());
    let end = start.saturating_add(page_size).min(image.len());
    image[start..end].iter().all(|&b| b == 0)
}

/// A deterministic test image of `pages` pages: every `zero_every`-th page
/// (if non-zero) is all zero, the rest hold bytes derived from `seed`.
pub fn test_image(pages: usize, page_size: usize, zero_every: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; pages * page_size];
    let mut rng = SmallRng::seed_from_u64(seed);
    for (p, chunk) in v.chunks_mut(page_size).enumerate() {
        if zero_every > 0 && p % zero_every == zero_every - 1 {
            continue;
        }
        rng.fill(chunk);
    }
    v
}
