//! Real UDP transport: IPv4 multicast with socket2, polled with mio.
//!
//! The server has one socket bound to its request address; it sends group
//! traffic from it with `IP_MULTICAST_TTL` (1 by default), `IP_MULTICAST_LOOP`
//! and the egress interface pinned with `SO_BINDTODEVICE`. A client has two
//! sockets: one bound to the group address and port (joined on the named
//! interface by index) for multicast, and one ephemeral unicast socket for its
//! requests and the server's unicast replies.
//!
//! [`UdpTransport::watch_readable`] adds other descriptors (a userfaultfd, an
//! eventfd) to the same poll, so one thread can wait for datagrams and for its
//! own events in a single `recv`.
//!
//! Batches go out with one `sendmmsg` and come in with one `recvmmsg` per
//! socket (through `nix`'s safe wrappers), up to [`MAX_BATCH`] datagrams per
//! system call.
//!
//! With [`UdpConfig::gso`] (on by default), a batch is cut into runs of
//! datagrams to one destination whose lengths are all equal but for a
//! shorter last one (at most 64 datagrams and 64 KiB); each run is one
//! message of the `sendmmsg`, with a `UDP_SEGMENT` control message giving the
//! segment size, and the kernel splits it into the original datagrams as
//! late as it can (on a veth and bridge path: at the receiving socket). The
//! datagrams on the wire are the same as without GSO. The socket option is
//! probed once; if a send is refused (`EINVAL`, `EIO`, `EMSGSIZE`,
//! `ENOPROTOOPT`, `EOPNOTSUPP`) GSO is switched off for the transport and the
//! rest of the batch goes by plain `sendmmsg`.
//!
//! With [`UdpConfig::gro`] (on by default), a client's sockets set
//! `UDP_GRO`: one `recvmmsg` slot may then hold several datagrams of one
//! flow, and the `UDP_GRO` control message gives their size. Such buffers
//! are cut back into datagrams and handed out one per caller slot, in order,
//! so callers see exactly the datagrams that were sent; what does not fit in
//! one call is handed out by the next.
//!
//! Readiness is edge-triggered and tracked per socket: a socket that a receive
//! found empty is not read again until the poll reports a datagram on it, so an
//! idle non-blocking receive costs one `epoll_wait` rather than one `recvmmsg`
//! per socket, and a wake-up for one socket (or for a watched descriptor, see
//! [`UdpTransport::take_watched_ready`]) reads only that one.
//!
//! Every socket sets `SO_RXQ_OVFL`, so batch receives learn the kernel's
//! count of datagrams each socket dropped because its buffer was full
//! ([`Transport::rx_dropped`]): a receiver that cannot keep up tells the
//! server so, apart from loss on the path. With GRO the kernel queues a buffer
//! of many datagrams as one and counts a dropped buffer as one drop; each
//! buffer comes with the count as it was when the buffer was queued, so the
//! buffers dropped between two received ones held the group sequence numbers
//! between them, and those are the datagrams counted (as many datagrams as the
//! received buffers held on average where the numbers are unknown). Otherwise
//! an overloaded GRO receiver's overload reads as path loss, up to 46 times
//! over.
//!
//! One module per concern: `setup` (configuration, interface lookup,
//! socket options, the GSO/GRO probes), `send` (batch send: `sendmmsg`, GSO
//! runs, the fallback when GSO is refused), `recv` (batch receive:
//! `recvmmsg`, GRO buffers cut back into datagrams). This file holds the
//! transport itself and its [`Transport`] implementation.

mod recv;
mod send;
mod setup;

pub use setup::{interface_info, UdpConfig, UdpSetupError, DEFAULT_GRO, DEFAULT_GSO};

use super::{Capabilities, Received, Transport, Wake};
use crate::{Dest, Transmit};
use mio::net::UdpSocket;
use mio::{Events, Poll, Token, Waker};
use recv::Gro;
use send::gso_refused;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Most datagrams moved by one `sendmmsg` or `recvmmsg`.
pub const MAX_BATCH: usize = 64;

const MCAST: Token = Token(0);
const UCAST: Token = Token(1);
const WAKE: Token = Token(2);
/// Tokens of descriptors added by [`UdpTransport::watch_readable`] start here.
const WATCH_BASE: usize = 16;

struct MioWaker(Waker);

impl Wake for MioWaker {
    fn wake(&self) {
        if let Err(e) = self.0.wake() {
            tracing::debug!(error = %e, "waking the transport failed");
        }
    }
}

/// A UDP multicast transport.
pub struct UdpTransport {
    poll: Poll,
    events: Events,
    waker: Arc<MioWaker>,
    mcast: Option<UdpSocket>,
    ucast: UdpSocket,
    group: SocketAddr,
    caps: Capabilities,
    turn: bool,
    watched: AtomicUsize,
    /// Group sends use UDP GSO (configured and accepted by the kernel).
    gso: bool,
    /// Receives use UDP GRO.
    gro: Option<Gro>,
    /// Lengths and senders of the last batch `recv_in_place` took without GRO.
    received: Vec<Received>,
    /// The kernel's running count of datagrams dropped for want of receive
    /// buffer (`SO_RXQ_OVFL`), as last reported, on the multicast and the
    /// unicast socket.
    drops: [u32; 2],
    /// Datagrams dropped for want of receive buffer, from `drops`: with GRO the kernel
    /// queues a buffer of many datagrams as one and counts a dropped one as one, so a
    /// rise of the count counts the group sequence numbers it skipped (`group_seq`).
    dropped: u64,
    /// Session and sequence number of the last group datagram each socket took with
    /// GRO: a dropped buffer's datagrams are the numbers between it and the next.
    group_seq: [Option<(u64, u64)>; 2],
    /// Whether the multicast and the unicast socket may hold datagrams: set by
    /// a readiness event, cleared when a receive finds the socket empty.
    may_read: [bool; 2],
    /// A watched descriptor was reported readable since the last
    /// [`UdpTransport::take_watched_ready`].
    watched_ready: AtomicBool,
}

impl std::fmt::Debug for UdpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpTransport")
            .field("group", &self.group)
            .field("local", &self.ucast.local_addr().ok())
            .finish()
    }
}

impl Transport for UdpTransport {
    fn send(&mut self, dest: Dest, data: &[u8]) -> io::Result<()> {
        let to = self.dest_addr(dest);
        let mut spins = 0u32;
        loop {
            match self.ucast.send_to(data, to) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && spins < 20_000 => {
                    spins += 1;
                    std::thread::sleep(Duration::from_micros(50));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A peer's port closed: the datagram is lost, like any other loss.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    fn recv(&mut self, buf: &mut [u8], timeout: Option<Duration>) -> io::Result<Option<Received>> {
        if self.gro.is_some() {
            // A GRO buffer holds several datagrams: take them one at a time.
            let mut one = Vec::with_capacity(1);
            let slot = buf.len();
            self.recv_batch(buf, slot, &mut one, timeout)?;
            return Ok(one.pop());
        }
        if timeout == Some(Duration::ZERO) {
            self.poll_events(timeout)?;
            return self.try_recv(buf);
        }
        if let Some(r) = self.try_recv(buf)? {
            return Ok(Some(r));
        }
        if !self.poll_events(timeout)? {
            return Ok(None);
        }
        self.try_recv(buf)
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.waker.clone()
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.ucast.local_addr()
    }

    fn send_batch(&mut self, buf: &[u8], slot: usize, items: &[Transmit]) -> io::Result<()> {
        let gso = self.gso;
        match self.send_runs(buf, slot, items, gso) {
            Ok(()) => Ok(()),
            Err((done, e)) if gso && gso_refused(&e) => {
                tracing::info!(error = %e, "UDP GSO refused; falling back to sendmmsg");
                self.gso = false;
                let rest = &items[done..];
                self.send_runs(&buf[(done * slot).min(buf.len())..], slot, rest, false)
                    .map_err(|(_, e)| e)
            }
            Err((_, e)) => Err(e),
        }
    }

    fn rx_dropped(&self) -> u64 {
        self.dropped
    }

    fn recv_batch(
        &mut self,
        buf: &mut [u8],
        slot: usize,
        out: &mut Vec<Received>,
        timeout: Option<Duration>,
    ) -> io::Result<usize> {
        if timeout == Some(Duration::ZERO) {
            if !self.gro.as_ref().is_some_and(Gro::has_pending) {
                self.poll_events(timeout)?;
            }
            return self.try_recv_batch(buf, slot, out);
        }
        let n = self.try_recv_batch(buf, slot, out)?;
        if n > 0 {
            return Ok(n);
        }
        if !self.poll_events(timeout)? {
            return Ok(0);
        }
        self.try_recv_batch(buf, slot, out)
    }

    /// With GRO, datagrams are lent where they lie in the coalesced receive buffers (no
    /// copy into `buf`); without it, one `recvmmsg` into `buf`'s slots.
    fn recv_in_place(
        &mut self,
        buf: &mut [u8],
        slot: usize,
        timeout: Option<Duration>,
        f: &mut dyn FnMut(SocketAddr, &mut [u8]),
    ) -> io::Result<usize> {
        let Some(mut gro) = self.gro.take() else {
            let mut got = std::mem::take(&mut self.received);
            let r = crate::transport::recv_in_place_by_batch(self, buf, slot, timeout, &mut got, f);
            self.received = got;
            return r;
        };
        let r = self.recv_gro_in_place(&mut gro, timeout, f);
        self.gro = Some(gro);
        r
    }
}

impl UdpTransport {
    /// Waits at most `timeout` for readiness events and notes them: sockets that may hold
    /// datagrams, and whether a watched descriptor became readable. `Ok(false)` when the
    /// wait was interrupted.
    fn poll_events(&mut self, timeout: Option<Duration>) -> io::Result<bool> {
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(false),
            Err(e) => return Err(e),
        }
        for ev in self.events.iter() {
            match ev.token() {
                MCAST => self.may_read[0] = true,
                UCAST => self.may_read[1] = true,
                WAKE => {}
                _ => self.watched_ready.store(true, Ordering::Relaxed),
            }
        }
        Ok(true)
    }

    /// Whether a descriptor added with [`UdpTransport::watch_readable`] was reported
    /// readable since the last call (true before the first). Readiness is edge-triggered:
    /// a caller that drains its descriptors whenever this says so, and only then, misses
    /// nothing and skips the reads that would find them empty.
    pub fn take_watched_ready(&self) -> bool {
        self.watched_ready.swap(false, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests;
