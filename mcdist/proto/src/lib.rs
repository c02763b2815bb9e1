//! # mcdist-proto — the mcdist protocol core
//!
//! The wire format and the sans-IO state machines of mcdist, with everything they
//! need and nothing that touches the operating system: no sockets, no threads, no
//! clock. The `mcdist` crate re-exports every module here under the same path and
//! adds the drivers (UDP transport, threads, keyed sessions, the CLI).
//!
//! - [`wire`]: versioned, checked packet views and representations.
//! - [`server::Server`] and [`client::Client`]: sans-IO state machines; time is a
//!   parameter, datagrams are written into caller buffers.
//! - [`integrity`]: hash pages that verify any page against the image's BLAKE3 root.
//! - [`fec`], [`pacing`], [`reassembly`], [`bitmap`], [`workingset`], [`digest`],
//!   [`timer`]: the rules the state machines are built from.
//! - [`source`]: the [`source::PageSource`] trait a driver implements to give the
//!   server page bytes, and the image scan a driver runs before starting a server.
//! - [`sim`]: a deterministic, virtual-time network for tests.
//!
//! ## Polling order (both state machines)
//! 1. Feed input: `handle_datagram(now, from, bytes)` for each received datagram
//!    (`Client::handle_datagram_slice` for one in a reused receive buffer),
//!    local requests (`Client::request_page`), and `handle_timeout(now)` once
//!    `now >= poll_timeout()`.
//! 2. Drain `poll_transmit(now, buf)` until it returns `None`, sending each
//!    [`Transmit`] to its [`Dest`].
//! 3. Drain `poll_event()` (a client's `PageReady` data may be handed back with
//!    `Client::recycle_page` once stored, so its buffer serves a later page).
//! 4. Sleep until `poll_timeout()` or the next input.
#![forbid(unsafe_code)]

pub mod bitmap;
pub mod client;
pub mod digest;
pub mod fec;
pub mod integrity;
pub mod pacing;
pub mod reassembly;
pub mod server;
pub mod sim;
pub mod source;
pub mod timer;
pub mod wire;
pub mod workingset;

use std::net::SocketAddr;

pub use client::{Client, ClientConfig, ClientEvent, ClientStats};
pub use server::{Server, ServerConfig, ServerEvent, ServerStats};
pub use source::{MemSource, PageSource};

/// Where a datagram produced by `poll_transmit` goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dest {
    /// The session's multicast group (or, in unicast fan-out, every receiver).
    Group,
    /// One peer by unicast.
    Peer(SocketAddr),
}

/// A datagram written by `poll_transmit` into the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    /// Destination.
    pub dest: Dest,
    /// Number of bytes written at the start of the buffer.
    pub len: usize,
}

/// Facts about a session, learned from the server's announce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionInfo {
    /// Session id.
    pub session_id: u64,
    /// Image size in bytes.
    pub image_size: u64,
    /// Page size in bytes.
    pub page_size: usize,
    /// Number of pages.
    pub page_count: u64,
    /// BLAKE3 digest of the image.
    pub digest: [u8; 32],
    /// Number of all-zero pages.
    pub zero_count: u64,
}

/// A 32-byte digest that prints (`Display` and `Debug`) as 64 lowercase hex digits, as
/// errors and logs name it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct DigestHex(pub [u8; 32]);

impl std::fmt::Display for DigestHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl std::fmt::Debug for DigestHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Format a digest as lowercase hex.
pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parse a digest written as 64 hex digits (either case); `None` for anything else.
pub fn parse_digest(s: &str) -> Option<[u8; 32]> {
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *o = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}
