//! The checks a simulation run must pass: every page handed over equals the
//! source, none twice, and a complete client holds every page; plus the
//! deterministic test images the checks compare against.

use super::Sim;
use crate::server::ConfigError;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::time::Duration;
use thiserror::Error;

/// A problem the simulation found.
#[derive(Debug, Error)]
pub enum SimError {
    /// The server could not be built.
    #[error("server configuration")]
    Config(#[from] ConfigError),
    /// A client was handed bytes that differ from the source.
    #[error("client {client}: page {pfn} differs from the source")]
    PageMismatch {
        /// Client index.
        client: usize,
        /// Page.
        pfn: u64,
    },
    /// A client was handed a page twice.
    #[error("client {client}: {count} page(s) reported ready twice")]
    DoubleReady {
        /// Client index.
        client: usize,
        /// How many.
        count: u64,
    },
    /// A client claims completion but a page is neither handed over nor a verified zero page.
    #[error("client {client}: complete but page {pfn} is missing or wrongly marked zero")]
    MissingPage {
        /// Client index.
        client: usize,
        /// Page.
        pfn: u64,
    },
    /// The simulation stopped making progress (time does not advance).
    #[error("simulation stalled at {at:?}: the {who} keeps asking to run now")]
    Stalled {
        /// Virtual time since the start.
        at: Duration,
        /// Which node's timeout stays in the past.
        who: SimNode,
    },
}

/// A node of the simulation, as [`SimError::Stalled`] names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimNode {
    /// The server.
    Server,
    /// Client `i`.
    Client(usize),
    /// No node: datagrams due now keep arriving.
    EventQueue,
}

impl std::fmt::Display for SimNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SimNode::Server => f.write_str("server"),
            SimNode::Client(i) => write!(f, "client {i}"),
            SimNode::EventQueue => f.write_str("event queue"),
        }
    }
}

impl Sim {
    /// Check every client: no page differed from the source, none was handed
    /// over twice, and a client that reports completion holds every page (each
    /// non-zero page handed over, each other page a zero page of the source).
    pub fn verify(&self) -> Result<(), SimError> {
        for (i, c) in self.clients.iter().enumerate() {
            if let Some(&pfn) = c.mismatches.first() {
                return Err(SimError::PageMismatch { client: i, pfn });
            }
            if c.double_ready > 0 {
                return Err(SimError::DoubleReady {
                    client: i,
                    count: c.double_ready,
                });
            }
            if c.client.is_complete() {
                let Some(img) = &c.image else {
                    return Err(SimError::MissingPage { client: i, pfn: 0 });
                };
                let zero = c.client.zero_map();
                let count = c.ready.len();
                for pfn in 0..count {
                    if c.ready.get(pfn) {
                        continue;
                    }
                    if !zero.get(pfn) || !page_is_zero(img, self.page_size, pfn) {
                        return Err(SimError::MissingPage { client: i, pfn });
                    }
                }
            }
        }
        Ok(())
    }
}

/// True when `data` equals page `pfn` of `image` (zero-padded at the end).
pub fn page_matches(image: &[u8], page_size: usize, pfn: u64, data: &[u8]) -> bool {
    if data.len() != page_size {
        return false;
    }
    let Some(start) = usize::try_from(pfn)
        .ok()
        .and_then(|p| p.checked_mul(page_size))
    else {
        return false;
    };
    if start >= image.len() {
        return false;
    }
    let end = (start + page_size).min(image.len());
    let n = end - start;
    data[..n] == image[start..end] && data[n..].iter().all(|&b| b == 0)
}

fn page_is_zero(image: &[u8], page_size: usize, pfn: u64) -> bool {
    let start = (pfn as usize).saturating_mul(page_size).min(image.len());
    let end = start.saturating_add(page_size).min(image.len());
    image[start..end].iter().all(|&b| b == 0)
}

/// A deterministic test image of `pages` pages: every `zero_every`-th page
/// (if non-zero) is all zero, the rest hold bytes derived from `seed`.
pub fn test_image(pages: usize, page_size: usize, zero_every: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; pages * page_size];
    let mut rng = SmallRng::seed_from_u64(seed);
    for (p, chunk) in v.chunks_mut(page_size).enumerate() {
        if zero_every > 0 && p % zero_every == zero_every - 1 {
            continue;
        }
        rng.fill(chunk);
    }
    v
}
