//! Links and loss models: each link direction has its own seeded generator for
//! loss (Bernoulli or Gilbert–Elliott bursts), duplication, reordering and delay
//! jitter, so loss is independent per client and the same seed gives the same run.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::time::Duration;

/// Loss model of one link direction.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Loss {
    /// Nothing is lost.
    #[default]
    None,
    /// Each datagram is lost independently with this probability.
    Bernoulli(f64),
    /// Gilbert–Elliott two-state burst loss.
    GilbertElliott {
        /// Probability per datagram of moving from the good to the bad state.
        p_good_to_bad: f64,
        /// Probability per datagram of moving from the bad to the good state.
        p_bad_to_good: f64,
        /// Loss probability in the good state.
        loss_good: f64,
        /// Loss probability in the bad state.
        loss_bad: f64,
    },
}

impl Loss {
    /// Long-run average loss rate of the model.
    pub fn mean(&self) -> f64 {
        match *self {
            Loss::None => 0.0,
            Loss::Bernoulli(p) => p,
            Loss::GilbertElliott {
                p_good_to_bad,
                p_bad_to_good,
                loss_good,
                loss_bad,
            } => {
                let denom = p_good_to_bad + p_bad_to_good;
                if denom <= 0.0 {
                    return loss_good;
                }
                let bad = p_good_to_bad / denom;
                bad * loss_bad + (1.0 - bad) * loss_good
            }
        }
    }
}

/// Impairments of one link direction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkConfig {
    /// Loss model.
    pub loss: Loss,
    /// Probability that a datagram is delivered twice.
    pub duplicate: f64,
    /// Probability that a datagram is held back by [`LinkConfig::reorder_delay`].
    pub reorder: f64,
    /// Extra delay of a reordered datagram.
    pub reorder_delay: Duration,
    /// Fixed one-way delay.
    pub delay: Duration,
    /// Extra delay drawn uniformly from `0..jitter` for every datagram.
    pub jitter: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            loss: Loss::None,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_delay: Duration::from_millis(1),
            delay: Duration::from_micros(100),
            jitter: Duration::ZERO,
        }
    }
}

impl LinkConfig {
    /// A link with independent loss probability `p` and default delay.
    pub fn lossy(p: f64) -> LinkConfig {
        LinkConfig {
            loss: if p > 0.0 {
                Loss::Bernoulli(p)
            } else {
                Loss::None
            },
            ..LinkConfig::default()
        }
    }
}

/// A receiver that processes at most `bytes_per_sec` and queues at most
/// `queue_bytes`; datagrams arriving at a full queue are dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxCapacity {
    /// Processing rate, bytes per second.
    pub bytes_per_sec: u64,
    /// Receive queue (socket buffer) size in bytes.
    pub queue_bytes: u64,
    /// Periods in which the receiver processes nothing (`None`: it never stalls).
    pub stalls: Option<Stalls>,
}

impl RxCapacity {
    /// A receiver that never stalls.
    pub fn new(bytes_per_sec: u64, queue_bytes: u64) -> RxCapacity {
        RxCapacity {
            bytes_per_sec,
            queue_bytes,
            stalls: None,
        }
    }
}

/// A receiver descheduled at regular times, as on a host whose cores more
/// processes share: for `length` out of every `every` (the first stall
/// beginning `phase` after the simulation starts) it processes nothing and
/// runs no timer, so it sends nothing either; datagrams wait in its queue,
/// which overflows once full. Applies with [`RxCapacity`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stalls {
    /// Period.
    pub every: Duration,
    /// Length of each stall.
    pub length: Duration,
    /// Start of the first stall, from the simulation's start.
    pub phase: Duration,
}

impl Stalls {
    /// Where `at` (time since the simulation's start) falls: whole periods since
    /// the first stall began, nanoseconds into the current one, and the stall's
    /// length in nanoseconds; `None` before the first stall.
    fn position(&self, at: Duration) -> Option<(u128, u128, u128)> {
        let into = at.checked_sub(self.phase)?.as_nanos();
        let every = self.every.as_nanos().max(1);
        Some((
            into / every,
            into % every,
            self.length.as_nanos().min(every),
        ))
    }

    /// Time stalled in `[0, at)`.
    fn stalled_before(&self, at: Duration) -> Duration {
        self.position(at)
            .map_or(Duration::ZERO, |(full, off, length)| {
                Duration::from_nanos((full * length + off.min(length)) as u64)
            })
    }

    /// Time stalled between `from` and `to`.
    pub(super) fn stalled_between(&self, from: Duration, to: Duration) -> Duration {
        self.stalled_before(to)
            .saturating_sub(self.stalled_before(from))
    }

    /// The first instant at or after `at` at which the receiver is not stalled.
    pub(super) fn resume(&self, at: Duration) -> Duration {
        match self.position(at) {
            Some((_, off, length)) if off < length => {
                at + Duration::from_nanos((length - off) as u64)
            }
            _ => at,
        }
    }
}

/// Per-link counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Datagrams offered to the link.
    pub offered: u64,
    /// Datagrams the loss model dropped.
    pub lost: u64,
    /// Extra copies delivered.
    pub duplicated: u64,
    /// Datagrams held back for reordering.
    pub reordered: u64,
}

#[derive(Debug)]
pub(super) struct Link {
    cfg: LinkConfig,
    rng: SmallRng,
    bad: bool,
    pub(super) stats: LinkStats,
}

impl Link {
    pub(super) fn new(cfg: LinkConfig, seed: u64) -> Link {
        Link {
            cfg,
            rng: SmallRng::seed_from_u64(seed),
            bad: false,
            stats: LinkStats::default(),
        }
    }

    /// Arrival offsets (from now) of the copies of one datagram that survive.
    pub(super) fn transmit(&mut self) -> ([Option<Duration>; 2], usize) {
        self.stats.offered += 1;
        let lost = match self.cfg.loss {
            Loss::None => false,
            Loss::Bernoulli(p) => self.rng.random_bool(p.clamp(0.0, 1.0)),
            Loss::GilbertElliott {
                p_good_to_bad,
                p_bad_to_good,
                loss_good,
                loss_bad,
            } => {
                let flip = if self.bad {
                    p_bad_to_good
                } else {
                    p_good_to_bad
                };
                if self.rng.random_bool(flip.clamp(0.0, 1.0)) {
                    self.bad = !self.bad;
                }
                let p = if self.bad { loss_bad } else { loss_good };
                self.rng.random_bool(p.clamp(0.0, 1.0))
            }
        };
        if lost {
            self.stats.lost += 1;
            return ([None, None], 0);
        }
        let copies = if self.rng.random_bool(self.cfg.duplicate.clamp(0.0, 1.0)) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        let mut out = [None, None];
        for slot in out.iter_mut().take(copies) {
            let mut d = self.cfg.delay;
            if !self.cfg.jitter.is_zero() {
                d += self.cfg.jitter.mul_f64(self.rng.random_range(0.0..1.0f64));
            }
            if self.rng.random_bool(self.cfg.reorder.clamp(0.0, 1.0)) {
                self.stats.reordered += 1;
                d += self.cfg.reorder_delay;
            }
            *slot = Some(d);
        }
        (out, copies)
    }
}
