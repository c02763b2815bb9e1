//! Every page is verified against the image's BLAKE3 root before anything sees it.
//!
//! Rule owned here: the root is `expected_digest` when the embedder pinned one (a
//! descriptor, `mcdist fetch --digest`), otherwise the first announce's digest. A hash
//! page (page numbers from `page_count` on, see [`crate::integrity`]) is verified and
//! cached, never reported; a data page (zero replies and zero-map fills too) is verified
//! before it becomes present. A page whose hash page above is missing is held, at most
//! `max_held_pages` of them (its hash pages ride in its demand request, or in the NACKs of a
//! whole-image fetch); it is verified when they arrive. A page that does not verify is dropped and counted
//! ([`ClientStats::integrity_failures`](super::ClientStats)), and comes again through the
//! normal retry path; after `max_integrity_failures` failures of one page, or a zero-map
//! page that is not zero, the session fails with [`ClientError::IntegrityFailure`].

use super::requests::Want;
use super::{Client, ClientError};
use crate::integrity::{HashLayout, IntegrityError, PageKind, Verifier};
use bytes::Bytes;
use std::collections::HashMap;
use std::time::Instant;

/// How a page arrived, for what follows its verification.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct How {
    /// An answer on its first send: a round-trip sample.
    pub(super) rtt: bool,
    /// A header-only zero reply.
    pub(super) zero: bool,
    /// A data page that may be kept for FEC decoding once verified ...
    pub(super) remember: bool,
    /// ... and the server marked it to be kept (see [`Client::fec_caching`]).
    pub(super) keep: bool,
}

/// A page waiting for the hash page above it.
#[derive(Debug)]
struct Held {
    page: Bytes,
    how: How,
}

/// What checking a page said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Verified (a hash page is now cached).
    Ok,
    /// A hash page above it is not verified yet.
    Missing,
    /// It is not the image's page.
    Bad,
}

/// The session's verifier, held pages and failure counts.
#[derive(Debug, Default)]
pub(super) struct Integrity {
    verifier: Option<Verifier>,
    held: HashMap<u64, Held>,
    failures: HashMap<u64, u32>,
}

impl Integrity {
    /// A fresh verifier for the image of `layout` whose root is `root`.
    pub(super) fn start(
        &mut self,
        layout: HashLayout,
        root: [u8; 32],
    ) -> Result<(), IntegrityError> {
        self.verifier = Some(Verifier::new(layout, root)?);
        self.held.clear();
        self.failures.clear();
        Ok(())
    }

    /// Data pages plus hash pages (0 before the session is known).
    pub(super) fn total_pages(&self) -> u64 {
        self.verifier
            .as_ref()
            .map_or(0, |v| v.layout().total_pages())
    }

    /// Hash pages verified.
    pub(super) fn verified_hash_pages(&self) -> u64 {
        self.verifier
            .as_ref()
            .map_or(0, Verifier::verified_hash_pages)
    }

    /// Hash pages to fetch before `pfn` can be verified.
    pub(super) fn missing_for(&self, pfn: u64) -> Vec<u64> {
        self.verifier
            .as_ref()
            .and_then(|v| v.missing_for(pfn).ok())
            .unwrap_or_default()
    }

    /// Whether page `pfn` is held for a hash page.
    pub(super) fn is_held(&self, pfn: u64) -> bool {
        self.held.contains_key(&pfn)
    }

    /// Pages held for a hash page.
    pub(super) fn held(&self) -> usize {
        self.held.len()
    }

    fn check(&mut self, pfn: u64, bytes: &[u8]) -> Verdict {
        let Some(v) = self.verifier.as_mut() else {
            return Verdict::Bad;
        };
        let res = if pfn < v.layout().data_pages() {
            v.verify_data_page(pfn, bytes)
        } else {
            v.verify_hash_page(pfn, bytes)
        };
        match res {
            Ok(()) => Verdict::Ok,
            Err(IntegrityError::Missing { .. }) => Verdict::Missing,
            Err(e) => {
                tracing::debug!(pfn, error = %e, "page failed verification");
                Verdict::Bad
            }
        }
    }

    /// The pages whose chaining values hash page `h` holds, and whether they are data.
    fn children(&self, h: u64) -> (Vec<u64>, bool) {
        let Some(l) = self.verifier.as_ref().map(Verifier::layout) else {
            return (Vec::new(), false);
        };
        match l.locate(h) {
            Ok(PageKind::Hash { level: 1, .. }) => (
                l.covered(h).map(Iterator::collect).unwrap_or_default(),
                true,
            ),
            Ok(PageKind::Hash { level, index }) => {
                let first = index.saturating_mul(l.fanout() as u64);
                let n = l.entries(level, index) as u64;
                let kids = (first..first + n)
                    .filter_map(|i| l.hash_pfn(level - 1, i))
                    .collect();
                (kids, false)
            }
            _ => (Vec::new(), false),
        }
    }
}

impl Client {
    /// Verify `bytes` as page `pfn` (data or hash).
    pub(super) fn verdict(&mut self, pfn: u64, bytes: &[u8]) -> Verdict {
        self.integrity.check(pfn, bytes)
    }

    /// A page arrived (received, decoded, or answered zero): verify it, then make it
    /// present, hold it, or refuse it.
    pub(super) fn receive(&mut self, now: Instant, pfn: u64, page: Bytes, how: How) {
        if self.failed {
            return;
        }
        if self.present.get(pfn) {
            self.stats.duplicates += 1;
            return;
        }
        match self.verdict(pfn, &page) {
            Verdict::Ok => self.accept_verified(now, pfn, page, how),
            Verdict::Missing => self.hold(pfn, page, how),
            Verdict::Bad => self.refuse(pfn),
        }
    }

    /// A verified page: a hash page is cached and frees what waited for it; a data page
    /// becomes present and is reported.
    pub(super) fn accept_verified(&mut self, now: Instant, pfn: u64, page: Bytes, how: How) {
        if self.fec_caching(how) {
            self.fec_remember(pfn, &page);
        }
        if pfn >= self.data_pages() {
            self.present.set(pfn);
            self.stats.hash_pages += 1;
            if let Some(rtt) = self.requests.settle(pfn, how.rtt.then_some(now)) {
                self.rtt_sample(rtt);
            }
            self.release_below(now, pfn);
            return;
        }
        if how.zero {
            self.requests.answered_zero(pfn);
            self.deliver_zero(pfn);
            self.check_complete();
        } else {
            self.accept_page(now, pfn, page, how.rtt);
        }
    }

    /// Keep a page until the hash pages above it arrive, and ask for them.
    pub(super) fn hold(&mut self, pfn: u64, page: Bytes, how: How) {
        let full = self.integrity.held.len() >= self.cfg.max_held_pages;
        if full && !self.integrity.held.contains_key(&pfn) {
            self.stats.integrity_held_dropped += 1;
            return;
        }
        self.stats.integrity_held += 1;
        if self.fec_caching(how) {
            self.fec_remember(pfn, &page);
        }
        self.integrity.held.insert(pfn, Held { page, how });
        self.requests.park(pfn);
        // The hash pages it needs are asked for by whoever wants the page: a demand
        // request carries them, and a whole-image fetch NACKs them with its gaps (asking
        // at once would be suppressed as a lockstep duplicate of the multicast just lost).
    }

    /// Queue the hash pages `pfn` needs that are neither verified nor asked for.
    pub(super) fn ask_hash_pages(&mut self, pfn: u64, want: Want) {
        for h in self.integrity.missing_for(pfn) {
            if !self.requests.contains(h) {
                let want = match want {
                    Want::Nack => self.nack_want(h),
                    w => w,
                };
                self.requests.ask(h, want);
            }
        }
    }

    /// A page that is not the image's: drop it, count it, and fail the session once one
    /// page failed too often.
    pub(super) fn refuse(&mut self, pfn: u64) {
        self.stats.integrity_failures += 1;
        self.requests.unpark(pfn);
        let n = self.integrity.failures.entry(pfn).or_insert(0);
        *n += 1;
        let failures = *n;
        tracing::debug!(pfn, failures, "dropping a page that failed verification");
        if failures > self.cfg.max_integrity_failures {
            self.fail(ClientError::IntegrityFailure { pfn, failures });
        }
    }

    /// Hash page `h` was verified: verify what waited for it.
    fn release_below(&mut self, now: Instant, h: u64) {
        let (kids, data) = self.integrity.children(h);
        for &c in &kids {
            if let Some(held) = self.integrity.held.remove(&c) {
                self.receive(now, c, held.page, held.how);
            }
        }
        if data && self.session.zero_map_complete {
            for c in kids {
                if self.session.zero.get(c) && !self.present.get(c) {
                    self.fill_zero(c);
                }
            }
            self.check_complete();
        }
    }

    /// A page the verified zero map lists: present (filled locally, not reported) once it
    /// verifies as zero. A listed page that is not zero fails the session: the zero map
    /// lied.
    pub(super) fn fill_zero(&mut self, pfn: u64) {
        let zero = self.zero_page_bytes();
        match self.verdict(pfn, &zero) {
            // A page asked for is reported; the others are filled locally.
            Verdict::Ok if self.requests.contains(pfn) => {
                self.requests.settle(pfn, None);
                self.deliver_zero(pfn);
            }
            Verdict::Ok => {
                self.present.set(pfn);
            }
            Verdict::Missing => {}
            Verdict::Bad => {
                self.stats.integrity_failures += 1;
                self.fail(ClientError::IntegrityFailure { pfn, failures: 1 });
            }
        }
    }

    /// The shared zero-filled page.
    pub(super) fn zero_page_bytes(&mut self) -> Bytes {
        let ps = self.session.info.map_or(4096, |s| s.page_size);
        if self.zero_page.len() != ps {
            self.zero_page = Bytes::from(vec![0u8; ps]);
        }
        self.zero_page.clone()
    }

    /// Whether page `pfn` is held for a hash page.
    pub(super) fn is_held(&self, pfn: u64) -> bool {
        self.integrity.is_held(pfn)
    }

    /// Data pages of the session (0 before it is known).
    pub(super) fn data_pages(&self) -> u64 {
        self.session.info.map_or(0, |s| s.page_count)
    }
}
