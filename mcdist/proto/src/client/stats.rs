//! What the client tells its embedder: events, failures and counters.
//!
//! Rule owned here: each page becomes present exactly once and is reported once as
//! [`ClientEvent::PageReady`]; a session ends either [`ClientEvent::Complete`] or
//! [`ClientEvent::Failed`] with a [`ClientError`] saying why. Counters only count.

use crate::SessionInfo;
use bytes::Bytes;
use std::net::SocketAddr;
use thiserror::Error;

/// Why a session failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ClientError {
    /// Nothing heard from the server for too long while pages were outstanding.
    #[error("server {server} silent for {silent_ms} ms with {outstanding} page(s) outstanding")]
    ServerUnresponsive {
        /// Server address.
        server: SocketAddr,
        /// How long it was silent.
        silent_ms: u64,
        /// Pages still awaited.
        outstanding: usize,
    },
    /// One page went unanswered through every retry.
    #[error("page {pfn} unanswered after {retries} retries")]
    PageUnavailable {
        /// The page.
        pfn: u64,
        /// Retries made.
        retries: u32,
    },
    /// The server now serves a different image.
    #[error("the server's image changed (digest {old} -> {new}); refusing to mix pages")]
    ImageChanged {
        /// Digest of the image being fetched.
        old: crate::DigestHex,
        /// Digest now announced.
        new: crate::DigestHex,
    },
    /// The session's image is not the one expected.
    #[error("session serves image {got}, expected {expected}")]
    WrongImage {
        /// Expected digest.
        expected: crate::DigestHex,
        /// Announced digest.
        got: crate::DigestHex,
    },
    /// One page failed verification against the image's root too often (or a page the
    /// zero map lists is not zero): someone sends pages that are not the image's.
    #[error("page {pfn} failed verification against the image's root {failures} time(s)")]
    IntegrityFailure {
        /// The page (hash pages are numbered after the data pages).
        pfn: u64,
        /// Failures counted.
        failures: u32,
    },
    /// The session's pages cannot be verified: the server sends no hash pages, or the
    /// page size is not a BLAKE3 subtree.
    #[error("the session serves no hash pages for pages of {page_size} bytes; its pages cannot be verified")]
    Unverifiable {
        /// The announced page size.
        page_size: u32,
    },
    /// The server ended the session before the client had what it needed.
    #[error("the server ended the session with {missing} page(s) missing")]
    ServerEnded {
        /// Pages not received.
        missing: u64,
    },
}

/// What the client tells its embedder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// The session's parameters are known.
    SessionStarted(SessionInfo),
    /// The server restarted with the same image; outstanding requests were re-sent.
    SessionResumed(SessionInfo),
    /// A page became present (exactly once per page).
    PageReady {
        /// Page number.
        pfn: u64,
        /// Its bytes (`page_size` long).
        data: Bytes,
    },
    /// The server hints that these pages (not present yet, ascending) are the working set
    /// earlier clones of the same parent touched: an embedder that serves a clone may ask
    /// for them in bulk ([`Client::request_page`](super::Client::request_page)), each still
    /// verified as it arrives. Hints of one session list at most the image's page count.
    WorkingSetHint(Vec<u64>),
    /// Every page is present (zero pages included).
    Complete,
    /// The session failed; no more pages will arrive.
    Failed(ClientError),
}

/// Client counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Unique pages received with data.
    pub pages_received: u64,
    /// ... of which answered our or a sibling's demand.
    pub demand_pages: u64,
    /// ... pushed next to faults.
    pub push_pages: u64,
    /// ... from the sweep.
    pub sweep_pages: u64,
    /// ... repairs.
    pub repair_pages: u64,
    /// Zero pages answered by the server (header only).
    pub zero_replies: u64,
    /// Pages received that were already present.
    pub duplicates: u64,
    /// Datagrams received (valid, this session).
    pub datagrams_received: u64,
    /// Bytes received (valid datagrams, this session).
    pub bytes_received: u64,
    /// Request datagrams sent.
    pub requests_sent: u64,
    /// Pages asked for in first requests.
    pub pages_requested: u64,
    /// Page re-requests after a timeout.
    pub retries: u64,
    /// NACK datagrams sent.
    pub nacks_sent: u64,
    /// Pages NACKed.
    pub nack_pages: u64,
    /// Of those, pages NACKed by their missing fragments (held in part).
    pub fragment_nack_pages: u64,
    /// Requests coalesced into one already outstanding.
    pub coalesced: u64,
    /// Datagrams that failed to parse or were refused.
    pub malformed: u64,
    /// Datagrams of another session or kind.
    pub foreign: u64,
    /// Page numbers outside the image.
    pub out_of_range: u64,
    /// Fragmented pages evicted from reassembly.
    pub fragments_evicted: u64,
    /// Times the server restarted with the same image.
    pub resumes: u64,
    /// Smoothed round-trip time of demand requests, microseconds.
    pub srtt_us: u64,
    /// FEC repair symbols received and kept for decoding.
    pub fec_repairs: u64,
    /// FEC repair symbols that came after their block was decoded or complete.
    pub fec_repairs_unneeded: u64,
    /// FEC repair symbols refused: inconsistent with the session or their block.
    pub fec_repairs_refused: u64,
    /// Pages recovered by FEC decoding (also counted in `pages_received`).
    pub fec_pages: u64,
    /// FEC blocks decoded.
    pub fec_blocks_decoded: u64,
    /// FEC blocks given up (evicted to bound memory, a member page no longer cached, or
    /// every repair symbol kept and still not decodable): their pages come plain.
    pub fec_blocks_dropped: u64,
    /// Hash pages received and verified (not counted in `pages_received`).
    pub hash_pages: u64,
    /// Pages (data or hash) dropped because they failed verification against the root.
    pub integrity_failures: u64,
    /// Pages held until the hash page above them arrived.
    pub integrity_held: u64,
    /// Pages dropped because the held-page map was full (asked for again later).
    pub integrity_held_dropped: u64,
    /// Pages listed in working-set hints and reported to the embedder.
    pub hint_pages: u64,
    /// Working-set hint datagrams dropped: refused by configuration, or past the image's
    /// page count of hinted pages in this session.
    pub hints_refused: u64,
}
