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
//! The header's [`HeaderFlags::AUTH`] bit (and [`HeaderFlags::ENCRYPTED`] when the
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
//! - joins above [`Security::joins_per_second`] per source address.
//!
//! [`Sealer`] and [`Opener`] are the pure parts (no I/O); [`SecureTransport`]
//! wraps any [`Transport`] with them, and the threaded drivers in
//! [`crate::node`] apply it when a config carries a [`Security`].
//! The wrapper reports a `max_datagram` [`TRAILER_LEN`] bytes smaller than the
//! transport's, so the state machines leave room for the trailer. It seals a
//! whole send batch into one buffer and opens a received batch in place, so the
//! wrapped transport's batching (`sendmmsg`, UDP GSO runs of equal-sized
//! datagrams, `recvmmsg`, GRO) serves keyed sessions as it serves plain ones.

use crate::transport::{Capabilities, Received, Transport, Wake};
use crate::wire::{self, HeaderFlags, Kind};
use crate::{Dest, Transmit};
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Length of a pre-shared key in bytes.
pub const PSK_LEN: usize = 32;
/// Length of the GCM tag.
pub const TAG_LEN: usize = 16;
/// Bytes appended to every sealed datagram: sender id, counter, tag.
pub const TRAILER_LEN: usize = 8 + 8 + TAG_LEN;
/// BLAKE3 key-derivation context for per-sender datagram keys.
const KDF_CONTEXT: &str = "mcdist 2026-11 per-sender AES-256-GCM datagram key v1";

/// A 256-bit pre-shared key. Its `Debug` output never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct Psk([u8; PSK_LEN]);

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Psk(<redacted>)")
    }
}

impl Drop for Psk {
    fn drop(&mut self) {
        // Best effort: the optimiser may keep other copies.
        self.0.fill(0);
    }
}

/// Errors reading or parsing a pre-shared key.
#[derive(Debug, Error)]
pub enum KeyError {
    /// The key file could not be read.
    #[error("cannot read key file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The key is neither 32 raw bytes nor 64 hex digits.
    #[error("a key must be 32 raw bytes or 64 hex digits; got {len} bytes")]
    BadFormat {
        /// Length of what was found (after trimming whitespace).
        len: usize,
    },
}

/// A key read from a file, with a warning if the file is readable by others.
#[derive(Debug)]
pub struct LoadedKey {
    /// The key.
    pub psk: Psk,
    /// Set when the file's permissions let group or others read it.
    pub permission_warning: Option<String>,
}

impl Psk {
    /// A key from its bytes.
    pub fn from_bytes(bytes: [u8; PSK_LEN]) -> Psk {
        Psk(bytes)
    }

    /// A fresh random key (from `rand`'s thread generator, a CSPRNG seeded by
    /// the operating system).
    pub fn generate() -> Psk {
        Psk(rand::random())
    }

    /// Parse 32 raw bytes, or 64 hex digits (surrounding whitespace ignored).
    pub fn parse(data: &[u8]) -> Result<Psk, KeyError> {
        if let Ok(raw) = <[u8; PSK_LEN]>::try_from(data) {
            return Ok(Psk(raw));
        }
        let text = data.trim_ascii();
        if text.len() == 2 * PSK_LEN {
            let mut k = [0u8; PSK_LEN];
            let mut ok = true;
            for (i, pair) in text.chunks_exact(2).enumerate() {
                match (hex_val(pair[0]), hex_val(pair[1])) {
                    (Some(h), Some(l)) => k[i] = (h << 4) | l,
                    _ => ok = false,
                }
            }
            if ok {
                return Ok(Psk(k));
            }
        }
        Err(KeyError::BadFormat { len: text.len() })
    }

    /// Read a key file (32 raw bytes or 64 hex digits). A file readable by
    /// group or others still loads, with a warning to show the user.
    pub fn load(path: &Path) -> Result<LoadedKey, KeyError> {
        use std::os::unix::fs::PermissionsExt;
        let read_err = |source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        let mode = meta.permissions().mode();
        let permission_warning = (mode & 0o077 != 0).then(|| {
            format!(
                "key file {} has mode {:04o}: group or others can read or change it; \
                 anyone who can read it can forge pages (run: chmod 600 {})",
                path.display(),
                mode & 0o7777,
                path.display()
            )
        });
        let mut data = std::fs::read(path).map_err(read_err)?;
        let psk = Psk::parse(&data);
        data.fill(0);
        Ok(LoadedKey {
            psk: psk?,
            permission_warning,
        })
    }

    /// The key as 64 lowercase hex digits (for writing a key file).
    pub fn to_hex(&self) -> String {
        crate::hex(&self.0)
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

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
    fn byte(self) -> u8 {
        match self {
            Role::Server => 1,
            Role::Client => 2,
        }
    }
}

/// Counters of the security layer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecurityStats {
    /// Datagrams sealed and sent.
    pub sealed: u64,
    /// Datagrams that authenticated and were passed on.
    pub opened: u64,
    /// Dropped: shorter than header plus trailer, or not an mcdist datagram.
    pub malformed: u64,
    /// Dropped: no authentication (AUTH bit clear).
    pub unauthenticated: u64,
    /// Dropped: the tag did not verify (forged, modified, wrong key or role).
    pub bad_tag: u64,
    /// Dropped: a counter already received from that sender (replay or duplicate).
    pub replayed: u64,
    /// Dropped: a counter older than the replay window.
    pub too_old: u64,
    /// Dropped: a datagram of another (earlier or foreign) session.
    pub other_session: u64,
    /// Dropped by a client: a datagram other than an announce before the
    /// first authenticated announce (the session is not known yet).
    pub before_session: u64,
    /// Dropped: joins over the per-address rate.
    pub rate_limited: u64,
}

impl SecurityStats {
    /// All datagrams dropped by the security layer.
    pub fn dropped(&self) -> u64 {
        self.malformed
            + self.unauthenticated
            + self.bad_tag
            + self.replayed
            + self.too_old
            + self.other_session
            + self.before_session
            + self.rate_limited
    }
}

/// Why sealing failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SealError {
    /// The datagram is shorter than an mcdist header.
    #[error("datagram shorter than an mcdist header")]
    NotMcdist,
    /// No room for the trailer after the datagram.
    #[error("no room for the {TRAILER_LEN}-byte authentication trailer")]
    BufferTooSmall,
    /// The sender's counter is exhausted (2⁶⁴ datagrams); a new sender id is needed.
    #[error("datagram counter exhausted")]
    CounterExhausted,
    /// The crypto library refused the operation.
    #[error("sealing failed")]
    Crypto,
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum Reject {
    /// Too short or not an mcdist datagram.
    #[error("malformed")]
    Malformed,
    /// Not authenticated.
    #[error("unauthenticated")]
    Unauthenticated,
    /// Tag did not verify.
    #[error("bad authentication tag")]
    BadTag,
    /// Counter already seen.
    #[error("replayed")]
    Replayed,
    /// Counter behind the replay window.
    #[error("older than the replay window")]
    TooOld,
    /// Another session.
    #[error("another session")]
    OtherSession,
    /// No session yet (client).
    #[error("before the session is known")]
    BeforeSession,
    /// Join rate exceeded.
    #[error("rate limited")]
    RateLimited,
}

fn derive_key(psk: &Psk, session: u64, role: Role, sender: u64) -> Option<LessSafeKey> {
    let mut m = [0u8; PSK_LEN + 8 + 1 + 8];
    m[..PSK_LEN].copy_from_slice(&psk.0);
    m[PSK_LEN..PSK_LEN + 8].copy_from_slice(&session.to_be_bytes());
    m[PSK_LEN + 8] = role.byte();
    m[PSK_LEN + 9..].copy_from_slice(&sender.to_be_bytes());
    let mut k = blake3::derive_key(KDF_CONTEXT, &m);
    m.fill(0);
    let key = UnboundKey::new(&AES_256_GCM, &k).ok().map(LessSafeKey::new);
    k.fill(0);
    key
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Compare two tags without an early exit.
fn tags_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len()
        && std::hint::black_box(a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y))) == 0
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Seals outgoing datagrams of one sender.
pub struct Sealer {
    psk: Psk,
    role: Role,
    protection: Protection,
    sender_id: u64,
    counter: u64,
    key: Option<(u64, LessSafeKey)>,
    scratch: Vec<u8>,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("role", &self.role)
            .field("sender_id", &format_args!("{:016x}", self.sender_id))
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// A sealer for a sender of `role` with a fresh random sender id.
    pub fn new(sec: &Security, role: Role) -> Sealer {
        Sealer::with_sender_id(sec, role, rand::random())
    }

    /// A sealer with a given sender id. The id must never be reused with the
    /// same key and session by another sender instance; [`Sealer::new`] draws one.
    pub fn with_sender_id(sec: &Security, role: Role, sender_id: u64) -> Sealer {
        Sealer {
            psk: sec.psk.clone(),
            role,
            protection: sec.protection,
            sender_id,
            counter: 0,
            key: None,
            scratch: Vec::new(),
        }
    }

    /// This sender's id.
    pub fn sender_id(&self) -> u64 {
        self.sender_id
    }

    /// Seal the datagram in `buf[..len]` in place and append the trailer;
    /// `buf` must have [`TRAILER_LEN`] bytes of room after `len`. Returns the
    /// sealed length.
    pub fn seal(&mut self, buf: &mut [u8], len: usize) -> Result<usize, SealError> {
        if len < wire::HEADER_LEN {
            return Err(SealError::NotMcdist);
        }
        let total = len + TRAILER_LEN;
        if buf.len() < total {
            return Err(SealError::BufferTooSmall);
        }
        if self.counter == u64::MAX {
            return Err(SealError::CounterExhausted);
        }
        self.counter += 1;
        let counter = self.counter;
        let session = be_u64(&buf[8..16]);
        if self.key.as_ref().is_none_or(|(s, _)| *s != session) {
            let k = derive_key(&self.psk, session, self.role, self.sender_id)
                .ok_or(SealError::Crypto)?;
            self.key = Some((session, k));
        }
        let Some((_, key)) = self.key.as_ref() else {
            return Err(SealError::Crypto);
        };
        buf[4] |= HeaderFlags::AUTH;
        let encrypt = self.protection == Protection::Encrypted;
        if encrypt {
            buf[4] |= HeaderFlags::ENCRYPTED;
        } else {
            buf[4] &= !HeaderFlags::ENCRYPTED;
        }
        let (head, rest) = buf.split_at_mut(wire::HEADER_LEN);
        let body = &mut rest[..len - wire::HEADER_LEN];
        let tag = if encrypt {
            key.seal_in_place_separate_tag(nonce(counter), Aad::from(&head[..]), body)
        } else {
            self.scratch.clear();
            self.scratch.extend_from_slice(body);
            key.seal_in_place_separate_tag(nonce(counter), Aad::from(&head[..]), &mut self.scratch)
        }
        .map_err(|_| SealError::Crypto)?;
        buf[len..len + 8].copy_from_slice(&self.sender_id.to_be_bytes());
        buf[len + 8..len + 16].copy_from_slice(&counter.to_be_bytes());
        buf[len + 16..total].copy_from_slice(tag.as_ref());
        Ok(total)
    }
}

/// A sliding window of received counters of one sender.
#[derive(Debug, Clone)]
struct ReplayWindow {
    top: u64,
    bits: Vec<u64>,
}

impl ReplayWindow {
    fn new(size: u64) -> ReplayWindow {
        let words = size.div_ceil(64).clamp(1, 1 << 16) as usize;
        ReplayWindow {
            top: 0,
            bits: vec![0; words],
        }
    }
    fn size(&self) -> u64 {
        self.bits.len() as u64 * 64
    }
    fn bit(&self, c: u64) -> (usize, u64) {
        let i = c % self.size();
        ((i / 64) as usize, 1u64 << (i % 64))
    }
    fn check(&self, c: u64) -> Result<(), Reject> {
        if c == 0 {
            return Err(Reject::TooOld);
        }
        if c > self.top {
            return Ok(());
        }
        if self.top - c >= self.size() {
            return Err(Reject::TooOld);
        }
        let (w, m) = self.bit(c);
        if self.bits[w] & m != 0 {
            Err(Reject::Replayed)
        } else {
            Ok(())
        }
    }
    fn update(&mut self, c: u64) {
        if c > self.top {
            if c - self.top >= self.size() {
                self.bits.fill(0);
            } else {
                for x in self.top + 1..=c {
                    let (w, m) = self.bit(x);
                    self.bits[w] &= !m;
                }
            }
            self.top = c;
        }
        let (w, m) = self.bit(c);
        self.bits[w] |= m;
    }
}

struct Peer {
    key: LessSafeKey,
    window: ReplayWindow,
    last_seen: Instant,
}

enum SessionPolicy {
    /// A server: its own session, plus session-0 joins and leaves.
    Fixed(u64),
    /// A client: follow the session of authenticated announces.
    Follow {
        current: Option<u64>,
        last: Option<Instant>,
    },
}

/// Verifies incoming datagrams for one receiver and tracks replay state.
pub struct Opener {
    psk: Psk,
    peer_role: Role,
    window: u64,
    max_peers: usize,
    switch_after: Duration,
    joins_per_second: u32,
    policy: SessionPolicy,
    peers: HashMap<(u64, u64), Peer>,
    joins: HashMap<SocketAddr, (Instant, u32)>,
    stats: SecurityStats,
    scratch: Vec<u8>,
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener")
            .field("peer_role", &self.peer_role)
            .field("peers", &self.peers.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Opener {
    /// An opener for the server of session `session`: it takes client datagrams.
    pub fn server(sec: &Security, session: u64) -> Opener {
        Opener::new(sec, Role::Client, SessionPolicy::Fixed(session))
    }

    /// An opener for a client: it takes server datagrams of the session it follows.
    pub fn client(sec: &Security) -> Opener {
        Opener::new(
            sec,
            Role::Server,
            SessionPolicy::Follow {
                current: None,
                last: None,
            },
        )
    }

    fn new(sec: &Security, peer_role: Role, policy: SessionPolicy) -> Opener {
        Opener {
            psk: sec.psk.clone(),
            peer_role,
            window: sec.replay_window.max(64),
            max_peers: sec.max_peers.max(1),
            switch_after: sec.session_switch_after,
            joins_per_second: sec.joins_per_second,
            policy,
            peers: HashMap::new(),
            joins: HashMap::new(),
            stats: SecurityStats::default(),
            scratch: Vec::new(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> &SecurityStats {
        &self.stats
    }

    /// The session a client follows (`None` before the first authenticated announce).
    pub fn current_session(&self) -> Option<u64> {
        match self.policy {
            SessionPolicy::Fixed(s) => Some(s),
            SessionPolicy::Follow { current, .. } => current,
        }
    }

    /// Verify (and decrypt, in place) the datagram `buf` received at `now`
    /// from `from`. On success returns the length of the plain datagram at
    /// the start of `buf`; on failure the datagram must be dropped (it is
    /// counted in [`Opener::stats`]).
    pub fn open(
        &mut self,
        now: Instant,
        from: SocketAddr,
        buf: &mut [u8],
    ) -> Result<usize, Reject> {
        let r = self.open_inner(now, from, buf);
        let s = &mut self.stats;
        match r {
            Ok(_) => s.opened += 1,
            Err(Reject::Malformed) => s.malformed += 1,
            Err(Reject::Unauthenticated) => s.unauthenticated += 1,
            Err(Reject::BadTag) => s.bad_tag += 1,
            Err(Reject::Replayed) => s.replayed += 1,
            Err(Reject::TooOld) => s.too_old += 1,
            Err(Reject::OtherSession) => s.other_session += 1,
            Err(Reject::BeforeSession) => s.before_session += 1,
            Err(Reject::RateLimited) => s.rate_limited += 1,
        }
        if let Err(e) = r {
            tracing::debug!(%from, reason = %e, "dropping datagram");
        }
        r
    }

    fn open_inner(
        &mut self,
        now: Instant,
        from: SocketAddr,
        buf: &mut [u8],
    ) -> Result<usize, Reject> {
        let n = buf.len();
        if n < wire::HEADER_LEN || wire::Packet::new_checked(&buf[..]).is_err() {
            return Err(Reject::Malformed);
        }
        if buf[4] & HeaderFlags::AUTH == 0 {
            return Err(Reject::Unauthenticated);
        }
        if n < wire::HEADER_LEN + TRAILER_LEN {
            return Err(Reject::Malformed);
        }
        let kind = Kind::from_u8(buf[3]).map_err(|_| Reject::Malformed)?;
        let session = be_u64(&buf[8..16]);
        let switching = match &self.policy {
            SessionPolicy::Fixed(s) => {
                let pre_session = session == 0 && matches!(kind, Kind::Join | Kind::Leave);
                if session != *s && !pre_session {
                    return Err(Reject::OtherSession);
                }
                false
            }
            SessionPolicy::Follow { current, last } => {
                if *current == Some(session) {
                    false
                } else if kind == Kind::Announce
                    && last.is_none_or(|t| now.saturating_duration_since(t) >= self.switch_after)
                {
                    true
                } else if current.is_none() {
                    return Err(Reject::BeforeSession);
                } else {
                    return Err(Reject::OtherSession);
                }
            }
        };
        let body_end = n - TRAILER_LEN;
        let sender = be_u64(&buf[body_end..body_end + 8]);
        let counter = be_u64(&buf[body_end + 8..body_end + 16]);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&buf[body_end + 16..n]);
        let id = (session, sender);
        let mut fresh: Option<(LessSafeKey, ReplayWindow)> = None;
        let key = match self.peers.get(&id) {
            Some(p) => {
                p.window.check(counter)?;
                &p.key
            }
            None => {
                let w = ReplayWindow::new(self.window);
                w.check(counter)?;
                let k =
                    derive_key(&self.psk, session, self.peer_role, sender).ok_or(Reject::BadTag)?;
                &fresh.insert((k, w)).0
            }
        };
        let (head, rest) = buf.split_at_mut(wire::HEADER_LEN);
        let body = &mut rest[..body_end - wire::HEADER_LEN];
        if head[4] & HeaderFlags::ENCRYPTED != 0 {
            key.open_in_place_separate_tag(
                nonce(counter),
                Aad::from(&head[..]),
                Tag::from(tag),
                body,
                0..,
            )
            .map_err(|_| Reject::BadTag)?;
        } else {
            self.scratch.clear();
            self.scratch.extend_from_slice(body);
            let expect = key
                .seal_in_place_separate_tag(nonce(counter), Aad::from(&head[..]), &mut self.scratch)
                .map_err(|_| Reject::BadTag)?;
            if !tags_equal(expect.as_ref(), &tag) {
                return Err(Reject::BadTag);
            }
        }
        // Authentic. Rate-limit joins before they cost the server a reply.
        if kind == Kind::Join && matches!(self.policy, SessionPolicy::Fixed(_)) {
            if self.joins.len() >= 65_536 {
                self.joins.clear();
            }
            let e = self.joins.entry(from).or_insert((now, 0));
            if now.saturating_duration_since(e.0) >= Duration::from_secs(1) {
                *e = (now, 0);
            }
            e.1 += 1;
            if e.1 > self.joins_per_second {
                // The counter is consumed all the same.
                self.record(id, fresh.take(), counter, now);
                return Err(Reject::RateLimited);
            }
        }
        self.record(id, fresh.take(), counter, now);
        if let SessionPolicy::Follow { current, last } = &mut self.policy {
            if switching {
                if current.is_some() {
                    tracing::info!(
                        old = ?current,
                        new = session,
                        "following a new authenticated session"
                    );
                }
                *current = Some(session);
            }
            *last = Some(now);
        }
        Ok(body_end)
    }

    fn record(
        &mut self,
        id: (u64, u64),
        fresh: Option<(LessSafeKey, ReplayWindow)>,
        counter: u64,
        now: Instant,
    ) {
        match fresh {
            None => {
                if let Some(p) = self.peers.get_mut(&id) {
                    p.window.update(counter);
                    p.last_seen = now;
                }
            }
            Some((key, mut window)) => {
                window.update(counter);
                if self.peers.len() >= self.max_peers {
                    // Forget the sender heard from least recently.
                    if let Some(old) = self
                        .peers
                        .iter()
                        .min_by_key(|(_, p)| p.last_seen)
                        .map(|(k, _)| *k)
                    {
                        self.peers.remove(&old);
                    }
                }
                self.peers.insert(
                    id,
                    Peer {
                        key,
                        window,
                        last_seen: now,
                    },
                );
            }
        }
    }
}

/// A cloneable handle on a [`SecureTransport`]'s counters, readable from any thread.
#[derive(Debug, Clone, Default)]
pub struct SecurityStatsHandle(Arc<Mutex<SecurityStats>>);

impl SecurityStatsHandle {
    /// A copy of the counters.
    pub fn get(&self) -> SecurityStats {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Wraps a [`Transport`]: seals what is sent and opens what is received,
/// dropping (and counting) every datagram that does not authenticate.
pub struct SecureTransport<T> {
    inner: T,
    sealer: Sealer,
    group_sealer: Sealer,
    opener: Opener,
    /// Sealed datagrams of a batch send, and their lengths.
    batch_out: Vec<u8>,
    batch_items: Vec<Transmit>,
    /// What the inner transport received in a batch, before opening.
    batch_recv: Vec<Received>,
    /// The opened datagram of a single `recv`.
    batch_got: Vec<Received>,
    stats: SecurityStatsHandle,
}

impl<T> fmt::Debug for SecureTransport<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecureTransport")
            .field("sealer", &self.sealer)
            .field("group_sealer", &self.group_sealer)
            .field("opener", &self.opener)
            .finish_non_exhaustive()
    }
}

/// Most dropped datagrams one `recv` call skips before it returns `Ok(None)`.
const MAX_DROPS_PER_RECV: usize = 1024;

impl<T: Transport> SecureTransport<T> {
    /// The server side of session `session`.
    pub fn server(inner: T, sec: &Security, session: u64) -> SecureTransport<T> {
        SecureTransport::new(
            inner,
            Sealer::new(sec, Role::Server),
            Sealer::new(sec, Role::Server),
            Opener::server(sec, session),
        )
    }

    /// A client.
    pub fn client(inner: T, sec: &Security) -> SecureTransport<T> {
        SecureTransport::new(
            inner,
            Sealer::new(sec, Role::Client),
            Sealer::new(sec, Role::Client),
            Opener::client(sec),
        )
    }

    /// Wrap with given sealers (one for datagrams to single peers, one for the
    /// group; distinct sender ids) and an opener. Group and unicast traffic
    /// reach a receiver on different sockets and may be read out of order with
    /// each other; separate counters keep each stream in order for the
    /// receiver's replay window.
    pub fn new(
        inner: T,
        sealer: Sealer,
        group_sealer: Sealer,
        opener: Opener,
    ) -> SecureTransport<T> {
        SecureTransport {
            inner,
            sealer,
            group_sealer,
            opener,
            batch_out: Vec::new(),
            batch_items: Vec::new(),
            batch_recv: Vec::new(),
            batch_got: Vec::new(),
            stats: SecurityStatsHandle::default(),
        }
    }

    /// A handle on the counters.
    pub fn stats_handle(&self) -> SecurityStatsHandle {
        self.stats.clone()
    }

    /// The wrapped transport.
    pub fn inner(&self) -> &T {
        &self.inner
    }

    fn publish(&self) {
        let mut s = self.stats.0.lock().unwrap_or_else(PoisonError::into_inner);
        *s = self.opener.stats.clone();
        s.sealed = self.sealer.counter + self.group_sealer.counter;
    }
}

impl<T: Transport> Transport for SecureTransport<T> {
    fn send(&mut self, dest: Dest, data: &[u8]) -> io::Result<()> {
        self.send_batch(
            data,
            data.len(),
            &[Transmit {
                dest,
                len: data.len(),
            }],
        )
    }

    fn recv(&mut self, buf: &mut [u8], timeout: Option<Duration>) -> io::Result<Option<Received>> {
        let mut got = std::mem::take(&mut self.batch_got);
        got.clear();
        let slot = buf.len();
        let r = self
            .recv_batch(buf, slot, &mut got, timeout)
            .map(|_| got.first().copied());
        self.batch_got = got;
        r
    }

    /// Seals the batch into one buffer of slots `TRAILER_LEN` larger and hands it to the
    /// inner transport's batch send (one `sendmmsg`, and GSO runs, on UDP): a run of
    /// equal-sized datagrams stays a run of equal-sized sealed datagrams.
    fn send_batch(&mut self, buf: &[u8], slot: usize, items: &[Transmit]) -> io::Result<()> {
        let sealed_slot = slot + TRAILER_LEN;
        self.batch_out.clear();
        self.batch_out.resize(sealed_slot * items.len(), 0);
        self.batch_items.clear();
        for (i, t) in items.iter().enumerate() {
            let data = crate::transport::batch_datagram(buf, slot, i, t.len)?;
            let out = &mut self.batch_out[i * sealed_slot..(i + 1) * sealed_slot];
            out[..data.len()].copy_from_slice(data);
            let sealer = match t.dest {
                Dest::Group => &mut self.group_sealer,
                Dest::Peer(_) => &mut self.sealer,
            };
            let n = sealer
                .seal(out, data.len())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            self.batch_items.push(Transmit {
                dest: t.dest,
                len: n,
            });
        }
        let r = self
            .inner
            .send_batch(&self.batch_out, sealed_slot, &self.batch_items);
        self.publish();
        r
    }

    /// Receives a batch from the inner transport and opens each datagram in its slot;
    /// datagrams that do not authenticate are dropped (counted) and the ones after them
    /// move up a slot, so that datagram `i` of the result is still at `buf[i * slot..]`.
    fn recv_batch(
        &mut self,
        buf: &mut [u8],
        slot: usize,
        out: &mut Vec<Received>,
        timeout: Option<Duration>,
    ) -> io::Result<usize> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let base = out.len();
        let mut drops = 0;
        loop {
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            self.batch_recv.clear();
            let n = self
                .inner
                .recv_batch(buf, slot, &mut self.batch_recv, remaining)?;
            if n == 0 {
                break;
            }
            let now = Instant::now();
            let mut kept = 0;
            for (i, r) in self.batch_recv.iter().enumerate() {
                let len = r.len.min(slot);
                let at = i * slot;
                match self.opener.open(now, r.from, &mut buf[at..at + len]) {
                    Ok(plain) => {
                        if kept != i {
                            buf.copy_within(at..at + plain, kept * slot);
                        }
                        out.push(Received {
                            len: plain,
                            from: r.from,
                        });
                        kept += 1;
                    }
                    Err(_) => drops += 1,
                }
            }
            if kept > 0 || drops >= MAX_DROPS_PER_RECV {
                break;
            }
        }
        self.publish();
        Ok(out.len() - base)
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.inner.waker()
    }

    fn capabilities(&self) -> Capabilities {
        let c = self.inner.capabilities();
        Capabilities {
            max_datagram: c.max_datagram.saturating_sub(TRAILER_LEN),
            ..c
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Body, Data, Message};

    fn addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9))
    }

    fn data_msg(session: u64, seq: u64, pfn: u64, payload: &[u8]) -> Vec<u8> {
        let m = Message {
            session,
            seq,
            flags: HeaderFlags(0),
            body: Body::Data(Data {
                pfn,
                frag_index: 0,
                frag_count: 1,
                flags: 0,
                payload,
            }),
        };
        let mut buf = vec![0u8; m.buffer_len() + TRAILER_LEN];
        let n = m.emit(&mut buf).unwrap();
        buf.truncate(n + TRAILER_LEN);
        buf
    }

    fn announce_msg(session: u64) -> Vec<u8> {
        let m = Message {
            session,
            seq: 1,
            flags: HeaderFlags(0),
            body: Body::Announce(wire::Announce {
                image_size: 4096,
                page_size: 4096,
                page_count: 1,
                digest: [0; 32],
                zero_count: 0,
                zero_map_digest: [0; 32],
                zero_map_chunks: 0,
                sweep_pos: wire::Announce::SWEEP_NONE,
                rate: 0,
                flags: 0,
                frag_payload: 4096,
            }),
        };
        let mut buf = vec![0u8; m.buffer_len() + TRAILER_LEN];
        let n = m.emit(&mut buf).unwrap();
        buf.truncate(n + TRAILER_LEN);
        buf
    }

    fn seal(s: &mut Sealer, mut buf: Vec<u8>) -> Vec<u8> {
        let len = buf.len() - TRAILER_LEN;
        let n = s.seal(&mut buf, len).unwrap();
        assert_eq!(n, buf.len());
        buf
    }

    fn sec(p: Protection) -> Security {
        Security {
            protection: p,
            ..Security::new(Psk::from_bytes([7; 32]))
        }
    }

    /// A client opener already following `session`.
    fn following(sec: &Security, server: &mut Sealer, session: u64) -> Opener {
        let mut o = Opener::client(sec);
        let mut a = seal(server, announce_msg(session));
        o.open(Instant::now(), addr(), &mut a).unwrap();
        assert_eq!(o.current_session(), Some(session));
        o
    }

    #[test]
    fn batches_are_sealed_and_opened_in_their_slots_and_forgeries_dropped() {
        use crate::transport::mem::MemNetwork;
        let net = MemNetwork::new(4096);
        let (sa, ca, ra): (SocketAddr, SocketAddr, SocketAddr) = (
            "10.0.0.1:1".parse().unwrap(),
            "10.0.0.2:1".parse().unwrap(),
            "10.0.0.3:1".parse().unwrap(),
        );
        let sec = sec(Protection::Encrypted);
        let mut server = SecureTransport::server(net.endpoint(sa, false), &sec, 9);
        let mut client = SecureTransport::client(net.endpoint(ca, true), &sec);
        let mut rogue = net.endpoint(ra, false);
        // Plaintexts of a batch: the announce, then pages 1..=3 of 1000 bytes each.
        let strip = |mut v: Vec<u8>| {
            v.truncate(v.len() - TRAILER_LEN);
            v
        };
        let msgs: Vec<Vec<u8>> = std::iter::once(strip(announce_msg(9)))
            .chain((1..=3).map(|p| strip(data_msg(9, p + 1, p, &[p as u8; 1000]))))
            .collect();
        let slot = msgs.iter().map(Vec::len).max().unwrap();
        let send = |t: &mut SecureTransport<_>, part: &[Vec<u8>]| {
            let mut buf = vec![0u8; slot * part.len()];
            let items: Vec<Transmit> = part
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    buf[i * slot..i * slot + m.len()].copy_from_slice(m);
                    Transmit {
                        dest: Dest::Group,
                        len: m.len(),
                    }
                })
                .collect();
            t.send_batch(&buf, slot, &items).unwrap();
        };
        send(&mut server, &msgs[..2]);
        // A forgery in the middle of the stream: an unsealed copy of page 2.
        rogue.send(Dest::Peer(ca), &msgs[2]).unwrap();
        send(&mut server, &msgs[2..]);
        let rslot = 2048;
        let mut buf = vec![0u8; rslot * 8];
        let mut got = Vec::new();
        let n = client
            .recv_batch(&mut buf, rslot, &mut got, Some(Duration::from_secs(1)))
            .unwrap();
        assert_eq!(n, 4, "{got:?}");
        for (i, (r, m)) in got.iter().zip(&msgs).enumerate() {
            assert_eq!(r.from, sa);
            // The sealed header differs only in its flag byte.
            assert_eq!(r.len, m.len(), "datagram {i}");
            assert_eq!(
                buf[i * rslot + 5..i * rslot + r.len],
                m[5..],
                "datagram {i}"
            );
        }
        let st = client.stats_handle().get();
        assert_eq!((st.opened, st.unauthenticated), (4, 1), "{st:?}");
        assert_eq!(server.stats_handle().get().sealed, 4);
    }

    #[test]
    fn round_trip_both_modes() {
        for p in [Protection::Encrypted, Protection::AuthOnly] {
            let sec = sec(p);
            let mut srv = Sealer::new(&sec, Role::Server);
            let mut o = following(&sec, &mut srv, 5);
            let payload = vec![0xabu8; 4096];
            let plain = data_msg(5, 2, 3, &payload);
            let mut sealed = seal(&mut srv, plain.clone());
            let body_visible = sealed.windows(64).any(|w| w == &payload[..64]);
            assert_eq!(body_visible, p == Protection::AuthOnly, "{p:?}");
            let flags = sealed[4];
            assert_ne!(flags & HeaderFlags::AUTH, 0);
            assert_eq!(
                flags & HeaderFlags::ENCRYPTED != 0,
                p == Protection::Encrypted
            );
            let n = o.open(Instant::now(), addr(), &mut sealed).unwrap();
            assert_eq!(n, plain.len() - TRAILER_LEN);
            assert_eq!(&sealed[5..n], &plain[5..n]);
            let msg = Message::parse(&sealed[..n]).unwrap();
            match msg.body {
                Body::Data(d) => assert_eq!(d.payload, &payload[..]),
                other => panic!("unexpected {other:?}"),
            }
            assert_eq!(o.stats().opened, 2);
        }
    }

    #[test]
    fn every_bit_flip_is_rejected() {
        for p in [Protection::Encrypted, Protection::AuthOnly] {
            let sec = sec(p);
            let mut srv = Sealer::new(&sec, Role::Server);
            let mut o = following(&sec, &mut srv, 5);
            let sealed = seal(&mut srv, data_msg(5, 2, 3, &[1, 2, 3, 4, 5, 6, 7, 8]));
            let mut rejected = 0;
            for i in 0..sealed.len() * 8 {
                let mut b = sealed.clone();
                b[i / 8] ^= 1 << (i % 8);
                assert!(o.open(Instant::now(), addr(), &mut b).is_err(), "bit {i}");
                rejected += 1;
            }
            let s = o.stats();
            assert_eq!(s.dropped(), rejected);
            assert!(s.bad_tag > 0);
            // The original still opens: failed attempts did not consume its counter.
            let mut b = sealed.clone();
            assert!(o.open(Instant::now(), addr(), &mut b).is_ok());
        }
    }

    #[test]
    fn wrong_key_wrong_role_and_unauthenticated_are_rejected() {
        let sec = sec(Protection::Encrypted);
        let mut srv = Sealer::new(&sec, Role::Server);
        let mut o = following(&sec, &mut srv, 5);
        let other = Security::new(Psk::from_bytes([8; 32]));
        let mut forger = Sealer::new(&other, Role::Server);
        let mut b = seal(&mut forger, data_msg(5, 2, 3, b"evil"));
        assert_eq!(o.open(Instant::now(), addr(), &mut b), Err(Reject::BadTag));
        // A client's datagram reflected at a client.
        let mut cl = Sealer::new(&sec, Role::Client);
        let mut b = seal(&mut cl, data_msg(5, 2, 3, b"evil"));
        assert_eq!(o.open(Instant::now(), addr(), &mut b), Err(Reject::BadTag));
        let mut b = data_msg(5, 2, 3, b"evil");
        assert_eq!(
            o.open(Instant::now(), addr(), &mut b),
            Err(Reject::Unauthenticated)
        );
        let mut b = vec![1u8; 10];
        assert_eq!(
            o.open(Instant::now(), addr(), &mut b),
            Err(Reject::Malformed)
        );
        let s = o.stats();
        assert_eq!((s.bad_tag, s.unauthenticated, s.malformed), (2, 1, 1));
    }

    #[test]
    fn replays_and_old_counters_are_rejected() {
        let sec = Security {
            replay_window: 128,
            ..sec(Protection::AuthOnly)
        };
        let mut srv = Sealer::new(&sec, Role::Server);
        let mut o = following(&sec, &mut srv, 5);
        let first = seal(&mut srv, data_msg(5, 2, 0, b"page"));
        let mut b = first.clone();
        o.open(Instant::now(), addr(), &mut b).unwrap();
        let mut b = first.clone();
        assert_eq!(
            o.open(Instant::now(), addr(), &mut b),
            Err(Reject::Replayed)
        );
        // Out of order within the window is fine.
        let later: Vec<Vec<u8>> = (0..200)
            .map(|i| seal(&mut srv, data_msg(5, 3 + i, 0, b"page")))
            .collect();
        let mut b = later[150].clone();
        o.open(Instant::now(), addr(), &mut b).unwrap();
        let mut b = later[100].clone();
        o.open(Instant::now(), addr(), &mut b).unwrap();
        // 151 counters behind the top: outside a 128-entry window.
        let mut b = first.clone();
        assert_eq!(o.open(Instant::now(), addr(), &mut b), Err(Reject::TooOld));
        let mut b = later[0].clone();
        assert_eq!(o.open(Instant::now(), addr(), &mut b), Err(Reject::TooOld));
        let s = o.stats();
        assert_eq!((s.replayed, s.too_old), (1, 2));
    }

    #[test]
    fn client_ignores_other_sessions_until_its_own_goes_quiet() {
        let sec = sec(Protection::Encrypted);
        let mut old = Sealer::new(&sec, Role::Server);
        let old_page = seal(&mut old, data_msg(4, 9, 0, b"stale"));
        let old_announce = seal(&mut old, announce_msg(4));
        let mut srv = Sealer::new(&sec, Role::Server);
        let t0 = Instant::now();
        let mut o = Opener::client(&sec);
        let mut a = seal(&mut srv, announce_msg(5));
        o.open(t0, addr(), &mut a).unwrap();
        let mut b = old_page.clone();
        assert_eq!(o.open(t0, addr(), &mut b), Err(Reject::OtherSession));
        let mut b = old_announce.clone();
        assert_eq!(o.open(t0, addr(), &mut b), Err(Reject::OtherSession));
        assert_eq!(o.current_session(), Some(5));
        // After the session went quiet a new session's announce is followed.
        let later = t0 + sec.session_switch_after;
        let mut srv2 = Sealer::new(&sec, Role::Server);
        let mut a = seal(&mut srv2, announce_msg(6));
        o.open(later, addr(), &mut a).unwrap();
        assert_eq!(o.current_session(), Some(6));
        assert_eq!(o.stats().other_session, 2);
    }

    #[test]
    fn server_takes_its_session_and_rate_limits_joins() {
        let sec = Security {
            joins_per_second: 3,
            ..sec(Protection::Encrypted)
        };
        let mut o = Opener::server(&sec, 5);
        let mut cl = Sealer::new(&sec, Role::Client);
        let join = |s: &mut Sealer, session: u64| {
            let m = Message {
                session,
                seq: 1,
                flags: HeaderFlags(0),
                body: Body::Join(wire::Join { flags: 0 }),
            };
            let mut buf = vec![0u8; m.buffer_len() + TRAILER_LEN];
            let n = m.emit(&mut buf).unwrap();
            let n = s.seal(&mut buf, n).unwrap();
            buf.truncate(n);
            buf
        };
        let t = Instant::now();
        for _ in 0..3 {
            let mut b = join(&mut cl, 0);
            o.open(t, addr(), &mut b).unwrap();
        }
        let mut b = join(&mut cl, 0);
        assert_eq!(o.open(t, addr(), &mut b), Err(Reject::RateLimited));
        let mut b = join(&mut cl, 0);
        o.open(t + Duration::from_secs(1), addr(), &mut b).unwrap();
        let mut b = seal(&mut cl, data_msg(7, 1, 0, b"x"));
        assert_eq!(o.open(t, addr(), &mut b), Err(Reject::OtherSession));
        let mut b = seal(&mut cl, data_msg(0, 1, 0, b"x"));
        assert_eq!(o.open(t, addr(), &mut b), Err(Reject::OtherSession));
    }

    #[test]
    fn group_backlog_survives_a_newer_unicast_datagram() {
        // The server's group and unicast streams have their own sender ids, so
        // a unicast datagram read ahead of a long queued group backlog does not
        // push the backlog out of the replay window.
        let sec = Security {
            replay_window: 256,
            ..sec(Protection::Encrypted)
        };
        let mut unicast = Sealer::new(&sec, Role::Server);
        let mut group = Sealer::new(&sec, Role::Server);
        let mut o = following(&sec, &mut unicast, 5);
        let backlog: Vec<Vec<u8>> = (0..1000)
            .map(|i| seal(&mut group, data_msg(5, i + 1, i, b"p")))
            .collect();
        for _ in 0..1000 {
            let mut u = seal(&mut unicast, data_msg(5, 1, 0, b"u"));
            o.open(Instant::now(), addr(), &mut u).unwrap();
        }
        for mut b in backlog {
            o.open(Instant::now(), addr(), &mut b).unwrap();
        }
        assert_eq!(o.stats().dropped(), 0);
    }

    #[test]
    fn sealer_never_repeats_a_nonce() {
        let sec = sec(Protection::AuthOnly);
        let mut s = Sealer::new(&sec, Role::Client);
        let mut seen = std::collections::HashSet::new();
        for session in [0u64, 5, 0, 5] {
            for _ in 0..100 {
                let b = seal(&mut s, data_msg(session, 1, 0, b"x"));
                let n = b.len();
                assert!(seen.insert(b[n - 32..n - 16].to_vec()));
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_datagrams_never_open(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let sec = sec(Protection::Encrypted);
            let mut c = Opener::client(&sec);
            let mut s = Opener::server(&sec, 5);
            let mut b = bytes.clone();
            proptest::prop_assert!(c.open(Instant::now(), addr(), &mut b).is_err());
            let mut b = bytes;
            proptest::prop_assert!(s.open(Instant::now(), addr(), &mut b).is_err());
        }

        #[test]
        fn any_change_to_a_sealed_datagram_is_rejected(
            pos in 0usize..1000,
            xor in 1u8..=255,
            cut in 0usize..40,
            auth_only in proptest::bool::ANY,
        ) {
            let p = if auth_only { Protection::AuthOnly } else { Protection::Encrypted };
            let sec = sec(p);
            let mut srv = Sealer::new(&sec, Role::Server);
            let mut o = following(&sec, &mut srv, 5);
            let good = seal(&mut srv, data_msg(5, 2, 3, &[9u8; 64]));
            let mut b = good.clone();
            let i = pos % b.len();
            b[i] ^= xor;
            proptest::prop_assert!(o.open(Instant::now(), addr(), &mut b).is_err());
            if cut > 0 {
                let mut b = good[..good.len() - cut].to_vec();
                proptest::prop_assert!(o.open(Instant::now(), addr(), &mut b).is_err());
            }
            let mut b = good;
            proptest::prop_assert!(o.open(Instant::now(), addr(), &mut b).is_ok());
        }
    }

    #[test]
    fn key_parsing() {
        let raw = [0x5au8; 32];
        assert_eq!(Psk::parse(&raw).unwrap(), Psk::from_bytes(raw));
        let hex = format!("{}\n", "5a".repeat(32));
        assert_eq!(Psk::parse(hex.as_bytes()).unwrap(), Psk::from_bytes(raw));
        assert!(matches!(
            Psk::parse(b"short"),
            Err(KeyError::BadFormat { len: 5 })
        ));
        assert!(Psk::parse("zz".repeat(32).as_bytes()).is_err());
        assert_eq!(format!("{:?}", Psk::from_bytes(raw)), "Psk(<redacted>)");
        let k = Psk::generate();
        assert_eq!(Psk::parse(k.to_hex().as_bytes()).unwrap(), k);
    }

    #[test]
    fn key_file_permissions_are_checked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        std::fs::write(&p, "11".repeat(32)).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let k = Psk::load(&p).unwrap();
        assert!(k.permission_warning.is_none());
        assert_eq!(k.psk, Psk::from_bytes([0x11; 32]));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let k = Psk::load(&p).unwrap();
        let w = k.permission_warning.unwrap();
        assert!(w.contains("0644") && w.contains("chmod 600"), "{w}");
        assert!(matches!(
            Psk::load(&dir.path().join("missing")),
            Err(KeyError::Read { .. })
        ));
    }
}
