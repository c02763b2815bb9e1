//! A seeded fault injector that wraps any [`Transport`]: loss, duplication and
//! reordering, applied independently on the send and the receive side (receive
//! loss models per-receiver multicast loss).

use super::{Capabilities, Received, Transport, Wake};
use crate::Dest;
use rand::{Rng, SeedableRng};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Fault probabilities, each in `0.0..=1.0`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FaultConfig {
    /// Drop an outgoing datagram.
    pub send_loss: f64,
    /// Drop an incoming datagram.
    pub recv_loss: f64,
    /// Send an outgoing datagram twice.
    pub duplicate: f64,
    /// Hold an outgoing datagram back and send it after the next one.
    pub reorder: f64,
    /// RNG seed.
    pub seed: u64,
}

/// Counters of injected faults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Outgoing datagrams dropped.
    pub send_dropped: u64,
    /// Incoming datagrams dropped.
    pub recv_dropped: u64,
    /// Outgoing datagrams duplicated.
    pub duplicated: u64,
    /// Outgoing datagrams reordered.
    pub reordered: u64,
}

/// Wraps a transport and injects faults.
#[derive(Debug)]
pub struct FaultInjector<T> {
    inner: T,
    cfg: FaultConfig,
    rng: rand::rngs::SmallRng,
    held: Option<(Dest, Vec<u8>)>,
    stats: FaultStats,
}

impl<T: Transport> FaultInjector<T> {
    /// Wrap `inner`.
    pub fn new(inner: T, cfg: FaultConfig) -> FaultInjector<T> {
        FaultInjector {
            inner,
            rng: rand::rngs::SmallRng::seed_from_u64(cfg.seed),
            cfg,
            held: None,
            stats: FaultStats::default(),
        }
    }

    /// Faults injected so far.
    pub fn stats(&self) -> FaultStats {
        self.stats
    }

    /// The wrapped transport.
    pub fn inner(&self) -> &T {
        &self.inner
    }
}

impl<T: Transport> Transport for FaultInjector<T> {
    fn send(&mut self, dest: Dest, data: &[u8]) -> io::Result<()> {
        if self.rng.random_bool(self.cfg.send_loss.clamp(0.0, 1.0)) {
            self.stats.send_dropped += 1;
            return Ok(());
        }
        if self.held.is_none() && self.rng.random_bool(self.cfg.reorder.clamp(0.0, 1.0)) {
            self.stats.reordered += 1;
            self.held = Some((dest, data.to_vec()));
            return Ok(());
        }
        self.inner.send(dest, data)?;
        if self.rng.random_bool(self.cfg.duplicate.clamp(0.0, 1.0)) {
            self.stats.duplicated += 1;
            self.inner.send(dest, data)?;
        }
        if let Some((d, held)) = self.held.take() {
            self.inner.send(d, &held)?;
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8], timeout: Option<Duration>) -> io::Result<Option<Received>> {
        // A held datagram is released when the sender goes quiet.
        if let Some((d, held)) = self.held.take() {
            self.inner.send(d, &held)?;
        }
        loop {
            match self.inner.recv(buf, timeout)? {
                Some(r) if self.rng.random_bool(self.cfg.recv_loss.clamp(0.0, 1.0)) => {
                    self.stats.recv_dropped += 1;
                    let _ = r;
                    if timeout.is_some() {
                        return Ok(None);
                    }
                }
                other => return Ok(other),
            }
        }
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.inner.waker()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn rx_dropped(&self) -> u64 {
        self.inner.rx_dropped()
    }
}
