//! Settings and what makes them valid.
//!
//! Rule owned here: a [`ServerConfig`] is checked once, against the image's page
//! size, when the server is built; the check yields the datagram [`Geometry`]
//! (fragment size and count) every later emit relies on. Defaults live here too.

use crate::pacing::RateConfig;
use crate::wire;
use std::io;
use std::time::Duration;
use thiserror::Error;

/// How group traffic reaches receivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// One datagram to the multicast group.
    Multicast,
    /// One datagram per known receiver (networks without multicast; also the
    /// baseline mcdist is compared against).
    UnicastFanout,
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Session id; `None` draws a random one.
    pub session_id: Option<u64>,
    /// Largest datagram to send (UDP payload bytes). Pages larger than what fits are fragmented.
    pub max_datagram: usize,
    /// Bytes at the end of each datagram left free for an authentication trailer.
    pub trailer_reserve: usize,
    /// Requests for a page multicast less than this long ago are ignored, and so are
    /// first requests sent before the asker took in that multicast (its heard sequence
    /// number) up to an `announce_interval` after it. Zero: no request is ever ignored for a
    /// multicast (lockstep suppression off).
    pub lockstep_window: Duration,
    /// Push the pages that follow a fault.
    pub push_neighbors: bool,
    /// Smallest and largest push window (pages); the window doubles while faults stay sequential.
    pub push_window: (u64, u64),
    /// Sweep the whole image in order after demand and push (whole-image distribution).
    pub sweep: bool,
    /// Record the order of first demand requests and replay it as pushes to
    /// receivers that join later (later generations of clones; see
    /// [`crate::workingset`]). On by default: a receiver of a later generation
    /// gets pages it did not ask for even with `push_neighbors` off.
    pub working_set_push: bool,
    /// Receivers joining less than this after the previous join are one
    /// generation: only a generation that began after something was recorded is
    /// replayed for.
    pub working_set_generation_gap: Duration,
    /// Most pages the recorded working set holds.
    pub working_set_max_pages: usize,
    /// With `working_set_push`: tell each receiver of a replayed generation, as it joins,
    /// which pages were recorded ([`Kind::Hint`](crate::wire::Kind::Hint) datagrams to it
    /// alone, ranges in page order), so that it can ask for them in bulk while it runs: a
    /// clone touching pages faster than the paced replay reaches them (see
    /// `benches/README.md`, "Hints and prefetch"). On by default.
    pub working_set_hints: bool,
    /// Also record pages pushed next to faults, in the order sent. A clone that
    /// finds a pushed page present never faults on it, so without this the
    /// pages a generation got from that push are missing from its recorded
    /// working set (later generations then fault on them).
    pub working_set_record_push: bool,
    /// The sweep starts only once this many receivers have joined.
    pub sweep_min_clients: usize,
    /// Multicast or unicast fan-out.
    pub delivery: Delivery,
    /// Pacing.
    pub rate: RateConfig,
    /// Fraction of non-zero pages sent at least once after which retries go unicast.
    pub endgame_fraction: f64,
    /// A receiver silent this long is forgotten.
    pub client_timeout: Duration,
    /// Period of the group announce.
    pub announce_interval: Duration,
    /// Most receivers tracked at once.
    pub max_clients: usize,
    /// Pages per second one source address may request (token bucket; burst = 1/4 s).
    pub per_source_page_rate: u64,
    /// Most pages one request datagram may make the server consider.
    pub max_pages_per_request: u64,
    /// Seed for the server's randomness (session id, address-token secret), for
    /// simulations and tests only; `None` (the default) draws from the OS RNG.
    pub seed: Option<u64>,
    /// Follow pushed and swept pages with FEC repair symbols
    /// ([`crate::fec`]); multicast delivery only. Off by default.
    pub fec: bool,
    /// Most pages in one FEC block.
    pub fec_block_pages: usize,
    /// Repair symbols per source symbol sent even while no receiver reports loss.
    pub fec_min_overhead: f64,
    /// Most repair symbols per source symbol.
    pub fec_max_overhead: f64,
    /// The chance, at the 90th-percentile reported loss, that some receiver loses more of
    /// a block than its repair symbols restore (it then NACKs; see
    /// [`ServerConfig::fec_repair_fraction`]) ...
    pub fec_block_failure: f64,
    /// ... plus this share of the block, while any receiver reports loss.
    pub fec_margin: f64,
    /// A NACK for a page of a block with a page multicast more than this
    /// many group pages ago takes the plain path: receivers keep the pages a block
    /// needs only for a while (`ClientConfig::fec_cache_pages`, 4096 by default).
    pub fec_repair_horizon_pages: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            session_id: None,
            max_datagram: 65_507,
            trailer_reserve: 0,
            lockstep_window: Duration::from_millis(5),
            push_neighbors: true,
            push_window: (16, 1024),
            sweep: false,
            working_set_push: true,
            working_set_generation_gap: Duration::from_millis(100),
            working_set_max_pages: 1 << 20,
            working_set_hints: true,
            working_set_record_push: true,
            sweep_min_clients: 0,
            delivery: Delivery::Multicast,
            rate: RateConfig::default(),
            endgame_fraction: 0.95,
            client_timeout: Duration::from_secs(10),
            announce_interval: Duration::from_millis(200),
            max_clients: 4096,
            per_source_page_rate: 400_000,
            max_pages_per_request: 8192,
            seed: None,
            fec: false,
            fec_block_pages: 256,
            fec_min_overhead: 0.0,
            fec_max_overhead: 0.5,
            fec_block_failure: 0.05,
            fec_margin: 0.01,
            fec_repair_horizon_pages: 2048,
        }
    }
}

impl ServerConfig {
    /// Repair symbols per source symbol for a block of `k` source symbols when `receivers`
    /// receivers report a loss of `loss` (0..1, their 90th percentile). Each receiver is
    /// taken to lose each symbol, source or repair, independently with that probability.
    /// Of `n = k + r` symbols sent a receiver then gets `n·(1 − p)` on average, with a
    /// standard deviation of `sqrt(n·p·(1 − p))`; `r` is the fewest repairs that leave it
    /// `k + s` symbols `z` standard deviations below that mean, `z` chosen so that all
    /// receivers decode the block but with probability `fec_block_failure`, and `s` the
    /// symbols beyond `k` the code needs to decode (8: it is a binary code). The fraction
    /// is `r / k + fec_margin`, within `fec_min_overhead..=fec_max_overhead`;
    /// `fec_min_overhead` without reported loss.
    ///
    /// ```
    /// let cfg = mcdist_proto::server::ServerConfig::default();
    /// // 128 pages of 3 fragments at 5 % loss: 19.2 symbols lost on average, and
    /// // the code's 8 beyond them.
    /// let eight = cfg.fec_repair_fraction(0.05, 384, 8);
    /// assert!(eight > (19.2 + 8.0) / 384.0 + 0.01 && eight < 0.12, "{eight}");
    /// // More receivers, more of them in the tail: more repairs.
    /// assert!(cfg.fec_repair_fraction(0.05, 384, 1000) > eight);
    /// assert_eq!(cfg.fec_repair_fraction(0.0, 384, 8), 0.0);
    /// ```
    pub fn fec_repair_fraction(&self, loss: f64, k: usize, receivers: usize) -> f64 {
        let x = if loss > 0.0 && k > 0 {
            let (k, p) = (k as f64, loss.min(1.0));
            let each = (self.fec_block_failure / receivers.max(1) as f64).clamp(1e-12, 0.5);
            let z = upper_normal_quantile(each);
            // n = k + r symbols sent, each received with probability 1 - p: the smallest n
            // with n·(1 - p) - z·sqrt(n·p·(1 - p)) >= k + s, a quadratic in sqrt(n), where
            // s is the code's spare: the symbols beyond k a block needs to decode.
            let (q, sd) = (1.0 - p, (p * (1.0 - p)).sqrt());
            let need = k + crate::fec::DECODE_SPARE as f64;
            let root = (z * sd + (z * z * sd * sd + 4.0 * q * need).sqrt()) / (2.0 * q);
            (root * root - k).max(0.0) / k + self.fec_margin
        } else {
            0.0
        };
        x.max(self.fec_min_overhead)
            .min(self.fec_max_overhead)
            .max(0.0)
    }

    /// FEC runs only over multicast.
    pub(super) fn fec_enabled(&self) -> bool {
        self.fec && self.delivery == Delivery::Multicast
    }

    /// Pages covered by one FEC block's member map.
    pub(super) fn fec_span(&self) -> u16 {
        (self.fec_block_pages.max(1) * 2).clamp(64, usize::from(wire::MAX_FEC_SPAN)) as u16
    }
}

/// Invalid server configuration or image.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The datagram size leaves no room for page data.
    #[error("max datagram of {0} bytes is too small (need at least 128)")]
    DatagramTooSmall(usize),
    /// A page would need more fragments than the wire allows.
    #[error("page size {page} needs {frags} fragments at this datagram size (max {max})")]
    TooManyFragments {
        /// Page size.
        page: usize,
        /// Fragments needed.
        frags: usize,
        /// Allowed.
        max: u16,
    },
    /// Page size is not a power of two between 1 KiB (the smallest page that is a BLAKE3
    /// subtree, see [`crate::integrity`]) and 2 MiB.
    #[error("page size {0} is not a power of two between 1024 and 2 MiB")]
    BadPageSize(usize),
    /// The image's hash pages do not hash to the digest the server was given.
    #[error("the image does not match its digest (its hash tree root is {})", crate::hex(.root))]
    DigestMismatch {
        /// Root of the image's hash tree.
        root: [u8; 32],
    },
    /// Reading the image failed.
    #[error("reading the image: {0}")]
    Source(#[from] io::Error),
}

/// How a page is cut into datagrams: fixed for the session.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    pub(super) page_size: usize,
    /// Page bytes per fragment (the last fragment may be shorter).
    pub(super) frag_payload: usize,
    /// Fragments per page.
    pub(super) frag_count: u16,
    /// Bytes left free at the end of each datagram.
    pub(super) trailer_reserve: usize,
}

impl Geometry {
    /// Check `cfg` against `page_size` and cut pages into equal fragments that
    /// fit a datagram (and, with FEC on, so one repair symbol fits one too).
    pub(super) fn new(cfg: &ServerConfig, page_size: usize) -> Result<Geometry, ConfigError> {
        if !page_size.is_power_of_two() || !(1024..=(1 << 21)).contains(&page_size) {
            return Err(ConfigError::BadPageSize(page_size));
        }
        let room = cfg
            .max_datagram
            .saturating_sub(wire::HEADER_LEN + wire::DATA_FIXED_LEN + cfg.trailer_reserve);
        if cfg.max_datagram < 128 || room < 64 {
            return Err(ConfigError::DatagramTooSmall(cfg.max_datagram));
        }
        let frag_payload = room.min(page_size);
        let mut frags = page_size.div_ceil(frag_payload);
        if cfg.fec_enabled() {
            // One repair symbol (a fragment's size) and its block header fit a datagram.
            while frags < usize::from(wire::MAX_FRAGMENTS)
                && page_size.div_ceil(frags)
                    + crate::fec::repair_overhead(cfg.fec_span())
                    + cfg.trailer_reserve
                    > cfg.max_datagram
            {
                frags += 1;
            }
        }
        if frags > usize::from(wire::MAX_FRAGMENTS) {
            return Err(ConfigError::TooManyFragments {
                page: page_size,
                frags,
                max: wire::MAX_FRAGMENTS,
            });
        }
        Ok(Geometry {
            page_size,
            // Equalise fragment sizes so the last one is not tiny.
            frag_payload: page_size.div_ceil(frags),
            frag_count: frags as u16,
            trailer_reserve: cfg.trailer_reserve,
        })
    }

    /// Length of a full data fragment's datagram.
    pub(super) fn data_len(&self) -> usize {
        wire::HEADER_LEN + wire::DATA_FIXED_LEN + self.frag_payload + self.trailer_reserve
    }

    /// Page bytes `start..end` carried by fragment `idx`.
    pub(super) fn fragment(&self, idx: u16) -> (usize, usize) {
        let start = usize::from(idx) * self.frag_payload;
        (start, (start + self.frag_payload).min(self.page_size))
    }
}

/// The `z` with `P(Z > z) = q` for a standard normal `Z`, `0 < q <= 0.5` (Abramowitz and
/// Stegun 26.2.23, error below 4.5e-4).
fn upper_normal_quantile(q: f64) -> f64 {
    let t = (-2.0 * q.ln()).sqrt();
    t - (2.515_517 + 0.802_853 * t + 0.010_328 * t * t)
        / (1.0 + 1.432_788 * t + 0.189_269 * t * t + 0.001_308 * t * t * t)
}
