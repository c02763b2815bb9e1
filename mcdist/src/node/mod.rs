//! Threaded drivers: a [`ServerNode`] and a [`ClientNode`] each run one
//! state machine on its own thread over any [`Transport`]. They follow the
//! polling order of the crate docs and hold no protocol logic.
//!
//! Embedders of the client receive pages through a [`PageSink`], called on the
//! client's I/O thread, so a page can go from the socket buffer to its final
//! place (a file, `UFFDIO_COPY`) without another thread hop.
//!
//! One module per concern: `server` (the server thread and its snapshot),
//! `client` (the client thread, its commands and the state waiters read),
//! `sink` (where pages go), `recv` (the receive loop both threads share). This
//! file holds the errors and the security wrapping both sides apply.

mod client;
mod recv;
mod server;
mod sink;

pub use client::ClientNode;
pub use server::{ServerNode, ServerSnapshot};
pub use sink::{MemorySink, NullSink, PageSink, SinkError};

use crate::client::ClientError;
use crate::secure::{SecureTransport, Security, SecurityStatsHandle};
use crate::server::ConfigError;
use crate::transport::Transport;
use std::io;
use std::sync::{Arc, Mutex, Once, PoisonError};
use std::time::Duration;
use thiserror::Error;

/// Errors of the threaded drivers.
///
/// The causes sit behind an [`Arc`] so that the error a client thread ended with can be
/// handed to every waiter ([`ClientNode::error`], [`ClientNode::wait_complete`]).
#[derive(Debug, Clone, Error)]
pub enum NodeError {
    /// The server could not be built.
    #[error("server configuration: {0}")]
    Config(#[source] Arc<ConfigError>),
    /// A transport call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The OS error.
        #[source]
        source: Arc<io::Error>,
    },
    /// The session failed.
    #[error(transparent)]
    Session(#[from] ClientError),
    /// Waiting timed out.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    /// The node was shut down.
    #[error("the node has stopped")]
    Stopped,
    /// The embedder's sink refused a page.
    #[error("storing page {pfn}: {source}")]
    Sink {
        /// The page.
        pfn: u64,
        /// Why.
        #[source]
        source: Arc<SinkError>,
    },
}

impl From<ConfigError> for NodeError {
    fn from(e: ConfigError) -> Self {
        NodeError::Config(Arc::new(e))
    }
}

fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> NodeError {
    move |e| NodeError::Io {
        context,
        source: Arc::new(e),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------- security

/// A driver's settings: the state machine's own settings plus what the driver
/// applies around it (the protocol core never sees keys).
///
/// Every `ServerConfig` or `ClientConfig` converts into an unkeyed `NodeConfig`, so
/// `ServerNode::start(cfg, ...)` runs an unauthenticated session;
/// `NodeConfig::new(cfg, Some(security))` runs a keyed one.
#[derive(Debug, Clone)]
pub struct NodeConfig<C> {
    /// The state machine's settings.
    pub protocol: C,
    /// Authenticate (and by default encrypt) every datagram under a pre-shared
    /// key; `None` runs an unauthenticated session. A keyed server draws a
    /// random session id unless one is configured.
    pub security: Option<Security>,
}

impl<C> NodeConfig<C> {
    /// Settings `protocol`, keyed by `security` when it is `Some`.
    pub fn new(protocol: C, security: Option<Security>) -> Self {
        NodeConfig { protocol, security }
    }
}

/// A `NodeConfig` reads and writes as its protocol settings (`cfg.give_up_after = ...`),
/// so code that tunes a client or server configuration can take either.
impl<C> std::ops::Deref for NodeConfig<C> {
    type Target = C;
    fn deref(&self) -> &C {
        &self.protocol
    }
}

impl<C> std::ops::DerefMut for NodeConfig<C> {
    fn deref_mut(&mut self) -> &mut C {
        &mut self.protocol
    }
}

impl<C> From<C> for NodeConfig<C> {
    fn from(protocol: C) -> Self {
        NodeConfig {
            protocol,
            security: None,
        }
    }
}

type Secured = (Box<dyn Transport>, Option<SecurityStatsHandle>);

fn warn_unauthenticated() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        tracing::warn!(
            "this mcdist session is unauthenticated: no pre-shared key is configured, so anyone \
             on the network can read pages and inject forged ones (give a key: mcdist --key FILE)"
        );
    });
}

fn secure_transport<T: Transport>(
    security: Option<&Security>,
    transport: T,
    wrap: impl FnOnce(T, &Security) -> SecureTransport<T>,
) -> Secured {
    match security {
        Some(sec) => {
            let t = wrap(transport, sec);
            let h = t.stats_handle();
            (Box::new(t), Some(h))
        }
        None => {
            warn_unauthenticated();
            (Box::new(transport), None)
        }
    }
}
