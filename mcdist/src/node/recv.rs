//! The receive turn both driver threads share: wait until the state
//! machine's next deadline (capped) for the first datagrams, then take what
//! is waiting without waiting again, at most [`RECV_BUDGET`] datagrams per
//! turn, and hand each to the state machine where it lies in the receive
//! buffer (slot `i` holds datagram `i` of a `recv_batch`, one `recvmmsg` on UDP).
//! A batch that did not fill the buffer ends the turn: the sockets were empty
//! (what came since is taken first by the next turn, which does not wait while
//! datagrams are waiting), so the answer to a lone request goes out without
//! one more receive call before it.

use super::{io_err, NodeError};
use crate::transport::Transport;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Receive buffer slot: the largest UDP payload, rounded up. A server on
/// another link may send larger datagrams than this host's MTU suggests.
const RECV_SLOT: usize = 65_536;
/// Most datagrams taken in one `recv_batch`.
const RECV_BATCH: usize = 32;
/// Most datagrams one receive turn takes before the loop serves its timers
/// and sends again.
const RECV_BUDGET: usize = 256;

/// How long to wait for datagrams: until `deadline` (the state machine's next
/// timer), at most `cap`.
pub(super) fn wait_until(deadline: Option<Instant>, now: Instant, cap: Duration) -> Duration {
    deadline
        .map_or(cap, |t| t.saturating_duration_since(now))
        .min(cap)
}

/// The receive buffer of one driver thread.
pub(super) struct Inbox {
    buf: Vec<u8>,
    /// Datagrams one batch holds.
    slots: usize,
}

impl Inbox {
    /// Room for one batch of `transport`'s size (at most [`RECV_BATCH`]).
    pub(super) fn new<T: Transport>(transport: &T) -> Inbox {
        let batch = transport.capabilities().batch.clamp(1, RECV_BATCH);
        Inbox {
            buf: vec![0u8; RECV_SLOT * batch],
            slots: batch,
        }
    }

    /// One receive turn: waits up to `wait` for the first batch, then takes
    /// batches without waiting until none is left or [`RECV_BUDGET`]
    /// datagrams were taken. Each datagram goes to `handle(at, from, bytes)` where it
    /// lies ([`Transport::recv_in_place`]), `at` being when its batch arrived.
    pub(super) fn receive<T: Transport>(
        &mut self,
        transport: &mut T,
        wait: Duration,
        mut handle: impl FnMut(Instant, SocketAddr, &[u8]),
    ) -> Result<(), NodeError> {
        let mut budget = RECV_BUDGET;
        let mut timeout = Some(wait);
        while budget > 0 {
            let mut at = None;
            let n = transport
                .recv_in_place(&mut self.buf, RECV_SLOT, timeout, &mut |from, bytes| {
                    handle(*at.get_or_insert_with(Instant::now), from, bytes)
                })
                .map_err(io_err("receiving"))?;
            if n < self.slots {
                break;
            }
            budget = budget.saturating_sub(n);
            timeout = Some(Duration::ZERO);
        }
        Ok(())
    }
}
