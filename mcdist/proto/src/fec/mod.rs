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
//! ones (checked against the image's digest first). A receiver keeps at most
//! `min(K, 256) + 16` repair symbols of a block; one that holds that many and still
//! cannot decode (it lost more than that: a receiver descheduled for a while) gives
//! the block up and asks for its lost pages plain. Demand answers stay plain pages.
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
use std::collections::VecDeque;
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

mod rx;
pub(crate) use rx::{repairs_kept, FecRx, Have, RepairOutcome};

#[cfg(test)]
mod tests;
