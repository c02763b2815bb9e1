//! The server thread: scans (or takes) the image facts, wraps the transport
//! for keyed sessions, and runs the server state machine — timers, batched
//! sends (one `sendmmsg` per batch on UDP), events, a snapshot of the
//! counters every few milliseconds, and the shared receive turn — until told
//! to stop, when it sends the end of session.

use super::recv::{wait_until, Inbox};
use super::{io_err, lock, secure_transport, NodeConfig, NodeError};
use crate::secure::{SecureTransport, SecurityStats, SecurityStatsHandle};
use crate::server::{Server, ServerConfig, ServerEvent, ServerStats};
use crate::source::{ImageInfo, PageSource};
use crate::transport::{Transport, Wake};
use crate::Transmit;
use crossbeam_channel::{Receiver, Sender};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A server state machine running on its own thread.
pub struct ServerNode {
    stop: Arc<AtomicBool>,
    waker: Arc<dyn Wake>,
    thread: Option<JoinHandle<Result<(), NodeError>>>,
    stats: Arc<Mutex<ServerSnapshot>>,
    events: Receiver<ServerEvent>,
    local_addr: SocketAddr,
    session_id: u64,
    info: ImageInfo,
    security: Option<SecurityStatsHandle>,
}

/// A copy of the server's counters and gauges.
#[derive(Debug, Clone, Default)]
pub struct ServerSnapshot {
    /// Counters.
    pub stats: ServerStats,
    /// Paced rate, bytes/s.
    pub rate: u64,
    /// Receivers tracked.
    pub clients: usize,
    /// Pages sent at least once.
    pub pages_ever_sent: u64,
}

impl std::fmt::Debug for ServerNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerNode")
            .field("local_addr", &self.local_addr)
            .field("session_id", &self.session_id)
            .finish()
    }
}

impl ServerNode {
    /// Scan `source` and serve it on `transport`. `cfg.max_datagram` is lowered
    /// to what the transport carries.
    pub fn start<T: Transport>(
        cfg: impl Into<NodeConfig<ServerConfig>>,
        transport: T,
        source: Arc<dyn PageSource>,
    ) -> Result<ServerNode, NodeError> {
        let info = crate::source::scan(source.as_ref()).map_err(io_err("reading the image"))?;
        ServerNode::start_with_info(cfg, transport, source, info)
    }

    /// Serve with an already computed [`ImageInfo`]. With a key in `cfg.security`,
    /// every datagram is sealed and a fresh random session id is drawn unless
    /// one is configured.
    pub fn start_with_info<T: Transport>(
        cfg: impl Into<NodeConfig<ServerConfig>>,
        transport: T,
        source: Arc<dyn PageSource>,
        info: ImageInfo,
    ) -> Result<ServerNode, NodeError> {
        let NodeConfig {
            protocol: mut cfg,
            security,
        } = cfg.into();
        if security.is_some() && cfg.session_id.is_none() {
            cfg.session_id = Some(rand::random::<u64>() | 1);
        }
        let session = cfg.session_id;
        let (mut transport, security) = secure_transport(security.as_ref(), transport, |t, sec| {
            SecureTransport::server(t, sec, session.unwrap_or(0))
        });
        cfg.max_datagram = cfg.max_datagram.min(transport.capabilities().max_datagram);
        let server = Server::with_info(cfg, source.clone(), info.clone(), Instant::now())?;
        let session_id = server.session_id();
        let local_addr = transport.local_addr().map_err(io_err("local address"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let waker = transport.waker();
        let stats = Arc::new(Mutex::new(ServerSnapshot::default()));
        let (ev_tx, events) = crossbeam_channel::unbounded();
        let thread = {
            let stop = stop.clone();
            let stats = stats.clone();
            std::thread::Builder::new()
                .name("mcdist-server".into())
                .spawn(move || server_loop(server, source, &mut transport, &stop, &stats, &ev_tx))
                .map_err(io_err("spawning the server thread"))?
        };
        Ok(ServerNode {
            stop,
            waker,
            thread: Some(thread),
            stats,
            events,
            local_addr,
            session_id,
            info,
            security,
        })
    }

    /// The address receivers send requests to (as bound; may be a wildcard).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Session id.
    pub fn session_id(&self) -> u64 {
        self.session_id
    }

    /// Digest, size and zero map of the image served.
    pub fn image_info(&self) -> &ImageInfo {
        &self.info
    }

    /// A snapshot of the counters (refreshed every few milliseconds).
    pub fn stats(&self) -> ServerSnapshot {
        lock(&self.stats).clone()
    }

    /// Counters of the security layer (`None` in an unauthenticated session).
    pub fn security_stats(&self) -> Option<SecurityStats> {
        self.security.as_ref().map(SecurityStatsHandle::get)
    }

    /// Server events.
    pub fn events(&self) -> &Receiver<ServerEvent> {
        &self.events
    }

    /// True while the server thread runs.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Send the end of session and stop; returns the thread's result.
    pub fn shutdown(mut self) -> Result<ServerSnapshot, NodeError> {
        self.stop_thread()?;
        Ok(self.stats())
    }

    fn stop_thread(&mut self) -> Result<(), NodeError> {
        self.stop.store(true, Ordering::SeqCst);
        self.waker.wake();
        match self.thread.take() {
            Some(t) => t.join().unwrap_or(Err(NodeError::Stopped)),
            None => Ok(()),
        }
    }
}

impl Drop for ServerNode {
    fn drop(&mut self) {
        let _ = self.stop_thread();
    }
}

/// The server thread: timers, sends, events, snapshot, one receive turn;
/// until `stop`, then the end of session goes out once.
/// How often the server thread checks that the image has not changed under it.
const SOURCE_CHECK_PERIOD: Duration = Duration::from_millis(250);

fn server_loop<T: Transport>(
    mut server: Server,
    source: Arc<dyn PageSource>,
    transport: &mut T,
    stop: &AtomicBool,
    stats: &Mutex<ServerSnapshot>,
    events: &Sender<ServerEvent>,
) -> Result<(), NodeError> {
    // Datagrams go out in batches (one `sendmmsg` on UDP) and come in in
    // batches (one `recvmmsg`): slot `i` of a buffer holds datagram `i`.
    let caps = transport.capabilities();
    let slot = caps.max_datagram.clamp(1, 65_536);
    let batch = caps.batch.clamp(1, 64);
    let mut out = vec![0u8; slot * batch];
    let mut items: Vec<Transmit> = Vec::with_capacity(batch);
    let mut inbox = Inbox::new(transport);
    let mut last_snapshot = Instant::now();
    let mut closing: Option<Instant> = None;
    let mut next_source_check = Instant::now() + SOURCE_CHECK_PERIOD;
    loop {
        let now = Instant::now();
        if stop.load(Ordering::SeqCst) && closing.is_none() {
            server.close();
            closing = Some(now);
        }
        if server.poll_timeout().is_some_and(|t| t <= now) {
            server.handle_timeout(now);
        }
        // Change detection is the driver's: the state machine never stats the image.
        if now >= next_source_check {
            next_source_check = now + SOURCE_CHECK_PERIOD;
            if let Err(e) = source.check_unchanged() {
                server.source_failed(e);
            }
        }
        let mut sent = 0;
        'send: while sent < 256 {
            items.clear();
            while items.len() < batch {
                let i = items.len();
                match server.poll_transmit(now, &mut out[i * slot..(i + 1) * slot]) {
                    Some(t) => items.push(t),
                    None => break,
                }
            }
            if items.is_empty() {
                break 'send;
            }
            transport
                .send_batch(&out, slot, &items)
                .map_err(io_err("sending"))?;
            sent += items.len();
            if items.len() < batch {
                break 'send;
            }
        }
        while let Some(e) = server.poll_event() {
            let _ = events.send(e);
        }
        if now.duration_since(last_snapshot) >= Duration::from_millis(5) || closing.is_some() {
            last_snapshot = now;
            *lock(stats) = ServerSnapshot {
                stats: server.stats().clone(),
                rate: server.rate(),
                clients: server.client_count(),
                pages_ever_sent: server.pages_ever_sent(),
            };
        }
        if closing.is_some() {
            return Ok(());
        }
        let wait = if sent >= 256 {
            Duration::ZERO
        } else {
            wait_until(server.poll_timeout(), now, Duration::from_millis(50))
        };
        inbox.receive(transport, wait, |at, from, bytes| {
            server.handle_datagram(at, from, bytes)
        })?;
    }
}
