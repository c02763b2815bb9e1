//! The server's side of forward error correction ([`crate::fec`]).
//!
//! Rules owned here: pushed and swept pages (never demand, repair, zero or
//! working-set pages) join an open block; a block closes when full, when the
//! next page does not fit its span, after [`FEC_MAX_BLOCK_AGE`], or when nothing
//! else is left to send; a closed block's repair symbols go after the waiting
//! answers and before further pushes. The repair fraction follows the
//! 90th-percentile loss that receivers report, between the configured bounds.

use super::config::Geometry;
use super::schedule::{Job, Target};
use super::{Server, ServerConfig};
use crate::fec::{BlockBuilder, Burst};
use crate::wire::{self, Body, Data, HeaderFlags, Message};
use crate::{Dest, Transmit};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Longest an FEC block stays open before its repairs are sent.
const FEC_MAX_BLOCK_AGE: Duration = Duration::from_millis(20);

#[derive(Debug)]
pub(super) struct FecState {
    builder: BlockBuilder,
    bursts: VecDeque<Burst>,
    /// 90th-percentile loss receivers report, parts per thousand.
    loss_p90: u16,
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
        })
    }
}

impl Server {
    /// Take the loss receivers report now as the basis of the repair fraction.
    pub(super) fn fec_note_loss(&mut self, now: Instant) {
        if let Some(fec) = self.fec.as_mut() {
            fec.loss_p90 = self.peers.loss_p90(now);
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

    /// Repair symbols per source symbol for the loss receivers report now.
    fn fec_fraction(&self) -> f64 {
        let Some(f) = self.fec.as_ref() else {
            return 0.0;
        };
        let p = f64::from(f.loss_p90) / 1000.0;
        let x = if p > 0.0 {
            p * self.cfg.fec_loss_factor + self.cfg.fec_margin
        } else {
            0.0
        };
        x.max(self.cfg.fec_min_overhead)
            .min(self.cfg.fec_max_overhead)
            .max(0.0)
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
        let frac = self.fec_fraction();
        let fec = self.fec.as_mut()?;
        if !fec.builder.is_open() && frac <= 0.0 {
            return None;
        }
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
        let frac = self.fec_fraction();
        let Some(fec) = self.fec.as_mut() else {
            return false;
        };
        let k = fec.builder.source_symbols();
        let repairs = (k as f64 * frac).ceil() as u32;
        match fec.builder.close(repairs) {
            Some(b) => {
                fec.bursts.push_back(b);
                self.stats.fec_blocks += 1;
                true
            }
            None => false,
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
        let res = pkt.and_then(|pkt| {
            Message {
                session,
                seq,
                flags: HeaderFlags::empty(),
                body: Body::Repair(wire::Repair {
                    first_pfn: b.first,
                    span: b.span,
                    symbols_per_page: spp,
                    symbol_size: t as u16,
                    esi: pkt.payload_id().encoding_symbol_id(),
                    members: &b.members,
                    symbol: pkt.data(),
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
