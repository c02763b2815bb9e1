//! The session: joining, the announce, the zero-page map, server restarts and image changes.
//!
//! Rule owned here: the client joins (first retries quickly, then backs off to once a
//! second) until an announce of a plausible size names the session, and keeps asking (every
//! 250 ms) until the zero-page map arrived and matches the announced digest and count. An
//! announce of another session id with the same image is a server restart: the session
//! resumes and every outstanding page is asked again. Another image fails the session, and
//! so does an announce of the same session that differs in digest, size, page size, zero
//! map or fragment geometry (`ImageChanged`, never a replacement); so does an image other
//! than `expected_digest`, a session without hash pages, and an `End` while pages are still
//! missing.
//! Leaving sends three leave datagrams 5 ms apart, even after a failure.
//!
//! Address validation: the server's unicast announce carries a token for this
//! client's address; the client echoes it at once in a join (and keeps it in every
//! join, heartbeat and leave). Until then the server answers nothing but joins, so
//! joins go on (every quarter `join_interval`) until an announce says the address is
//! validated; a server restart starts this over.

use super::verify::Verdict;
use super::{Client, ClientError, ClientEvent, Timer};
use crate::bitmap::PageBitmap;
use crate::integrity::HashLayout;
use crate::reassembly::Reassembler;
use crate::wire::{self, Announce, Body, Token, TOKEN_LEN};
use crate::{SessionInfo, Transmit};
use std::time::{Duration, Instant};

/// Pages asked for before the session is known, kept to be asked once it is.
const MAX_EARLY: usize = 65536;

/// Leave datagrams still to send.
#[derive(Debug, Clone, Copy)]
pub(super) struct Leave {
    pub(super) reason: u8,
    pub(super) remaining: u8,
}

/// Joins retried at the first, short interval before the interval doubles.
const QUICK_JOINS: u32 = 4;

/// What the client knows of the session.
pub(super) struct Session {
    /// The session's parameters, once announced.
    pub(super) info: Option<SessionInfo>,
    /// The latest announce of this session.
    pub(super) announce: Option<Announce>,
    /// Zero pages (complete once `zero_map_complete`).
    pub(super) zero: PageBitmap,
    /// Zero-map chunks received.
    zero_chunks: PageBitmap,
    /// The zero map was received and verified.
    pub(super) zero_map_complete: bool,
    /// Pages asked for before the session was known.
    early: Vec<u64>,
    /// Delay before the next join while the session is unknown.
    join_backoff: Duration,
    /// Joins sent while the session is unknown.
    joins_unanswered: u32,
    /// The server's address-validation token for this client (zero: none yet).
    pub(super) token: Token,
    /// An announce said the server validated this client's address.
    validated: bool,
}

impl Session {
    pub(super) fn new(join_interval: Duration) -> Session {
        Session {
            info: None,
            announce: None,
            zero: PageBitmap::new(0),
            zero_chunks: PageBitmap::new(0),
            zero_map_complete: false,
            early: Vec::new(),
            // The first joins are retried quickly (a lost join must not make a
            // late joiner), then back off to one a second.
            join_backoff: (join_interval / 8).max(Duration::from_millis(1)),
            joins_unanswered: 0,
            token: [0; TOKEN_LEN],
            validated: false,
        }
    }

    /// Remember a page asked for before the session is known.
    pub(super) fn ask_early(&mut self, pfn: u64) {
        if self.early.len() < MAX_EARLY {
            self.early.push(pfn);
        }
    }
}

/// Whether two announces describe the same image, cut the same way (what may not change
/// within a session).
fn same_image(a: &Announce, b: &Announce) -> bool {
    same_content(a, b)
        && a.zero_count == b.zero_count
        && a.zero_map_digest == b.zero_map_digest
        && a.zero_map_chunks == b.zero_map_chunks
        && a.frag_payload == b.frag_payload
}

/// Whether two announces serve the same image, with hash pages (what a restarted server
/// must keep for the session to resume; it may cut datagrams otherwise).
fn same_content(a: &Announce, b: &Announce) -> bool {
    a.digest == b.digest
        && a.image_size == b.image_size
        && a.page_size == b.page_size
        && a.page_count == b.page_count
        && (a.flags & b.flags).contains(Announce::FLAG_HASH_PAGES)
}

impl Client {
    pub(super) fn on_announce(&mut self, now: Instant, session_id: u64, a: Announce) {
        // The announce sizes what the client allocates (page bitmaps, zero-map
        // chunk set): refuse sizes beyond the configured bound, and chunk counts
        // no server would use for this many pages.
        if a.page_count > self.cfg.max_image_pages
            || u64::from(a.zero_map_chunks) > a.page_count.div_ceil(64) + 1
        {
            self.stats.malformed += 1;
            tracing::debug!(
                pages = a.page_count,
                chunks = a.zero_map_chunks,
                "dropping announce of an implausible size"
            );
            return;
        }
        let info = SessionInfo {
            session_id,
            image_size: a.image_size,
            page_size: a.page_size as usize,
            page_count: a.page_count,
            digest: a.digest,
            zero_count: a.zero_count,
        };
        match self.session.info {
            None => self.start_session(now, info, a),
            Some(old) if old.session_id == session_id => {
                // The same session names the same image, cut the same way: an announce
                // that says otherwise is not a replacement.
                if let Some(cur) = self.session.announce {
                    if !same_image(&cur, &a) {
                        self.fail(ClientError::ImageChanged {
                            old: crate::DigestHex(cur.digest),
                            new: crate::DigestHex(a.digest),
                        });
                        return;
                    }
                }
                self.meter.last_server_packet = now;
                self.session.announce = Some(a);
            }
            Some(old) => {
                if self
                    .session
                    .announce
                    .is_some_and(|cur| same_content(&cur, &a))
                {
                    tracing::info!(
                        old = old.session_id,
                        new = session_id,
                        "server restarted with the same image; resuming"
                    );
                    self.stats.resumes += 1;
                    self.session.info = Some(info);
                    self.session.announce = Some(a);
                    self.meter.last_server_packet = now;
                    self.meter.server_restarted();
                    // The new instance validates this address anew.
                    self.session.token = [0; TOKEN_LEN];
                    self.session.validated = false;
                    self.timers.set(Timer::Join, now);
                    self.requests.resend_all();
                    self.events.push_back(ClientEvent::SessionResumed(info));
                } else {
                    self.fail(ClientError::ImageChanged {
                        old: crate::DigestHex(old.digest),
                        new: crate::DigestHex(a.digest),
                    });
                }
            }
        }
        self.take_token(now, session_id, &a);
    }

    /// Keep the token of a unicast announce of the current session and echo it
    /// now; note when the announce says the address is validated.
    fn take_token(&mut self, now: Instant, session_id: u64, a: &Announce) {
        let current = self
            .session
            .info
            .is_some_and(|s| s.session_id == session_id);
        if self.failed || !current || a.token == [0; TOKEN_LEN] {
            return;
        }
        if a.token != self.session.token {
            self.session.token = a.token;
            self.session.validated = false;
            self.timers.set(Timer::Join, now);
        }
        if a.flags.contains(Announce::FLAG_VALIDATED) && !self.session.validated {
            // The zero map answers the join that validated the address; ask
            // again a join interval later if it does not all arrive.
            self.session.validated = true;
            if self.joins_needed() {
                self.timers.set(Timer::Join, now + self.cfg.join_interval);
            } else {
                self.timers.stop(Timer::Join);
            }
        }
    }

    /// Joins go on until the address is validated and a wanted zero map arrived.
    fn joins_needed(&self) -> bool {
        !self.session.validated || self.cfg.want_zero_map && !self.session.zero_map_complete
    }

    fn start_session(&mut self, now: Instant, info: SessionInfo, a: Announce) {
        if let Some(exp) = self.cfg.expected_digest {
            if exp != a.digest {
                self.fail(ClientError::WrongImage {
                    expected: crate::DigestHex(exp),
                    got: crate::DigestHex(a.digest),
                });
                return;
            }
        }
        // Every page is verified against the pinned root, or the first announce's.
        let root = self.cfg.expected_digest.unwrap_or(a.digest);
        let layout = HashLayout::new(a.image_size, info.page_size)
            .ok()
            .filter(|l| {
                l.data_pages() == a.page_count && a.flags.contains(Announce::FLAG_HASH_PAGES)
            });
        let started = layout.map(|l| self.integrity.start(l, root));
        if !matches!(started, Some(Ok(()))) {
            self.fail(ClientError::Unverifiable {
                page_size: a.page_size,
            });
            return;
        }
        let total = self.integrity.total_pages();
        let s = &mut self.session;
        s.info = Some(info);
        s.announce = Some(a);
        s.zero = PageBitmap::new(a.page_count);
        s.zero_chunks = PageBitmap::new(u64::from(a.zero_map_chunks));
        s.zero_map_complete = a.zero_map_chunks == 0 && a.zero_count == 0;
        self.present = PageBitmap::new(total);
        self.reasm = Reassembler::with_budget(
            info.page_size,
            self.cfg.max_partial_pages,
            self.cfg.max_partial_bytes,
        );
        self.meter.last_server_packet = now;
        // Heartbeats go out only once the session is known; the first one is due when it
        // was due at construction.
        self.timers.set(Timer::Report, self.meter.first_report);
        self.events.push_back(ClientEvent::SessionStarted(info));
        for pfn in std::mem::take(&mut self.session.early) {
            self.request_page(now, pfn);
        }
        if self.joins_needed() {
            self.timers.set(Timer::Join, now + self.cfg.join_interval);
        } else {
            self.timers.stop(Timer::Join);
        }
    }

    pub(super) fn on_zero_map(&mut self, now: Instant, z: wire::ZeroMap<'_>) {
        let Some(a) = self.session.announce else {
            return;
        };
        let s = &mut self.session;
        if s.zero_map_complete || z.chunk_count != a.zero_map_chunks {
            return;
        }
        if !z.fits(a.page_count) {
            self.stats.malformed += 1;
            return;
        }
        if !s.zero_chunks.set(u64::from(z.chunk)) {
            return;
        }
        s.zero.or_bytes_at(z.start_page, z.bits);
        if !s.zero_chunks.is_full() {
            return;
        }
        let digest = *blake3::hash(&s.zero.to_bytes()).as_bytes();
        if digest == a.zero_map_digest && s.zero.count_ones() == a.zero_count {
            s.zero_map_complete = true;
            if !self.joins_needed() {
                self.timers.stop(Timer::Join);
            }
            // Pages asked for that turn out to be zero are satisfied locally.
            let zeros: Vec<u64> = self
                .requests
                .pfns()
                .into_iter()
                .filter(|&p| self.session.zero.get(p))
                .collect();
            let zero = self.zero_page_bytes();
            for pfn in zeros {
                if self.verdict(pfn, &zero) == Verdict::Ok {
                    self.requests.settle(pfn, None);
                    self.deliver_zero(pfn);
                }
            }
            // Listed zero pages are present once verified as zero (now, or when the hash
            // page above them arrives).
            let mut p = 0;
            while let Some(z) = self.session.zero.next_set(p) {
                p = z + 1;
                if !self.present.get(z) {
                    self.fill_zero(z);
                }
            }
            self.check_complete();
        } else {
            tracing::debug!("zero map failed verification; asking again");
            self.stats.malformed += 1;
            s.zero = PageBitmap::new(s.zero.len());
            s.zero_chunks = PageBitmap::new(s.zero_chunks.len());
            if self.cfg.want_zero_map {
                self.timers.set(Timer::Join, now);
            }
        }
    }

    /// The server ended the session: fail unless nothing is missing.
    pub(super) fn on_end(&mut self, s: SessionInfo) {
        let missing = if self.gaps.fetch_all {
            s.page_count.saturating_sub(self.pages_present())
        } else {
            self.requests.len() as u64
        };
        if !self.complete && missing > 0 && !self.failed {
            self.fail(ClientError::ServerEnded { missing });
        }
    }

    /// A join, when one is due (`Some(None)`: due, but `buf` too small).
    pub(super) fn emit_join(&mut self, now: Instant, buf: &mut [u8]) -> Option<Option<Transmit>> {
        if !self.timers.is_expired(Timer::Join, now) {
            return None;
        }
        if self.session.info.is_none() {
            self.timers
                .set(Timer::Join, now + self.session.join_backoff);
            // A join or its answer lost on a lossy path is common; a server not
            // up yet is not worth a flood: the first QUICK_JOINS retries keep the
            // short interval, later ones double it.
            self.session.joins_unanswered += 1;
            if self.session.joins_unanswered >= QUICK_JOINS {
                self.session.join_backoff =
                    (self.session.join_backoff * 2).min(Duration::from_secs(1));
            }
        } else if !self.session.validated {
            // The token (or the first join's answer) may have been lost.
            let retry = (self.cfg.join_interval / 16).max(Duration::from_millis(1));
            self.timers.set(Timer::Join, now + retry);
        } else if self.joins_needed() {
            self.timers
                .set(Timer::Join, now + Duration::from_millis(250));
        } else {
            self.timers.stop(Timer::Join);
        }
        let seq = self.next_seq();
        let flags = if self.cfg.want_zero_map {
            wire::Join::WANT_ZERO_MAP
        } else {
            wire::JoinFlags::empty()
        };
        let token = self.session.token;
        Some(self.to_server(seq, Body::Join(wire::Join { flags, token }), buf))
    }

    /// A leave datagram, when one is due (`Some(None)`: due, but `buf` too small).
    pub(super) fn emit_leave(&mut self, now: Instant, buf: &mut [u8]) -> Option<Option<Transmit>> {
        let l = self.leave.as_mut()?;
        if l.remaining == 0 || !self.timers.is_expired(Timer::Leave, now) {
            return None;
        }
        l.remaining -= 1;
        let reason = l.reason;
        if l.remaining > 0 {
            self.timers
                .set(Timer::Leave, now + Duration::from_millis(5));
        } else {
            self.timers.stop(Timer::Leave);
        }
        let seq = self.next_seq();
        let token = self.session.token;
        Some(self.to_server(seq, Body::Leave(wire::Leave { reason, token }), buf))
    }
}
