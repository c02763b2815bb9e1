//! Opening: what a receiver accepts. A datagram passes only if it is
//! authenticated (tag verifies under the sender's key for the peer's role),
//! its counter is fresh in that sender's replay window, it belongs to the
//! session the receiver takes (a server: its own, plus session-0 joins and
//! leaves; a client: the session of the first authenticated announce, switched
//! only after that session went quiet), and, for joins, the source stays under
//! the join rate; a client that requires encryption
//! ([`Security::require_encryption`]) also drops authentic datagrams sent in the clear.
//! Every drop is counted in [`SecurityStats`].

use super::key::{derive_key, nonce};
use super::replay::ReplayWindow;
use super::{be_u64, Psk, Role, Security, TAG_LEN, TRAILER_LEN};
use crate::wire::{self, HeaderFlags, Kind};
use ring::aead::{Aad, LessSafeKey, Tag};
use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use thiserror::Error;

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
    /// Dropped by a client that requires encryption: an authentic datagram whose body
    /// was not encrypted (the server runs authenticated-only).
    pub not_encrypted: u64,
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
            + self.not_encrypted
    }
}

impl fmt::Display for SecurityStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} sealed, {} opened, dropped {} (bad tag {}, unauthenticated {}, replayed {}, \
             too old {}, other session {}, before session {}, rate limited {}, malformed {}, \
             not encrypted {})",
            self.sealed,
            self.opened,
            self.dropped(),
            self.bad_tag,
            self.unauthenticated,
            self.replayed,
            self.too_old,
            self.other_session,
            self.before_session,
            self.rate_limited,
            self.malformed,
            self.not_encrypted
        )
    }
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
    /// Authentic but not encrypted, at a client that requires encryption.
    #[error("not encrypted")]
    NotEncrypted,
}

/// Compare two tags without an early exit.
fn tags_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len()
        && std::hint::black_box(a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y))) == 0
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
    require_encryption: bool,
    policy: SessionPolicy,
    peers: HashMap<(u64, u64), Peer>,
    joins: HashMap<SocketAddr, (Instant, u32)>,
    pub(super) stats: SecurityStats,
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
            require_encryption: peer_role == Role::Server && sec.requires_encryption(),
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
            Err(Reject::NotEncrypted) => s.not_encrypted += 1,
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
        if !HeaderFlags::from_bits_retain(buf[4]).contains(HeaderFlags::AUTH) {
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
        let encrypted = HeaderFlags::from_bits_retain(head[4]).contains(HeaderFlags::ENCRYPTED);
        if encrypted {
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
        // Authentic. A client that requires encryption drops it only now, so that no
        // forger can make it look as if the server sent page contents in the clear; the
        // counter is not consumed and the session is not followed.
        if self.require_encryption && !encrypted {
            return Err(Reject::NotEncrypted);
        }
        // Rate-limit joins before they cost the server a reply.
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
