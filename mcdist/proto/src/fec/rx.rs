//! The receiver's side of FEC: the cache of received pages, the open blocks and
//! their repair symbols, and decoding (see the [module docs](super) for the bounds).

use super::code;
use super::{max_repairs, piece};
use crate::wire::Repair;
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, HashSet, VecDeque};

/// What the receiver knows of one page of a block.
pub(crate) enum Have<'a> {
    /// The whole page (taken from the cache of received pages).
    Present,
    /// Some fragments, as `(index, payload)`.
    Fragments(Box<dyn Iterator<Item = (u16, &'a [u8])> + 'a>),
    /// Nothing.
    Nothing,
}

#[derive(Debug)]
struct RxBlock {
    /// Bytes this block holds: its member bitmap and its repair symbols.
    bytes: usize,
    span: u16,
    spp: u16,
    t: u16,
    /// The block's first burst as a share of it (the code's layer size).
    share: u8,
    members: Vec<u8>,
    repairs: Vec<(u32, Bytes)>,
    /// Repairs held at the last failed decoding attempt.
    tried_with: usize,
}

/// Why a repair symbol was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RepairOutcome {
    /// Stored; the block may decode now.
    Stored,
    /// The block was decoded or given up already.
    Late,
    /// Already held (same ESI).
    Duplicate,
    /// Contradicts what is known of the block, or too many for it.
    Refused,
}

/// A receiver's FEC state: recently received pages and open blocks, both bounded.
#[derive(Debug)]
pub(crate) struct FecRx {
    max_blocks: usize,
    cache_cap: usize,
    /// The byte budget `B` (see the module docs).
    max_bytes: usize,
    cache_bytes: usize,
    block_bytes: usize,
    /// Received pages kept, oldest first (a page kept twice: its later copy counts).
    cache: VecDeque<(u64, Bytes)>,
    blocks: HashMap<u64, RxBlock>,
    order: VecDeque<u64>,
    done: HashSet<u64>,
    done_order: VecDeque<u64>,
    /// Blocks evicted unsolved to bound memory.
    pub evicted: u64,
    /// The code's rows for the block shapes decoded last (most recent last).
    layers: Vec<code::Layers>,
    /// Pages the cache let go of, for the receiver to reuse their buffers
    /// ([`FecRx::released`]).
    released: Vec<Bytes>,
}

/// Pages let go of that [`FecRx`] holds for reuse at most: a block's (256 by default).
const RELEASED_MAX: usize = 256;

/// Repair symbols a receiver keeps of one block of `k` source symbols: `k` (at most
/// 256) and a few more. A block that holds that many and cannot decode never will (it
/// is given up, and its pages asked for plain), however many repair symbols come.
pub(crate) fn repairs_kept(k: usize) -> usize {
    k.min(256) + 16
}

impl FecRx {
    /// At most `max_blocks` open blocks, `cache_cap` cached pages and `max_bytes` held
    /// (see the module docs).
    pub fn new(max_blocks: usize, cache_cap: usize, max_bytes: usize) -> FecRx {
        FecRx {
            max_blocks: max_blocks.max(1),
            cache_cap,
            max_bytes,
            cache_bytes: 0,
            block_bytes: 0,
            cache: VecDeque::new(),
            blocks: HashMap::new(),
            order: VecDeque::new(),
            done: HashSet::new(),
            done_order: VecDeque::new(),
            evicted: 0,
            layers: Vec::new(),
            released: Vec::new(),
        }
    }

    /// Keep a received page for decoding blocks it belongs to.
    pub fn remember(&mut self, pfn: u64, page: &Bytes) {
        if self.cache_cap == 0 || page.len() > self.max_bytes / 4 {
            return;
        }
        self.cache.push_back((pfn, page.clone()));
        self.cache_bytes += page.len();
        while self.cache.len() > self.cache_cap || self.cache_bytes > self.max_bytes / 4 {
            match self.cache.pop_front() {
                Some((_, p)) => {
                    self.cache_bytes -= p.len();
                    self.release(p);
                }
                None => break,
            }
        }
    }

    fn release(&mut self, page: Bytes) {
        if self.released.len() < RELEASED_MAX {
            self.released.push(page);
        }
    }

    /// The pages the cache let go of since the last call: their buffers may serve
    /// later pages (the receiver hands them to its reassembler, which keeps those
    /// no one else holds).
    pub fn released(&mut self) -> std::vec::Drain<'_, Bytes> {
        self.released.drain(..)
    }

    /// Drop cached pages no block needs any more: the members of a block that
    /// decoded or was complete (blocks do not share pages), so only pages of
    /// blocks with a loss, or not heard of yet, stay cached.
    pub fn forget(&mut self, pfns: impl IntoIterator<Item = u64>) {
        let mut gone: Vec<u64> = pfns.into_iter().collect();
        gone.sort_unstable();
        let (Some(&lo), Some(&hi)) = (gone.first(), gone.last()) else {
            return;
        };
        let mut kept = VecDeque::with_capacity(self.cache.len());
        for (pfn, p) in std::mem::take(&mut self.cache) {
            if (lo..=hi).contains(&pfn) && gone.binary_search(&pfn).is_ok() {
                self.cache_bytes -= p.len();
                self.release(p);
            } else {
                kept.push_back((pfn, p));
            }
        }
        self.cache = kept;
    }

    /// The latest cached copy of each of the pages `first..first + span`.
    fn cached(&self, first: u64, span: usize) -> Vec<Option<&Bytes>> {
        let mut at = vec![None; span];
        for (pfn, p) in &self.cache {
            let i = pfn.wrapping_sub(first);
            if i < span as u64 {
                at[i as usize] = Some(p);
            }
        }
        at
    }

    /// Bytes held now: cached pages, and the member bitmaps and repair symbols of open
    /// blocks (at most half the budget; decoding one block may take the other half).
    pub fn held_bytes(&self) -> usize {
        self.cache_bytes + self.block_bytes
    }

    /// The largest source block (`K × T` bytes) taken: decoding needs about 4× that.
    pub fn max_block_bytes(&self) -> usize {
        self.max_bytes / 8
    }

    /// Drop an open block, releasing what it holds.
    fn drop_block(&mut self, first: u64) -> bool {
        match self.blocks.remove(&first) {
            Some(b) => {
                self.block_bytes -= b.bytes;
                true
            }
            None => false,
        }
    }

    #[cfg(test)]
    pub fn open_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Symbols per page of block `first`, while it is held.
    pub fn symbols_per_page(&self, first: u64) -> Option<u16> {
        self.blocks.get(&first).map(|b| b.spp)
    }

    /// Mark a block finished (decoded, complete, or given up): later repairs are dropped.
    pub fn finish(&mut self, first: u64) {
        self.drop_block(first);
        if self.done.insert(first) {
            self.done_order.push_back(first);
            while self.done_order.len() > self.max_blocks * 16 {
                if let Some(old) = self.done_order.pop_front() {
                    self.done.remove(&old);
                }
            }
        }
    }

    /// `pfn` is a member of a block being decoded (repair symbols held, not done).
    pub fn in_open_block(&self, pfn: u64) -> bool {
        self.blocks.iter().any(|(&first, b)| {
            let i = pfn.wrapping_sub(first);
            i < u64::from(b.span) && b.members[(i / 8) as usize] & (1 << (i % 8)) != 0
        })
    }

    pub fn is_done(&self, first: u64) -> bool {
        self.done.contains(&first)
    }

    /// Store a repair symbol whose fields the caller validated against the session.
    pub fn add(&mut self, r: &Repair<'_>, symbol: Bytes) -> RepairOutcome {
        if self.done.contains(&r.first_pfn) {
            return RepairOutcome::Late;
        }
        // Repair symbols have ESIs `K` and up (below is a source symbol's), and come
        // from the first burst or the few layers after it.
        let k = r.source_symbols();
        let limit = max_repairs(k as usize, r.burst_share);
        if r.esi < k || r.esi - k >= limit {
            return RepairOutcome::Refused;
        }
        // A source block too large to decode within the budget is never taken.
        let source_bytes = (r.source_symbols() as usize).saturating_mul(usize::from(r.symbol_size));
        if source_bytes > self.max_block_bytes() {
            return RepairOutcome::Refused;
        }
        if let Some(b) = self.blocks.get(&r.first_pfn) {
            if b.span != r.span
                || b.spp != r.symbols_per_page
                || b.t != r.symbol_size
                || b.share != r.burst_share
                || b.members != r.members
            {
                return RepairOutcome::Refused;
            }
        } else {
            while self.blocks.len() >= self.max_blocks {
                let Some(old) = self.order.pop_front() else {
                    break;
                };
                if self.drop_block(old) {
                    self.evicted += 1;
                }
            }
            self.block_bytes += r.members.len();
            self.blocks.insert(
                r.first_pfn,
                RxBlock {
                    bytes: r.members.len(),
                    span: r.span,
                    spp: r.symbols_per_page,
                    t: r.symbol_size,
                    share: r.burst_share,
                    members: r.members.to_vec(),
                    repairs: Vec::new(),
                    tried_with: 0,
                },
            );
            self.order.push_back(r.first_pfn);
            if self.order.len() > self.max_blocks * 4 {
                let live = &self.blocks;
                self.order.retain(|f| live.contains_key(f));
            }
        }
        let Some(b) = self.blocks.get(&r.first_pfn) else {
            return RepairOutcome::Refused;
        };
        if b.repairs.iter().any(|(e, _)| *e == r.esi) {
            return RepairOutcome::Duplicate;
        }
        // Bounded memory: a server sends at most `fec_max_overhead` (≤ 1) × K
        // repairs in a block's first burst; more than [`repairs_kept`] are refused.
        if b.repairs.len() >= repairs_kept(r.source_symbols() as usize) {
            return RepairOutcome::Refused;
        }
        // And in bytes: older blocks make room, this one's symbols never exceed it.
        while self.block_bytes + symbol.len() > self.max_bytes / 4 {
            let Some(old) = self.order.iter().copied().find(|&f| f != r.first_pfn) else {
                return RepairOutcome::Refused;
            };
            self.order.retain(|&f| f != old);
            if self.drop_block(old) {
                self.evicted += 1;
            }
        }
        let Some(b) = self.blocks.get_mut(&r.first_pfn) else {
            return RepairOutcome::Refused;
        };
        b.bytes += symbol.len();
        self.block_bytes += symbol.len();
        b.repairs.push((r.esi, symbol));
        RepairOutcome::Stored
    }

    /// Try to decode block `first`. `have(pfn)` says what the receiver holds of
    /// a member page. Returns the missing pages, or `None` when the block cannot
    /// be decoded yet; `Err(())` when it never can: a page present but no longer
    /// cached, or as many repair symbols held as a block keeps ([`repairs_kept`])
    /// and still not enough. The caller gives the block up; its lost pages are then
    /// asked for as plain pages.
    pub fn try_decode<'a>(
        &mut self,
        first: u64,
        page_size: usize,
        mut have: impl FnMut(u64) -> Have<'a>,
    ) -> Result<Option<Vec<(u64, Bytes)>>, ()> {
        let Some(b) = self.blocks.get(&first) else {
            return Ok(None);
        };
        if b.repairs.len() <= b.tried_with {
            return Ok(None);
        }
        let (spp, t) = (b.spp, usize::from(b.t));
        let members: Vec<u64> = (0..usize::from(b.span))
            .filter(|i| b.members[i / 8] & (1 << (i % 8)) != 0)
            .map(|i| first + i as u64)
            .collect();
        let k = members.len() * usize::from(spp);
        // First count what is in hand, without copying: a block that cannot
        // decode yet costs no symbol copies.
        enum Src<'b> {
            Page(Bytes),
            Frags(Vec<(u16, &'b [u8])>),
        }
        let cached = self.cached(first, usize::from(b.span));
        let mut srcs: Vec<(usize, Src<'a>)> = Vec::with_capacity(members.len());
        let mut missing = Vec::new();
        let mut symbols = 0usize;
        for (m, &pfn) in members.iter().enumerate() {
            match have(pfn) {
                Have::Present => {
                    let Some(p) = cached[(pfn - first) as usize] else {
                        return Err(());
                    };
                    if p.len() != page_size {
                        return Err(());
                    }
                    symbols += usize::from(spp);
                    srcs.push((m, Src::Page(p.clone())));
                }
                Have::Fragments(it) => {
                    missing.push((m, pfn));
                    let v: Vec<(u16, &[u8])> = it.filter(|(i, _)| *i < spp).collect();
                    symbols += v.len();
                    srcs.push((m, Src::Frags(v)));
                }
                Have::Nothing => missing.push((m, pfn)),
            }
        }
        if missing.is_empty() {
            self.finish(first);
            self.forget(members);
            return Ok(Some(Vec::new()));
        }
        let Some(b) = self.blocks.get_mut(&first) else {
            return Ok(None);
        };
        // With as many repair symbols as a block keeps, no further one is taken: a
        // block that cannot decode now never will.
        let full = b.repairs.len() >= repairs_kept(k);
        if symbols + b.repairs.len() < k {
            return if full { Err(()) } else { Ok(None) };
        }
        // The symbols in hand, where they lie: nothing is copied but the lost symbols
        // the decoder restores.
        let mut held: Vec<Option<&[u8]>> = vec![None; k];
        for (m, src) in &srcs {
            let base = m * usize::from(spp);
            match src {
                Src::Page(p) => {
                    for i in 0..spp {
                        let (s, l) = piece(page_size, spp, i);
                        held[base + usize::from(i)] = Some(&p[s..s + l]);
                    }
                }
                Src::Frags(v) => {
                    for (i, data) in v {
                        let l = piece(page_size, spp, *i).1.min(data.len());
                        held[base + usize::from(*i)] = Some(&data[..l]);
                    }
                }
            }
        }
        b.tried_with = b.repairs.len();
        let share = b.share;
        let repairs: Vec<(u32, &[u8])> = b
            .repairs
            .iter()
            .map(|(esi, sym)| (esi - k as u32, &sym[..]))
            .collect();
        let rows = code::Layers::kept(&mut self.layers, k, share);
        let Ok(restored) = code::decode(k, t, rows, |i| held[i], &repairs) else {
            return if full { Err(()) } else { Ok(None) };
        };
        let restored: HashMap<usize, Vec<u8>> = restored.into_iter().collect();
        let symbol = |i: usize| -> &[u8] {
            match (restored.get(&i), held[i]) {
                (Some(s), _) => s,
                (None, Some(s)) => s,
                (None, None) => &[],
            }
        };
        let mut out = Vec::with_capacity(missing.len());
        for (m, pfn) in missing {
            let mut page = BytesMut::zeroed(page_size);
            for i in 0..spp {
                let (s, l) = piece(page_size, spp, i);
                let sym = symbol(m * usize::from(spp) + usize::from(i));
                let n = l.min(sym.len());
                page[s..s + n].copy_from_slice(&sym[..n]);
            }
            out.push((pfn, page.freeze()));
        }
        self.finish(first);
        self.forget(members);
        Ok(Some(out))
    }
}
