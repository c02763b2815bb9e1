//! Address validation and the anti-amplification limit (RFC 9000 §8 is the model).
//!
//! Rules owned here:
//! 1. **Tokens.** The server answers a join with an announce carrying a token,
//!    `BLAKE3-keyed(server secret, session ‖ address)` cut to 16 bytes: stateless,
//!    bound to the address the announce went to, and worthless to another server
//!    instance (each draws its own secret). A join, heartbeat or leave that echoes
//!    the token proves the sender receives at that address: the address is
//!    validated and the receiver enters the table.
//! 2. **Three times, not more.** Until then the address gets nothing but the
//!    announce reply to each join, and only when that reply is at most three
//!    times the join's size (clients pad their joins, as QUIC pads Initials).
//!    Requests, NACKs, end-game retries, heartbeats and leaves from an address
//!    that is not validated are dropped: they never trigger a group send, a
//!    unicast answer or a zero map, never occupy the receiver table, never count
//!    toward completion and never start the sweep.
//! 3. **Heartbeats and leaves carry the token**, so a stranger forging the
//!    address of a validated receiver cannot report it complete or gone.
//! 4. **Control is paced and bounded.** Control datagrams spend a bucket of
//!    their own (an eighth of the paced rate, at least [`CONTROL_MIN_RATE`]);
//!    the control queue holds at most [`Validator::queue_limit`] entries.

use super::emit::Control;
use super::{Server, ServerConfig};
use crate::wire::{self, Token, TOKEN_LEN};
use std::net::SocketAddr;

/// Amplification factor allowed toward an address that is not validated.
pub(super) const AMPLIFICATION_LIMIT: usize = 3;
/// Floor of the control bucket's rate, bytes per second.
pub(super) const CONTROL_MIN_RATE: u64 = 1 << 20;

/// The server's token secret.
pub(super) struct Validator {
    secret: [u8; 32],
}

impl std::fmt::Debug for Validator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Validator { .. }")
    }
}

impl Validator {
    pub(super) fn new(secret: [u8; 32]) -> Validator {
        Validator { secret }
    }

    /// The token for `addr` in `session`.
    pub(super) fn token(&self, session: u64, addr: SocketAddr) -> Token {
        let mut h = blake3::Hasher::new_keyed(&self.secret);
        h.update(b"mcdist address token v1");
        h.update(&session.to_be_bytes());
        match addr {
            SocketAddr::V4(a) => h.update(&a.ip().octets()),
            SocketAddr::V6(a) => h.update(&a.ip().octets()),
        };
        h.update(&addr.port().to_be_bytes());
        let mut t = [0u8; TOKEN_LEN];
        t.copy_from_slice(&h.finalize().as_bytes()[..TOKEN_LEN]);
        t
    }

    /// `token` is the one issued to `addr` (compared in constant time).
    pub(super) fn check(&self, session: u64, addr: SocketAddr, token: &Token) -> bool {
        let want = self.token(session, addr);
        want.iter()
            .zip(token)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    /// Most control messages queued at once: every zero-map chunk for a few
    /// receivers, plus announces.
    pub(super) fn queue_limit(zero_map_chunks: u32) -> usize {
        1024 + 4 * zero_map_chunks as usize
    }
}

impl Server {
    /// `token` validates `from` for this session.
    pub(super) fn token_valid(&self, from: SocketAddr, token: &Token) -> bool {
        self.validator.check(self.session, from, token)
    }

    /// The token this server hands to `to`.
    pub(super) fn token_for(&self, to: SocketAddr) -> Token {
        self.validator.token(self.session, to)
    }

    /// Bytes of an announce reply on the wire (security trailer included).
    fn announce_reply_len(&self) -> usize {
        wire::HEADER_LEN + wire::Announce::LEN + self.cfg.trailer_reserve
    }

    /// A join of `len` bytes from an address that is not validated: answer with
    /// the announce (and its token) only if the reply stays within the limit.
    pub(super) fn answer_unvalidated_join(&mut self, from: SocketAddr, len: usize) {
        if self.announce_reply_len() > AMPLIFICATION_LIMIT * len {
            self.stats.unvalidated += 1;
            tracing::debug!(%from, len, "join too short to answer an unvalidated address");
            return;
        }
        self.queue_announce_to(from);
    }

    /// The control bucket's rate and burst for a paced data rate of `rate`.
    pub(super) fn control_rate(cfg: &ServerConfig, rate: u64) -> (u64, u64) {
        let r = (rate / 8).max(CONTROL_MIN_RATE);
        (r, (r / 8).max(4 * cfg.max_datagram as u64))
    }

    /// Bytes a control message takes from the control bucket (an upper bound).
    pub(super) fn control_len(&self, c: &Control) -> u64 {
        let body = match c {
            Control::Announce(_) => wire::Announce::LEN,
            Control::ZeroMapChunk(..) | Control::Hint(..) => self.cfg.max_datagram,
            Control::End => 1,
        };
        (wire::HEADER_LEN + body + self.cfg.trailer_reserve).min(self.cfg.max_datagram) as u64
    }

    /// Room for `n` more control messages.
    pub(super) fn control_room(&mut self, n: usize) -> bool {
        let ok = self.out.control.len() + n <= Validator::queue_limit(self.out.zero_map_chunks());
        if !ok {
            self.stats.queue_full += 1;
        }
        ok
    }

    /// Drop a datagram from an address that is not validated (or with a bad token).
    pub(super) fn drop_unvalidated(&mut self, from: SocketAddr, what: &'static str) {
        self.stats.unvalidated += 1;
        tracing::debug!(%from, what, "dropping datagram from an address not validated");
    }
}
