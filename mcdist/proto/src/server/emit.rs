//! Turning jobs and control messages into datagrams.
//!
//! Rules owned here: control messages (announce, zero-map chunks, end) go
//! before any data; a page in progress finishes (all its fragments, and every
//! receiver of a unicast fan-out) before the next job starts; group and unicast
//! datagrams carry separate sequence numbers (unicast ones with
//! [`wire::SEQ_UNICAST_BIT`]) so receivers measure group loss alone; a page that
//! fits one datagram to one destination is read from the source straight into it.

use super::schedule::{Job, Target};
use super::{Delivery, Server, ServerConfig};
use crate::bitmap::PageBitmap;
use crate::wire::{self, Announce, Body, Data, Header, HeaderFlags, Kind, Message};
use crate::{Dest, Transmit};
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::time::Instant;

/// Receivers from which the zero map goes to the group rather than to each asker.
const ZERO_MAP_GROUP_MIN: usize = 64;

/// A control message waiting to go out.
#[derive(Debug)]
pub(super) enum Control {
    Announce(Dest),
    ZeroMapChunk(Dest, u32),
    /// The recorded working set's ranges from this page on, to one receiver.
    Hint(SocketAddr, u64),
    End,
}

impl Control {
    fn dest(&self) -> Dest {
        match *self {
            Control::Announce(d) => d,
            Control::ZeroMapChunk(d, _) => d,
            Control::Hint(peer, _) => Dest::Peer(peer),
            Control::End => Dest::Group,
        }
    }
}

/// The page being sent.
#[derive(Debug)]
pub(super) struct Current {
    job: Job,
    /// Unicast fan-out destinations still to serve (last is current).
    fanout: Vec<SocketAddr>,
    next_frag: u16,
    /// The page goes in one datagram to one destination: it is read from the
    /// source straight into the datagram, not through `page_buf`.
    direct: bool,
    /// Member index in the open FEC block.
    fec_slot: Option<usize>,
    /// Its fragments go out marked [`Data::KEEP`].
    keep: bool,
}

impl Current {
    /// A zero-page answer (header only).
    pub(super) fn is_zero(&self) -> bool {
        self.job.is_zero()
    }
}

/// The zero map, cut into chunks that fit a datagram.
#[derive(Debug)]
struct ZeroMapChunks {
    bytes: Vec<u8>,
    digest: [u8; 32],
    chunk_bytes: usize,
    count: u32,
}

impl ZeroMapChunks {
    fn new(zero_map: &PageBitmap, cfg: &ServerConfig) -> ZeroMapChunks {
        let bytes = zero_map.to_bytes();
        let digest = *blake3::hash(&bytes).as_bytes();
        let chunk_bytes = cfg
            .max_datagram
            .saturating_sub(wire::HEADER_LEN + wire::ZeroMap::FIXED_LEN + cfg.trailer_reserve)
            .max(8);
        let count = u32::try_from(bytes.len().div_ceil(chunk_bytes)).unwrap_or(u32::MAX);
        ZeroMapChunks {
            bytes,
            digest,
            chunk_bytes,
            count,
        }
    }

    fn chunk(&self, chunk: u32) -> wire::ZeroMap<'_> {
        let start = chunk as usize * self.chunk_bytes;
        let end = (start + self.chunk_bytes).min(self.bytes.len());
        wire::ZeroMap {
            chunk,
            chunk_count: self.count,
            start_page: start as u64 * 8,
            bits: self.bytes.get(start..end).unwrap_or(&[]),
        }
    }
}

/// What is on its way out: control messages, the page in progress, sequence numbers.
#[derive(Debug)]
pub(super) struct Outbox {
    pub(super) control: VecDeque<Control>,
    pub(super) current: Option<Current>,
    page_buf: Vec<u8>,
    pub(super) seq_group: u64,
    seq_unicast: u64,
    zero_map: ZeroMapChunks,
    /// A copy of the zero map for the group is queued and not sent yet.
    zero_map_to_group: bool,
}

impl Outbox {
    pub(super) fn new(cfg: &ServerConfig, zero_map: &PageBitmap, page_size: usize) -> Outbox {
        Outbox {
            control: VecDeque::new(),
            current: None,
            page_buf: vec![0; page_size],
            seq_group: 0,
            seq_unicast: 0,
            zero_map: ZeroMapChunks::new(zero_map, cfg),
            zero_map_to_group: false,
        }
    }

    /// Number of zero-map chunks.
    pub(super) fn zero_map_chunks(&self) -> u32 {
        self.zero_map.count
    }

    pub(super) fn next_seq(&mut self, group: bool) -> u64 {
        if group {
            self.seq_group += 1;
            self.seq_group
        } else {
            self.seq_unicast += 1;
            self.seq_unicast | wire::SEQ_UNICAST_BIT
        }
    }
}

impl Server {
    /// The session announce as it stands (a token only in one to a peer).
    fn announce(&self, dest: Dest) -> Announce {
        let cfg = &self.cfg;
        let sweep_done = self.sweep.pos >= self.total_pages;
        let flag =
            |on: bool, f: wire::AnnounceFlags| if on { f } else { wire::AnnounceFlags::empty() };
        Announce {
            image_size: self.info.image_size,
            page_size: self.geo.page_size as u32,
            page_count: self.page_count,
            digest: self.info.digest,
            zero_count: self.info.zero_map.count_ones(),
            zero_map_digest: self.out.zero_map.digest,
            zero_map_chunks: self.out.zero_map.count,
            sweep_pos: if cfg.sweep {
                self.sweep_frontier()
            } else {
                Announce::SWEEP_NONE
            },
            rate: self.bucket.rate(),
            flags: flag(cfg.push_neighbors, Announce::FLAG_PUSH)
                | flag(cfg.sweep, Announce::FLAG_SWEEP)
                | flag(cfg.sweep && sweep_done, Announce::FLAG_SWEEP_DONE)
                | flag(self.fec.is_some(), Announce::FLAG_FEC)
                | Announce::FLAG_HASH_PAGES
                | flag(
                    matches!(dest, Dest::Peer(p) if self.peers.contains(&p)),
                    Announce::FLAG_VALIDATED,
                ),
            frag_payload: self.geo.frag_payload as u16,
            token: match dest {
                Dest::Peer(p) => self.token_for(p),
                Dest::Group => [0; wire::TOKEN_LEN],
            },
        }
    }

    /// Announce to every receiver: one multicast (none if one is queued already), or one
    /// per receiver in fan-out.
    pub(super) fn queue_group_announce(&mut self) {
        let queued = self
            .out
            .control
            .iter()
            .any(|c| matches!(c, Control::Announce(Dest::Group)));
        if !queued || self.cfg.delivery == Delivery::UnicastFanout {
            self.queue_group_announce_copy();
        }
    }

    /// Announce to every receiver even if an announce is queued already (a second copy
    /// of one that matters).
    pub(super) fn queue_group_announce_copy(&mut self) {
        match self.cfg.delivery {
            Delivery::Multicast => {
                if self.control_room(1) {
                    self.out.control.push_back(Control::Announce(Dest::Group));
                }
            }
            Delivery::UnicastFanout => {
                for p in self.peers.addrs() {
                    self.queue_announce_to(p);
                }
            }
        }
    }

    /// Announce to one receiver (within the control queue's bound).
    pub(super) fn queue_announce_to(&mut self, peer: SocketAddr) {
        if self.control_room(1) {
            self.out
                .control
                .push_back(Control::Announce(Dest::Peer(peer)));
        }
    }

    /// Every zero-map chunk (all or none, within the bound) to a receiver that
    /// asked: with multicast delivery and more than [`ZERO_MAP_GROUP_MIN`]
    /// receivers, to the group, where a copy still queued
    /// serves every receiver that asks meanwhile (it holds the announce, since
    /// its join echoed the token), so receivers joining together share one copy
    /// and the control bytes of a join do not grow with the receiver count.
    pub(super) fn queue_zero_map(&mut self, peer: SocketAddr) {
        let many = self.peers.len() > ZERO_MAP_GROUP_MIN;
        let dest = match self.cfg.delivery {
            Delivery::Multicast if many && self.out.zero_map_to_group => return,
            Delivery::Multicast if many => Dest::Group,
            Delivery::Multicast | Delivery::UnicastFanout => Dest::Peer(peer),
        };
        if !self.control_room(self.out.zero_map.count as usize) {
            return;
        }
        self.out.zero_map_to_group = dest == Dest::Group;
        for c in 0..self.out.zero_map.count {
            self.out.control.push_back(Control::ZeroMapChunk(dest, c));
        }
    }

    /// Announce the end of the session (reason 1 once the source failed).
    pub(super) fn queue_end(&mut self) {
        if self.control_room(1) {
            self.out.control.push_back(Control::End);
        }
    }

    /// The recorded working set, in page order, to a receiver that just joined a replayed
    /// generation (one datagram now, the next queued as each goes out).
    pub(super) fn queue_hint(&mut self, peer: SocketAddr) {
        if self.control_room(1) {
            self.out.control.push_back(Control::Hint(peer, 0));
        }
    }

    pub(super) fn emit_control(&mut self, c: Control, buf: &mut [u8]) -> Option<Transmit> {
        let dest = c.dest();
        let seq = self.out.next_seq(dest == Dest::Group);
        let mut raw = Vec::new();
        let body = match c {
            Control::Hint(peer, start) => {
                let max =
                    wire::Request::max_ranges(self.cfg.max_datagram, self.cfg.trailer_reserve);
                let (ranges, more) = self.working_set.ranges_from(start, max.max(1));
                if let Some(next) = more.filter(|_| self.control_room(1)) {
                    self.out.control.push_front(Control::Hint(peer, next));
                }
                self.stats.hint_datagrams += 1;
                self.stats.hint_pages += ranges.iter().map(|r| u64::from(r.len)).sum::<u64>();
                wire::encode_ranges(&ranges, &mut raw);
                Body::Hint(wire::Request {
                    rx_rate: 0,
                    loss_permille: 0,
                    flags: wire::RequestFlags::empty(),
                    heard_seq: 0,
                    ranges: wire::ranges_from_encoded(&raw),
                })
            }
            Control::Announce(d) => Body::Announce(self.announce(d)),
            Control::End => Body::End(wire::End {
                reason: u8::from(self.failed),
            }),
            Control::ZeroMapChunk(d, chunk) => {
                if d == Dest::Group && chunk + 1 == self.out.zero_map.count {
                    self.out.zero_map_to_group = false;
                }
                Body::ZeroMap(self.out.zero_map.chunk(chunk))
            }
        };
        let m = Message {
            session: self.session,
            seq,
            flags: HeaderFlags::empty(),
            body,
        };
        let len = m.emit(buf).ok()?;
        self.stats.count_datagram(len, 0);
        Some(Transmit { dest, len })
    }

    /// Make `job` the page in progress: its fan-out list, its bytes (unless
    /// read straight into the datagram), its FEC block slot.
    pub(super) fn load(&mut self, now: Instant, job: Job) -> io::Result<()> {
        let fanout = match (job.target, self.cfg.delivery) {
            (Target::Group, Delivery::UnicastFanout) => {
                let mut v = self.peers.addrs();
                v.sort();
                v
            }
            _ => Vec::new(),
        };
        let zero = job.is_zero();
        let hash = job.pfn >= self.page_count;
        let direct = !zero && !hash && self.geo.frag_count == 1 && fanout.is_empty();
        if hash {
            // A hash page, from memory.
            let page = self
                .tree
                .page(job.pfn)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no such hash page"))?;
            self.out.page_buf.copy_from_slice(page);
        } else if !zero && !direct {
            self.source.read_page(job.pfn, &mut self.out.page_buf)?;
        }
        let fec_slot = if fanout.is_empty() {
            self.fec_admit(now, &job)
        } else {
            None
        };
        let keep = !zero && self.fec_keeping();
        self.out.current = Some(Current {
            job,
            fanout,
            next_frag: job.next_fragment(0, self.geo.frag_count),
            direct,
            fec_slot,
            keep,
        });
        Ok(())
    }

    /// The next fragment of the page in progress.
    pub(super) fn emit_fragment(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        let cur = self.out.current.as_mut()?;
        let job = cur.job;
        let direct = cur.direct;
        let fec_slot = cur.fec_slot;
        let keep = cur.keep;
        let dest = match (job.target, cur.fanout.last()) {
            (Target::Peer(p), _) => Dest::Peer(p),
            (Target::Group, Some(p)) => Dest::Peer(*p),
            (Target::Group, None) if self.cfg.delivery == Delivery::UnicastFanout => {
                // Nobody to fan out to: the page counts as not sent.
                self.sent.queued_group.clear(job.pfn);
                self.out.current = None;
                return None;
            }
            (Target::Group, None) => Dest::Group,
        };
        let zero = job.is_zero();
        let (frag_count, idx) = if zero {
            (1u16, 0u16)
        } else {
            (self.geo.frag_count, cur.next_frag)
        };
        let (start, end) = if zero { (0, 0) } else { self.geo.fragment(idx) };
        // The last fragment is padded with zeros to the others' length, so that the
        // datagrams of consecutive pages are all one size: they go out (and come in
        // again through GRO) many to a GSO buffer, where a shorter one ends a buffer.
        let wire_len = if zero {
            0
        } else {
            self.geo.frag_payload.max(end - start)
        };
        let seq = self.out.next_seq(dest == Dest::Group);
        let header = Header {
            kind: Kind::Data,
            flags: HeaderFlags::empty(),
            session: self.session,
            seq,
        };
        // Receivers keep a marked page for FEC decoding.
        let flags = if keep {
            job.flags | Data::KEEP
        } else {
            job.flags
        };
        let off =
            wire::emit_data_header(buf, &header, job.pfn, idx, frag_count, flags, wire_len).ok()?;
        let (data_end, len) = (off + (end - start), off + wire_len);
        if direct {
            // One copy, source to datagram.
            if let Err(e) = self.source.read_page(job.pfn, &mut buf[off..data_end]) {
                self.fail_source(e);
                return None;
            }
        } else {
            buf[off..data_end].copy_from_slice(&self.out.page_buf[start..end]);
        }
        buf[data_end..len].fill(0);
        if let Some(m) = fec_slot {
            self.fec_put(m, idx, &buf[off..data_end]);
        }
        self.stats.count_datagram(len, end - start);
        self.stats.fragments_resent += u64::from(job.is_partial());
        // Advance.
        let cur = self.out.current.as_mut()?;
        cur.next_frag = job.next_fragment(idx + 1, frag_count);
        if cur.next_frag >= frag_count {
            cur.next_frag = job.next_fragment(0, frag_count);
            let page_done_for_all = if cur.fanout.is_empty() {
                true
            } else {
                cur.fanout.pop();
                cur.fanout.is_empty()
            };
            self.page_sent(now, job, dest);
            if page_done_for_all {
                // A full FEC block's repairs go right after its last page.
                if fec_slot.is_some() && self.fec_block_full() {
                    self.fec_close();
                }
                self.out.current = None;
                if job.target == Target::Group {
                    self.sent.queued_group.clear(job.pfn);
                }
            }
        }
        Some(Transmit { dest, len })
    }
}
