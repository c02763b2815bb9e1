//! The small I/O trait the drivers use, and its implementations.
//!
//! - [`udp::UdpTransport`]: real UDP multicast (socket2 + mio): interface
//!   selection, TTL, loop, large socket buffers; also unicast-only mode for the
//!   server's unicast fan-out delivery.
//! - [`mem::MemNetwork`]: an in-memory network of endpoints (real time, threads).
//! - [`fault::FaultInjector`]: wraps any transport with seeded loss,
//!   duplication and reordering on send and receive.
//!
//! The deterministic virtual-time network used by tests lives in [`crate::sim`];
//! it drives the state machines directly.

pub mod fault;
pub mod mem;
pub mod udp;

use crate::{Dest, Transmit};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// What a transport can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Largest datagram payload it sends without IP fragmentation.
    pub max_datagram: usize,
    /// How many datagrams it can send or receive in one system call.
    pub batch: usize,
}

/// One received datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Bytes written to the buffer.
    pub len: usize,
    /// Sender.
    pub from: SocketAddr,
}

/// Interrupts a blocked [`Transport::recv`] from another thread.
pub trait Wake: Send + Sync {
    /// Wake the receiver; harmless when it is not waiting.
    fn wake(&self);
}

/// Sends and receives datagrams.
pub trait Transport: Send + 'static {
    /// Send one datagram to `dest` (the group, or one peer).
    fn send(&mut self, dest: Dest, data: &[u8]) -> io::Result<()>;
    /// Receive one datagram, waiting at most `timeout` (`None`: until one
    /// arrives or the transport is woken). `Ok(None)` on timeout or wake.
    fn recv(&mut self, buf: &mut [u8], timeout: Option<Duration>) -> io::Result<Option<Received>>;
    /// A handle that interrupts `recv`.
    fn waker(&self) -> Arc<dyn Wake>;
    /// Limits of this transport.
    fn capabilities(&self) -> Capabilities;
    /// The address peers reply to.
    fn local_addr(&self) -> io::Result<SocketAddr>;

    /// Datagrams the receive side dropped so far because it did not keep up
    /// (its socket buffers were full), as far as the transport knows: a
    /// running count, 0 where it is not measured.
    fn rx_dropped(&self) -> u64 {
        0
    }

    /// Send several datagrams: datagram `i` goes to `items[i].dest` and is the
    /// first `items[i].len` bytes of `buf[i * slot..]`. Transports that can
    /// send many datagrams in one system call (`sendmmsg`) override this; the
    /// default sends them one by one.
    fn send_batch(&mut self, buf: &[u8], slot: usize, items: &[Transmit]) -> io::Result<()> {
        for (i, t) in items.iter().enumerate() {
            self.send(t.dest, batch_datagram(buf, slot, i, t.len)?)?;
        }
        Ok(())
    }

    /// Receive up to `buf.len() / slot` datagrams, waiting at most `timeout`
    /// for the first: datagram `i` lands at `buf[i * slot..]` and its length and
    /// sender are appended to `out`. Returns how many arrived. Transports that
    /// can receive many datagrams in one system call (`recvmmsg`) override
    /// this; the default receives them one by one.
    fn recv_batch(
        &mut self,
        buf: &mut [u8],
        slot: usize,
        out: &mut Vec<Received>,
        timeout: Option<Duration>,
    ) -> io::Result<usize> {
        let mut n = 0;
        let mut timeout = timeout;
        for chunk in buf.chunks_exact_mut(slot.max(1)) {
            match self.recv(chunk, timeout)? {
                Some(r) => {
                    out.push(r);
                    n += 1;
                    timeout = Some(Duration::ZERO);
                }
                None => break,
            }
        }
        Ok(n)
    }

    /// Receive what is waiting (waiting at most `timeout` for the first datagram) and lend
    /// each datagram to `f(from, bytes)` where it lies: in a slot of `buf` (slots of `slot`
    /// bytes, as in [`Transport::recv_batch`]), or in the transport's own receive buffers
    /// (UDP GRO), so that a driver can hand a page on without copying the datagram first.
    /// `f` may modify the bytes (a layer above opens datagrams in place). Returns how many
    /// datagrams were handed to `f`. The default receives one batch with
    /// [`Transport::recv_batch`].
    fn recv_in_place(
        &mut self,
        buf: &mut [u8],
        slot: usize,
        timeout: Option<Duration>,
        f: &mut dyn FnMut(SocketAddr, &mut [u8]),
    ) -> io::Result<usize> {
        recv_in_place_by_batch(self, buf, slot, timeout, &mut Vec::new(), f)
    }
}

/// [`Transport::recv_in_place`] over one [`Transport::recv_batch`] into `buf`; `got` is
/// scratch for the lengths and senders (a transport keeps one to reuse).
pub(crate) fn recv_in_place_by_batch<T: Transport + ?Sized>(
    t: &mut T,
    buf: &mut [u8],
    slot: usize,
    timeout: Option<Duration>,
    got: &mut Vec<Received>,
    f: &mut dyn FnMut(SocketAddr, &mut [u8]),
) -> io::Result<usize> {
    let slot = slot.max(1);
    got.clear();
    let n = t.recv_batch(buf, slot, got, timeout)?;
    for (i, r) in got.iter().enumerate() {
        let at = i * slot;
        f(r.from, &mut buf[at..at + r.len.min(slot)]);
    }
    Ok(n)
}

/// Datagram `i` of a send batch: the first `len` bytes (at most `slot`) of
/// `buf[i * slot..]`.
pub(crate) fn batch_datagram(buf: &[u8], slot: usize, i: usize, len: usize) -> io::Result<&[u8]> {
    let start = i * slot;
    buf.get(start..start + len.min(slot))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "batch slot out of range"))
}

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn send(&mut self, dest: Dest, data: &[u8]) -> io::Result<()> {
        (**self).send(dest, data)
    }
    fn recv(&mut self, buf: &mut [u8], timeout: Option<Duration>) -> io::Result<Option<Received>> {
        (**self).recv(buf, timeout)
    }
    fn waker(&self) -> Arc<dyn Wake> {
        (**self).waker()
    }
    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        (**self).local_addr()
    }
    fn rx_dropped(&self) -> u64 {
        (**self).rx_dropped()
    }
    fn send_batch(&mut self, buf: &[u8], slot: usize, items: &[Transmit]) -> io::Result<()> {
        (**self).send_batch(buf, slot, items)
    }
    fn recv_batch(
        &mut self,
        buf: &mut [u8],
        slot: usize,
        out: &mut Vec<Received>,
        timeout: Option<Duration>,
    ) -> io::Result<usize> {
        (**self).recv_batch(buf, slot, out, timeout)
    }
    fn recv_in_place(
        &mut self,
        buf: &mut [u8],
        slot: usize,
        timeout: Option<Duration>,
        f: &mut dyn FnMut(SocketAddr, &mut [u8]),
    ) -> io::Result<usize> {
        (**self).recv_in_place(buf, slot, timeout, f)
    }
}
