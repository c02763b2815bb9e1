//! The clone factory: connects a clone's lazy memory to the session its descriptor names (for
//! [`crate::clone::run_clone`] and [`crate::clone::ThreadLauncher`]).

use std::sync::Arc;
use std::time::Duration;

use mcdist::secure::Security;

use crate::descriptor::Descriptor;
use crate::inline::InlineMcdist;
use crate::lazy::{LazyHandle, PageFetcher};
use crate::threaded::McdistFetcher;

use super::CloneError;

/// How long a clone waits for the server's announce.
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects a clone's lazy memory to the session in `desc`, keyed with `security` (which
/// must fit the descriptor: [`crate::session::check_keyed`]). A server silent for `give_up`
/// fails the clone.
///
/// The clone's fault thread drives the mcdist client itself ([`InlineMcdist`]), which is
/// faster than a client thread fed by the fault thread ([`McdistFetcher`], still available):
/// see the crate README's measurements.
pub fn connect_fetcher(
    desc: &Descriptor,
    iface: Option<&str>,
    handle: LazyHandle,
    give_up: Duration,
    security: Option<&Security>,
) -> Result<Arc<dyn PageFetcher>, CloneError> {
    let f = InlineMcdist::connect(desc, iface, &handle, JOIN_TIMEOUT, |c| {
        c.give_up_after = give_up;
        c.security = security.cloned();
    })?;
    Ok(f.into_fetcher())
}

/// [`connect_fetcher`] with the threaded client ([`McdistFetcher`]).
pub fn connect_threaded_fetcher(
    desc: &Descriptor,
    iface: Option<&str>,
    handle: LazyHandle,
    give_up: Duration,
    security: Option<&Security>,
) -> Result<Arc<dyn PageFetcher>, CloneError> {
    let f = McdistFetcher::connect(desc, iface, handle, JOIN_TIMEOUT, |c| {
        c.give_up_after = give_up;
        c.security = security.cloned();
    })?;
    Ok(Arc::new(f))
}
