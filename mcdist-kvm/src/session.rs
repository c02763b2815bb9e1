//! Joining an mcdist session from a clone host: the transport and client configuration for
//! the session a [`Descriptor`] names, and the errors of doing so. A leaf module: the fetchers
//! ([`crate::inline`], [`crate::threaded`]), the host cache ([`crate::share`]) and the memory
//! server ([`crate::clone::MemoryServer`]) build on it.

use mcdist::node::NodeError;
use mcdist::secure::{KeyError, Protection, Psk, Security};
use mcdist::transport::udp::{UdpConfig, UdpSetupError, UdpTransport};
use mcdist::{ClientConfig, SessionInfo};

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
    /// The descriptor's session is keyed and no key was given.
    #[error("the descriptor's mcdist session is keyed ({0:?}): give its key with --key FILE")]
    KeyRequired(Protection),
    /// A key was given for a session the descriptor says is unkeyed.
    #[error("the descriptor's mcdist session is not keyed: drop --key")]
    NotKeyed,
    /// The key's protection mode differs from the descriptor's.
    #[error("the descriptor's mcdist session is {described:?}, the key is set up for {given:?}")]
    ProtectionMismatch {
        /// The descriptor's mode.
        described: Protection,
        /// The mode given.
        given: Protection,
    },
    /// The server announces another session than the descriptor names (a restarted or
    /// foreign server).
    #[error("the server announces session {announced:#x}, the descriptor names {described:#x}")]
    OtherSession {
        /// Session id announced.
        announced: u64,
        /// Session id in the descriptor.
        described: u64,
    },
    /// The host page cache could not be mapped.
    #[error("mcdist transport: cannot map the page cache: {0}")]
    CacheMap(#[source] std::io::Error),
}

/// Checks an announced session against `desc`: its session id (when the descriptor names
/// one) and its page count (the digest is checked by the client, `expected_digest`).
pub(crate) fn check_session(desc: &Descriptor, info: &SessionInfo) -> Result<(), SessionError> {
    if let Some(s) = &desc.session {
        if info.session_id != s.session_id {
            return Err(SessionError::OtherSession {
                announced: info.session_id,
                described: s.session_id,
            });
        }
    }
    if info.page_count != desc.page_count() {
        return Err(SessionError::ImageMismatch {
            served: info.page_count,
            described: desc.page_count(),
        });
    }
    Ok(())
}

/// The one-line warning of a session run without a key.
pub const UNKEYED_WARNING: &str = "unkeyed mcdist session (no --key): integrity (every page is \
    verified against the descriptor's root) but no confidentiality and no authentication of the \
    control plane";

/// A session key as loaded by [`load_security`].
#[derive(Debug, Default)]
pub struct LoadedSecurity {
    /// The key and mode; `None`: an unkeyed session.
    pub security: Option<Security>,
    /// Set when the key file is readable by group or others (for the CLI to print).
    pub permission_warning: Option<String>,
}

/// Loads the pre-shared key at `key` (as `mcdist serve --key`): `auth_only` authenticates
/// without encrypting. No `key`: an unkeyed session. Every binary of this crate that moves
/// pages loads its key here.
pub fn load_security(
    key: Option<&std::path::Path>,
    auth_only: bool,
) -> Result<LoadedSecurity, KeyError> {
    let Some(path) = key else {
        return Ok(LoadedSecurity::default());
    };
    let loaded = Psk::load(path)?;
    Ok(LoadedSecurity {
        security: Some(if auth_only {
            Security::auth_only(loaded.psk.clone())
        } else {
            Security::new(loaded.psk.clone())
        }),
        permission_warning: loaded.permission_warning,
    })
}

/// Checks that `security` fits the session the descriptor names: a keyed session needs a key
/// of its protection mode, an unkeyed one takes none.
pub fn check_keyed(desc: &Descriptor, security: Option<&Security>) -> Result<(), SessionError> {
    match &desc.session {
        Some(s) => check_protection(s.protection, security),
        None => Ok(()),
    }
}

/// Checks that `security` fits a session a descriptor describes as `described` (its
/// protection; `None`: unkeyed): a keyed session needs a key of its mode, an unkeyed one
/// takes none.
pub fn check_protection(
    described: Option<mcdist::secure::Protection>,
    security: Option<&Security>,
) -> Result<(), SessionError> {
    match (described, security) {
        (None, None) => Ok(()),
        (Some(p), None) => Err(SessionError::KeyRequired(p)),
        (None, Some(_)) => Err(SessionError::NotKeyed),
        (Some(d), Some(s)) if d != s.protection => Err(SessionError::ProtectionMismatch {
            described: d,
            given: s.protection,
        }),
        (Some(_), Some(_)) => Ok(()),
    }
}

/// The UDP transport and client configuration for joining the session named in
/// `desc` on `iface`: the descriptor's digest is required, zero pages come from
/// the descriptor (no zero map is asked for), and `tune` adjusts the rest (the key goes in
/// `security`; it must fit the descriptor, [`check_keyed`]).
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
    check_keyed(desc, cfg.security.as_ref())?;
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
    /// The client followed a session other than the descriptor's (a restarted server).
    #[error("mcdist session changed: {0}")]
    SessionChanged(#[source] SessionError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::descriptor::SessionParams;
    use crate::source::PageBitmap;

    fn desc(protection: Option<Protection>) -> Descriptor {
        Descriptor {
            mem_size: 4096,
            page_size: 4096,
            digest: [0; 32],
            session: Some(SessionParams {
                group: "239.255.1.2:4000".parse().expect("group"),
                server: "127.0.0.1:4001".parse().expect("server"),
                session_id: 5,
                protection,
            }),
            vcpus: Vec::new(),
            zero_map: PageBitmap::new(1),
        }
    }

    #[test]
    fn a_keyed_descriptor_needs_a_key_of_its_mode() {
        let key = || Security::new(Psk::generate());
        let e = check_keyed(&desc(Some(Protection::Encrypted)), None).expect_err("no key");
        assert!(matches!(
            e,
            SessionError::KeyRequired(Protection::Encrypted)
        ));
        assert!(e.to_string().contains("--key FILE"), "{e}");
        assert!(check_keyed(&desc(Some(Protection::Encrypted)), Some(&key())).is_ok());
        assert!(matches!(
            check_keyed(&desc(Some(Protection::AuthOnly)), Some(&key())),
            Err(SessionError::ProtectionMismatch { .. })
        ));
        assert!(matches!(
            check_keyed(&desc(None), Some(&key())),
            Err(SessionError::NotKeyed)
        ));
        assert!(check_keyed(&desc(None), None).is_ok());
    }

    #[test]
    fn an_announce_of_another_session_is_refused() {
        let d = desc(None);
        let info = SessionInfo {
            session_id: 6,
            image_size: 4096,
            page_size: 4096,
            page_count: 1,
            digest: [0; 32],
            zero_count: 0,
        };
        assert!(matches!(
            check_session(&d, &info),
            Err(SessionError::OtherSession {
                announced: 6,
                described: 5
            })
        ));
        assert!(check_session(
            &d,
            &SessionInfo {
                session_id: 5,
                ..info
            }
        )
        .is_ok());
    }
}
