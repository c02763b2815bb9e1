//! Pages arriving: whole, in fragments, as zero replies; each becomes present once.
//!
//! Rule owned here: a data datagram for a page in the image that is not yet present makes
//! it present once verified (`verify`; a whole page at once, a fragmented one when its
//! last fragment is in), settles
//! its request (a first-try answer is a round-trip sample) and reports it exactly once;
//! duplicates are counted and dropped. A zero page (in the verified zero map, or answered
//! by a header-only zero reply) is reported as a shared zero-filled buffer. The session is
//! complete when every page, zero pages included, is present.

use super::verify::{How, Verdict};
use super::{Client, ClientEvent};
use crate::wire::Data;
use bytes::Bytes;
use std::time::Instant;

/// Where a page that arrived whole in one datagram goes: borrowed by a sink, or copied
/// into a [`ClientEvent::PageReady`].
pub(super) type PageSinkFn<'a> = Option<&'a mut dyn FnMut(u64, &[u8])>;

impl Client {
    pub(super) fn on_data(&mut self, now: Instant, d: Data<'_>, sink: PageSinkFn<'_>) {
        let Some(s) = self.session.info else { return };
        if d.pfn >= self.integrity.total_pages() {
            self.stats.out_of_range += 1;
            return;
        }
        let hash = d.pfn >= s.page_count;
        if self.present.get(d.pfn) {
            self.stats.duplicates += 1;
            return;
        }
        if d.flags.contains(Data::ZERO) {
            if hash {
                // Hash pages are never zero replies.
                self.refuse(d.pfn);
                return;
            }
            self.stats.zero_replies += 1;
            let zero = self.zero_page_bytes();
            let how = How {
                zero: true,
                ..How::default()
            };
            self.receive(now, d.pfn, zero, how);
            return;
        }
        let how = How {
            rtt: true,
            zero: false,
            remember: true,
            keep: d.flags.contains(Data::KEEP),
        };
        let page = if d.frag_count == 1 {
            if d.payload.len() != s.page_size {
                self.stats.malformed += 1;
                return;
            }
            if let (Some(sink), false) = (sink, hash) {
                // The page is lent to the sink where it lies in the datagram, once verified.
                match self.verdict(d.pfn, d.payload) {
                    Verdict::Ok => {
                        self.count_data(&d);
                        if self.fec_caching(how) {
                            self.fec_remember(d.pfn, &Bytes::copy_from_slice(d.payload));
                        }
                        sink(d.pfn, d.payload);
                        self.page_present(now, d.pfn, true);
                        self.check_complete();
                    }
                    Verdict::Missing => {
                        self.count_data(&d);
                        self.hold(d.pfn, Bytes::copy_from_slice(d.payload), how);
                    }
                    Verdict::Bad => self.refuse(d.pfn),
                }
                return;
            }
            // The one copy of a page that arrived whole.
            Bytes::copy_from_slice(d.payload)
        } else {
            // Each fragment is copied once, into its place in the page.
            match self
                .reasm
                .insert(d.pfn, d.frag_index, d.frag_count, d.payload)
            {
                Ok(Some(p)) => p,
                Ok(None) => {
                    self.stats.fragments_evicted = self.reasm.evicted();
                    return;
                }
                Err(e) => {
                    self.stats.malformed += 1;
                    tracing::debug!(error = %e, pfn = d.pfn, "bad fragment");
                    return;
                }
            }
        };
        let failures = self.stats.integrity_failures;
        self.receive(now, d.pfn, page, how);
        if self.stats.integrity_failures == failures {
            self.count_data(&d);
        }
    }

    /// Count a page by why the server sent it.
    fn count_data(&mut self, d: &Data<'_>) {
        if d.pfn >= self.data_pages() {
            // Hash pages are counted once verified.
            return;
        }
        match d.flags {
            f if f.contains(Data::DEMAND) => self.stats.demand_pages += 1,
            f if f.contains(Data::PUSH) => self.stats.push_pages += 1,
            f if f.contains(Data::SWEEP) => {
                self.stats.sweep_pages += 1;
                if d.pfn < self.data_pages() {
                    self.gaps.swept(d.pfn);
                }
            }
            _ => self.stats.repair_pages += 1,
        }
    }

    /// A page became present (received or decoded): report it once, settle its request.
    pub(super) fn accept_page(&mut self, now: Instant, pfn: u64, page: Bytes, rtt_sample: bool) {
        self.page_present(now, pfn, rtt_sample);
        self.events
            .push_back(ClientEvent::PageReady { pfn, data: page });
        self.check_complete();
    }

    /// Mark a received page present and settle its request.
    pub(super) fn page_present(&mut self, now: Instant, pfn: u64, rtt_sample: bool) {
        self.present.set(pfn);
        self.stats.pages_received += 1;
        if let Some(rtt) = self.requests.settle(pfn, rtt_sample.then_some(now)) {
            self.rtt_sample(rtt);
        }
    }

    /// Report a verified zero page (present once).
    pub(super) fn deliver_zero(&mut self, pfn: u64) {
        if self.present.set(pfn) {
            let data = self.zero_page_bytes();
            self.events.push_back(ClientEvent::PageReady { pfn, data });
        }
    }

    pub(super) fn check_complete(&mut self) {
        if self.complete || !self.session.zero_map_complete {
            return;
        }
        let Some(s) = self.session.info else { return };
        if self.pages_present() >= s.page_count {
            self.complete = true;
            self.timers.stop(super::Timer::Scan);
            self.events.push_back(ClientEvent::Complete);
        }
    }
}
