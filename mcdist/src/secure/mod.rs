//! Authenticated and encrypted sessions.
//!
//! A memory image holds keys and passwords, and a forged page installed in a
//! clone is code execution inside it. With a 256-bit pre-shared key ([`Psk`])
//! every mcdist datagram is sealed with AES-256-GCM (ring): the 24-byte header
//! is associated data, the body is encrypted ([`Protection::Encrypted`], the
//! default) or only authenticated ([`Protection::AuthOnly`]), and a 32-byte
//! trailer is appended:
//!
//! In authenticated-only mode the body travels in the clear and the tag is the
//! GCM tag of sealing the body (header as associated data): the sender seals a
//! scratch copy and discards the ciphertext, the receiver recomputes the tag
//! the same way and compares in constant time. Forging a tag is then exactly
//! as hard as forging a GCM tag. (GCM over a 4 KiB body as associated data
//! only takes ring's slow one-block-at-a-time GHASH path, about 3× slower than
//! the stitched AES-GCM encryption this uses.)
//!
//! | offset from the end | size | field                                      |
//! |--------------------:|-----:|--------------------------------------------|
//! | −32                 | 8    | sender id (random per sender instance)     |
//! | −24                 | 8    | sender counter (starts at 1, never repeats) |
//! | −16                 | 16   | GCM tag                                    |
//!
//! The header's [`HeaderFlags::AUTH`](crate::wire::HeaderFlags::AUTH) bit (and [`HeaderFlags::ENCRYPTED`](crate::wire::HeaderFlags::ENCRYPTED) when the
//! body is encrypted) is set; both are covered by the tag.
//!
//! ## Keys and nonces
//! Every sender instance (a server, each client) draws a random 64-bit sender
//! id from a CSPRNG seeded by the operating system; the server draws one for
//! group and one for unicast datagrams. A sender's datagrams of session `s`
//! are sealed under `K = BLAKE3-derive_key(CONTEXT, psk ‖ s ‖ role ‖ sender_id)`
//! with the 96-bit nonce `0³² ‖ counter`. A key is therefore used by one
//! sender only, whose counter never repeats, so a (key, nonce) pair never
//! repeats (unless two of n senders draw the same id: probability about
//! n²/2⁶⁵). The role (server or client) is part of the key, so a datagram
//! cannot be reflected back as if the other side sent it. Joins carry session
//! 0 (the client does not know the session yet) and use the session-0 key of
//! their sender.
//!
//! ## What a receiver drops (and counts in [`SecurityStats`])
//! - datagrams without the AUTH bit or too short for a trailer;
//! - a bad tag: forged, bit-flipped, sealed under another key or role;
//! - a counter already seen (replay) or older than the replay window;
//! - datagrams of another session: a server takes only its own session (and
//!   session-0 joins and leaves); a client follows the session of the first
//!   authenticated announce and switches to another session's announce only
//!   after its current session went quiet ([`Security::session_switch_after`]),
//!   so packets replayed from an earlier session are dropped;
//! - joins above [`Security::joins_per_second`] per source address;
//! - at a client that requires encryption ([`Security::require_encryption`], the
//!   default with [`Protection::Encrypted`]): authentic datagrams whose body is not
//!   encrypted, so a server misconfigured as authenticated-only cannot leak pages to
//!   it; the tag is checked first, so only a key holder can cause this drop.
//!
//! [`Sealer`] and [`Opener`] are the pure parts (no I/O); [`SecureTransport`]
//! wraps any [`Transport`](crate::transport::Transport) with them, and the threaded drivers in
//! [`crate::node`] apply it when a config carries a [`Security`].
//! The wrapper reports a `max_datagram` [`TRAILER_LEN`] bytes smaller than the
//! transport's, so the state machines leave room for the trailer. It seals a
//! whole send batch into one buffer and opens a received batch in place, so the

mod config;
mod key;
mod open;
mod replay;
mod seal;
mod transport;

pub use config::{Protection, Role, Security};
pub use key::{KeyError, LoadedKey, Psk, MAX_KEY_FILE_LEN};
pub use open::{Opener, Reject, SecurityStats};
pub use seal::{SealError, Sealer};
pub use transport::{SecureTransport, SecurityStatsHandle};

/// Length of a pre-shared key in bytes.
pub const PSK_LEN: usize = 32;
/// Length of the GCM tag.
pub const TAG_LEN: usize = 16;
/// Bytes appended to every sealed datagram: sender id, counter, tag.
pub const TRAILER_LEN: usize = 8 + 8 + TAG_LEN;

/// The big-endian `u64` at the start of `b` (at least 8 bytes).
fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests;
