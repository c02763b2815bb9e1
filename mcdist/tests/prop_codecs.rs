//! Property tests of the pure parts: wire codecs (emit → parse identity, parse
//! of arbitrary or mutated bytes never panics), NACK range encoding, the page
//! bitmap and its zero-map chunking, fragment reassembly of interleaved pages, and the
//! image digest built from pages in any order.

mod common;

use mcdist::bitmap::{coalesce, PageBitmap};
use mcdist::digest::PageDigest;
use mcdist::reassembly::{fragment_slot, Reassembler};
use mcdist::wire::{
    encode_ranges, ranges_from_encoded, Announce, Body, Data, End, HeaderFlags, Heartbeat, Join,
    Leave, Message, PageRange, Repair, Request, ZeroMap, HEADER_LEN, MAX_FEC_ESI, MAX_FEC_SPAN,
    MAX_FRAGMENTS, MAX_RANGE_LEN,
};
use proptest::prelude::*;
use std::collections::BTreeSet;

fn announce() -> impl Strategy<Value = Announce> {
    (
        0u64..(1 << 40),
        9u32..=21,
        any::<[u8; 32]>(),
        any::<[u8; 32]>(),
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        any::<u8>(),
        1u16..,
        any::<u64>(),
    )
        .prop_map(
            |(size, pow, digest, zd, chunks, sweep, rate, flags, frag, z)| {
                let page_size = 1u32 << pow;
                let page_count = size.div_ceil(u64::from(page_size));
                Announce {
                    image_size: size,
                    page_size,
                    page_count,
                    digest,
                    zero_count: if page_count == 0 {
                        0
                    } else {
                        z % (page_count + 1)
                    },
                    zero_map_digest: zd,
                    zero_map_chunks: chunks,
                    sweep_pos: sweep,
                    rate,
                    flags: mcdist::wire::AnnounceFlags::from_bits_retain(flags),
                    frag_payload: frag,
                    token: [0; 16],
                }
            },
        )
}

/// Encoded ranges with valid lengths.
fn ranges_raw() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec((any::<u64>(), 1u32..=MAX_RANGE_LEN), 0..50).prop_map(|v| {
        let r: Vec<PageRange> = v
            .into_iter()
            .map(|(start, len)| PageRange { start, len })
            .collect();
        let mut raw = Vec::new();
        encode_ranges(&r, &mut raw);
        raw
    })
}

#[derive(Debug, Clone)]
enum Owned {
    Announce(Announce),
    Data {
        pfn: u64,
        idx: u16,
        count: u16,
        flags: u8,
        payload: Vec<u8>,
    },
    Request {
        /// 0: request, 1: NACK, 2: working-set hint (one body, three kinds), 3: fragment
        /// NACK (the same layout; a range's length read as the fragment mask).
        kind: u8,
        rx: u64,
        loss: u16,
        flags: u8,
        raw: Vec<u8>,
    },
    Join(u8),
    Heartbeat(Heartbeat),
    Leave(u8),
    ZeroMap {
        chunk: u32,
        count: u32,
        start: u64,
        bits: Vec<u8>,
    },
    End(u8),
    Repair {
        first: u64,
        span: u16,
        spp: u16,
        esi: u32,
        burst_share: u8,
        members: Vec<u8>,
        symbol: Vec<u8>,
    },
}

/// A valid FEC repair: the first page is a member, no bits past the span, at
/// most 8 symbols per page (so the block stays within `MAX_FEC_SYMBOLS`).
fn repair() -> impl Strategy<Value = Owned> {
    (
        0u64..u64::MAX / 2,
        1u16..=MAX_FEC_SPAN,
        1u16..=8,
        (0u32..=MAX_FEC_ESI, 1u8..=u8::MAX),
        proptest::collection::vec(any::<u8>(), 128),
        proptest::collection::vec(any::<u8>(), 1..1500),
    )
        .prop_map(|(first, span, spp, (esi, burst_share), bits, symbol)| {
            let n = usize::from(span).div_ceil(8);
            let mut members = bits[..n].to_vec();
            members[0] |= 1;
            if span % 8 != 0 {
                members[n - 1] &= (1u8 << (span % 8)) - 1;
            }
            Owned::Repair {
                first,
                span,
                spp,
                esi,
                burst_share,
                members,
                symbol,
            }
        })
}

fn owned() -> impl Strategy<Value = Owned> {
    prop_oneof![
        announce().prop_map(Owned::Announce),
        (
            any::<u64>(),
            1u16..=MAX_FRAGMENTS,
            any::<u16>(),
            any::<u8>(),
            proptest::collection::vec(any::<u8>(), 0..2000)
        )
            .prop_map(|(pfn, count, i, flags, payload)| {
                let zero = mcdist::wire::DataFlags::from_bits_retain(flags).contains(Data::ZERO);
                Owned::Data {
                    pfn,
                    idx: i % count,
                    count,
                    flags,
                    payload: if zero { Vec::new() } else { payload },
                }
            }),
        (
            0u8..4,
            any::<u64>(),
            any::<u16>(),
            any::<u8>(),
            ranges_raw()
        )
            .prop_map(|(kind, rx, loss, flags, raw)| Owned::Request {
                kind,
                rx,
                loss,
                flags,
                raw
            }),
        any::<u8>().prop_map(Owned::Join),
        (any::<u64>(), any::<u16>(), any::<u64>(), any::<u8>()).prop_map(|(r, l, h, f)| {
            Owned::Heartbeat(Heartbeat {
                rx_rate: r,
                loss_permille: l,
                overload_permille: l.rotate_left(3),
                have_pages: h,
                flags: mcdist::wire::HeartbeatFlags::from_bits_retain(f),
                token: [f; 16],
            })
        }),
        any::<u8>().prop_map(Owned::Leave),
        (
            1u32..,
            any::<u32>(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..500)
        )
            .prop_map(|(count, c, start, bits)| Owned::ZeroMap {
                chunk: c % count,
                count,
                start: start & !7,
                bits
            }),
        any::<u8>().prop_map(Owned::End),
        repair(),
    ]
}

fn body(o: &Owned) -> Body<'_> {
    match o {
        Owned::Announce(a) => Body::Announce(*a),
        Owned::Data {
            pfn,
            idx,
            count,
            flags,
            payload,
        } => Body::Data(Data {
            pfn: *pfn,
            frag_index: *idx,
            frag_count: *count,
            flags: mcdist::wire::DataFlags::from_bits_retain(*flags),
            payload,
        }),
        Owned::Request {
            kind,
            rx,
            loss,
            flags,
            raw,
        } => {
            let q = Request {
                rx_rate: *rx,
                loss_permille: *loss,
                flags: mcdist::wire::RequestFlags::from_bits_retain(*flags),
                heard_seq: rx.rotate_left(17) ^ u64::from(*loss),
                ranges: ranges_from_encoded(raw),
            };
            match kind {
                0 => Body::Request(q),
                1 => Body::Nack(q),
                2 => Body::Hint(q),
                _ => Body::FragmentNack(mcdist::wire::FragmentNack {
                    rx_rate: q.rx_rate,
                    loss_permille: q.loss_permille,
                    flags: q.flags,
                    heard_seq: q.heard_seq,
                    entries: mcdist::wire::fragment_entries_from_encoded(raw),
                }),
            }
        }
        Owned::Join(f) => Body::Join(Join {
            flags: mcdist::wire::JoinFlags::from_bits_retain(*f),
            token: [*f; 16],
        }),
        Owned::Heartbeat(h) => Body::Heartbeat(*h),
        Owned::Leave(r) => Body::Leave(Leave {
            reason: *r,
            token: [*r; 16],
        }),
        Owned::ZeroMap {
            chunk,
            count,
            start,
            bits,
        } => Body::ZeroMap(ZeroMap {
            chunk: *chunk,
            chunk_count: *count,
            start_page: *start,
            bits,
        }),
        Owned::End(r) => Body::End(End { reason: *r }),
        Owned::Repair {
            first,
            span,
            spp,
            esi,
            burst_share,
            members,
            symbol,
        } => Body::Repair(Repair {
            first_pfn: *first,
            span: *span,
            symbols_per_page: *spp,
            symbol_size: symbol.len() as u16,
            esi: *esi,
            burst_share: *burst_share,
            members,
            symbol,
        }),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn emit_then_parse_is_identity(o in owned(), session in any::<u64>(), seq in any::<u64>(), flags in any::<u8>()) {
        let m = Message { session, seq, flags: HeaderFlags::from_bits_retain(flags), body: body(&o) };
        let mut buf = vec![0u8; m.buffer_len()];
        let n = m.emit(&mut buf).unwrap();
        prop_assert_eq!(n, m.buffer_len());
        let p = Message::parse(&buf[..n]).unwrap();
        prop_assert_eq!(p, m);
        // A buffer one byte short is refused, not overrun.
        prop_assert!(m.emit(&mut buf[..n - 1]).is_err());
    }

    #[test]
    fn parse_of_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
        let _ = Message::parse(&bytes);
    }

    #[test]
    fn parse_of_mutated_packets_never_panics(o in owned(), edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8), cut in any::<usize>()) {
        let m = Message { session: 1, seq: 2, flags: HeaderFlags::empty(), body: body(&o) };
        let mut buf = vec![0u8; m.buffer_len()];
        let n = m.emit(&mut buf).unwrap();
        for (at, v) in edits {
            buf[at % n] = v;
        }
        // Mutate, then also truncate anywhere.
        if let Ok(p) = Message::parse(&buf) {
            // Whatever parses re-emits to a parseable datagram.
            let mut again = vec![0u8; p.buffer_len()];
            let k = p.emit(&mut again).unwrap();
            prop_assert!(Message::parse(&again[..k]).is_ok());
        }
        let _ = Message::parse(&buf[..cut % (n + 1)]);
        prop_assert!(Message::parse(&buf[..HEADER_LEN.min(n) - 1]).is_err());
    }

    /// NACK ranges: any page set → coalesced ranges → request datagram → parse →
    /// expanded pages gives back exactly the set, in few ranges.
    #[test]
    fn nack_ranges_roundtrip(pages in proptest::collection::btree_set(0u64..100_000, 0..2000), base in 0u64..(u64::MAX / 2)) {
        let pages: BTreeSet<u64> = pages.into_iter().map(|p| p + base).collect();
        let ranges = coalesce(pages.iter().copied());
        // Sorted, disjoint, non-adjacent (maximal) and valid lengths.
        for w in ranges.windows(2) {
            prop_assert!(w[0].end() < w[1].start);
        }
        for r in &ranges {
            prop_assert!(r.len >= 1 && r.len <= MAX_RANGE_LEN);
        }
        let mut raw = Vec::new();
        encode_ranges(&ranges, &mut raw);
        let nack = Request { rx_rate: 0, loss_permille: 0, flags: mcdist::wire::RequestFlags::empty(), heard_seq: 0, ranges: ranges_from_encoded(&raw) };
        let buf = common::emit(9, Body::Nack(nack));
        let Body::Nack(q) = Message::parse(&buf).unwrap().body else { panic!("kind changed") };
        let back: BTreeSet<u64> = q.ranges.iter().flat_map(|r| r.start..r.end()).collect();
        prop_assert_eq!(back, pages.clone());
        prop_assert_eq!(q.ranges.total_pages(), pages.len() as u64);
    }

    /// Absurd ranges are refused at parse time, whatever else the datagram holds.
    #[test]
    fn absurd_range_lengths_are_refused(start in any::<u64>(), len in prop_oneof![Just(0u32), (MAX_RANGE_LEN + 1)..]) {
        let buf = common::request(9, mcdist::wire::RequestFlags::empty(), &[PageRange { start, len }]);
        prop_assert!(Message::parse(&buf).is_err());
    }

    /// The zero map travels in chunks: OR-ing the chunks back in any order
    /// rebuilds the bitmap, and to_bytes/from_bytes round-trips.
    #[test]
    fn bitmap_chunks_roundtrip(len in 0u64..5000, bits in proptest::collection::btree_set(0u64..5000, 0..500), chunk in 1usize..100, rev in any::<bool>()) {
        let mut b = PageBitmap::new(len);
        for &i in &bits {
            b.set(i);
        }
        prop_assert_eq!(b.count_ones(), bits.iter().filter(|&&i| i < len).count() as u64);
        let bytes = b.to_bytes();
        prop_assert_eq!(PageBitmap::from_bytes(len, &bytes), b.clone());
        let mut c = PageBitmap::new(len);
        let mut chunks: Vec<(usize, &[u8])> = bytes.chunks(chunk).enumerate().collect();
        if rev {
            chunks.reverse();
        }
        for (k, part) in chunks {
            c.or_bytes_at((k * chunk * 8) as u64, part);
        }
        prop_assert_eq!(c, b.clone());
        // next_clear finds exactly the first clear bit at or after any point.
        for from in [0, len / 3, len / 2, len.saturating_sub(1)] {
            let want = (from..len).find(|&i| !b.get(i));
            prop_assert_eq!(b.next_clear(from), want);
        }
    }

    /// Several fragmented pages interleaved, with duplicates: each completes
    /// exactly once and byte-identical while the reassembler has room for all.
    #[test]
    fn interleaved_pages_reassemble(pages in 1usize..6, count in 2u16..12, seed in any::<u64>()) {
        let ps = 4096;
        let mut r = Reassembler::new(ps, pages);
        let page = |p: usize| -> Vec<u8> { (0..ps).map(|i| (i * 31 + p * 7) as u8 ^ seed as u8).collect() };
        let mut order: Vec<(usize, u16)> = (0..pages).flat_map(|p| (0..count).map(move |i| (p, i))).collect();
        let mut s = seed | 1;
        for i in (1..order.len()).rev() {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            order.swap(i, (s % (i as u64 + 1)) as usize);
        }
        // Duplicates of fragments of pages not yet complete.
        let dup = order[..order.len() / 3].to_vec();
        order.splice(order.len() / 2..order.len() / 2, dup);
        let mut done = vec![0u32; pages];
        let mut have: Vec<BTreeSet<u16>> = vec![BTreeSet::new(); pages];
        for (p, i) in order {
            if done[p] > 0 { continue; }
            let (st, len) = fragment_slot(ps, count, i).unwrap();
            let data = page(p);
            have[p].insert(i);
            if let Some(out) = r.insert(p as u64, i, count, &data[st..st + len]).unwrap() {
                prop_assert_eq!(have[p].len(), usize::from(count));
                prop_assert_eq!(out.as_ref(), &data[..]);
                done[p] += 1;
            }
        }
        prop_assert!(done.iter().all(|&d| d == 1));
        prop_assert_eq!(r.in_progress(), 0);
    }

    /// The digest built from pages and runs of pages, added in any order and more than
    /// once, is BLAKE3 of the image, for every image length and page size.
    #[test]
    fn page_digest_is_the_image_hash(len in 0usize..300_000, pow in 10u32..14, cuts in proptest::collection::vec((any::<u64>(), 0u64..40), 0..30), seed in any::<u64>()) {
        let ps = 1usize << pow;
        let img: Vec<u8> = (0..len).map(|i| ((i as u64).wrapping_mul(seed | 1) >> 7) as u8).collect();
        let pages = len.div_ceil(ps) as u64;
        let mut padded = img.clone();
        padded.resize(pages as usize * ps, 0xee);
        let mut d = PageDigest::new(len as u64, ps).unwrap();
        // Runs at arbitrary places first, then every page in a shuffled order.
        for (at, n) in cuts {
            if pages == 0 { break; }
            let first = at % pages;
            let n = n.min(pages - first);
            prop_assert!(d.add_run(first, &padded[first as usize * ps..(first + n) as usize * ps]));
        }
        let mut order: Vec<u64> = (0..pages).collect();
        let mut s = seed | 1;
        for i in (1..order.len()).rev() {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            order.swap(i, (s % (i as u64 + 1)) as usize);
        }
        for p in order {
            prop_assert!(d.add_page(p, &padded[p as usize * ps..(p as usize + 1) * ps]));
        }
        prop_assert_eq!(d.finalize(), Some(*blake3::hash(&img).as_bytes()));
    }
}
