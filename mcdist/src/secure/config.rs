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
        }
    }

    /// Authenticated-only sessions under `psk`.
    pub fn auth_only(psk: Psk) -> Security {
        Security {
            protection: Protection::AuthOnly,
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
