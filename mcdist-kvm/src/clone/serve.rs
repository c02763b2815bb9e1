//! The parent side of a session: an mcdist server for a frozen image
//! ([`crate::clone::Frozen::serve`]).

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;

use mcdist::node::{NodeConfig, ServerNode, ServerSnapshot};
use mcdist::source::ImageInfo;
use mcdist::transport::udp::{UdpConfig, UdpTransport};
use mcdist::ServerConfig;

use crate::descriptor::SessionParams;
use crate::session::SessionError;
use crate::source::{PageBitmap, PageSource};

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
    /// `zero` and `digest` come from the descriptor; the server builds the hash pages from
    /// `image` (one read; [`MemoryServer::start_with_info`] takes them from a scan). The session id is
    /// `cfg.session_id` or, unset, drawn from the OS random generator (a restarted server is
    /// another session, which clones of the old descriptor refuse); `cfg.security` keys the
    /// session, and the descriptor records how (never the key).
    pub fn start(
        image: Arc<dyn PageSource>,
        zero: &PageBitmap,
        digest: [u8; 32],
        group: SocketAddrV4,
        iface: Option<&str>,
        listen: SocketAddr,
        cfg: impl Into<NodeConfig<ServerConfig>>,
    ) -> Result<Self, SessionError> {
        let info = ImageInfo {
            image_size: image.image_size(),
            page_size: image.page_size(),
            digest,
            zero_map: zero.clone(),
            hash_tree: None,
        };
        Self::start_with_info(image, info, group, iface, listen, cfg)
    }

    /// [`MemoryServer::start`] with the image's whole [`ImageInfo`] from a scan: its hash
    /// pages are served as they are (without them the server builds them, reading the image
    /// once more).
    pub fn start_with_info(
        image: Arc<dyn PageSource>,
        info: ImageInfo,
        group: SocketAddrV4,
        iface: Option<&str>,
        listen: SocketAddr,
        cfg: impl Into<NodeConfig<ServerConfig>>,
    ) -> Result<Self, SessionError> {
        let mut cfg: NodeConfig<ServerConfig> = cfg.into();
        if cfg.session_id.is_none() {
            cfg.session_id = Some(rand::random::<u64>() | 1);
        }
        let protection = cfg.security.as_ref().map(|s| s.protection);
        if protection.is_none() {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| tracing::warn!("{}", crate::session::UNKEYED_WARNING));
        }
        let mut udp = UdpConfig::new(group);
        udp.iface = iface.map(str::to_string);
        udp.listen = Some(listen);
        let transport = UdpTransport::server(&udp).map_err(SessionError::Transport)?;
        let node = ServerNode::start_with_info(cfg, transport, image, info)?;
        let session = SessionParams {
            group,
            server: listen,
            session_id: node.session_id(),
            protection,
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
    pub fn shutdown(self) -> Result<ServerSnapshot, SessionError> {
        Ok(self.node.shutdown()?)
    }
}
