//! One clone host's lazy file: the mcdist client for the descriptor's session wired to a
//! [`PageStore`] and mounted with [`LazyMount`].

use super::{FuseError, LazyMount, PageStore};
use crate::qemu::descriptor::{DescriptorError, QemuDescriptor};
use mcdist::client::ClientConfig;
use mcdist::node::{ClientNode, NodeError};
use mcdist::secure::Security;
use mcdist::transport::udp::{UdpConfig, UdpSetupError, UdpTransport};
use std::net::{AddrParseError, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Errors starting a host's lazy file.
#[derive(Debug, thiserror::Error)]
pub enum HostFileError {
    /// The descriptor is unusable.
    #[error(transparent)]
    Descriptor(#[from] DescriptorError),
    /// An address in the descriptor is malformed.
    #[error("descriptor address: {0}")]
    Addr(#[from] AddrParseError),
    /// The sockets could not be set up.
    #[error(transparent)]
    Udp(#[from] UdpSetupError),
    /// The mcdist client failed.
    #[error("mcdist client: {0}")]
    Client(#[from] NodeError),
    /// The server serves another session than the descriptor names.
    #[error("the server runs session {got:016x}, the descriptor names {want:016x}")]
    Session {
        /// Descriptor's session.
        want: u64,
        /// Server's session.
        got: u64,
    },
    /// FUSE failed.
    #[error(transparent)]
    Fuse(#[from] FuseError),
    /// The local image cannot be read.
    #[error("{path}: {source}")]
    Image {
        /// The image.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Options of a host's lazy file.
#[derive(Debug, Clone)]
pub struct HostFileOptions {
    /// Interface that reaches the server and joins the group.
    pub iface: String,
    /// Pre-shared key.
    pub security: Option<Security>,
    /// Receive replies by unicast instead of joining the group.
    pub unicast: bool,
    /// How long to wait for the server's announce.
    pub join_timeout: Duration,
    /// Fetch the whole image before mounting (the eager baseline).
    pub eager: bool,
    /// With `eager`: also write the whole image to this local file once fetched (what
    /// `mcdist fetch` makes), for clones to map instead of the lazy file.
    pub copy_to: Option<std::path::PathBuf>,
}

/// A running lazy file and its client.
#[derive(Debug)]
pub struct HostFile {
    /// The mount (unmounted on drop).
    pub mount: LazyMount,
    /// The host's one mcdist client (`None` when pages come from a local file).
    pub client: Option<Arc<ClientNode>>,
}

impl HostFile {
    /// Joins the descriptor's session and mounts the image as `mountpoint/name`.
    pub fn start(
        desc: &QemuDescriptor,
        mountpoint: &Path,
        name: &str,
        opts: &HostFileOptions,
    ) -> Result<Self, HostFileError> {
        let zero = desc.zero_map()?;
        let digest = desc.image_digest()?;
        let group: SocketAddrV4 = desc.group.parse()?;
        let server: SocketAddr = desc.server.parse()?;
        let mut ucfg = UdpConfig::new(group);
        ucfg.iface = Some(opts.iface.clone());
        ucfg.server = Some(server);
        ucfg.multicast = !opts.unicast;
        let transport = UdpTransport::client(&ucfg)?;
        let mut ccfg = ClientConfig::new(server);
        ccfg.seed = rand::random();
        ccfg.expected_digest = Some(digest);
        let store = Arc::new(PageStore::new(desc.mem_bytes, desc.page_size, zero));
        let client = Arc::new(ClientNode::start(
            mcdist::node::NodeConfig::new(ccfg, opts.security.clone()),
            transport,
            store.clone(),
        )?);
        let info = client.wait_session(opts.join_timeout)?;
        if info.session_id != desc.session_id {
            return Err(HostFileError::Session {
                want: desc.session_id,
                got: info.session_id,
            });
        }
        if opts.eager {
            client.fetch_all();
            client.wait_complete(Duration::from_secs(3600))?;
            if let Some(path) = &opts.copy_to {
                let image = |source| HostFileError::Image {
                    path: path.clone(),
                    source,
                };
                let file = std::fs::File::create(path).map_err(image)?;
                store.write_image(&file).map_err(image)?;
            }
        }
        let c = client.clone();
        store.set_requester(move |pfn| c.request(pfn));
        let mount = LazyMount::mount(mountpoint, name, store)?;
        Ok(Self {
            mount,
            client: Some(client),
        })
    }

    /// The same file with every missing page read from the local `image` on the READ path
    /// (no network): the baseline for READ latency.
    pub fn start_local(
        desc: &QemuDescriptor,
        image: &Path,
        mountpoint: &Path,
        name: &str,
    ) -> Result<Self, HostFileError> {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::open(image).map_err(|source| HostFileError::Image {
            path: image.to_path_buf(),
            source,
        })?;
        let store = Arc::new(PageStore::new(
            desc.mem_bytes,
            desc.page_size,
            desc.zero_map()?,
        ));
        let sink = Arc::downgrade(&store);
        let ps = desc.page_size;
        store.set_requester(move |pfn| {
            let Some(store) = sink.upgrade() else { return };
            let mut buf = vec![0u8; ps];
            match file.read_at(&mut buf, pfn * ps as u64) {
                Ok(n) => {
                    buf.truncate(n);
                    let _ = mcdist::node::PageSink::page_ready(store.as_ref(), pfn, &buf);
                }
                Err(e) => mcdist::node::PageSink::failed(
                    store.as_ref(),
                    &NodeError::Io {
                        context: "reading the local image",
                        source: std::sync::Arc::new(e),
                    },
                ),
            }
        });
        let mount = LazyMount::mount(mountpoint, name, store)?;
        Ok(Self {
            mount,
            client: None,
        })
    }

    /// Counters as one JSON object.
    pub fn stats_json(&self) -> serde_json::Value {
        let store = self.mount.store();
        let c = &store.counters;
        let lat = store.latencies();
        let (p50, p99) = super::percentiles(&lat).unwrap_or((0, 0));
        let cs = self.client.as_ref().map(|c| c.stats()).unwrap_or_default();
        serde_json::json!({
            "reads": c.reads.load(Ordering::Relaxed),
            "page_reads": c.page_reads.load(Ordering::Relaxed),
            "max_read": c.max_read.load(Ordering::Relaxed),
            "zero_reads": c.zero_reads.load(Ordering::Relaxed),
            "remote_reads": c.remote_reads.load(Ordering::Relaxed),
            "pages_requested": c.pages_requested.load(Ordering::Relaxed),
            "pages_received": c.pages_received.load(Ordering::Relaxed),
            "pages_unasked": c.pages_unasked.load(Ordering::Relaxed),
            "pages_stored": c.pages_stored.load(Ordering::Relaxed),
            "eio": c.eio.load(Ordering::Relaxed),
            "zero_pages_received": c.zero_pages_received.load(Ordering::Relaxed),
            "lost": store.is_lost(),
            "read_latency_us_p50": p50,
            "read_latency_us_p99": p99,
            "remote_read_samples": lat.len(),
            "bytes_received": cs.bytes_received,
            "zero_replies": cs.zero_replies,
            "retries": cs.retries,
        })
    }
}
