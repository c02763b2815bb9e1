//! Reassembly of pages split into fragments.
//!
//! A page of `page_size` bytes sent in `count` fragments is cut into pieces of
//! `page_size.div_ceil(count)` bytes (the last one shorter, and padded with zeros to
//! the others' length on the wire: [`fragment_bytes`]), so each fragment's
//! offset and length follow from its index alone. Fragments may arrive in any
//! order and more than once. Memory is bounded in pages and in bytes: at most
//! `max_partial` pages, and at most `max_bytes / page_size` page buffers (pages in
//! progress and buffers kept for reuse together), are held; the oldest page in
//! progress is evicted to make room. So a stream of fragments, hostile or not, never
//! makes a reassembler hold more than [`Reassembler::max_held_bytes`] of page buffers
//! (plus a few words per page in progress).

use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};
use thiserror::Error;

/// Why a fragment was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FragmentError {
    /// Index or count out of range for this page size.
    #[error("fragment index/count out of range")]
    BadIndex,
    /// Payload length does not match the fragment's slot.
    #[error("fragment payload has the wrong length")]
    BadLength,
    /// The page is already being reassembled with a different fragment count.
    #[error("fragment count changed for a page in progress")]
    CountMismatch,
}

#[derive(Debug)]
struct Partial {
    buf: BytesMut,
    got: Got,
    received: u16,
    count: u16,
}

/// Which fragments of a page arrived: inline for up to 256 fragments (every page that
/// fits a 64 KiB datagram budget, and 4 KiB pages at any MTU), on the heap beyond.
#[derive(Debug)]
enum Got {
    Inline([u64; 4]),
    Heap(Vec<u64>),
}

impl Got {
    fn new(count: u16) -> Got {
        let words = usize::from(count).div_ceil(64);
        if words <= 4 {
            Got::Inline([0; 4])
        } else {
            Got::Heap(vec![0; words])
        }
    }
    fn words(&mut self) -> &mut [u64] {
        match self {
            Got::Inline(w) => w,
            Got::Heap(w) => w,
        }
    }
    fn get(&self, i: u16) -> bool {
        let w = match self {
            Got::Inline(w) => &w[..],
            Got::Heap(w) => &w[..],
        };
        w.get(usize::from(i) / 64)
            .is_some_and(|x| x & (1 << (i % 64)) != 0)
    }
    /// Marks fragment `i`; false when it was marked already.
    fn set(&mut self, i: u16) -> bool {
        match self.words().get_mut(usize::from(i) / 64) {
            Some(x) if *x & (1 << (i % 64)) == 0 => {
                *x |= 1 << (i % 64);
                true
            }
            _ => false,
        }
    }
}

/// Bounded fragment reassembly.
#[derive(Debug)]
pub struct Reassembler {
    page_size: usize,
    /// Most page buffers held (in progress and pooled together).
    max_partial: usize,
    partial: HashMap<u64, Partial>,
    order: VecDeque<u64>,
    evicted: u64,
    /// Page buffers to reuse ([`Reassembler::recycle`]): every byte of a page is written by
    /// its fragments before the page completes, so a reused buffer needs no clearing.
    pool: Vec<BytesMut>,
}

/// Most page buffers a [`Reassembler`] keeps for reuse: an FEC block's pages (256 by
/// default) come back at once when the block completes.
const POOL_PAGES: usize = 256;

/// Offset and length of fragment `index` of `count` in a page of `page_size`.
pub fn fragment_slot(page_size: usize, count: u16, index: u16) -> Option<(usize, usize)> {
    if count == 0 || index >= count {
        return None;
    }
    let piece = page_size.div_ceil(usize::from(count));
    let start = usize::from(index) * piece;
    if start >= page_size {
        return None;
    }
    Some((start, piece.min(page_size - start)))
}

/// Where fragment `index` of `count` goes in its page and its page bytes, from the
/// payload it travels with: exactly its slot, or, for the last fragment, its slot
/// followed by zeros up to the other fragments' length (senders pad it so that every
/// fragment's datagram is one size).
pub fn fragment_bytes(
    page_size: usize,
    count: u16,
    index: u16,
    payload: &[u8],
) -> Result<(usize, &[u8]), FragmentError> {
    let (start, len) = fragment_slot(page_size, count, index).ok_or(FragmentError::BadIndex)?;
    let piece = page_size.div_ceil(usize::from(count));
    match payload.len() {
        n if n == len => Ok((start, payload)),
        n if n == piece && index + 1 == count && payload[len..].iter().all(|&b| b == 0) => {
            Ok((start, &payload[..len]))
        }
        _ => Err(FragmentError::BadLength),
    }
}

impl Reassembler {
    /// A reassembler for pages of `page_size` bytes keeping at most `max_partial` in progress.
    pub fn new(page_size: usize, max_partial: usize) -> Reassembler {
        Reassembler::with_budget(page_size, max_partial, usize::MAX)
    }

    /// A reassembler for pages of `page_size` bytes holding at most `max_partial` page
    /// buffers and at most `max_bytes` of them (at least one page either way).
    pub fn with_budget(page_size: usize, max_partial: usize, max_bytes: usize) -> Reassembler {
        let by_bytes = max_bytes / page_size.max(1);
        Reassembler {
            page_size,
            max_partial: max_partial.min(by_bytes).max(1),
            partial: HashMap::new(),
            order: VecDeque::new(),
            evicted: 0,
            pool: Vec::new(),
        }
    }

    /// Pages dropped unfinished to bound memory.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Pages in progress.
    pub fn in_progress(&self) -> usize {
        self.partial.len()
    }

    /// Bytes of page buffers held now (pages in progress and buffers kept for reuse).
    pub fn held_bytes(&self) -> usize {
        (self.partial.len() + self.pool.len()) * self.page_size
    }

    /// The most [`Reassembler::held_bytes`] can ever be.
    pub fn max_held_bytes(&self) -> usize {
        self.max_partial * self.page_size
    }

    /// Forget a page (e.g. it arrived whole by another path).
    pub fn forget(&mut self, pfn: u64) {
        if let Some(p) = self.partial.remove(&pfn) {
            self.keep(p.buf);
        }
    }

    /// Hands back a page this reassembler completed, once its user is done with it: when no
    /// other reference to it is left, its buffer serves a later page instead of a new
    /// allocation. Anything else is dropped.
    pub fn recycle(&mut self, page: Bytes) {
        if let Ok(buf) = page.try_into_mut() {
            self.keep(buf);
        }
    }

    fn keep(&mut self, buf: BytesMut) {
        let held = self.partial.len() + self.pool.len();
        if buf.len() == self.page_size && self.pool.len() < POOL_PAGES && held < self.max_partial {
            self.pool.push(buf);
        }
    }

    /// The fragments held for a page in progress: its fragment count and the
    /// `(index, payload)` of each fragment received so far.
    pub fn fragments(&self, pfn: u64) -> Option<(u16, impl Iterator<Item = (u16, &[u8])> + '_)> {
        let p = self.partial.get(&pfn)?;
        let page_size = self.page_size;
        let it = (0..p.count).filter_map(move |i| {
            if !p.got.get(i) {
                return None;
            }
            let (start, len) = fragment_slot(page_size, p.count, i)?;
            Some((i, &p.buf[start..start + len]))
        });
        Some((p.count, it))
    }

    /// The fragments a page in progress still misses, bit `i` for fragment `i`; `None`
    /// for a page not in progress or cut into more fragments than
    /// [`wire::MAX_NACK_FRAGMENTS`](crate::wire::MAX_NACK_FRAGMENTS).
    pub fn missing(&self, pfn: u64) -> Option<u32> {
        let p = self.partial.get(&pfn)?;
        if p.count > crate::wire::MAX_NACK_FRAGMENTS {
            return None;
        }
        Some(
            (0..p.count)
                .filter(|&i| !p.got.get(i))
                .fold(0, |m, i| m | 1 << i),
        )
    }

    /// Fragments received so far for a page in progress, with its fragment count.
    pub fn received(&self, pfn: u64) -> Option<(u16, u16)> {
        self.partial.get(&pfn).map(|p| (p.received, p.count))
    }

    /// Add one fragment. Returns the whole page when this fragment completes it.
    pub fn insert(
        &mut self,
        pfn: u64,
        index: u16,
        count: u16,
        payload: &[u8],
    ) -> Result<Option<Bytes>, FragmentError> {
        let (start, payload) = fragment_bytes(self.page_size, count, index, payload)?;
        let len = payload.len();
        if count == 1 {
            return Ok(Some(Bytes::copy_from_slice(payload)));
        }
        if !self.partial.contains_key(&pfn) {
            while self.partial.len() >= self.max_partial {
                match self.order.pop_front() {
                    Some(old) => {
                        if let Some(p) = self.partial.remove(&old) {
                            self.evicted += 1;
                            self.keep(p.buf);
                        }
                    }
                    None => break,
                }
            }
            let buf = self
                .pool
                .pop()
                .unwrap_or_else(|| BytesMut::zeroed(self.page_size));
            self.partial.insert(
                pfn,
                Partial {
                    buf,
                    got: Got::new(count),
                    received: 0,
                    count,
                },
            );
            self.order.push_back(pfn);
            // Keep the order queue from growing with stale entries.
            if self.order.len() > self.max_partial * 4 {
                let live = &self.partial;
                self.order.retain(|p| live.contains_key(p));
            }
        }
        let p = self.partial.get_mut(&pfn).ok_or(FragmentError::BadIndex)?;
        if p.count != count {
            return Err(FragmentError::CountMismatch);
        }
        if !p.got.set(index) {
            return Ok(None);
        }
        p.received += 1;
        p.buf[start..start + len].copy_from_slice(payload);
        if p.received == p.count {
            let done = self.partial.remove(&pfn).map(|p| p.buf.freeze());
            return Ok(done);
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_last_fragment_may_come_padded_with_zeros_to_the_others_length() {
        // 4096 bytes in 3 fragments: 1366, 1366 and 1364, padded to 1366 on the wire.
        let page: Vec<u8> = (0..4096).map(|i| (i % 251) as u8 + 1).collect();
        let mut padded = page[2732..].to_vec();
        padded.extend([0, 0]);
        let mut r = Reassembler::new(4096, 4);
        assert_eq!(r.insert(1, 2, 3, &padded), Ok(None));
        assert_eq!(r.insert(1, 0, 3, &page[..1366]), Ok(None));
        let done = r.insert(1, 1, 3, &page[1366..2732]).unwrap().unwrap();
        assert_eq!(&done[..], &page[..]);
        // The exact length is still taken.
        assert_eq!(
            fragment_bytes(4096, 3, 2, &page[2732..]),
            Ok((2732, &page[2732..]))
        );
        // Padding that is not zero, padding of another fragment, or too much of it: refused.
        let mut dirty = padded.clone();
        dirty[1365] = 1;
        assert_eq!(r.insert(2, 2, 3, &dirty), Err(FragmentError::BadLength));
        assert_eq!(
            r.insert(2, 0, 3, &[&page[..1366], &[0u8][..]].concat()),
            Err(FragmentError::BadLength)
        );
        padded.push(0);
        assert_eq!(r.insert(2, 2, 3, &padded), Err(FragmentError::BadLength));
        assert_eq!(r.in_progress(), 0);
    }

    proptest! {
        #[test]
        fn any_order_with_duplicates(page_pow in 9u32..14, count in 1u16..40, seed in any::<u64>(), dups in 0usize..20) {
            let page_size = 1usize << page_pow;
            prop_assume!(fragment_slot(page_size, count, count - 1).is_some());
            let page: Vec<u8> = (0..page_size).map(|i| (i as u64 ^ seed) as u8).collect();
            let mut order: Vec<u16> = (0..count).collect();
            // deterministic shuffle
            let mut s = seed | 1;
            for i in (1..order.len()).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                order.swap(i, (s % (i as u64 + 1)) as usize);
            }
            for d in 0..dups { order.push(order[d % order.len()]); }
            let mut r = Reassembler::new(page_size, 4);
            let mut out = None;
            let mut completions = 0;
            for idx in order {
                let (st, len) = fragment_slot(page_size, count, idx).unwrap();
                if let Some(p) = r.insert(7, idx, count, &page[st..st + len]).unwrap() {
                    completions += 1;
                    out = Some(p);
                }
            }
            // A duplicate arriving after completion starts a new partial page but never completes it
            // unless every fragment comes again; the page completed at least once and is identical.
            prop_assert!(completions >= 1);
            let out = out.unwrap();
            prop_assert_eq!(out.as_ref(), &page[..]);
        }

        #[test]
        fn missing_piece_never_completes(count in 2u16..30, missing in 0u16..30) {
            let page_size = 4096;
            let missing = missing % count;
            let mut r = Reassembler::new(page_size, 2);
            for idx in (0..count).filter(|&i| i != missing) {
                let (_, len) = fragment_slot(page_size, count, idx).unwrap();
                prop_assert!(r.insert(1, idx, count, &vec![1u8; len]).unwrap().is_none());
            }
            prop_assert_eq!(r.in_progress(), 1);
        }

        #[test]
        fn garbage_is_refused(idx in any::<u16>(), count in any::<u16>(), len in 0usize..5000) {
            let mut r = Reassembler::new(4096, 2);
            let ok = fragment_slot(4096, count, idx).is_some_and(|(_, l)| l == len);
            let res = r.insert(1, idx, count, &vec![0u8; len]);
            prop_assert_eq!(res.is_ok(), ok);
        }
    }

    #[test]
    fn memory_is_bounded() {
        let mut r = Reassembler::new(4096, 3);
        for pfn in 0..100 {
            r.insert(pfn, 0, 4, &[0u8; 1024]).unwrap();
        }
        assert_eq!(r.in_progress(), 3);
        assert_eq!(r.evicted(), 97);
    }

    #[test]
    fn memory_is_bounded_in_bytes_with_recycled_buffers() {
        let ps = 2 << 20;
        let mut r = Reassembler::with_budget(ps, 4096, 8 << 20);
        assert_eq!(r.max_held_bytes(), 8 << 20);
        let piece = |i: u16| vec![i as u8; fragment_slot(ps, 2, i).unwrap().1];
        for pfn in 0..100u64 {
            let done = r.insert(pfn, 0, 2, &piece(0)).unwrap();
            assert!(done.is_none());
            if pfn % 3 == 0 {
                let page = r.insert(pfn, 1, 2, &piece(1)).unwrap().expect("complete");
                r.recycle(page);
            }
            assert!(r.held_bytes() <= r.max_held_bytes(), "{}", r.held_bytes());
        }
        assert_eq!(r.held_bytes(), 8 << 20);
        // 66 pages never completed; at most four buffers are left (in progress or pooled).
        assert!(r.evicted() >= 66 - 4, "{}", r.evicted());
        // However small the budget, one page can be reassembled.
        let mut r = Reassembler::with_budget(ps, 4096, 1);
        assert!(r.insert(1, 0, 2, &piece(0)).unwrap().is_none());
        assert!(r.insert(1, 1, 2, &piece(1)).unwrap().is_some());
    }

    #[test]
    fn recycled_buffers_are_reused_and_never_leak_old_contents() {
        let ps = 4096;
        let mut r = Reassembler::new(ps, 4);
        let page = |b: u8| vec![b; ps];
        let insert_all = |r: &mut Reassembler, pfn: u64, data: &[u8], order: &[u16]| {
            let mut out = None;
            for &i in order {
                let (s, l) = fragment_slot(ps, 3, i).unwrap();
                if let Some(p) = r.insert(pfn, i, 3, &data[s..s + l]).unwrap() {
                    out = Some(p);
                }
            }
            out.expect("complete")
        };
        let first = insert_all(&mut r, 1, &page(0xaa), &[0, 1, 2]);
        let addr = first.as_ptr();
        r.recycle(first);
        // The next page lands in the same buffer, its fragments in another order, and
        // holds only its own bytes.
        let second = insert_all(&mut r, 2, &page(0x55), &[2, 0, 1]);
        assert_eq!(second.as_ptr(), addr, "the buffer was not reused");
        assert!(second.iter().all(|&b| b == 0x55));
        // A page still referenced elsewhere is not taken back; a foreign size is ignored.
        let held = second.clone();
        r.recycle(second);
        r.recycle(Bytes::from(vec![1u8; 100]));
        let third = insert_all(&mut r, 3, &page(0x11), &[1, 2, 0]);
        assert_ne!(third.as_ptr(), held.as_ptr());
        assert!(held.iter().all(|&b| b == 0x55), "a held page changed");
        assert!(third.iter().all(|&b| b == 0x11));
    }
}
