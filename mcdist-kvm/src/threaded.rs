//! Lazy memory fed by an mcdist client on its own I/O thread ([`McdistFetcher`]): a clone's
//! page faults become requests handed to the client thread, and pages the server multicasts
//! (demanded by any clone, or pushed) are installed by that thread as they arrive. The
//! clone path drives the client on the fault thread instead ([`crate::inline::InlineMcdist`]).

use std::sync::Arc;
use std::time::Duration;

use mcdist::node::{ClientNode, NodeError, PageSink, SinkError};

use crate::descriptor::Descriptor;
use crate::lazy::{LazyHandle, PageFetcher};
use crate::session::{check_session, client_setup, ClientSetup, SessionError, SessionLost};

/// Delivers the client's pages into one clone's lazy memory; a session other than the
/// descriptor's (`pin`) fails the memory before any of its pages arrives.
struct Sink(LazyHandle, Option<u64>);

impl PageSink for Sink {
    fn session_started(&self, info: &mcdist::SessionInfo) {
        if let Some(pin) = self.1.filter(|p| *p != info.session_id) {
            self.0
                .fail(SessionLost::SessionChanged(SessionError::OtherSession {
                    announced: info.session_id,
                    described: pin,
                }));
        }
    }
    fn page_ready(&self, pfn: u64, data: &[u8]) -> Result<(), SinkError> {
        self.0.install(pfn, data);
        Ok(())
    }
    fn failed(&self, error: &NodeError) {
        self.0.fail(SessionLost::Node(error.clone()));
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

impl McdistFetcher {
    /// Joins the session named in `desc` over UDP multicast on `iface` and delivers pages to
    /// `handle`. Waits up to `join_timeout` for the server's announcement.
    pub fn connect(
        desc: &Descriptor,
        iface: Option<&str>,
        handle: LazyHandle,
        join_timeout: Duration,
        tune: impl FnOnce(&mut ClientSetup),
    ) -> Result<Self, SessionError> {
        let (transport, cfg) = client_setup(desc, iface, tune)?;
        let pin = desc.session.as_ref().map(|s| s.session_id);
        let client = ClientNode::start(cfg, transport, Arc::new(Sink(handle, pin)))?;
        let info = client.wait_session(join_timeout)?;
        check_session(desc, &info)?;
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
