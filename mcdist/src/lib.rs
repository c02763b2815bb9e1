//! # mcdist — multicast lazy memory distribution for VM cloning
//!
//! mcdist serves a frozen memory image (a parent VM's RAM, a snapshot file) to
//! many receivers at once. Every page is sent **once by IP multicast** and every
//! receiver that needs it takes it; receivers ask for pages they fault on (and
//! re-ask for lost ones) by unicast. The protocol follows SnowFlock's mcdist:
//! lockstep suppression of duplicate requests, push of pages predicted to be
//! needed next, receiver-driven pacing and a unicast end game; it adds compact
//! NACK ranges, bounded retry with backoff and jitter, zero-page elision and
//! application-level fragmentation of pages larger than a datagram.
//!
//! ## Layers
//! - [`wire`]: versioned, checked packet views and representations.
//! - [`server::Server`] and [`client::Client`]: **sans-IO** state machines. They
//!   read no clock and do no network I/O; time is a parameter (see below).
//! - [`transport`]: the [`transport::Transport`] trait with real UDP multicast
//!   (socket2), unicast fan-out, an in-memory network and a seeded fault injector.
//! - [`node`]: threaded drivers ([`node::ServerNode`], [`node::ClientNode`]) that
//!   turn the state machines into socket calls; they hold no protocol logic.
//! - [`digest`]: the image digest built page by page as pages arrive.
//! - [`fec`]: RaptorQ repair symbols over pushed and swept pages (off by
//!   default; `ServerConfig::fec`).
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
//!
//! ## What mcdist does not do
//! It does not freeze VMs or trap faults itself; the `mcdist-kvm` and `mcdist-xen`
//! crates do that and use this crate's client. It does not route multicast: the
//! group must reach the receivers (one L2 segment, or a multicast-routed network).
#![forbid(unsafe_code)]

pub mod bitmap;
pub mod client;
pub mod digest;
pub mod fec;
pub mod integrity;
pub mod node;
pub mod pacing;
pub mod reassembly;
pub mod secure;
pub mod server;
pub mod sim;
pub mod source;
pub mod testnet;
pub mod timer;
pub mod transport;
pub mod wire;
pub mod workingset;

use std::net::SocketAddr;

pub use client::{Client, ClientConfig, ClientEvent, ClientStats};
pub use server::{Server, ServerConfig, ServerEvent, ServerStats};
pub use source::{FileSource, MemSource, PageSource};

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
