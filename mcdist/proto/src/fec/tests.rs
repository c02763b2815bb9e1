//! Tests of block encoding, receiver decoding and the server's repair schedule.
use super::*;
use bytes::Bytes;
use std::collections::HashMap;

fn pages(n: usize, ps: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|p| (0..ps).map(|i| (i * 31 + p * 7 + i / 251) as u8).collect())
        .collect()
}

/// Encode a block of pages fragment by fragment, lose some fragments, decode
/// with repair symbols: the missing pages come back byte-identical.
#[test]
fn repairs_restore_lost_fragments() {
    let ps = 4096;
    let spp = 3u16;
    let data = pages(8, ps);
    let now = Instant::now();
    let mut b = BlockBuilder::new(ps, spp, 16, 64);
    let pfns: Vec<u64> = vec![10, 11, 13, 14, 15, 17, 18, 20];
    for (p, page) in pfns.iter().zip(&data) {
        assert!(b.fits(*p));
        let m = b.admit(now, *p);
        for i in 0..spp {
            let (s, l) = piece(ps, spp, i);
            b.put(m, i, &page[s..s + l]);
        }
    }
    let burst = b.close(10).unwrap();
    assert_eq!(burst.first, 10);
    assert_eq!(burst.span, 11);
    let mut rx = FecRx::new(4, 64, 64 << 20);
    // Page 13 lost entirely, page 17 lost its middle fragment; pages present are cached.
    let mut frags: HashMap<u64, Vec<(u16, Vec<u8>)>> = HashMap::new();
    for (p, page) in pfns.iter().zip(&data) {
        match p {
            13 => {}
            17 => {
                for i in [0u16, 2] {
                    let (s, l) = piece(ps, spp, i);
                    frags
                        .entry(*p)
                        .or_default()
                        .push((i, page[s..s + l].to_vec()));
                }
            }
            _ => rx.remember(*p, &Bytes::from(page.clone())),
        }
    }
    let mut got = None;
    let mut used = 0;
    for (esi, symbol) in &burst.packets {
        let r = Repair {
            first_pfn: burst.first,
            span: burst.span,
            symbols_per_page: spp,
            symbol_size: symbol_size(ps, spp) as u16,
            esi: *esi,
            burst_share: burst.share,
            members: &burst.members,
            symbol,
        };
        assert_eq!(
            rx.add(&r, Bytes::copy_from_slice(symbol)),
            RepairOutcome::Stored
        );
        used += 1;
        let res = rx
            .try_decode(10, ps, |pfn| match pfn {
                13 | 17 => match frags.get(&pfn) {
                    Some(v) => Have::Fragments(Box::new(v.iter().map(|(i, d)| (*i, d.as_slice())))),
                    None => Have::Nothing,
                },
                _ => Have::Present,
            })
            .unwrap();
        if let Some(out) = res {
            got = Some(out);
            break;
        }
    }
    // Four symbols lost (page 13's three, page 17's middle one); a binary code needs a
    // few repair symbols more than that.
    let got = got.expect("10 repairs cover 4 lost symbols");
    assert!(used >= 4);
    assert_eq!(got.len(), 2);
    for (pfn, page) in got {
        let i = pfns.iter().position(|&p| p == pfn).unwrap();
        assert_eq!(&page[..], &data[i][..], "page {pfn}");
    }
    assert!(rx.is_done(10));
}

/// The server forms no block and sends no repair while nobody reports
/// loss; with a repair fraction set, each block of swept pages is followed
/// by `ceil(K × f)` repair symbols before the next block's pages.
#[test]
fn server_sends_repairs_only_when_asked() {
    use crate::server::{Server, ServerConfig};
    use crate::source::MemSource;
    use crate::wire::{Body, Kind, Message};
    use std::sync::Arc;
    let img: Vec<u8> = (0..64 * 4096).map(|i| (i % 251 + 1) as u8).collect();
    let run = |min: f64| {
        let cfg = ServerConfig {
            session_id: Some(7),
            max_datagram: 1500,
            sweep: true,
            fec: true,
            fec_min_overhead: min,
            fec_block_pages: 16,
            ..ServerConfig::default()
        };
        let src = Arc::new(MemSource::new(img.clone(), 4096));
        let t0 = Instant::now();
        let mut s = Server::with_info(
            cfg,
            src.clone(),
            crate::source::scan(src.as_ref()).expect("an in-memory image scans"),
            t0,
        )
        .unwrap();
        let mut now = t0;
        let mut buf = vec![0u8; 65_536];
        let mut kinds = Vec::new();
        while s.stats().sweep_pages < 64 || kinds.last() != Some(&Kind::Announce) {
            match s.poll_transmit(now, &mut buf) {
                Some(t) => {
                    let m = Message::parse(&buf[..t.len]).unwrap();
                    if let Body::Repair(r) = m.body {
                        // 16 pages, or the hash page the sweep sends first, alone.
                        assert!(matches!(r.source_symbols(), 48 | 3));
                        assert_eq!(r.symbol_size, 1366);
                    }
                    kinds.push(m.body.kind());
                }
                None => now += std::time::Duration::from_millis(1),
            }
            assert!(now < t0 + std::time::Duration::from_secs(10));
        }
        (kinds, s.stats().clone())
    };
    let (kinds, st) = run(0.0);
    assert!(!kinds.contains(&Kind::Repair));
    assert_eq!((st.fec_blocks, st.fec_repairs), (0, 0));
    let (mut kinds, st) = run(0.1);
    // The hash page (3 fragments: 1 repair asked, 2 sent), then 4 blocks of 16 pages
    // × 3 fragments, ceil(48 × 0.1) = 5 asked and 6 sent each: a first burst is a
    // whole number of 256ths of its block (27/256 of 48 symbols).
    assert_eq!((st.fec_blocks, st.fec_repairs), (5, 26));
    kinds.retain(|k| *k != Kind::Announce);
    let data: Vec<usize> = kinds
        .iter()
        .enumerate()
        .filter(|(_, k)| **k == Kind::Data)
        .map(|(i, _)| i)
        .collect();
    for block in 0..4 {
        // The 6 repairs follow the block's last fragment, before the next block.
        let last = data[3 + block * 48 + 47];
        assert!(kinds[last + 1..last + 7].iter().all(|k| *k == Kind::Repair));
        assert_ne!(kinds.get(last + 7), Some(&Kind::Repair));
    }
}

#[test]
fn open_blocks_are_bounded() {
    let mut rx = FecRx::new(2, 0, 64 << 20);
    for first in 0..10u64 {
        let r = Repair {
            first_pfn: first * 100,
            span: 1,
            symbols_per_page: 1,
            symbol_size: 4,
            esi: 1,
            burst_share: 1,
            members: &[1],
            symbol: b"abcd",
        };
        rx.add(&r, Bytes::from_static(b"abcd"));
    }
    assert_eq!(rx.open_blocks(), 2);
    assert_eq!(rx.evicted, 8);
}

/// A repair index past the first burst and the layers after it that a block may use is
/// refused: what decoding builds stays bounded whatever repair symbols arrive.
#[test]
fn repair_indices_past_the_layers_a_block_may_use_are_refused() {
    let mut rx = FecRx::new(2, 0, 64 << 20);
    // One page of one symbol; its first burst is one repair symbol, then 4 layers of 16.
    let limit = max_repairs(1, 255);
    assert_eq!(limit, 1 + 4 * 16);
    let repair = |esi| Repair {
        first_pfn: 7,
        span: 1,
        symbols_per_page: 1,
        symbol_size: 4,
        esi,
        burst_share: 255,
        members: &[1],
        symbol: b"abcd",
    };
    let sym = || Bytes::from_static(b"abcd");
    assert_eq!(rx.add(&repair(1 + limit - 1), sym()), RepairOutcome::Stored);
    assert_eq!(rx.add(&repair(1 + limit), sym()), RepairOutcome::Refused);
    // An ESI of a source symbol is no repair symbol.
    assert_eq!(rx.add(&repair(0), sym()), RepairOutcome::Refused);
}

#[test]
fn pages_the_cache_lets_go_of_are_handed_back_for_reuse() {
    let mut rx = FecRx::new(4, 2, 1 << 20);
    for pfn in 0..3u8 {
        rx.remember(u64::from(pfn), &Bytes::from(vec![pfn; 4096]));
    }
    // Two pages fit: the oldest went.
    let gone: Vec<Bytes> = rx.released().collect();
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0][0], 0);
    // Pages no block needs any more go too, once each.
    rx.forget([1, 2]);
    assert_eq!(rx.released().count(), 2);
    assert_eq!(rx.released().count(), 0);
}

/// A block holding as many repair symbols as a receiver keeps of it, and still short
/// of what it lost, never decodes: it is given up (`Err`), and the receiver asks for
/// its pages plain. Kept open, its pages were NACKed for more repair symbols of the
/// block, each refused, until the receiver's retries of a page ran out.
#[test]
fn a_block_that_cannot_decode_with_every_repair_symbol_it_keeps_is_given_up() {
    let (ps, spp) = (4096, 3u16);
    let members: Vec<u64> = (0..128).collect();
    let data = pages(128, ps);
    let enc = block_encoder(ps, spp, &members, 255, |p, buf| {
        buf.copy_from_slice(&data[p as usize]);
        Ok(())
    })
    .unwrap();
    let (span, bitmap) = member_bitmap(0, &members);
    let kept = rx::repairs_kept(members.len() * usize::from(spp));
    let burst = more_repairs(&enc, 0, span, bitmap.clone(), 0, kept as u32 + 1);
    let mut rx = FecRx::new(4, 256, 64 << 20);
    // 28 pages arrived; 100 pages (300 symbols, more than the 272 kept) were lost.
    for p in 0..28u64 {
        rx.remember(p, &Bytes::from(data[p as usize].clone()));
    }
    let have = |pfn: u64| {
        if pfn < 28 {
            Have::Present
        } else {
            Have::Nothing
        }
    };
    for (i, (esi, symbol)) in burst.packets.iter().enumerate() {
        let r = Repair {
            first_pfn: 0,
            span,
            symbols_per_page: spp,
            symbol_size: symbol_size(ps, spp) as u16,
            esi: *esi,
            burst_share: burst.share,
            members: &bitmap,
            symbol,
        };
        let outcome = rx.add(&r, Bytes::copy_from_slice(symbol));
        if i == kept {
            assert_eq!(outcome, RepairOutcome::Refused, "one more than kept");
            break;
        }
        assert_eq!(outcome, RepairOutcome::Stored);
        let res = rx.try_decode(0, ps, have);
        if i + 1 < kept {
            assert!(matches!(res, Ok(None)), "{i} repairs: still open");
        } else {
            assert!(res.is_err(), "every repair kept and no decode: given up");
        }
    }
}
