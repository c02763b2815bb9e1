//! Forward error correction over runs of pages the server pushes or sweeps, with a
//! sparse binary erasure code whose decoding cost follows the losses ([`code`]).
//!
//! **Blocks.** The server groups pages it multicasts by push or sweep, in the
//! order sent, into blocks of up to `fec_block_pages` pages whose page numbers
//! lie within [`wire::MAX_FEC_SPAN`] of the block's first page. The pages go
//! out as ordinary [`wire::Data`] datagrams (the code is systematic); once the
//! block closes, the server multicasts `R` [`wire::Repair`] datagrams, each
//! carrying one repair symbol. One repair symbol replaces *any* one lost
//! symbol of the block, so the same datagram fixes different losses at
//! different receivers.
//!
//! **Symbols.** A page travels in `F` fragments of `ceil(page_size / F)` bytes
//! (the last may be shorter). The symbol size `T` is that fragment size, and a
//! page is `F` source symbols: its fragments, each zero-padded to `T`. So a
//! received fragment is exactly one source symbol, and one repair symbol fills
//! one datagram the size of a fragment datagram. With 4 KiB pages at MTU 1500
//! that is `F = 3`, `T = 1366` (two bytes of padding per page); with jumbo
//! frames or loopback `F = 1`, `T = 4096`. The server keeps the fragment size
//! small enough that a repair datagram (its header, member bitmap and symbol)
//! fits the datagram size.
//!
//! **How many repairs.** `R = ceil(K × f)` for `K` source symbols, with `f` =
//! [`ServerConfig::fec_repair_fraction`](crate::server::ServerConfig::fec_repair_fraction)
//! of the 90th-percentile loss receivers reported (over the last two seconds, slow
//! receivers left out) and how many they are: enough repairs that every receiver, losing
//! source and repair symbols alike at that rate, decodes the block but with probability
//! `fec_block_failure`, plus `fec_margin`; at least `fec_min_overhead` and at most
//! `fec_max_overhead`. `R = 0` (and no block is formed, so nothing is copied or encoded)
//! while nobody reports loss and no minimum is set.
//!
//! **Receivers** keep the last pages they received (a bounded cache) and a
//! bounded set of open blocks. When a block's received source symbols (pages
//! present, fragments of partly received pages) plus its repair symbols reach
//! `K`, they try to decode, and again with each further repair symbol until the
//! lost symbols are determined; restored pages are delivered exactly like received
//! ones (checked against the image's digest first). Demand answers and NACK repairs
//! stay plain pages.
//!
//! **Copies.** A received page is kept as a reference to the page the client
//! made anyway (a page lent to the sink where it lies in the datagram is copied
//! once into the cache); nothing else is copied on arrival. Decoding reads the
//! symbols in hand where they lie and copies only the restored symbols out.
//!
//! **Why this code.** Measured on these blocks (the `fec_codec` bench): RaptorQ
//! (RFC 6330) decodes from almost any `K` symbols, but its decoder solves for every
//! intermediate symbol of a block whatever was lost, about 11 µs per page, and every
//! receiver decodes every block it lost anything of; Reed–Solomon over GF(2^16)
//! decodes only 1.05–1.1× faster. The sparse code encodes about 5× and decodes
//! 23–39× faster than RaptorQ at `K = 384`, and decoded every one of 400 blocks at
//! the server's repair counts for 5 and 10 % loss (2 failed at 1 %); with few repair
//! symbols it needs a few more than were lost (a NACK round sends them).
//!
//! **Receiver memory** is bounded in bytes by one budget `B` (`fec_max_bytes`),
//! whatever the stream: the page cache holds at most `B / 4` of pages (oldest
//! dropped first), the open blocks at most `B / 4` of repair symbols and member
//! bitmaps (the oldest other block is dropped to make room; a symbol that does
//! not fit even then is refused), and a block is taken only if its source block
//! (`K × T` bytes) is at most `B / 8`: decoding one holds about four times that at
//! once (the symbols handed to the decoder, its copy of them, the decoded block and
//! the recovered pages), so decoding stays within the other `B / 2`. Counts bound
//! the bookkeeping as before (`fec_max_blocks` open blocks, `fec_cache_pages`
//! pages).

use crate::wire::{self, Repair};
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

pub mod code;
pub(crate) use code::{burst_len, burst_share, max_repairs, BlockEncoder, DECODE_SPARE};

/// Symbol size for pages of `page_size` bytes sent in `frags` fragments.
pub fn symbol_size(page_size: usize, frags: u16) -> usize {
    page_size.div_ceil(usize::from(frags.max(1)))
}

/// Offset and length of fragment `idx` of a page (the part of symbol `idx` that is data).
fn piece(page_size: usize, frags: u16, idx: u16) -> (usize, usize) {
    crate::reassembly::fragment_slot(page_size, frags, idx).unwrap_or((0, 0))
}

/// Bytes a repair datagram needs beyond the symbol: header, fixed body and a
/// member bitmap of `span` pages.
pub fn repair_overhead(span: u16) -> usize {
    wire::HEADER_LEN + Repair::FIXED_LEN + usize::from(span).div_ceil(8)
}

/// A closed block's repair symbols, waiting to be sent.
#[derive(Debug)]
pub(crate) struct Burst {
    pub first: u64,
    pub span: u16,
    pub members: Vec<u8>,
    /// The block's first burst of repair symbols as a share of it ([`burst_len`]).
    pub share: u8,
    /// `(ESI, symbol)`: repair symbol `j` has ESI `K + j`.
    pub packets: VecDeque<(u32, Vec<u8>)>,
}

/// The server's block being filled.
#[derive(Debug)]
pub(crate) struct BlockBuilder {
    spp: u16,
    t: usize,
    max_pages: usize,
    max_span: u16,
    /// `max_pages × spp × t` bytes: slot `(m × spp + i) × t` holds fragment `i`
    /// of member `m`; the padding after each fragment is never written, so stays zero.
    buf: Vec<u8>,
    first: u64,
    members: Vec<u64>,
    opened: Option<Instant>,
    last_enc: Option<BlockEncoder>,
}

impl BlockBuilder {
    pub fn new(page_size: usize, spp: u16, max_pages: usize, max_span: u16) -> BlockBuilder {
        let t = symbol_size(page_size, spp);
        let max_pages = max_pages
            .clamp(1, usize::from(max_span))
            .min(wire::MAX_FEC_SYMBOLS as usize / usize::from(spp.max(1)))
            .max(1);
        BlockBuilder {
            spp,
            t,
            max_pages,
            max_span,
            buf: Vec::new(),
            first: 0,
            members: Vec::with_capacity(max_pages),
            opened: None,
            last_enc: None,
        }
    }

    pub fn is_open(&self) -> bool {
        self.opened.is_some()
    }

    pub fn opened_at(&self) -> Option<Instant> {
        self.opened
    }

    /// The open block has as many pages as a block may hold.
    pub fn is_full(&self) -> bool {
        self.opened.is_some() && self.members.len() >= self.max_pages
    }

    /// Whether `pfn` is a member of the open block.
    pub fn holds(&self, pfn: u64) -> bool {
        self.opened.is_some() && self.members.binary_search(&pfn).is_ok()
    }

    /// Whether `pfn` can join the open block (false: close it first).
    pub fn fits(&self, pfn: u64) -> bool {
        self.opened.is_none()
            || (self.members.len() < self.max_pages
                && pfn > self.members.last().copied().unwrap_or(self.first)
                && pfn - self.first < u64::from(self.max_span))
    }

    /// Add `pfn` (opening a block if none is open); returns its member index.
    /// The caller checked [`BlockBuilder::fits`].
    pub fn admit(&mut self, now: Instant, pfn: u64) -> usize {
        if self.opened.is_none() {
            self.opened = Some(now);
            self.first = pfn;
            self.members.clear();
            let need = self.max_pages * usize::from(self.spp) * self.t;
            if self.buf.len() != need {
                self.buf = vec![0; need];
            }
        }
        self.members.push(pfn);
        self.members.len() - 1
    }

    /// Store fragment `idx` of member `m`.
    pub fn put(&mut self, m: usize, idx: u16, data: &[u8]) {
        let off = (m * usize::from(self.spp) + usize::from(idx)) * self.t;
        if let Some(dst) = self.buf.get_mut(off..off + data.len().min(self.t)) {
            dst.copy_from_slice(&data[..dst.len()]);
        }
    }

    /// Close the block and encode at least `repairs` repair symbols (none: nothing to
    /// send): the first burst is a whole share of the block (see [`burst_len`]).
    pub fn close(&mut self, repairs: u32) -> Option<Burst> {
        self.opened.take()?;
        self.last_enc = None;
        let count = self.members.len();
        if count == 0 || repairs == 0 {
            return None;
        }
        let k = count * usize::from(self.spp);
        let share = burst_share(k, repairs as usize);
        let enc = BlockEncoder::new(self.buf[..k * self.t].to_vec(), self.t, share);
        let (span, members) = member_bitmap(self.first, &self.members);
        let out = more_repairs(&enc, self.first, span, members, 0, enc.burst() as u32);
        self.last_enc = Some(enc);
        Some(out)
    }

    /// The last closed block: its first page and members.
    pub fn last_block(&self) -> (u64, &[u64]) {
        (self.first, &self.members)
    }

    /// The encoder of the last closed block, if it sent repairs.
    pub fn take_encoder(&mut self) -> Option<BlockEncoder> {
        self.last_enc.take()
    }

    /// Source symbols of the open block so far.
    pub fn source_symbols(&self) -> usize {
        if self.opened.is_some() {
            self.members.len() * usize::from(self.spp)
        } else {
            0
        }
    }

    /// Source symbols per page and symbol size.
    pub fn geometry(&self) -> (u16, usize) {
        (self.spp, self.t)
    }
}

/// Member bitmap (LSB first, bit 0 = `first`) and span of a block whose
/// members are `members`, ascending.
pub(crate) fn member_bitmap(first: u64, members: &[u64]) -> (u16, Vec<u8>) {
    let last = members.last().copied().unwrap_or(first);
    let span = (last - first + 1) as u16;
    let mut bits = vec![0u8; usize::from(span).div_ceil(8)];
    for &p in members {
        let i = (p - first) as usize;
        bits[i / 8] |= 1 << (i % 8);
    }
    (span, bits)
}

/// The encoder of a block of `members` (ascending pages of `page_size` bytes in
/// `spp` fragments) whose first burst was `share` of it, built from the pages
/// `read` returns: for NACK repair of a block whose symbols were sent some time ago.
pub(crate) fn block_encoder(
    page_size: usize,
    spp: u16,
    members: &[u64],
    share: u8,
    mut read: impl FnMut(u64, &mut [u8]) -> std::io::Result<()>,
) -> std::io::Result<BlockEncoder> {
    let t = symbol_size(page_size, spp);
    let k = members.len() * usize::from(spp);
    let mut data = vec![0u8; k * t];
    let mut page = vec![0u8; page_size];
    for (m, &pfn) in members.iter().enumerate() {
        read(pfn, &mut page)?;
        for i in 0..spp {
            let (s, l) = piece(page_size, spp, i);
            let off = (m * usize::from(spp) + usize::from(i)) * t;
            data[off..off + l].copy_from_slice(&page[s..s + l]);
        }
    }
    Ok(BlockEncoder::new(data, t, share))
}

/// `count` repair symbols of `enc`, the first with repair index `start` (ESI `K + start`).
pub(crate) fn more_repairs(
    enc: &BlockEncoder,
    first: u64,
    span: u16,
    members: Vec<u8>,
    start: u32,
    count: u32,
) -> Burst {
    let k = enc.source_symbols() as u32;
    Burst {
        first,
        span,
        members,
        share: enc.share(),
        packets: enc
            .repairs(start, count)
            .into_iter()
            .map(|(j, s)| (k + j, s))
            .collect(),
    }
}

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
    cache: HashMap<u64, Bytes>,
    cache_order: VecDeque<u64>,
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
            cache: HashMap::new(),
            cache_order: VecDeque::new(),
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
        match self.cache.insert(pfn, page.clone()) {
            Some(old) => self.cache_bytes -= old.len(),
            None => self.cache_order.push_back(pfn),
        }
        self.cache_bytes += page.len();
        while self.cache.len() > self.cache_cap || self.cache_bytes > self.max_bytes / 4 {
            match self.cache_order.pop_front() {
                Some(old) => {
                    if let Some(p) = self.cache.remove(&old) {
                        self.cache_bytes -= p.len();
                        self.release(p);
                    }
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
        for pfn in pfns {
            if let Some(p) = self.cache.remove(&pfn) {
                self.cache_bytes -= p.len();
                self.release(p);
            }
        }
        if self.cache_order.len() > 2 * self.cache.len() + 1024 {
            let live = &self.cache;
            self.cache_order.retain(|p| live.contains_key(p));
        }
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
        // repairs; more than K (or 256) plus a few are refused.
        if b.repairs.len() >= (r.source_symbols() as usize).min(256) + 16 {
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
    /// be decoded yet; `Err(())` when it never can (a page present but no
    /// longer cached): the block is given up.
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
        let mut srcs: Vec<(usize, Src<'a>)> = Vec::with_capacity(members.len());
        let mut missing = Vec::new();
        let mut symbols = 0usize;
        for (m, &pfn) in members.iter().enumerate() {
            match have(pfn) {
                Have::Present => {
                    let Some(p) = self.cache.get(&pfn) else {
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
        if symbols + b.repairs.len() < k {
            return Ok(None);
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
            return Ok(None);
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

#[cfg(test)]
mod tests;
