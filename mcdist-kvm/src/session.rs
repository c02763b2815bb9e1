//! Joining an mcdist session from a clone host: the transport and client configuration for
//! the session a [`Descriptor`] names, and the errors of doing so. A leaf module: the fetchers
//! ([`crate::inline`], [`crate::threaded`]), the host cache ([`crate::share`]) and the memory
//! server ([`crate::clone::MemoryServer`]) build on it.

use mcdist::node::NodeError;
use mcdist::transport::udp::{UdpConfig, UdpSetupError, UdpTransport};
use mcdist::ClientConfig;

use crate::descriptor::Descriptor;

/// Errors joining or serving an mcdist session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The descriptor names no memory server.
    #[error("the descriptor has no mcdist session parameters")]
    NoSession,
    /// The UDP transport could not be set up.
    #[error("mcdist transport: {0}")]
    Transport(#[source] UdpSetupError),
    /// The mcdist node failed.
    #[error("mcdist: {0}")]
    Node(#[from] NodeError),
    /// The session failed, or its transport broke, before the server's announce arrived.
    #[error("mcdist transport: the {0} failed while joining")]
    JoinFailed(&'static str),
    /// The server serves a different image than the descriptor describes.
    #[error("memory server serves {served} pages, descriptor describes {described}")]
    ImageMismatch {
        /// Pages served.
        served: u64,
        /// Pages in the descriptor.
        described: u64,
    },
    /// The host page cache could not be mapped.
    #[error("mcdist transport: cannot map the page cache: {0}")]
    CacheMap(#[source] std::io::Error),
}

/// Checks that the server's image has as many pages as `desc` describes.
pub(crate) fn check_image(desc: &Descriptor, served: u64) -> Result<(), SessionError> {
    if served != desc.page_count() {
        return Err(SessionError::ImageMismatch {
            served,
            described: desc.page_count(),
        });
    }
    Ok(())
}

/// The UDP transport and client configuration for joining the session named in
/// `desc` on `iface`: the descriptor's digest is required, zero pages come from
/// the descriptor (no zero map is asked for), and `tune` adjusts the rest.
/// A clone-side client's settings: the protocol's and the key (`setup.security`); it
/// reads and writes as a [`ClientConfig`] (`setup.give_up_after = ...`).
pub type ClientSetup = mcdist::node::NodeConfig<ClientConfig>;

pub(crate) fn client_setup(
    desc: &Descriptor,
    iface: Option<&str>,
    tune: impl FnOnce(&mut ClientSetup),
) -> Result<(UdpTransport, ClientSetup), SessionError> {
    let s = desc.session.as_ref().ok_or(SessionError::NoSession)?;
    let mut udp = UdpConfig::new(s.group);
    udp.iface = iface.map(str::to_string);
    udp.server = Some(s.server);
    let transport = UdpTransport::client(&udp).map_err(SessionError::Transport)?;
    let mut cfg = ClientSetup::from(ClientConfig::new(s.server));
    cfg.expected_digest = Some(desc.digest);
    cfg.want_zero_map = false;
    tune(&mut cfg);
    Ok((transport, cfg))
}

/// Why a running session stopped delivering pages to a clone (handed to
/// [`crate::LazyHandle::fail`]).
#[derive(Debug, thiserror::Error)]
pub enum SessionLost {
    /// The client state machine gave up on the session.
    #[error("mcdist session failed: {0}")]
    Client(#[source] mcdist::client::ClientError),
    /// The client node failed.
    #[error("mcdist session failed: {0}")]
    Node(#[source] NodeError),
    /// Receiving failed.
    #[error("mcdist receive failed: {0}")]
    Receive(#[source] std::io::Error),
}
