//! Threaded drivers: a [`ServerNode`] and a [`ClientNode`] each run one
//! state machine on its own thread over any [`Transport`]. They follow the
//! polling order of the crate docs and hold no protocol logic.
//!
//! Embedders of the client receive pages through a [`PageSink`], called on the
//! client's I/O thread, so a page can go from the socket buffer to its final
//! place (a file, `UFFDIO_COPY`) without another thread hop.

use crate::client::{Client, ClientConfig, ClientError, ClientEvent, ClientStats};
use crate::secure::{SecureTransport, Security, SecurityStats, SecurityStatsHandle};
use crate::server::{ConfigError, Server, ServerConfig, ServerEvent, ServerStats};
use crate::source::{ImageInfo, PageSource};
use crate::transport::{Received, Transport, Wake};
use crate::{SessionInfo, Transmit};
use crossbeam_channel::{Receiver, Sender};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Errors of the threaded drivers.
#[derive(Debug, Clone, Error)]
pub enum NodeError {
    /// The server could not be built.
    #[error("server configuration: {0}")]
    Config(String),
    /// A transport call failed.
    #[error("{context}: {message}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The OS error.
        message: String,
    },
    /// The session failed.
    #[error(transparent)]
    Session(#[from] ClientError),
    /// Waiting timed out.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    /// The node was shut down.
    #[error("the node has stopped")]
    Stopped,
    /// The embedder's sink refused a page.
    #[error("storing page {pfn}: {message}")]
    Sink {
        /// The page.
        pfn: u64,
        /// Why.
        message: String,
    },
}

impl From<ConfigError> for NodeError {
    fn from(e: ConfigError) -> Self {
        NodeError::Config(e.to_string())
    }
}

fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> NodeError {
    move |e| NodeError::Io {
        context,
        message: e.to_string(),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Receives pages on the client's I/O thread.
pub trait PageSink: Send + Sync + 'static {
    /// Page `pfn` is present; called exactly once per page that arrives with
    /// data (zero pages from the session's zero map are not delivered).
    /// Returning an error fails the session.
    fn page_ready(&self, pfn: u64, data: &[u8]) -> Result<(), String>;
    /// The client joined a session (or found its server again after a restart with the
    /// same image); called before any page of that session is delivered.
    fn session_started(&self, _info: &SessionInfo) {}
    /// The session failed.
    fn failed(&self, _error: &NodeError) {}
}

/// A sink that ignores pages (for measuring the protocol alone).
#[derive(Debug, Default, Clone, Copy)]
pub struct NullSink;

impl PageSink for NullSink {
    fn page_ready(&self, _pfn: u64, _data: &[u8]) -> Result<(), String> {
        Ok(())
    }
}

/// A sink that keeps every page in memory, keyed by page number, and fails the session if a
/// page is delivered twice (small images and tests).
#[derive(Debug, Default)]
pub struct MemorySink(Mutex<std::collections::HashMap<u64, Vec<u8>>>);

impl MemorySink {
    /// The pages received so far.
    pub fn pages(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, Vec<u8>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
    /// Number of pages received so far.
    pub fn len(&self) -> usize {
        self.pages().len()
    }
    /// True when no page has arrived.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl PageSink for MemorySink {
    fn page_ready(&self, pfn: u64, data: &[u8]) -> Result<(), String> {
        if self.pages().insert(pfn, data.to_vec()).is_some() {
            return Err(format!("page {pfn} delivered twice"));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- security

type Secured = (Box<dyn Transport>, Option<SecurityStatsHandle>);

fn warn_unauthenticated() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        tracing::warn!(
            "this mcdist session is unauthenticated: no pre-shared key is configured, so anyone \
             on the network can read pages and inject forged ones (give a key: mcdist --key FILE)"
        );
    });
}

fn secure_transport<T: Transport>(
    security: Option<&Security>,
    transport: T,
    wrap: impl FnOnce(T, &Security) -> SecureTransport<T>,
) -> Secured {
    match security {
        Some(sec) => {
            let t = wrap(transport, sec);
            let h = t.stats_handle();
            (Box::new(t), Some(h))
        }
        None => {
            warn_unauthenticated();
            (Box::new(transport), None)
        }
    }
}

// ---------------------------------------------------------------- server

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
        cfg: ServerConfig,
        transport: T,
        source: Arc<dyn PageSource>,
    ) -> Result<ServerNode, NodeError> {
        let info = crate::source::scan(source.as_ref()).map_err(io_err("reading the image"))?;
        ServerNode::start_with_info(cfg, transport, source, info)
    }

    /// Serve with an already computed [`ImageInfo`]. With `cfg.security` set,
    /// every datagram is sealed and a fresh random session id is drawn unless
    /// one is configured.
    pub fn start_with_info<T: Transport>(
        mut cfg: ServerConfig,
        transport: T,
        source: Arc<dyn PageSource>,
        info: ImageInfo,
    ) -> Result<ServerNode, NodeError> {
        if cfg.security.is_some() && cfg.session_id.is_none() {
            cfg.session_id = Some(rand::random::<u64>() | 1);
        }
        let session = cfg.session_id;
        let (mut transport, security) =
            secure_transport(cfg.security.as_ref(), transport, |t, sec| {
                SecureTransport::server(t, sec, session.unwrap_or(0))
            });
        cfg.max_datagram = cfg.max_datagram.min(transport.capabilities().max_datagram);
        let server = Server::with_info(cfg, source, info.clone(), Instant::now())?;
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
                .spawn(move || server_loop(server, &mut transport, &stop, &stats, &ev_tx))
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

/// Receive buffer slot: the largest UDP payload, rounded up.
const RECV_SLOT: usize = 65_536;
/// Most datagrams taken in one `recv_batch`.
const RECV_BATCH: usize = 32;

fn server_loop<T: Transport>(
    mut server: Server,
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
    let rbatch = caps.batch.clamp(1, RECV_BATCH);
    let mut inp = vec![0u8; RECV_SLOT * rbatch];
    let mut received: Vec<Received> = Vec::with_capacity(rbatch);
    let mut last_snapshot = Instant::now();
    let mut closing: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if stop.load(Ordering::SeqCst) && closing.is_none() {
            server.close();
            closing = Some(now);
        }
        if server.poll_timeout().is_some_and(|t| t <= now) {
            server.handle_timeout(now);
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
            server
                .poll_timeout()
                .map_or(Duration::from_millis(50), |t| {
                    t.saturating_duration_since(now)
                })
                .min(Duration::from_millis(50))
        };
        let mut budget = 256usize;
        let mut timeout = Some(wait);
        while budget > 0 {
            received.clear();
            let n = transport
                .recv_batch(&mut inp, RECV_SLOT, &mut received, timeout)
                .map_err(io_err("receiving"))?;
            if n == 0 {
                break;
            }
            let at = Instant::now();
            for (i, r) in received.iter().enumerate() {
                let start = i * RECV_SLOT;
                server.handle_datagram(at, r.from, &inp[start..start + r.len.min(RECV_SLOT)]);
            }
            budget = budget.saturating_sub(n);
            timeout = Some(Duration::ZERO);
        }
    }
}

// ---------------------------------------------------------------- client

enum Cmd {
    Request(u64),
    FetchAll,
    Leave(bool),
    Stop,
}

/// Presence bits readable from any thread.
struct AtomicBitmap {
    words: Vec<AtomicU64>,
}

impl AtomicBitmap {
    fn new(len: u64) -> AtomicBitmap {
        AtomicBitmap {
            words: (0..len.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }
    fn set(&self, i: u64) {
        if let Some(w) = self.words.get((i / 64) as usize) {
            w.fetch_or(1 << (i % 64), Ordering::Release);
        }
    }
    fn get(&self, i: u64) -> bool {
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (i % 64)) != 0)
    }
}

#[derive(Default)]
struct ClientState {
    session: Option<SessionInfo>,
    complete: bool,
    error: Option<NodeError>,
    stopped: bool,
    stats: ClientStats,
    pages_present: u64,
    left: bool,
}

struct ClientShared {
    state: Mutex<ClientState>,
    cond: Condvar,
    present: OnceLock<AtomicBitmap>,
    zero: OnceLock<crate::bitmap::PageBitmap>,
}

/// A client state machine running on its own thread.
pub struct ClientNode {
    cmds: Sender<Cmd>,
    waker: Arc<dyn Wake>,
    shared: Arc<ClientShared>,
    thread: Option<JoinHandle<()>>,
    local_addr: SocketAddr,
    security: Option<SecurityStatsHandle>,
}

impl std::fmt::Debug for ClientNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientNode")
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

impl ClientNode {
    /// Start a client; pages go to `sink`. `cfg.max_datagram` is lowered to
    /// what the transport carries. With `cfg.security` set, only datagrams
    /// authenticated under its key reach the client.
    pub fn start<T: Transport>(
        mut cfg: ClientConfig,
        transport: T,
        sink: Arc<dyn PageSink>,
    ) -> Result<ClientNode, NodeError> {
        let (mut transport, security) =
            secure_transport(cfg.security.as_ref(), transport, SecureTransport::client);
        cfg.max_datagram = cfg.max_datagram.min(transport.capabilities().max_datagram);
        let local_addr = transport.local_addr().map_err(io_err("local address"))?;
        let waker = transport.waker();
        let (cmds, rx) = crossbeam_channel::unbounded();
        let shared = Arc::new(ClientShared {
            state: Mutex::new(ClientState::default()),
            cond: Condvar::new(),
            present: OnceLock::new(),
            zero: OnceLock::new(),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("mcdist-client".into())
                .spawn(move || {
                    let client = Client::new(cfg, Instant::now());
                    let res = client_loop(client, &mut transport, &rx, &shared, sink.as_ref());
                    let mut st = lock(&shared.state);
                    if let Err(e) = res {
                        if st.error.is_none() {
                            sink.failed(&e);
                            st.error = Some(e);
                        }
                    }
                    st.stopped = true;
                    shared.cond.notify_all();
                })
                .map_err(io_err("spawning the client thread"))?
        };
        Ok(ClientNode {
            cmds,
            waker,
            shared,
            thread: Some(thread),
            local_addr,
            security,
        })
    }

    /// The client's unicast address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    fn wait_for<R>(
        &self,
        timeout: Duration,
        what: &'static str,
        mut f: impl FnMut(&ClientState) -> Option<Result<R, NodeError>>,
    ) -> Result<R, NodeError> {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.shared.state);
        loop {
            if let Some(r) = f(&st) {
                return r;
            }
            if let Some(e) = &st.error {
                return Err(e.clone());
            }
            if st.stopped {
                return Err(NodeError::Stopped);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(NodeError::Timeout(timeout, what));
            }
            st = self
                .shared
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Wait until the server's announce arrived.
    pub fn wait_session(&self, timeout: Duration) -> Result<SessionInfo, NodeError> {
        self.wait_for(timeout, "the server's announce", |st| st.session.map(Ok))
    }

    /// Wait until every page is present.
    pub fn wait_complete(&self, timeout: Duration) -> Result<(), NodeError> {
        self.wait_for(timeout, "the whole image", |st| {
            st.complete.then_some(Ok(()))
        })
    }

    /// The session's zero-page map, once received.
    pub fn zero_map(&self) -> Option<&crate::bitmap::PageBitmap> {
        self.shared.zero.get()
    }

    /// Ask for page `pfn`; it arrives through the sink. Cheap and non-blocking;
    /// concurrent requests for one page make one network request.
    pub fn request(&self, pfn: u64) {
        if self.is_present(pfn) {
            return;
        }
        if self.cmds.send(Cmd::Request(pfn)).is_ok() {
            self.waker.wake();
        }
    }

    /// Fetch the whole image.
    pub fn fetch_all(&self) {
        if self.cmds.send(Cmd::FetchAll).is_ok() {
            self.waker.wake();
        }
    }

    /// True when page `pfn` was delivered (or is a known zero page).
    pub fn is_present(&self, pfn: u64) -> bool {
        self.shared.present.get().is_some_and(|b| b.get(pfn))
            || self.shared.zero.get().is_some_and(|z| z.get(pfn))
    }

    /// Pages present so far (zero pages included).
    pub fn pages_present(&self) -> u64 {
        lock(&self.shared.state).pages_present
    }

    /// Counters.
    pub fn stats(&self) -> ClientStats {
        lock(&self.shared.state).stats.clone()
    }

    /// Counters of the security layer (`None` in an unauthenticated session).
    pub fn security_stats(&self) -> Option<SecurityStats> {
        self.security.as_ref().map(SecurityStatsHandle::get)
    }

    /// The error that ended the session, if any.
    pub fn error(&self) -> Option<NodeError> {
        lock(&self.shared.state).error.clone()
    }

    /// Tell the server we are done (`ok`: verified the image) and wait briefly
    /// until the notice was sent.
    pub fn leave(&self, ok: bool) {
        if self.cmds.send(Cmd::Leave(ok)).is_ok() {
            self.waker.wake();
        }
        let _ = self.wait_for(Duration::from_millis(500), "leave", |st| {
            st.left.then_some(Ok(()))
        });
    }

    /// Stop the client thread.
    pub fn shutdown(mut self) -> ClientStats {
        self.stop_thread();
        self.stats()
    }

    fn stop_thread(&mut self) {
        let _ = self.cmds.send(Cmd::Stop);
        self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ClientNode {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

fn client_loop<T: Transport>(
    mut client: Client,
    transport: &mut T,
    cmds: &Receiver<Cmd>,
    shared: &ClientShared,
    sink: &dyn PageSink,
) -> Result<(), NodeError> {
    let mut out = vec![0u8; 65_536];
    // Receive slots take the largest UDP datagram: a server on another link
    // may send larger datagrams than this host's MTU suggests.
    let slot = RECV_SLOT;
    let batch = transport.capabilities().batch.clamp(1, RECV_BATCH);
    let mut inbuf = vec![0u8; slot * batch];
    let mut received: Vec<Received> = Vec::with_capacity(batch);
    let mut last_publish = Instant::now();
    let mut leaving = false;
    loop {
        let now = Instant::now();
        // Commands.
        while let Ok(c) = cmds.try_recv() {
            match c {
                Cmd::Request(pfn) => client.request_page(now, pfn),
                Cmd::FetchAll => client.fetch_all(now),
                Cmd::Leave(ok) => {
                    client.leave(now, ok);
                    leaving = true;
                }
                Cmd::Stop => return Ok(()),
            }
        }
        if client.poll_timeout().is_some_and(|t| t <= now) {
            client.handle_timeout(now);
        }
        while let Some(t) = client.poll_transmit(now, &mut out) {
            transport
                .send(t.dest, &out[..t.len])
                .map_err(io_err("sending"))?;
        }
        let mut changed = false;
        // Whether something a waiter of `wait_for` looks at changed (not pages or stats,
        // which are read without waiting): waking the waiting thread for every batch of
        // pages costs a context switch each time.
        let mut wake = false;
        while let Some(e) = client.poll_event() {
            changed = true;
            wake |= !matches!(e, ClientEvent::PageReady { .. });
            match e {
                ClientEvent::SessionStarted(s) | ClientEvent::SessionResumed(s) => {
                    sink.session_started(&s);
                    let _ = shared.present.set(AtomicBitmap::new(s.page_count));
                    lock(&shared.state).session = Some(s);
                }
                ClientEvent::PageReady { pfn, data } => {
                    if let Err(message) = sink.page_ready(pfn, &data) {
                        let err = NodeError::Sink { pfn, message };
                        sink.failed(&err);
                        let mut st = lock(&shared.state);
                        st.error = Some(err);
                        shared.cond.notify_all();
                        drop(st);
                        client.leave(now, false);
                        while let Some(t) = client.poll_transmit(now, &mut out) {
                            let _ = transport.send(t.dest, &out[..t.len]);
                        }
                        return Ok(());
                    }
                    if let Some(b) = shared.present.get() {
                        b.set(pfn);
                    }
                    client.recycle_page(data);
                }
                ClientEvent::Complete => lock(&shared.state).complete = true,
                ClientEvent::Failed(err) => {
                    let err = NodeError::Session(err);
                    sink.failed(&err);
                    lock(&shared.state).error = Some(err);
                }
            }
        }
        if client.zero_map_complete() && shared.zero.get().is_none() {
            let _ = shared.zero.set(client.zero_map().clone());
        }
        if changed || now.duration_since(last_publish) >= Duration::from_millis(20) {
            last_publish = now;
            let mut st = lock(&shared.state);
            st.stats = client.stats().clone();
            st.pages_present = client.pages_present();
            if leaving && client.leave_sent() && !st.left {
                st.left = true;
                wake = true;
            }
            if wake {
                shared.cond.notify_all();
            }
        }
        let wait = client
            .poll_timeout()
            .map_or(Duration::from_millis(100), |t| {
                t.saturating_duration_since(now)
            })
            .min(Duration::from_millis(100));
        let wait = if cmds.is_empty() {
            wait
        } else {
            Duration::ZERO
        };
        let mut timeout = Some(wait);
        let mut budget = 256usize;
        while budget > 0 {
            received.clear();
            let n = transport
                .recv_batch(&mut inbuf, slot, &mut received, timeout)
                .map_err(io_err("receiving"))?;
            if n == 0 {
                break;
            }
            let at = Instant::now();
            for (i, r) in received.iter().enumerate() {
                let start = i * slot;
                client.handle_datagram_slice(at, r.from, &inbuf[start..start + r.len.min(slot)]);
            }
            budget = budget.saturating_sub(n);
            timeout = Some(Duration::ZERO);
        }
    }
}
