//! Configuration of a keyed session: the key, what sealing protects
//! ([`Protection`]), the limits a receiver enforces (replay window, session
//! switch delay, join rate, peer table size), and which side a sender is
//! ([`Role`], part of every key so a datagram cannot be reflected).

use super::Psk;
use std::time::Duration;

/// What sealing protects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protection {
    /// Bodies are encrypted and authenticated (the default).
    #[default]
    Encrypted,
    /// Bodies travel in the clear but are authenticated (trusted networks that
    /// only need integrity).
    AuthOnly,
}

/// Session security settings: the library's configuration field
/// (`ServerConfig::security`, `ClientConfig::security`).
#[derive(Debug, Clone)]
pub struct Security {
    /// The pre-shared key.
    pub psk: Psk,
    /// Encrypt bodies or only authenticate them.
    pub protection: Protection,
    /// Replay window per sender, in datagrams.
    pub replay_window: u64,
    /// A client switches to an announce of another session only after its
    /// current session sent nothing authentic for this long.
    pub session_switch_after: Duration,
    /// Most joins accepted per source address and second (server side).
    pub joins_per_second: u32,
    /// Most senders whose replay state a receiver keeps.
    pub max_peers: usize,
    /// With [`Protection::Encrypted`], a client drops authentic datagrams that are not
    /// encrypted (counted in [`SecurityStats::not_encrypted`](super::SecurityStats)), so a
    /// server misconfigured to send page contents in the clear is refused rather than
    /// followed. Set by [`Security::new`], clear in [`Security::auth_only`]; ignored with
    /// [`Protection::AuthOnly`] and by a server (requests carry page numbers, not contents).
    pub require_encryption: bool,
}

impl Security {
    /// Encrypted sessions under `psk` with default limits.
    pub fn new(psk: Psk) -> Security {
        Security {
            psk,
            protection: Protection::Encrypted,
            replay_window: 16_384,
            session_switch_after: Duration::from_secs(1),
            joins_per_second: 50,
            max_peers: 8192,
            require_encryption: true,
        }
    }

    /// The settings of a command line's `--key FILE` (see [`Psk::load`]) and
    /// `--auth-only`, with the key file's permission warning if any.
    pub fn from_key_file(
        path: &std::path::Path,
        auth_only: bool,
    ) -> Result<(Security, Option<String>), super::KeyError> {
        let super::LoadedKey {
            psk,
            permission_warning,
        } = Psk::load(path)?;
        let sec = if auth_only {
            Security::auth_only(psk)
        } else {
            Security::new(psk)
        };
        Ok((sec, permission_warning))
    }

    /// Whether a client drops authentic datagrams that are not encrypted.
    pub fn requires_encryption(&self) -> bool {
        self.require_encryption && self.protection == Protection::Encrypted
    }

    /// What sealing gives, in a few words (for a status line).
    pub fn label(&self) -> &'static str {
        match self.protection {
            Protection::Encrypted => "encrypted (AES-256-GCM)",
            Protection::AuthOnly => "authenticated only (AES-256-GCM tag)",
        }
    }

    /// Authenticated-only sessions under `psk`.
    pub fn auth_only(psk: Psk) -> Security {
        Security {
            protection: Protection::AuthOnly,
            require_encryption: false,
            ..Security::new(psk)
        }
    }
}

/// Which side of a session a sender is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The memory server.
    Server,
    /// A receiver.
    Client,
}

impl Role {
    pub(super) fn byte(self) -> u8 {
        match self {
            Role::Server => 1,
            Role::Client => 2,
        }
    }
}
