//! The client thread and its handle: commands from the embedder (request a
//! page, fetch all, leave, stop), the state waiters read (session, completion,
//! error, presence bits readable from any thread), and the client loop —
//! commands, timers, sends, events to the [`PageSink`], and the shared
//! receive turn. A page the sink refuses fails the session and sends a leave.
//! The server's working-set hints are asked for in bulk, at most
//! `HINT_WINDOW` (256) outstanding requests at a time, so that an embedder serving a
//! clone (a page cache, a lazy memory file) has them before it is asked.

use super::recv::{wait_until, Inbox};
use super::{io_err, lock, secure_transport, NodeConfig, NodeError, PageSink};
use crate::client::{Client, ClientConfig, ClientEvent, ClientStats};
use crate::secure::{SecureTransport, SecurityStats, SecurityStatsHandle};
use crate::transport::{Transport, Wake};
use crate::SessionInfo;
use crossbeam_channel::{Receiver, Sender};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Most requests outstanding while hinted pages wait to be asked for: each waits behind at
/// most this many pages (1 MiB of 4 KiB pages), well inside its retransmission timer.
const HINT_WINDOW: usize = 256;

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
    /// what the transport carries. With a key in `cfg.security`, only datagrams
    /// authenticated under its key reach the client.
    pub fn start<T: Transport>(
        cfg: impl Into<NodeConfig<ClientConfig>>,
        transport: T,
        sink: Arc<dyn PageSink>,
    ) -> Result<ClientNode, NodeError> {
        let NodeConfig {
            protocol: mut cfg,
            security,
        } = cfg.into();
        let (mut transport, security) =
            secure_transport(security.as_ref(), transport, SecureTransport::client);
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

/// What the loop does with the client's output: pages to the sink (borrowed from the
/// datagram, or from a `PageReady`), session state to the waiters.
struct Delivery<'a> {
    shared: &'a ClientShared,
    sink: &'a dyn PageSink,
    /// The sink refused a page: the session ends with this error.
    refused: Option<NodeError>,
    /// Something changed since the state was last published.
    changed: bool,
    /// Something a waiter of `wait_for` looks at changed (not pages or stats, which are
    /// read without waiting): waking the waiting thread for every batch of pages costs a
    /// context switch each time.
    wake: bool,
    /// Hinted pages not asked for yet.
    hinted: VecDeque<u64>,
}

impl Delivery<'_> {
    /// Hands a verified page to the sink; after a refusal, nothing more is delivered.
    fn page(&mut self, pfn: u64, data: &[u8]) {
        if self.refused.is_some() {
            return;
        }
        self.changed = true;
        if let Err(e) = self.sink.page_ready(pfn, data) {
            self.refused = Some(NodeError::Sink {
                pfn,
                source: Arc::new(e),
            });
            return;
        }
        if let Some(b) = self.shared.present.get() {
            b.set(pfn);
        }
    }

    /// Drains the client's events. Called after every datagram, so a session's
    /// `session_started` reaches the sink before any of its pages.
    fn events(&mut self, client: &mut Client) {
        while let Some(e) = client.poll_event() {
            self.changed = true;
            self.wake |= !matches!(e, ClientEvent::PageReady { .. });
            match e {
                ClientEvent::SessionStarted(s) | ClientEvent::SessionResumed(s) => {
                    self.sink.session_started(&s);
                    let _ = self.shared.present.set(AtomicBitmap::new(s.page_count));
                    lock(&self.shared.state).session = Some(s);
                }
                ClientEvent::PageReady { pfn, data } => {
                    self.page(pfn, &data);
                    client.recycle_page(data);
                }
                ClientEvent::Complete => lock(&self.shared.state).complete = true,
                ClientEvent::WorkingSetHint(pages) => self.hinted.extend(pages),
                ClientEvent::Failed(err) => {
                    let err = NodeError::Session(err);
                    self.sink.failed(&err);
                    lock(&self.shared.state).error = Some(err);
                }
            }
        }
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
    let mut inbox = Inbox::new(transport);
    let mut last_publish = Instant::now();
    let mut leaving = false;
    let mut d = Delivery {
        shared,
        sink,
        refused: None,
        changed: false,
        wake: false,
        hinted: VecDeque::new(),
    };
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
        // Hinted pages, a window at a time (asks made above go first).
        while client.outstanding() < HINT_WINDOW && !leaving {
            let Some(pfn) = d.hinted.pop_front() else {
                break;
            };
            client.request_page(now, pfn);
        }
        if client.poll_timeout().is_some_and(|t| t <= now) {
            client.handle_timeout(now);
        }
        while let Some(t) = client.poll_transmit(now, &mut out) {
            transport
                .send(t.dest, &out[..t.len])
                .map_err(io_err("sending"))?;
        }
        d.events(&mut client);
        if let Some(err) = d.refused.take() {
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
        if client.zero_map_complete() && shared.zero.get().is_none() {
            let _ = shared.zero.set(client.zero_map().clone());
        }
        if d.changed || now.duration_since(last_publish) >= Duration::from_millis(20) {
            last_publish = now;
            let mut st = lock(&shared.state);
            st.stats = client.stats().clone();
            st.pages_present = client.pages_present();
            if leaving && client.leave_sent() && !st.left {
                st.left = true;
                d.wake = true;
            }
            if d.wake {
                shared.cond.notify_all();
            }
            d.changed = false;
            d.wake = false;
        }
        let wait = if cmds.is_empty() {
            wait_until(client.poll_timeout(), now, Duration::from_millis(100))
        } else {
            Duration::ZERO
        };
        // A page that arrived whole goes to the sink where it lies in the receive buffer.
        inbox.receive(transport, wait, |at, from, bytes| {
            client.handle_datagram_borrowed(at, from, bytes, &mut |pfn, page| d.page(pfn, page));
            d.events(&mut client);
        })?;
        // Receive-buffer drops are the receiver's own overload, not path loss.
        client.note_socket_drops(transport.rx_dropped());
    }
}
