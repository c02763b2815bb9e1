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
//! The protocol core lives in the `mcdist-proto` crate (`mcdist/proto/`): wire
//! format, state machines, integrity, FEC, pacing and the simulator, with no
//! sockets, threads or clock, and none of this crate's I/O dependencies (socket2,
//! mio, nix, clap, indicatif, tracing-subscriber). This crate re-exports each of
//! its modules under the same path and adds the drivers.
//! - [`wire`]: versioned, checked packet views and representations.
//! - [`server::Server`] and [`client::Client`]: **sans-IO** state machines. They
//!   read no clock and do no network I/O; time is a parameter (see below).
//! - [`transport`]: the [`transport::Transport`] trait with real UDP multicast
//!   (socket2), unicast fan-out, an in-memory network and a seeded fault injector.
//! - [`node`]: threaded drivers ([`node::ServerNode`], [`node::ClientNode`]) that
//!   turn the state machines into socket calls; they hold no protocol logic.
//! - [`digest`]: the image digest built page by page as pages arrive.
//! - [`fec`]: FEC repair symbols over pushed and swept pages (off by
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

pub mod node;
pub mod secure;
pub mod source;
pub mod testnet;
pub mod transport;

pub use mcdist_proto::{
    bitmap, client, digest, fec, hex, integrity, pacing, parse_digest, reassembly, server, sim,
    timer, wire, workingset, Dest, SessionInfo, Transmit,
};
pub use mcdist_proto::{Client, ClientConfig, ClientEvent, ClientStats};
pub use mcdist_proto::{MemSource, PageSource};
pub use mcdist_proto::{Server, ServerConfig, ServerEvent, ServerStats};
pub use source::FileSource;
