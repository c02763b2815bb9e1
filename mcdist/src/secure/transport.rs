//! The [`SecureTransport`] wrapper: any [`Transport`] with sealing on the way
//! out and opening on the way in. It keeps the inner transport's batching: a
//! send batch is sealed into one buffer of slots [`TRAILER_LEN`] larger, a
//! received batch is opened in place (datagrams that do not authenticate are
//! dropped and the rest move up), and it reports a `max_datagram`
//! [`TRAILER_LEN`] bytes smaller than the transport's.

use super::{Opener, Role, Sealer, Security, SecurityStats, TRAILER_LEN};
use crate::transport::{Capabilities, Received, Transport, Wake};
use crate::{Dest, Transmit};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A cloneable handle on a [`SecureTransport`]'s counters, readable from any thread.
#[derive(Debug, Clone, Default)]
pub struct SecurityStatsHandle(Arc<Mutex<SecurityStats>>);

impl SecurityStatsHandle {
    /// A copy of the counters.
    pub fn get(&self) -> SecurityStats {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Wraps a [`Transport`]: seals what is sent and opens what is received,
/// dropping (and counting) every datagram that does not authenticate.
pub struct SecureTransport<T> {
    inner: T,
    sealer: Sealer,
    group_sealer: Sealer,
    opener: Opener,
    /// Sealed datagrams of a batch send, and their lengths.
    batch_out: Vec<u8>,
    batch_items: Vec<Transmit>,
    /// What the inner transport received in a batch, before opening.
    batch_recv: Vec<Received>,
    /// The opened datagram of a single `recv`.
    batch_got: Vec<Received>,
    stats: SecurityStatsHandle,
}

impl<T> fmt::Debug for SecureTransport<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecureTransport")
            .field("sealer", &self.sealer)
            .field("group_sealer", &self.group_sealer)
            .field("opener", &self.opener)
            .finish_non_exhaustive()
    }
}

/// Most dropped datagrams one `recv` call skips before it returns `Ok(None)`.
const MAX_DROPS_PER_RECV: usize = 1024;

impl<T: Transport> SecureTransport<T> {
    /// The server side of session `session`.
    pub fn server(inner: T, sec: &Security, session: u64) -> SecureTransport<T> {
        SecureTransport::new(
            inner,
            Sealer::new(sec, Role::Server),
            Sealer::new(sec, Role::Server),
            Opener::server(sec, session),
        )
    }

    /// A client.
    pub fn client(inner: T, sec: &Security) -> SecureTransport<T> {
        SecureTransport::new(
            inner,
            Sealer::new(sec, Role::Client),
            Sealer::new(sec, Role::Client),
            Opener::client(sec),
        )
    }

    /// Wrap with given sealers (one for datagrams to single peers, one for the
    /// group; distinct sender ids) and an opener. Group and unicast traffic
    /// reach a receiver on different sockets and may be read out of order with
    /// each other; separate counters keep each stream in order for the
    /// receiver's replay window.
    pub fn new(
        inner: T,
        sealer: Sealer,
        group_sealer: Sealer,
        opener: Opener,
    ) -> SecureTransport<T> {
        SecureTransport {
            inner,
            sealer,
            group_sealer,
            opener,
            batch_out: Vec::new(),
            batch_items: Vec::new(),
            batch_recv: Vec::new(),
            batch_got: Vec::new(),
            stats: SecurityStatsHandle::default(),
        }
    }

    /// A handle on the counters.
    pub fn stats_handle(&self) -> SecurityStatsHandle {
        self.stats.clone()
    }

    /// The wrapped transport.
    pub fn inner(&self) -> &T {
        &self.inner
    }

    fn publish(&self) {
        let mut s = self.stats.0.lock().unwrap_or_else(PoisonError::into_inner);
        *s = self.opener.stats.clone();
        s.sealed = self.sealer.counter + self.group_sealer.counter;
    }
}

impl<T: Transport> Transport for SecureTransport<T> {
    fn send(&mut self, dest: Dest, data: &[u8]) -> io::Result<()> {
        self.send_batch(
            data,
            data.len(),
            &[Transmit {
                dest,
                len: data.len(),
            }],
        )
    }

    fn recv(&mut self, buf: &mut [u8], timeout: Option<Duration>) -> io::Result<Option<Received>> {
        let mut got = std::mem::take(&mut self.batch_got);
        got.clear();
        let slot = buf.len();
        let r = self
            .recv_batch(buf, slot, &mut got, timeout)
            .map(|_| got.first().copied());
        self.batch_got = got;
        r
    }

    /// Seals the batch into one buffer of slots `TRAILER_LEN` larger and hands it to the
    /// inner transport's batch send (one `sendmmsg`, and GSO runs, on UDP): a run of
    /// equal-sized datagrams stays a run of equal-sized sealed datagrams.
    fn send_batch(&mut self, buf: &[u8], slot: usize, items: &[Transmit]) -> io::Result<()> {
        let sealed_slot = slot + TRAILER_LEN;
        self.batch_out.clear();
        self.batch_out.resize(sealed_slot * items.len(), 0);
        self.batch_items.clear();
        for (i, t) in items.iter().enumerate() {
            let data = crate::transport::batch_datagram(buf, slot, i, t.len)?;
            let out = &mut self.batch_out[i * sealed_slot..(i + 1) * sealed_slot];
            out[..data.len()].copy_from_slice(data);
            let sealer = match t.dest {
                Dest::Group => &mut self.group_sealer,
                Dest::Peer(_) => &mut self.sealer,
            };
            let n = sealer
                .seal(out, data.len())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            self.batch_items.push(Transmit {
                dest: t.dest,
                len: n,
            });
        }
        let r = self
            .inner
            .send_batch(&self.batch_out, sealed_slot, &self.batch_items);
        self.publish();
        r
    }

    /// Receives a batch from the inner transport and opens each datagram in its slot;
    /// datagrams that do not authenticate are dropped (counted) and the ones after them
    /// move up a slot, so that datagram `i` of the result is still at `buf[i * slot..]`.
    fn recv_batch(
        &mut self,
        buf: &mut [u8],
        slot: usize,
        out: &mut Vec<Received>,
        timeout: Option<Duration>,
    ) -> io::Result<usize> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let base = out.len();
        let mut drops = 0;
        loop {
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            self.batch_recv.clear();
            let n = self
                .inner
                .recv_batch(buf, slot, &mut self.batch_recv, remaining)?;
            if n == 0 {
                break;
            }
            let now = Instant::now();
            let mut kept = 0;
            for (i, r) in self.batch_recv.iter().enumerate() {
                let len = r.len.min(slot);
                let at = i * slot;
                match self.opener.open(now, r.from, &mut buf[at..at + len]) {
                    Ok(plain) => {
                        if kept != i {
                            buf.copy_within(at..at + plain, kept * slot);
                        }
                        out.push(Received {
                            len: plain,
                            from: r.from,
                        });
                        kept += 1;
                    }
                    Err(_) => drops += 1,
                }
            }
            if kept > 0 || drops >= MAX_DROPS_PER_RECV {
                break;
            }
        }
        self.publish();
        Ok(out.len() - base)
    }

    /// Opens each datagram where the inner transport lends it and lends `f` what
    /// authenticated; like `recv_batch`, keeps receiving (up to `timeout`) while everything
    /// received was dropped.
    fn recv_in_place(
        &mut self,
        buf: &mut [u8],
        slot: usize,
        timeout: Option<Duration>,
        f: &mut dyn FnMut(SocketAddr, &mut [u8]),
    ) -> io::Result<usize> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let (mut kept, mut drops) = (0, 0);
        loop {
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let opener = &mut self.opener;
            let mut now = None;
            let n = self
                .inner
                .recv_in_place(buf, slot, remaining, &mut |from, d| {
                    let at = *now.get_or_insert_with(Instant::now);
                    match opener.open(at, from, d) {
                        Ok(plain) => {
                            kept += 1;
                            f(from, &mut d[..plain]);
                        }
                        Err(_) => drops += 1,
                    }
                })?;
            if n == 0 || kept > 0 || drops >= MAX_DROPS_PER_RECV {
                break;
            }
        }
        self.publish();
        Ok(kept)
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.inner.waker()
    }

    fn capabilities(&self) -> Capabilities {
        let c = self.inner.capabilities();
        Capabilities {
            max_datagram: c.max_datagram.saturating_sub(TRAILER_LEN),
            ..c
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn rx_dropped(&self) -> u64 {
        self.inner.rx_dropped()
    }
}
