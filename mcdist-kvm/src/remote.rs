//! Lazy memory fed by mcdist: a clone's page faults become mcdist requests, and pages the
//! server multicasts (demanded by any clone, or pushed) are installed as they arrive.
//! [`connect_fetcher`] (the clone path) drives the client on the fault thread
//! ([`InlineMcdist`]); [`McdistFetcher`] runs it on its own thread.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use mcdist::node::{ClientNode, NodeError, PageSink, ServerNode, ServerSnapshot, SinkError};
use mcdist::source::ImageInfo;
use mcdist::transport::udp::{UdpConfig, UdpTransport};
use mcdist::{ClientConfig, ServerConfig};

use crate::descriptor::{Descriptor, SessionParams};
use crate::inline::InlineMcdist;
use crate::lazy::{LazyHandle, PageFetcher};
use crate::source::{PageBitmap, PageSource};

/// Errors connecting lazy memory to mcdist.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The descriptor names no memory server.
    #[error("the descriptor has no mcdist session parameters")]
    NoSession,
    /// The UDP transport could not be set up.
    #[error("mcdist transport: {0}")]
    Transport(String),
    /// The mcdist node failed.
    #[error("mcdist: {0}")]
    Node(#[from] NodeError),
    /// The server serves a different image than the descriptor describes.
    #[error("memory server serves {served} pages, descriptor describes {described}")]
    ImageMismatch {
        /// Pages served.
        served: u64,
        /// Pages in the descriptor.
        described: u64,
    },
}

struct Sink(LazyHandle);

impl PageSink for Sink {
    fn page_ready(&self, pfn: u64, data: &[u8]) -> Result<(), SinkError> {
        self.0.install(pfn, data);
        Ok(())
    }
    fn failed(&self, error: &NodeError) {
        self.0.fail(format!("mcdist session failed: {error}"));
    }
}

/// Command-line options of the clone-side binaries naming the mcdist session (the
/// descriptor's, unless overridden) and the interface to join it on.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SessionArgs {
    /// Multicast group (overrides the descriptor).
    #[arg(long)]
    pub group: Option<SocketAddrV4>,
    /// Interface for multicast.
    #[arg(long)]
    pub iface: Option<String>,
    /// Memory server request address (overrides the descriptor).
    #[arg(long)]
    pub server: Option<SocketAddr>,
}

impl SessionArgs {
    /// Loads the descriptor at `path` and applies the overrides to its session.
    pub fn load(
        &self,
        path: &std::path::Path,
    ) -> Result<Descriptor, crate::descriptor::DescriptorError> {
        let mut desc = Descriptor::load(path)?;
        if let Some(s) = desc.session.as_mut() {
            if let Some(g) = self.group {
                s.group = g;
            }
            if let Some(a) = self.server {
                s.server = a;
            }
        }
        Ok(desc)
    }
}

/// A [`PageFetcher`] backed by an mcdist [`ClientNode`].
pub struct McdistFetcher {
    client: ClientNode,
}

impl std::fmt::Debug for McdistFetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McdistFetcher")
            .field("client", &self.client)
            .finish()
    }
}

/// The UDP transport and client configuration for joining the session named in
/// `desc` on `iface`: the descriptor's digest is required, zero pages come from
/// the descriptor (no zero map is asked for), and `tune` adjusts the rest.
pub(crate) fn client_setup(
    desc: &Descriptor,
    iface: Option<&str>,
    tune: impl FnOnce(&mut ClientConfig),
) -> Result<(UdpTransport, ClientConfig), RemoteError> {
    let s = desc.session.as_ref().ok_or(RemoteError::NoSession)?;
    let mut udp = UdpConfig::new(s.group);
    udp.iface = iface.map(str::to_string);
    udp.server = Some(s.server);
    let transport =
        UdpTransport::client(&udp).map_err(|e| RemoteError::Transport(e.to_string()))?;
    let mut cfg = ClientConfig::new(s.server);
    cfg.expected_digest = Some(desc.digest);
    cfg.want_zero_map = false;
    tune(&mut cfg);
    Ok((transport, cfg))
}

impl McdistFetcher {
    /// Joins the session named in `desc` over UDP multicast on `iface` and delivers pages to
    /// `handle`. Waits up to `join_timeout` for the server's announcement.
    pub fn connect(
        desc: &Descriptor,
        iface: Option<&str>,
        handle: LazyHandle,
        join_timeout: Duration,
        tune: impl FnOnce(&mut ClientConfig),
    ) -> Result<Self, RemoteError> {
        let (transport, cfg) = client_setup(desc, iface, tune)?;
        let client = ClientNode::start(cfg, transport, Arc::new(Sink(handle)))?;
        let info = client.wait_session(join_timeout)?;
        let served = info.page_count;
        if served != desc.page_count() {
            return Err(RemoteError::ImageMismatch {
                served,
                described: desc.page_count(),
            });
        }
        Ok(Self { client })
    }

    /// The client's statistics.
    pub fn stats(&self) -> mcdist::ClientStats {
        self.client.stats()
    }
}

impl PageFetcher for McdistFetcher {
    fn request(&self, pfn: u64) {
        self.client.request(pfn);
    }
}

/// An mcdist server for a frozen image.
pub struct MemoryServer {
    node: ServerNode,
    session: SessionParams,
}

impl std::fmt::Debug for MemoryServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryServer")
            .field("session", &self.session)
            .finish()
    }
}

impl MemoryServer {
    /// Serves `image` on multicast `group` via `iface`, taking requests on `listen`.
    /// `zero` and `digest` come from the descriptor (no second scan).
    pub fn start(
        image: Arc<dyn PageSource>,
        zero: &PageBitmap,
        digest: [u8; 32],
        group: SocketAddrV4,
        iface: Option<&str>,
        listen: SocketAddr,
        cfg: ServerConfig,
    ) -> Result<Self, RemoteError> {
        let mut udp = UdpConfig::new(group);
        udp.iface = iface.map(str::to_string);
        udp.listen = Some(listen);
        let transport =
            UdpTransport::server(&udp).map_err(|e| RemoteError::Transport(e.to_string()))?;
        let zero_map = zero.clone();
        let info = ImageInfo {
            image_size: image.image_size(),
            page_size: image.page_size(),
            digest,
            zero_map,
            // The server builds the hash pages from the image (their root must be `digest`).
            hash_tree: None,
        };
        let node = ServerNode::start_with_info(cfg, transport, image, info)?;
        let session = SessionParams {
            group,
            server: listen,
            session_id: node.session_id(),
        };
        Ok(Self { node, session })
    }

    /// Session parameters for the descriptor.
    pub fn session(&self) -> &SessionParams {
        &self.session
    }

    /// Server statistics.
    pub fn stats(&self) -> ServerSnapshot {
        self.node.stats()
    }

    /// Stops the server.
    pub fn shutdown(self) -> Result<ServerSnapshot, RemoteError> {
        Ok(self.node.shutdown()?)
    }
}

/// Connects a clone's lazy memory to the session in `desc` (for [`crate::clone::run_clone`]
/// and [`crate::clone::ThreadLauncher`]). A server silent for `give_up` fails the clone.
///
/// The clone's fault thread drives the mcdist client itself ([`InlineMcdist`]), which is
/// faster than a client thread fed by the fault thread ([`McdistFetcher`], still available):
/// see the crate README's measurements.
pub fn connect_fetcher(
    desc: &Descriptor,
    iface: Option<&str>,
    handle: LazyHandle,
    give_up: Duration,
) -> Result<Arc<dyn PageFetcher>, crate::clone::CloneError> {
    let f = InlineMcdist::connect(desc, iface, &handle, Duration::from_secs(5), |c| {
        c.give_up_after = give_up
    })
    .map_err(|e| crate::clone::CloneError::Source(e.to_string()))?;
    Ok(f.into_fetcher())
}

/// [`connect_fetcher`] with the threaded client ([`McdistFetcher`]).
pub fn connect_threaded_fetcher(
    desc: &Descriptor,
    iface: Option<&str>,
    handle: LazyHandle,
    give_up: Duration,
) -> Result<Arc<dyn PageFetcher>, crate::clone::CloneError> {
    let f = McdistFetcher::connect(desc, iface, handle, Duration::from_secs(5), |c| {
        c.give_up_after = give_up
    })
    .map_err(|e| crate::clone::CloneError::Source(e.to_string()))?;
    Ok(Arc::new(f))
}
