//! A spoofing adversary: datagrams to the server under source addresses the
//! adversary does not own, and the bytes the server sends back to them.
//!
//! [`Sim::spoof`] injects a datagram "from" a forged address and counts its bytes
//! against that address; the driver counts every unicast byte the server sends
//! to each address and every group byte other than the periodic announce, so a
//! test reads the amplification factor per forged address
//! ([`Sim::amplification`]) and the group traffic a forgery caused
//! ([`Sim::group_data_bytes`]). [`Forgery`] builds the messages an off-path
//! attacker can write knowing only the session id (it is in every announce):
//! joins, demand requests, end-game retries, NACKs, COMPLETE heartbeats and
//! leaves, each with a guessed (wrong) token.

use super::Sim;
use crate::wire::{self, Body, HeaderFlags, Message, PageRange};
use bytes::Bytes;
use std::net::SocketAddr;
use std::time::Duration;

/// A message an off-path adversary forges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forgery {
    /// A join (padded like an honest one) asking for the zero map.
    Join,
    /// A demand request for 64 pages.
    Request,
    /// An end-game retry for 64 pages.
    Retry,
    /// A NACK for 64 pages, reporting heavy loss.
    Nack,
    /// A heartbeat reporting completion.
    Complete,
    /// A leave saying "done".
    Leave,
}

impl Forgery {
    /// Every kind.
    pub const ALL: [Forgery; 6] = [
        Forgery::Join,
        Forgery::Request,
        Forgery::Retry,
        Forgery::Nack,
        Forgery::Complete,
        Forgery::Leave,
    ];

    /// The datagram for `session`, asking about pages from `start` (modulo
    /// `page_count`); `guess` fills the token field.
    pub fn datagram(self, session: u64, start: u64, page_count: u64, guess: u8) -> Bytes {
        let token = [guess; wire::TOKEN_LEN];
        let mut raw = Vec::new();
        let start = start % page_count.max(1);
        let len = 64u32
            .min(u32::try_from(page_count - start).unwrap_or(64))
            .max(1);
        wire::encode_ranges(&[PageRange { start, len }], &mut raw);
        let request = |flags, loss_permille| wire::Request {
            rx_rate: 1,
            loss_permille,
            flags,
            // Heard everything: no answer counts as in flight to it.
            heard_seq: u64::MAX,
            ranges: wire::ranges_from_encoded(&raw),
        };
        let body = match self {
            Forgery::Join => Body::Join(wire::Join {
                flags: wire::Join::WANT_ZERO_MAP,
                token,
            }),
            Forgery::Request => Body::Request(request(wire::RequestFlags::empty(), 0)),
            Forgery::Retry => Body::Request(request(wire::Request::RETRY, 0)),
            Forgery::Nack => Body::Nack(request(wire::RequestFlags::empty(), 999)),
            Forgery::Complete => Body::Heartbeat(wire::Heartbeat {
                rx_rate: 1,
                loss_permille: 0,
                overload_permille: 0,
                have_pages: page_count,
                flags: wire::Heartbeat::COMPLETE,
                token,
            }),
            Forgery::Leave => Body::Leave(wire::Leave { reason: 0, token }),
        };
        let m = Message {
            session,
            seq: start + 1,
            flags: HeaderFlags::empty(),
            body,
        };
        let mut buf = vec![0u8; m.buffer_len()];
        let n = m.emit(&mut buf).unwrap_or(0);
        buf.truncate(n);
        buf.into()
    }
}

impl Sim {
    /// Send `data` to the server as if from `from`, an address the sender
    /// does not own, after `delay`; its bytes count against `from`.
    pub fn spoof(&mut self, from: SocketAddr, data: Bytes, delay: Duration) {
        *self.spoofed_in.entry(from).or_default() += data.len() as u64;
        self.inject(None, from, data, delay);
    }

    /// Bytes the server sent to `addr` by unicast.
    pub fn bytes_sent_to(&self, addr: SocketAddr) -> u64 {
        self.unicast_bytes.get(&addr).copied().unwrap_or(0)
    }

    /// Bytes forged under `addr` with [`Sim::spoof`].
    pub fn bytes_spoofed_from(&self, addr: SocketAddr) -> u64 {
        self.spoofed_in.get(&addr).copied().unwrap_or(0)
    }

    /// Bytes the server sent to the forged addresses `addrs` per byte forged
    /// under them (0 when nothing was forged).
    pub fn amplification(&self, addrs: &[SocketAddr]) -> f64 {
        let out: u64 = addrs.iter().map(|a| self.bytes_sent_to(*a)).sum();
        let inp: u64 = addrs.iter().map(|a| self.bytes_spoofed_from(*a)).sum();
        if inp == 0 {
            0.0
        } else {
            out as f64 / inp as f64
        }
    }

    /// Group bytes the server sent, the periodic announces left out.
    pub fn group_data_bytes(&self) -> u64 {
        self.group_data_bytes
    }
}
