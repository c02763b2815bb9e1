//! The replay window: which counters of one sender were already received.
//! A counter is taken once; a counter more than a window behind the newest
//! one is too old. The window is a ring of bits indexed by counter.

use super::Reject;

/// A sliding window of received counters of one sender.
#[derive(Debug, Clone)]
pub(super) struct ReplayWindow {
    top: u64,
    bits: Vec<u64>,
}

impl ReplayWindow {
    pub(super) fn new(size: u64) -> ReplayWindow {
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
    pub(super) fn check(&self, c: u64) -> Result<(), Reject> {
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
    pub(super) fn update(&mut self, c: u64) {
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
