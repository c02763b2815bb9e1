//! An mcdist client driven by the fault thread itself.
//!
//! [`crate::threaded::McdistFetcher`] runs a [`mcdist::node::ClientNode`]: a fault goes from
//! the fault thread to the client's I/O thread (channel + wake-up), the request goes out, the
//! multicast reply wakes the I/O thread, which installs the page. [`InlineMcdist`] drives the
//! sans-IO [`mcdist::Client`] on the fault thread: the fault thread sends the request at once,
//! then waits in one poll over the client's UDP sockets, the userfaultfd and the stop event
//! ([`UdpTransport::watch_readable`]); a reply is installed with `UFFDIO_COPY` right there.
//! That removes one thread hand-off in each direction, which on a small, busy host is most of
//! a remote fault's cost.

use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use mcdist::secure::SecureTransport;
use mcdist::transport::udp::UdpTransport;
use mcdist::transport::Transport;
use mcdist::{Client, ClientEvent, ClientStats, SessionInfo};

use crate::descriptor::Descriptor;
use crate::lazy::{InlineFetcher, LazyHandle, PageFetcher};
use crate::session::{
    check_session, client_setup, ClientSetup, SessionError, SessionLost, UNKEYED_WARNING,
};

/// The client's transport: plain UDP, or UDP under mcdist's authentication layer.
enum Link {
    Plain(Box<UdpTransport>),
    Secure(Box<SecureTransport<UdpTransport>>),
}

impl Link {
    fn udp(&self) -> &UdpTransport {
        match self {
            Link::Plain(t) => t,
            Link::Secure(t) => t.inner(),
        }
    }
    fn transport(&mut self) -> &mut dyn Transport {
        match self {
            Link::Plain(t) => &mut **t,
            Link::Secure(t) => &mut **t,
        }
    }
}

/// An mcdist client whose I/O runs on the caller's thread (the fault thread once handed to
/// [`crate::LazyMemory`]). Built by [`InlineMcdist::connect`], which waits for the server's
/// announce; usable directly as an [`InlineFetcher`] or, through [`InlineMcdist::into_fetcher`],
/// wherever a [`PageFetcher`] is expected.
pub struct InlineMcdist {
    client: Client,
    link: Link,
    out: Vec<u8>,
    inbuf: Vec<u8>,
    session: SessionInfo,
    stats: Arc<Mutex<ClientStats>>,
    last_publish: Instant,
    dead: bool,
    /// The session id the descriptor names: a resume under another id fails the memory.
    pin: Option<u64>,
}

impl std::fmt::Debug for InlineMcdist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InlineMcdist")
            .field("session", &self.session)
            .field("dead", &self.dead)
            .finish()
    }
}

impl InlineMcdist {
    /// Joins the session named in `desc` over UDP multicast on `iface`, waiting up to
    /// `join_timeout` for the server's announce on the calling thread. Pages that arrive
    /// meanwhile (pushed) go to `handle`. `tune` adjusts the client configuration.
    pub fn connect(
        desc: &Descriptor,
        iface: Option<&str>,
        handle: &LazyHandle,
        join_timeout: Duration,
        tune: impl FnOnce(&mut ClientSetup),
    ) -> Result<Self, SessionError> {
        let (transport, cfg) = client_setup(desc, iface, tune)?;
        let mcdist::node::NodeConfig {
            protocol: mut cfg,
            security,
        } = cfg;
        let mut link = match &security {
            Some(sec) => Link::Secure(Box::new(SecureTransport::client(transport, sec))),
            None => {
                static ONCE: std::sync::Once = std::sync::Once::new();
                ONCE.call_once(|| tracing::warn!("{UNKEYED_WARNING}"));
                Link::Plain(Box::new(transport))
            }
        };
        cfg.max_datagram = cfg
            .max_datagram
            .min(link.transport().capabilities().max_datagram);
        let now = Instant::now();
        let mut me = InlineMcdist {
            client: Client::new(cfg, now),
            link,
            out: vec![0u8; 65_536],
            inbuf: vec![0u8; RECV_SLOT * RECV_SLOTS],
            session: SessionInfo {
                session_id: 0,
                image_size: 0,
                page_size: 0,
                page_count: 0,
                digest: [0; 32],
                zero_count: 0,
            },
            stats: Arc::new(Mutex::new(ClientStats::default())),
            last_publish: now,
            dead: false,
            pin: desc.session.as_ref().map(|s| s.session_id),
        };
        let deadline = now + join_timeout;
        loop {
            if let Some(s) = me.client.session() {
                me.session = *s;
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(SessionError::Node(mcdist::node::NodeError::Timeout(
                    join_timeout,
                    "the server's announce",
                )));
            }
            me.step(deadline - now, handle);
            if me.dead {
                return Err(SessionError::JoinFailed(if me.client.is_failed() {
                    "session"
                } else {
                    "transport"
                }));
            }
        }
        check_session(desc, &me.session)?;
        Ok(me)
    }

    /// The session announced by the server.
    pub fn session(&self) -> &SessionInfo {
        &self.session
    }

    /// A handle on the client's counters (refreshed every few milliseconds while it runs).
    pub fn stats_handle(&self) -> Arc<Mutex<ClientStats>> {
        self.stats.clone()
    }

    /// Wraps the client as a [`PageFetcher`] that hands itself over to the fault thread
    /// ([`PageFetcher::take_inline`]), for APIs that take fetchers.
    pub fn into_fetcher(self) -> Arc<dyn PageFetcher> {
        Arc::new(InlineSlot(Mutex::new(Some(Box::new(self)))))
    }

    fn send_all(&mut self, now: Instant) {
        while let Some(t) = self.client.poll_transmit(now, &mut self.out) {
            if let Err(e) = self.link.transport().send(t.dest, &self.out[..t.len]) {
                tracing::warn!(error = %e, "mcdist send failed");
                self.dead = true;
                return;
            }
        }
    }

    fn drain_events(&mut self, handle: &LazyHandle) {
        drain_events(&mut self.client, self.pin, &mut self.dead, handle);
    }

    /// One round: timers, transmits, then up to 256 datagrams waiting at most `timeout` for
    /// the first; each page is installed as soon as its datagram is handled, a page that
    /// arrived whole straight from the receive buffer it lies in.
    fn step(&mut self, timeout: Duration, handle: &LazyHandle) {
        let now = Instant::now();
        if self.client.poll_timeout().is_some_and(|t| t <= now) {
            self.client.handle_timeout(now);
        }
        self.send_all(now);
        self.drain_events(handle);
        let wait = self
            .client
            .poll_timeout()
            .map_or(timeout, |t| t.saturating_duration_since(now).min(timeout));
        let mut wait = Some(wait);
        let mut budget = RECV_BUDGET;
        while budget > 0 && !self.dead {
            let (client, pin, dead) = (&mut self.client, self.pin, &mut self.dead);
            let got = self.link.transport().recv_in_place(
                &mut self.inbuf,
                RECV_SLOT,
                wait,
                &mut |from, datagram| {
                    if *dead {
                        return;
                    }
                    let at = Instant::now();
                    client.handle_datagram_borrowed(at, from, datagram, &mut |pfn, page| {
                        handle.install_received(pfn, page, at)
                    });
                    drain_events(client, pin, dead, handle);
                },
            );
            match got {
                Ok(0) => break,
                Ok(n) => budget = budget.saturating_sub(n),
                Err(e) => {
                    handle.fail(SessionLost::Receive(e));
                    self.dead = true;
                    return;
                }
            }
            wait = Some(Duration::ZERO);
        }
        // Receive-buffer drops are this clone's own overload, not path loss: the
        // server slows for them rather than for loss on the path.
        let drops = self.link.transport().rx_dropped();
        self.client.note_socket_drops(drops);
        let now = Instant::now();
        if self.client.poll_timeout().is_some_and(|t| t <= now) {
            self.client.handle_timeout(now);
        }
        self.send_all(now);
        self.drain_events(handle);
        if now.duration_since(self.last_publish) >= Duration::from_millis(20) {
            self.publish();
        }
    }

    fn publish(&mut self) {
        self.last_publish = Instant::now();
        *self.stats.lock().unwrap_or_else(PoisonError::into_inner) = self.client.stats().clone();
    }
}

/// Most datagrams one round takes before it serves timers and sends again.
const RECV_BUDGET: usize = 256;
/// Receive buffer slot: the largest UDP payload.
const RECV_SLOT: usize = 65_536;
/// Receive slots (datagrams per `recvmmsg` without GRO).
const RECV_SLOTS: usize = 4;

/// Drains the client's events into the memory: pages (fragmented, zero or FEC-decoded
/// ones; pages that arrived whole are installed from the datagram), a failure, and a
/// session that is not the one the descriptor names. Called after every datagram, so a
/// foreign session stops the memory before any of its pages is installed.
fn drain_events(client: &mut Client, pin: Option<u64>, dead: &mut bool, handle: &LazyHandle) {
    while let Some(e) = client.poll_event() {
        match e {
            ClientEvent::PageReady { pfn, data } => {
                if !*dead {
                    handle.install(pfn, &data);
                }
                client.recycle_page(data);
            }
            ClientEvent::Failed(err) => {
                handle.fail(SessionLost::Client(err));
                *dead = true;
            }
            ClientEvent::SessionStarted(info) | ClientEvent::SessionResumed(info) => {
                if let Some(pin) = pin.filter(|p| *p != info.session_id) {
                    handle.fail(SessionLost::SessionChanged(SessionError::OtherSession {
                        announced: info.session_id,
                        described: pin,
                    }));
                    *dead = true;
                }
            }
            ClientEvent::WorkingSetHint(pages) => {
                // Earlier clones' working set: asked for in bulk while the guest runs.
                if !*dead {
                    handle.prefetch_start(&pages);
                }
            }
            ClientEvent::Complete => {}
        }
    }
}

impl Drop for InlineMcdist {
    fn drop(&mut self) {
        self.publish();
    }
}

impl InlineFetcher for InlineMcdist {
    fn watch(&mut self, fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
        let udp = self.link.udp();
        for fd in fds {
            udp.watch_readable(*fd)?;
        }
        Ok(())
    }

    fn watched_ready(&mut self) -> bool {
        self.link.udp().take_watched_ready()
    }

    fn request(&mut self, pfn: u64, _handle: &LazyHandle) {
        if self.dead {
            return;
        }
        let now = Instant::now();
        self.client.request_page(now, pfn);
        self.send_all(now);
    }

    fn request_many(&mut self, pfns: &[u64], _handle: &LazyHandle) {
        if self.dead {
            return;
        }
        let now = Instant::now();
        for &pfn in pfns {
            self.client.request_page(now, pfn);
        }
        self.send_all(now);
    }

    fn poll(&mut self, timeout: Duration, handle: &LazyHandle) {
        if self.dead {
            // Keep waiting on the watched descriptors without touching the session; a broken
            // socket must not turn the fault thread into a busy loop.
            if self
                .link
                .transport()
                .recv(&mut self.inbuf, Some(timeout))
                .is_err()
            {
                std::thread::sleep(timeout.min(Duration::from_millis(10)));
            }
            return;
        }
        self.step(timeout, handle);
    }
}

/// Holds an [`InlineMcdist`] until [`crate::LazyMemory::start`] takes it.
struct InlineSlot(Mutex<Option<Box<InlineMcdist>>>);

impl PageFetcher for InlineSlot {
    fn request(&self, pfn: u64) {
        // Only reached if the memory did not take the inline driver (it always does).
        tracing::debug!(pfn, "inline mcdist fetcher asked outside its fault thread");
    }

    fn take_inline(&self) -> Option<Box<dyn InlineFetcher>> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .map(|b| b as Box<dyn InlineFetcher>)
    }
}
