//! Joining the session of a plain snapshot memory file served by `mcdist serve`: nothing but
//! the group and the server's address is known beforehand, so a short probe learns the image
//! (size, page size, digest) and its zero-page map from the server's announce, and the result
//! is the [`Descriptor`] the host cache joins with.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mcdist::node::{ClientNode, NullSink};

use crate::descriptor::{Descriptor, SessionParams};
use crate::session::{client_setup, ClientSetup, SessionError};
use crate::source::PageBitmap;

/// Learns the image served to `group` by the server at `server` (joined on `iface`) and
/// returns a descriptor for it. With `digest`, the server must serve that image. `tune`
/// adjusts the probe's client configuration (for example its key). The probe waits at most
/// `timeout` for the announce and then for the zero map (without one, every page is asked
/// for and the server answers zero pages briefly).
pub fn plain_descriptor(
    group: SocketAddrV4,
    server: SocketAddr,
    digest: Option<[u8; 32]>,
    iface: Option<&str>,
    timeout: Duration,
    tune: impl FnOnce(&mut ClientSetup),
) -> Result<Descriptor, SessionError> {
    // The key the caller gives decides the session's protection: a plain file has no
    // descriptor to say it.
    let mut wanted = ClientSetup::from(mcdist::ClientConfig::new(server));
    tune(&mut wanted);
    let session = SessionParams {
        group,
        server,
        session_id: 0,
        protection: wanted.security.as_ref().map(|s| s.protection),
    };
    let probe = Descriptor {
        mem_size: 0,
        page_size: 4096,
        digest: digest.unwrap_or([0; 32]),
        session: Some(session.clone()),
        vcpus: Vec::new(),
        zero_map: PageBitmap::new(0),
    };
    let (transport, cfg) = client_setup(&probe, iface, |c| {
        *c = wanted;
        c.expected_digest = digest;
        c.want_zero_map = true;
    })?;
    let client = ClientNode::start(cfg, transport, Arc::new(NullSink))?;
    let deadline = Instant::now() + timeout;
    let info = client.wait_session(timeout)?;
    let zero_map = loop {
        if let Some(z) = client.zero_map() {
            break z.clone();
        }
        if Instant::now() >= deadline {
            tracing::warn!("no zero-page map from the server; asking for every page");
            break PageBitmap::new(info.page_count);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Descriptor {
        mem_size: info.page_count * info.page_size as u64,
        page_size: info.page_size as u32,
        digest: info.digest,
        session: Some(SessionParams {
            session_id: info.session_id,
            ..session
        }),
        vcpus: Vec::new(),
        zero_map,
    })
}
