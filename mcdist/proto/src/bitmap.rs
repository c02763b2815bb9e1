//! A fixed-size page bitmap and helpers that turn page sets into compact ranges.

use crate::wire::{PageRange, MAX_RANGE_LEN};

/// A fixed-length bitmap, one bit per page.
#[derive(Clone, PartialEq, Eq)]
pub struct PageBitmap {
    words: Vec<u64>,
    len: u64,
    ones: u64,
}

impl std::fmt::Debug for PageBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageBitmap")
            .field("len", &self.len)
            .field("ones", &self.ones)
            .finish()
    }
}

impl PageBitmap {
    /// An all-clear bitmap of `len` bits.
    pub fn new(len: u64) -> PageBitmap {
        let n = usize::try_from(len.div_ceil(64)).unwrap_or(usize::MAX);
        PageBitmap {
            words: vec![0; n],
            len,
            ones: 0,
        }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the bitmap has no bits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bit `i`; out-of-range bits read as clear.
    pub fn get(&self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Set bit `i`; returns true if it was clear. Out-of-range indexes are ignored.
    pub fn set(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let m = 1 << (i % 64);
        if *w & m == 0 {
            *w |= m;
            self.ones += 1;
            true
        } else {
            false
        }
    }

    /// Clear bit `i`; returns true if it was set.
    pub fn clear(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let m = 1 << (i % 64);
        if *w & m != 0 {
            *w &= !m;
            self.ones -= 1;
            true
        } else {
            false
        }
    }

    /// Set every bit that is set in `other` (bitmaps of equal length; extra bits ignored).
    pub fn union_with(&mut self, other: &PageBitmap) {
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w |= o;
        }
        if let Some(last) = self.words.last_mut() {
            let tail = self.len % 64;
            if tail != 0 {
                *last &= (1u64 << tail) - 1;
            }
        }
        self.ones = self.words.iter().map(|w| u64::from(w.count_ones())).sum();
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.ones
    }

    /// True when every bit is set.
    pub fn is_full(&self) -> bool {
        self.ones == self.len
    }

    /// The first clear bit at or after `from`, if any.
    pub fn next_clear(&self, from: u64) -> Option<u64> {
        let mut i = from;
        while i < self.len {
            let wi = (i / 64) as usize;
            let w = self.words[wi] | ((1u64 << (i % 64)) - 1);
            if w != u64::MAX {
                let bit = (wi as u64) * 64 + u64::from((!w).trailing_zeros());
                return (bit < self.len).then_some(bit);
            }
            i = (wi as u64 + 1) * 64;
        }
        None
    }

    /// The first set bit at or after `from`, if any.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        let mut i = from;
        while i < self.len {
            let wi = (i / 64) as usize;
            let w = self.words[wi] & !((1u64 << (i % 64)) - 1);
            if w != 0 {
                let bit = (wi as u64) * 64 + u64::from(w.trailing_zeros());
                return (bit < self.len).then_some(bit);
            }
            i = (wi as u64 + 1) * 64;
        }
        None
    }

    /// Bytes, LSB first (bit `i` is bit `i % 8` of byte `i / 8`).
    pub fn to_bytes(&self) -> Vec<u8> {
        let n = usize::try_from(self.len.div_ceil(8)).unwrap_or(usize::MAX);
        let mut out = Vec::with_capacity(n);
        for w in &self.words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.truncate(n);
        out
    }

    /// Build from bytes as produced by [`PageBitmap::to_bytes`]; bits past `len` are ignored.
    pub fn from_bytes(len: u64, bytes: &[u8]) -> PageBitmap {
        let mut b = PageBitmap::new(len);
        b.or_bytes_at(0, bytes);
        b
    }

    /// OR `bytes` (LSB first) into the bitmap starting at bit `start` (a multiple of 8).
    pub fn or_bytes_at(&mut self, start: u64, bytes: &[u8]) {
        for (k, &byte) in bytes.iter().enumerate() {
            if byte == 0 {
                continue;
            }
            // Checked: bits past the end (or past u64::MAX) are ignored.
            let Some(base) = (k as u64)
                .checked_mul(8)
                .and_then(|o| start.checked_add(o))
                .filter(|&b| b < self.len)
            else {
                break;
            };
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    self.set(base + bit);
                }
            }
        }
    }
}

/// Coalesce an ascending sequence of page numbers into ranges (each at most
/// [`MAX_RANGE_LEN`] pages). Duplicates are tolerated.
pub fn coalesce<I: IntoIterator<Item = u64>>(pages: I) -> Vec<PageRange> {
    let mut out: Vec<PageRange> = Vec::new();
    for p in pages {
        if let Some(last) = out.last_mut() {
            if p >= last.start && p < last.end() {
                continue;
            }
            if p == last.end() && last.len < MAX_RANGE_LEN {
                last.len += 1;
                continue;
            }
        }
        out.push(PageRange { start: p, len: 1 });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn basic_ops() {
        let mut b = PageBitmap::new(130);
        assert!(b.set(0));
        assert!(!b.set(0));
        assert!(b.set(129));
        assert!(!b.set(130));
        assert_eq!(b.count_ones(), 2);
        assert_eq!(b.next_clear(0), Some(1));
        assert_eq!(b.next_clear(129), None);
        assert!(b.clear(0));
        assert_eq!(b.next_clear(0), Some(0));
    }

    proptest! {
        #[test]
        fn bitmap_matches_set(len in 0u64..2000, ops in proptest::collection::vec((0u64..2100, any::<bool>()), 0..300)) {
            let mut b = PageBitmap::new(len);
            let mut s = BTreeSet::new();
            for (i, set) in ops {
                if set { b.set(i); if i < len { s.insert(i); } } else { b.clear(i); s.remove(&i); }
            }
            prop_assert_eq!(b.count_ones(), s.len() as u64);
            for i in 0..len { prop_assert_eq!(b.get(i), s.contains(&i)); }
            let first_clear = (0..len).find(|i| !s.contains(i));
            prop_assert_eq!(b.next_clear(0), first_clear);
            let rt = PageBitmap::from_bytes(len, &b.to_bytes());
            prop_assert_eq!(rt, b);
        }

        #[test]
        fn coalesce_covers_exactly(pages in proptest::collection::btree_set(0u64..5000, 0..400)) {
            let ranges = coalesce(pages.iter().copied());
            let mut back = BTreeSet::new();
            for r in &ranges {
                prop_assert!(r.len >= 1);
                for p in r.start..r.end() { back.insert(p); }
            }
            prop_assert_eq!(back, pages);
            for w in ranges.windows(2) { prop_assert!(w[0].end() < w[1].start); }
        }
    }
}
