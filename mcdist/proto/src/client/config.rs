//! Client settings and their defaults.
//!
//! Rule owned here: every knob of the client (timeouts, backoff bounds, request
//! budgets, memory bounds in pages and in bytes, FEC hold-back) has one documented
//! default, chosen in [`ClientConfig::new`].

use std::net::SocketAddr;
use std::time::Duration;

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The server's unicast request address.
    pub server: SocketAddr,
    /// Largest datagram to send.
    pub max_datagram: usize,
    /// Bytes per datagram left free for an authentication trailer.
    pub trailer_reserve: usize,
    /// Retransmission timeout before any round trip was measured.
    pub initial_rto: Duration,
    /// Smallest retransmission timeout.
    pub min_rto: Duration,
    /// Largest retransmission timeout (backoff cap).
    pub max_rto: Duration,
    /// Most retries of one page before the session fails.
    pub max_retries: u32,
    /// Server silence (no datagram at all) after which waiting requests fail the session.
    pub give_up_after: Duration,
    /// Period of join attempts before the session is known.
    pub join_interval: Duration,
    /// Period of heartbeats (receive-rate reports).
    pub heartbeat_interval: Duration,
    /// Pages behind the sweep frontier tolerated as reordering before they are NACKed.
    pub nack_slack_pages: u64,
    /// Most pages outstanding at once in a whole-image fetch.
    pub max_outstanding: usize,
    /// Ask for the zero-page map when joining.
    pub want_zero_map: bool,
    /// NACK a page held in part (some of its fragments arrived) by its missing fragments
    /// ([`wire::FragmentNack`](crate::wire::FragmentNack)), so the server resends only
    /// those. Off: every NACK names whole pages.
    pub fragment_nacks: bool,
    /// Report the server's working-set hints ([`ClientEvent::WorkingSetHint`]): the pages
    /// earlier clones of the same parent touched, which the embedder may ask for in bulk.
    /// Off: hints are dropped (counted in `ClientStats::hints_refused`).
    ///
    /// [`ClientEvent::WorkingSetHint`]: super::ClientEvent::WorkingSetHint
    pub accept_hints: bool,
    /// The image's digest (BLAKE3 root), from a trusted source (a descriptor, `mcdist
    /// fetch --digest`): sessions serving another image are refused, and every page is
    /// verified against it. `None` takes the root from the first announce (integrity
    /// against corruption and against senders other than the announcer, not against a
    /// forged announce).
    pub expected_digest: Option<[u8; 32]>,
    /// Most pages held until the hash page above them arrives.
    pub max_held_pages: usize,
    /// Most verification failures of one page before the session fails.
    pub max_integrity_failures: u32,
    /// Most fragmented pages in reassembly at once.
    pub max_partial_pages: usize,
    /// Most bytes of page buffers reassembly holds (with 2 MiB pages this, not
    /// `max_partial_pages`, is the bound).
    pub max_partial_bytes: usize,
    /// Largest image (in pages) the client accepts; an announce of a larger one is dropped.
    pub max_image_pages: u64,
    /// Seed for retry jitter.
    pub seed: u64,
    /// Most FEC blocks being decoded at once (the oldest is dropped).
    pub fec_max_blocks: usize,
    /// Received pages kept for decoding FEC blocks (only while the server sends FEC).
    pub fec_cache_pages: usize,
    /// Most bytes FEC receiving holds, decoding included: a quarter for cached pages, a
    /// quarter for repair symbols, and blocks of at most an eighth (see [`crate::fec`]).
    pub fec_max_bytes: usize,
    /// While the server sends FEC, gaps are NACKed only once the sweep
    /// frontier passed them this long ago, so repair symbols get a chance first.
    pub fec_nack_delay: Duration,
}

impl ClientConfig {
    /// Defaults for a server at `server`.
    pub fn new(server: SocketAddr) -> ClientConfig {
        ClientConfig {
            server,
            max_datagram: 65_507,
            trailer_reserve: 0,
            initial_rto: Duration::from_millis(50),
            min_rto: Duration::from_millis(10),
            max_rto: Duration::from_secs(1),
            max_retries: 40,
            give_up_after: Duration::from_secs(5),
            join_interval: Duration::from_millis(100),
            heartbeat_interval: Duration::from_millis(100),
            nack_slack_pages: 64,
            max_outstanding: 8192,
            want_zero_map: true,
            fragment_nacks: true,
            accept_hints: true,
            expected_digest: None,
            max_held_pages: 4096,
            max_integrity_failures: 16,
            max_partial_pages: 4096,
            max_partial_bytes: 32 << 20,
            max_image_pages: 1 << 28,
            seed: 0x636c_6965_6e74,
            fec_max_blocks: 64,
            fec_cache_pages: 4096,
            fec_max_bytes: 64 << 20,
            fec_nack_delay: Duration::from_millis(30),
        }
    }
}
