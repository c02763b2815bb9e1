//! The server's side of forward error correction ([`crate::fec`]).
//!
//! Rules owned here: pushed and swept pages (never demand, repair, zero or
//! working-set pages) join an open block; a block closes when full, when the
//! next page does not fit its span, after [`FEC_MAX_BLOCK_AGE`], or when nothing
//! else is left to send; a closed block's repair symbols go after the waiting
//! answers and before further pushes. The repair fraction follows the
//! 90th-percentile path loss that receivers report (their loss less their own
//! overload: datagrams a receiver's socket dropped are the rate controller's to
//! remove, and NACK repair by block recovers them), between the configured
//! bounds; the first loss report sets it at once, before the next rate update.
//!
//! NACK repair by block: a receiver's first NACK of a swept or pushed page is
//! answered with fresh repair symbols of the page's block (the block it was
//! sent in, or, for a page sent while no block was open, the pages sent from its
//! aligned window of `fec_block_pages`), as many as the receiver NACKed
//! fragments there. NACKs for one block within [`NACK_ROUND_WINDOW`] of a round
//! share it (the round grows to the largest need), so one round repairs every
//! receiver whose loss in the block it covers, whatever the number of receivers.
//! Hash pages form windows of their own. A re-asked page, a slow or heavily
//! lossy receiver's NACK, and a NACK for a block with a page multicast more
//! than `fec_repair_horizon_pages` pages ago (receivers no longer hold its
//! other pages, so repair symbols would not decode) take the plain path
//! (`requests`); the pages of a NACK naming more lost symbols of one block than a
//! receiver keeps repair symbols of ([`crate::fec::repairs_kept`]) go to the asker
//! alone.
//!
//! Pages receivers keep: from the first loss a receiver reports (or the first block
//! formed) every data page carries [`Data::KEEP`], which tells receivers to keep it
//! for decoding (they keep unmarked pages only while they see loss themselves, see
//! `client::fec_rx`).

use super::config::Geometry;
use super::schedule::{Job, Target, ALL_FRAGMENTS};
use super::{Server, ServerConfig};
use crate::fec::{BlockBuilder, BlockEncoder, Burst};
use crate::wire::{self, Body, Data, HeaderFlags, Message};
use crate::{Dest, Transmit};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How a NACK is answered ([`Server::fec_nack`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FecNack {
    /// With repair symbols of its block (noted for the next round).
    Symbols,
    /// By the plain path.
    Plain,
    /// Its block's repair indices are spent (receivers take no more of it): the page,
    /// to the asker alone. The asker could not decode the block with every symbol it
    /// may take, so its loss is its own; others that need the page ask too.
    Spent,
}

/// Longest an FEC block stays open before its repairs are sent.
const FEC_MAX_BLOCK_AGE: Duration = Duration::from_millis(20);
/// NACKs for one block this close together share one round of repair symbols.
const NACK_ROUND_WINDOW: Duration = Duration::from_millis(10);
/// Sent blocks remembered for NACK repair (the oldest is forgotten).
const MAX_SENT_BLOCKS: usize = 4096;
/// Encoders of sent blocks kept for further rounds (the oldest is dropped and
/// rebuilt from the source if needed again).
const MAX_ENCODERS: usize = 16;

/// A block whose pages went out: what NACK repair needs to send more symbols.
#[derive(Debug)]
struct SentBlock {
    members: Vec<u64>,
    /// Its first burst's share of it, the code's layer size (0: none went yet, a
    /// block formed for a NACK: its first round sets it).
    share: u8,
    /// Repair index of the next fresh symbol (ESI `K + next_repair`).
    next_repair: u32,
    /// Latest NACK round: when it was queued and how many symbols it holds.
    round: Option<(Instant, u32)>,
}

impl SentBlock {
    /// Its source symbols (`K`), `spp` per page.
    fn source_symbols(&self, spp: u16) -> usize {
        self.members.len() * usize::from(spp)
    }

    /// Receivers take no more of its repair indices (see [`crate::fec::max_repairs`]).
    fn spent(&self, spp: u16) -> bool {
        self.share != 0
            && self.next_repair >= crate::fec::max_repairs(self.source_symbols(spp), self.share)
    }
}

/// Sent blocks, by first page, bounded.
#[derive(Debug, Default)]
struct SentBlocks {
    blocks: BTreeMap<u64, SentBlock>,
    order: VecDeque<u64>,
    encoders: HashMap<u64, BlockEncoder>,
    enc_order: VecDeque<u64>,
}

impl SentBlocks {
    fn insert(&mut self, first: u64, members: Vec<u64>, share: u8, next_repair: u32) {
        let block = SentBlock {
            members,
            share,
            next_repair,
            round: None,
        };
        if self.blocks.insert(first, block).is_none() {
            self.order.push_back(first);
        } else {
            // A new block from the same first page (its pages sent again, to a
            // later receiver): the old block's encoder holds other pages.
            self.encoders.remove(&first);
        }
        while self.order.len() > MAX_SENT_BLOCKS {
            if let Some(old) = self.order.pop_front() {
                self.blocks.remove(&old);
                self.encoders.remove(&old);
            }
        }
    }

    fn keep_encoder(&mut self, first: u64, enc: BlockEncoder) {
        if self.encoders.insert(first, enc).is_none() {
            self.enc_order.push_back(first);
        }
        while self.enc_order.len() > MAX_ENCODERS {
            if let Some(old) = self.enc_order.pop_front() {
                self.encoders.remove(&old);
            }
        }
    }

    /// The sent block `pfn` is a member of: blocks start at most one span before it.
    fn block_of(&self, pfn: u64) -> Option<u64> {
        let lo = pfn.saturating_sub(u64::from(wire::MAX_FEC_SPAN));
        self.blocks
            .range(lo..=pfn)
            .rev()
            .find(|(_, b)| b.members.binary_search(&pfn).is_ok())
            .map(|(f, _)| *f)
    }
}

#[derive(Debug)]
pub(super) struct FecState {
    builder: BlockBuilder,
    bursts: VecDeque<Burst>,
    /// 90th-percentile loss receivers report, parts per thousand ...
    loss_p90: u16,
    /// ... and how many receivers report.
    receivers: usize,
    sent: SentBlocks,
    /// NACKed pages (and their fragments) per block in the datagram being handled.
    nacked: Vec<(u64, Vec<(u64, u32)>)>,
    /// Data pages go out marked [`Data::KEEP`] (from the first loss reported on).
    keeping: bool,
}

impl FecState {
    /// FEC state when `cfg` turns it on (multicast only).
    pub(super) fn new(cfg: &ServerConfig, geo: &Geometry) -> Option<FecState> {
        cfg.fec_enabled().then(|| FecState {
            builder: BlockBuilder::new(
                geo.page_size,
                geo.frag_count,
                cfg.fec_block_pages,
                cfg.fec_span(),
            ),
            bursts: VecDeque::new(),
            loss_p90: 0,
            receivers: 1,
            sent: SentBlocks::default(),
            nacked: Vec::new(),
            keeping: false,
        })
    }
}

impl Server {
    /// Data pages go out marked [`Data::KEEP`] (see the module docs).
    pub(super) fn fec_keeping(&self) -> bool {
        self.fec.as_ref().is_some_and(|f| f.keeping)
    }

    /// Take the loss receivers report now as the basis of the repair fraction.
    pub(super) fn fec_note_loss(&mut self, now: Instant) {
        if let Some(fec) = self.fec.as_mut() {
            (fec.loss_p90, fec.receivers) = self.peers.loss_p90(now);
            fec.receivers = fec.receivers.max(1);
            fec.keeping |= fec.loss_p90 > 0;
        }
    }

    /// A loss report: the first one sets the repair fraction at once, so repair
    /// symbols follow from the next block rather than from the next rate update,
    /// for as many receivers as are known (until the update counts those reporting).
    pub(super) fn fec_first_loss(&mut self, loss_permille: u16) {
        let receivers = self.peers.len().max(1);
        if let Some(fec) = self.fec.as_mut() {
            if fec.loss_p90 == 0 {
                fec.loss_p90 = loss_permille;
                fec.receivers = receivers;
            }
            fec.keeping = true;
        }
    }

    /// A block is open or repair symbols wait.
    pub(super) fn fec_pending(&self) -> bool {
        self.fec
            .as_ref()
            .is_some_and(|f| f.builder.is_open() || !f.bursts.is_empty())
    }

    /// The open block is older than [`FEC_MAX_BLOCK_AGE`].
    pub(super) fn fec_block_expired(&self, now: Instant) -> bool {
        self.fec.as_ref().is_some_and(|f| {
            f.builder
                .opened_at()
                .is_some_and(|t| now.saturating_duration_since(t) >= FEC_MAX_BLOCK_AGE)
        })
    }

    /// The open block holds as many pages as it may.
    pub(super) fn fec_block_full(&self) -> bool {
        self.fec.as_ref().is_some_and(|f| f.builder.is_full())
    }

    /// Repair symbols per source symbol for a block of `k` source symbols at the loss
    /// receivers report now.
    fn fec_fraction(&self, k: usize) -> f64 {
        let Some(f) = self.fec.as_ref() else {
            return 0.0;
        };
        self.cfg
            .fec_repair_fraction(f64::from(f.loss_p90) / 1000.0, k, f.receivers)
    }

    /// Add a pushed or swept page to the open FEC block (opening one while
    /// repairs are due); its member index.
    pub(super) fn fec_admit(&mut self, now: Instant, job: &Job) -> Option<usize> {
        let eligible = job.target == Target::Group
            && !job.ws
            && job.flags.intersects(Data::PUSH | Data::SWEEP)
            && !job.is_zero();
        if !eligible || self.fec.is_none() {
            return None;
        }
        if self.fec.as_ref().is_some_and(|f| !f.builder.fits(job.pfn)) {
            self.fec_close();
        }
        let frac = self.fec_fraction(1);
        let fec = self.fec.as_mut()?;
        if !fec.builder.is_open() && frac <= 0.0 {
            return None;
        }
        fec.keeping = true;
        Some(fec.builder.admit(now, job.pfn))
    }

    /// Feed fragment `idx` of block member `member` to the open block.
    pub(super) fn fec_put(&mut self, member: usize, idx: u16, bytes: &[u8]) {
        if let Some(fec) = self.fec.as_mut() {
            fec.builder.put(member, idx, bytes);
        }
    }

    /// Close the open FEC block and queue its repair symbols; true if any were queued.
    pub(super) fn fec_close(&mut self) -> bool {
        let Some(k) = self.fec.as_ref().map(|f| f.builder.source_symbols()) else {
            return false;
        };
        let frac = self.fec_fraction(k);
        let Some(fec) = self.fec.as_mut() else {
            return false;
        };
        let repairs = (k as f64 * frac).ceil() as u32;
        let was_open = fec.builder.is_open();
        let burst = fec.builder.close(repairs);
        if was_open {
            let (first, members) = fec.builder.last_block();
            if !members.is_empty() {
                let (share, sent) = burst
                    .as_ref()
                    .map_or((0, 0), |b| (b.share, b.packets.len() as u32));
                fec.sent.insert(first, members.to_vec(), share, sent);
                if let Some(enc) = fec.builder.take_encoder() {
                    fec.sent.keep_encoder(first, enc);
                }
            }
        }
        match burst {
            Some(b) => {
                fec.bursts.push_back(b);
                self.stats.fec_blocks += 1;
                true
            }
            None => false,
        }
    }

    /// A receiver's first NACK of fragments `frags` of page `pfn`: note it for repair
    /// by block (see the module docs), or say how else it is answered.
    pub(super) fn fec_nack(&mut self, pfn: u64, frags: u32) -> FecNack {
        if pfn >= self.total_pages || !self.sent.ever.get(pfn) {
            return FecNack::Plain;
        }
        let window = self.cfg.fec_block_pages.max(1) as u64;
        // Data pages and hash pages form windows of their own.
        let (base, page_count) = if pfn < self.page_count {
            (0, self.page_count)
        } else {
            (self.page_count, self.total_pages)
        };
        let (zero, ever) = (&self.info.zero_map, &self.sent.ever);
        let Some(fec) = self.fec.as_mut() else {
            return FecNack::Plain;
        };
        if fec.builder.holds(pfn) {
            // Its block is still open: its repair symbols are not out yet, and
            // a window block formed now would claim the same first page with
            // other members (receivers refuse such a repair). Plain path.
            return FecNack::Plain;
        }
        let sent = &self.sent;
        // Receivers keep the pages a block needs only for a while (the last
        // `fec_cache_pages` they received): a block with a member multicast
        // longer ago than the horizon is no help to them.
        let horizon = self.cfg.fec_repair_horizon_pages;
        let recent = |members: &[u64]| {
            members
                .iter()
                .all(|&q| sent.multicast_pages_after(q).is_some_and(|n| n <= horizon))
        };
        let first = match fec.sent.block_of(pfn) {
            Some(f) if !fec.sent.blocks.get(&f).is_some_and(|b| recent(&b.members)) => {
                return FecNack::Plain
            }
            Some(f) => f,
            None => {
                // Sent while no block was open: the window's sent pages that
                // are in no other block make one now.
                let lo = pfn - (pfn - base) % window;
                let hi = (lo + window).min(page_count);
                let members: Vec<u64> = (lo..hi)
                    .filter(|&q| !zero.get(q) && ever.get(q) && fec.sent.block_of(q).is_none())
                    .collect();
                let Some(&first) = members.first() else {
                    return FecNack::Plain;
                };
                if !recent(&members) {
                    return FecNack::Plain;
                }
                if fec.sent.blocks.contains_key(&first) {
                    return FecNack::Plain;
                }
                fec.sent.insert(first, members, 0, 0);
                first
            }
        };
        // A block whose repair indices are spent (receivers take no more of it): the
        // page itself, or the receiver would ask for it again and again in vain.
        let (spp, _) = fec.builder.geometry();
        if fec.sent.blocks.get(&first).is_some_and(|b| b.spent(spp)) {
            return FecNack::Spent;
        }
        match fec.nacked.iter_mut().find(|(f, _)| *f == first) {
            Some((_, v)) => v.push((pfn, frags)),
            None => fec.nacked.push((first, vec![(pfn, frags)])),
        }
        self.stats.fec_nacked_pages += 1;
        FecNack::Symbols
    }

    /// Queue repair rounds for the blocks the datagram from `from` just handled
    /// NACKed: one fresh symbol per NACKed fragment, shared with the round queued for
    /// the block less than [`NACK_ROUND_WINDOW`] ago (grown if this need is larger).
    /// A block of which the asker lost more symbols than a receiver keeps repair
    /// symbols of ([`crate::fec::repairs_kept`]) cannot decode there: its pages go to
    /// the asker alone (a loss that large is its own, as a host that did not run for a
    /// while has; siblings that need a page ask too).
    pub(super) fn fec_flush_nacks(&mut self, now: Instant, from: SocketAddr) {
        let Some(fec) = self.fec.as_mut() else {
            return;
        };
        if fec.nacked.is_empty() {
            return;
        }
        let nacked = std::mem::take(&mut fec.nacked);
        let (spp, _) = fec.builder.geometry();
        let page_size = self.geo.page_size;
        for (first, nacks) in nacked {
            let Some(fec) = self.fec.as_mut() else {
                return;
            };
            let Some(b) = fec.sent.blocks.get_mut(&first) else {
                continue;
            };
            let k = b.source_symbols(spp) as u32;
            let lost: usize = nacks
                .iter()
                .map(|&(_, f)| match f {
                    ALL_FRAGMENTS => usize::from(spp),
                    f => f.count_ones() as usize,
                })
                .sum();
            if lost > crate::fec::repairs_kept(k as usize) {
                self.stats.fec_nacks_plain += 1;
                for (pfn, frags) in nacks {
                    self.queue_unicast(from, pfn, Data::REPAIR, frags);
                }
                continue;
            }
            let pages = nacks.len() as u32;
            // The NACKed fragments, and the code's spare beyond them.
            let need = (pages * u32::from(spp)).min(k) + crate::fec::DECODE_SPARE as u32;
            let mut count = match b.round {
                Some((t, size)) if now.saturating_duration_since(t) < NACK_ROUND_WINDOW => {
                    if need <= size {
                        self.stats.suppressed_queued += u64::from(pages);
                        continue;
                    }
                    b.round = Some((t, need));
                    need - size
                }
                _ => {
                    b.round = Some((now, need));
                    self.stats.fec_nack_rounds += 1;
                    need
                }
            };
            // Repair indexes stay below the wire's ESI bound.
            let start = b.next_repair;
            if u64::from(k) + u64::from(start) + u64::from(count) >= u64::from(wire::MAX_FEC_ESI) {
                continue;
            }
            if b.share == 0 {
                // The block's first repair symbols: a whole share of it, the layer size.
                b.share = crate::fec::burst_share(k as usize, count as usize);
                count = count.max(crate::fec::burst_len(k as usize, b.share) as u32);
            }
            // Receivers take repair indices of the first burst and a few layers after
            // it: past them, NACKs get the pages (their re-asks take the plain path).
            count = count.min(crate::fec::max_repairs(k as usize, b.share).saturating_sub(start));
            if count == 0 {
                continue;
            }
            b.next_repair += count;
            let share = b.share;
            let members = b.members.clone();
            if !fec.sent.encoders.contains_key(&first) {
                let (source, tree, data_pages) =
                    (self.source.clone(), self.tree.clone(), self.page_count);
                let built = crate::fec::block_encoder(page_size, spp, &members, share, |p, buf| {
                    if p < data_pages {
                        return source.read_page(p, buf);
                    }
                    // A hash page, from memory.
                    let page = tree.page(p).ok_or_else(|| {
                        std::io::Error::new(std::io::ErrorKind::InvalidInput, "no such hash page")
                    })?;
                    buf.copy_from_slice(page);
                    Ok(())
                });
                match built {
                    Ok(enc) => fec.sent.keep_encoder(first, enc),
                    Err(e) => {
                        self.fail_source(e);
                        return;
                    }
                }
            }
            let Some(enc) = fec.sent.encoders.get(&first) else {
                continue;
            };
            let (span, bitmap) = crate::fec::member_bitmap(first, &members);
            let burst = crate::fec::more_repairs(enc, first, span, bitmap, start, count);
            // Ahead of proactive repairs: receivers are waiting for these.
            fec.bursts.push_front(burst);
        }
    }

    /// Length of the next repair datagram, when one is due: repairs go after
    /// demand, NACK repairs and unicast answers, before further pushes.
    pub(super) fn fec_repair_ready(&self) -> Option<usize> {
        if self.queues.answers_waiting() {
            return None;
        }
        let fec = self.fec.as_ref()?;
        let b = fec.bursts.front()?;
        let (_, t) = fec.builder.geometry();
        Some(crate::fec::repair_overhead(b.span) + t + self.cfg.trailer_reserve)
    }

    /// The next repair symbol of the oldest closed block.
    pub(super) fn emit_repair(&mut self, buf: &mut [u8]) -> Option<Transmit> {
        let seq = self.out.next_seq(true);
        let session = self.session;
        let fec = self.fec.as_mut()?;
        let (spp, t) = fec.builder.geometry();
        let b = fec.bursts.front_mut()?;
        let pkt = b.packets.pop_front();
        let res = pkt.and_then(|(esi, symbol)| {
            Message {
                session,
                seq,
                flags: HeaderFlags::empty(),
                body: Body::Repair(wire::Repair {
                    first_pfn: b.first,
                    span: b.span,
                    symbols_per_page: spp,
                    symbol_size: t as u16,
                    esi,
                    burst_share: b.share,
                    members: &b.members,
                    symbol: &symbol,
                }),
            }
            .emit(buf)
            .ok()
        });
        if b.packets.is_empty() {
            fec.bursts.pop_front();
        }
        let len = res?;
        self.stats.count_datagram(len, 0);
        self.stats.fec_repairs += 1;
        Some(Transmit {
            dest: Dest::Group,
            len,
        })
    }
}
