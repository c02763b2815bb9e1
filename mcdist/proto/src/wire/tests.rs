//! Round trips and rejections of the wire codecs.

use super::*;

fn roundtrip(m: Message<'_>) {
    let mut buf = vec![0u8; m.buffer_len()];
    let n = m.emit(&mut buf).unwrap();
    assert_eq!(n, buf.len());
    let p = Message::parse(&buf).unwrap();
    assert_eq!(p, m);
}

#[test]
fn every_kind_roundtrips() {
    let ann = Announce {
        image_size: 10_000,
        page_size: 4096,
        page_count: 3,
        digest: [7; 32],
        zero_count: 1,
        zero_map_digest: [9; 32],
        zero_map_chunks: 1,
        sweep_pos: 2,
        rate: 1_000_000,
        flags: Announce::FLAG_PUSH,
        frag_payload: 1400,
        token: [0; 16],
    };
    let mut raw = Vec::new();
    encode_ranges(
        &[
            PageRange { start: 5, len: 3 },
            PageRange { start: 100, len: 1 },
        ],
        &mut raw,
    );
    let bodies = [
        Body::Announce(ann),
        Body::Data(Data {
            pfn: 42,
            frag_index: 1,
            frag_count: 3,
            flags: Data::PUSH,
            payload: b"hello",
        }),
        Body::Request(Request {
            rx_rate: 5,
            loss_permille: 12,
            flags: Request::RETRY,
            heard_seq: 1 << 40 | 7,
            ranges: ranges_from_encoded(&raw),
        }),
        Body::Nack(Request {
            rx_rate: 0,
            loss_permille: 0,
            flags: RequestFlags::empty(),
            heard_seq: 0,
            ranges: ranges_from_encoded(&raw),
        }),
        Body::Join(Join {
            flags: JoinFlags::WANT_ZERO_MAP,
            token: [3; 16],
        }),
        Body::Heartbeat(Heartbeat {
            rx_rate: 9,
            loss_permille: 3,
            overload_permille: 0,
            have_pages: 77,
            flags: Heartbeat::COMPLETE,
            token: [5; 16],
        }),
        Body::Leave(Leave {
            reason: 0,
            token: [4; 16],
        }),
        Body::ZeroMap(ZeroMap {
            chunk: 0,
            chunk_count: 2,
            start_page: 64,
            bits: &[1, 2, 3],
        }),
        Body::End(End { reason: 0 }),
        Body::FragmentNack(FragmentNack {
            rx_rate: 7,
            loss_permille: 50,
            flags: Request::RETRY,
            heard_seq: 99,
            // Read as (page 5, fragments 0-2) and (page 100, fragment 0).
            entries: fragment_entries_from_encoded(&raw),
        }),
        Body::Repair(Repair {
            first_pfn: 40,
            span: 10,
            symbols_per_page: 3,
            symbol_size: 4,
            esi: 30,
            burst_share: 3,
            members: &[0b1111_0111, 0b10],
            symbol: b"abcd",
        }),
    ];
    for (i, body) in bodies.into_iter().enumerate() {
        roundtrip(Message {
            session: 0xdead_beef,
            seq: i as u64,
            flags: HeaderFlags::empty(),
            body,
        });
    }
}

#[test]
fn fragment_nack_entries_read_back_and_an_empty_mask_is_refused() {
    let mut raw = Vec::new();
    let want = [
        PageFragments {
            pfn: 9,
            missing: 0b101,
        },
        PageFragments {
            pfn: u64::MAX,
            missing: 1 << 31,
        },
    ];
    encode_fragment_entries(&want, &mut raw);
    let f = FragmentNack {
        rx_rate: 1,
        loss_permille: 2,
        flags: RequestFlags::empty(),
        heard_seq: 3,
        entries: fragment_entries_from_encoded(&raw),
    };
    let mut buf = vec![0u8; f.buffer_len()];
    f.emit(&mut buf).unwrap();
    let back = FragmentNack::parse(&buf).unwrap();
    assert_eq!(back.entries.iter().collect::<Vec<_>>(), want);
    let mut bad = Vec::new();
    encode_fragment_entries(&[PageFragments { pfn: 9, missing: 0 }], &mut bad);
    let f = FragmentNack {
        entries: fragment_entries_from_encoded(&bad),
        ..f
    };
    let mut buf = vec![0u8; f.buffer_len()];
    f.emit(&mut buf).unwrap();
    assert_eq!(
        FragmentNack::parse(&buf).unwrap_err(),
        WireError::BadField("fragment mask")
    );
    // A count larger than the entries that follow.
    assert_eq!(
        FragmentNack::parse(&buf[..buf.len() - 1]).unwrap_err(),
        WireError::Truncated
    );
}

#[test]
fn rejects_bad_headers() {
    assert_eq!(Message::parse(b"MD").unwrap_err(), WireError::Truncated);
    let mut buf = [0u8; 40];
    buf[0..2].copy_from_slice(b"XX");
    assert_eq!(Message::parse(&buf).unwrap_err(), WireError::BadMagic);
    buf[0..2].copy_from_slice(&MAGIC);
    buf[2] = 9;
    assert_eq!(Message::parse(&buf).unwrap_err(), WireError::BadVersion(9));
    buf[2] = VERSION;
    buf[3] = 200;
    assert_eq!(Message::parse(&buf).unwrap_err(), WireError::BadKind(200));
}

#[test]
fn rejects_bad_fragments_and_ranges() {
    let mut buf = vec![0u8; 64];
    let m = Message {
        session: 1,
        seq: 1,
        flags: HeaderFlags::empty(),
        body: Body::Data(Data {
            pfn: 1,
            frag_index: 0,
            frag_count: 1,
            flags: DataFlags::empty(),
            payload: &[],
        }),
    };
    let n = m.emit(&mut buf).unwrap();
    // frag_index (offset 32) = 5 >= frag_count 1
    buf[HEADER_LEN + 9] = 5;
    assert!(matches!(
        Message::parse(&buf[..n]),
        Err(WireError::BadField(_))
    ));
    // a request claiming 1000 ranges but carrying none
    let mut q = vec![0u8; HEADER_LEN + Request::FIXED_LEN];
    Header {
        kind: Kind::Request,
        flags: HeaderFlags::empty(),
        session: 1,
        seq: 1,
    }
    .emit(&mut q)
    .unwrap();
    let l = q.len();
    q[l - 2..].copy_from_slice(&1000u16.to_be_bytes());
    assert_eq!(Message::parse(&q).unwrap_err(), WireError::Truncated);
}

#[test]
fn rejects_bad_repairs() {
    let good = Repair {
        first_pfn: 8,
        span: 10,
        symbols_per_page: 3,
        symbol_size: 4,
        esi: 12,
        burst_share: 2,
        members: &[0b0000_0101, 0b10],
        symbol: b"abcd",
    };
    let emit = |r: Repair<'_>| {
        let m = Message {
            session: 1,
            seq: 1,
            flags: HeaderFlags::empty(),
            body: Body::Repair(r),
        };
        let mut buf = vec![0u8; m.buffer_len()];
        m.emit(&mut buf).unwrap();
        buf
    };
    // An ESI past 24 bits cannot be sent.
    let too_far = Message {
        session: 1,
        seq: 1,
        flags: HeaderFlags::empty(),
        body: Body::Repair(Repair {
            esi: MAX_FEC_ESI + 1,
            ..good
        }),
    };
    let mut buf = vec![0u8; too_far.buffer_len()];
    assert!(too_far.emit(&mut buf).is_err());
    let ok = emit(good);
    let Body::Repair(p) = Message::parse(&ok).unwrap().body else {
        panic!("kind changed");
    };
    assert_eq!(p.member_pfns().collect::<Vec<_>>(), vec![8, 10, 17]);
    assert_eq!(p.source_symbols(), 9);
    let bad = [
        Repair {
            members: &[0b100, 0b10],
            ..good
        }, // first page not a member
        Repair {
            members: &[0b101, 0b110],
            ..good
        }, // bit past the span
        Repair {
            span: 0,
            members: &[],
            ..good
        }, // empty span
        Repair {
            span: MAX_FEC_SPAN + 8,
            members: &[1; 129],
            ..good
        }, // span too wide
        Repair {
            symbols_per_page: 0,
            ..good
        },
        Repair {
            symbols_per_page: MAX_FRAGMENTS + 1,
            ..good
        },
        Repair {
            burst_share: 0,
            ..good
        },
        Repair {
            symbol_size: 0,
            symbol: b"",
            ..good
        },
        Repair {
            first_pfn: u64::MAX - 3,
            ..good
        }, // span wraps
        // 1024 pages of 9 symbols: more than MAX_FEC_SYMBOLS
        Repair {
            span: 1024,
            symbols_per_page: 9,
            members: &[0xff; 128],
            ..good
        },
    ];
    for r in bad {
        assert!(
            matches!(Message::parse(&emit(r)), Err(WireError::BadField(_))),
            "{r:?}"
        );
    }
    // A symbol shorter or longer than its stated size.
    let mut buf = emit(good);
    buf.pop();
    assert!(Message::parse(&buf).is_err());
    let mut buf = emit(good);
    buf.push(0);
    assert!(Message::parse(&buf).is_err());
}

/// The chunks of a map of `pages` pages cut into `chunk_bytes`-byte pieces, as a server
/// cuts it: `(chunk, count, start_page, bits length)`.
fn cut(pages: u64, chunk_bytes: u64) -> Vec<(u32, u32, u64, usize)> {
    let total = pages.div_ceil(8);
    let count = total.div_ceil(chunk_bytes) as u32;
    (0..count)
        .map(|c| {
            let start = u64::from(c) * chunk_bytes;
            let end = (start + chunk_bytes).min(total);
            (c, count, start * 8, (end - start) as usize)
        })
        .collect()
}

#[test]
fn zero_map_chunks_fit_only_where_they_belong() {
    let bits = vec![0xffu8; 1 << 18];
    let zm = |(chunk, chunk_count, start_page, len): (u32, u32, u64, usize)| ZeroMap {
        chunk,
        chunk_count,
        start_page,
        bits: &bits[..len],
    };
    for pages in [1u64, 7, 8, 9, 100, 8 * 1400, 8 * 1400 + 1, 30_000, 1 << 20] {
        for cb in [8u64, 13, 1400, 4096] {
            let chunks = cut(pages, cb);
            for &c in &chunks {
                assert!(zm(c).fits(pages), "{pages} pages, {cb}-byte chunks: {c:?}");
                let (chunk, count, start, len) = c;
                // Moved, resized, renumbered, or for another map size: refused.
                if start > 0 {
                    assert!(!zm((chunk, count, start - 8, len)).fits(pages));
                }
                assert!(!zm((chunk, count, start + 8, len)).fits(pages));
                // (The first of several chunks alone does not pin the chunk size: one of
                // another size fits too, and the map's digest then fails.)
                if chunk > 0 || count == 1 {
                    assert!(!zm((chunk, count, start, len + 1)).fits(pages));
                    assert!(!zm((chunk, count, start, len - 1)).fits(pages));
                }
                if chunk > 0 {
                    assert!(!zm((chunk - 1, count, start, len)).fits(pages));
                }
                assert!(!zm((chunk, count + 1, start, len)).fits(pages));
                assert!(!zm(c).fits(pages + 8 * cb * u64::from(count)));
            }
        }
    }
    assert!(!zm((0, 1, 0, 0)).fits(0));
}

#[test]
fn zero_map_page_numbers_never_overflow() {
    let mut body = vec![0u8; ZeroMap::FIXED_LEN + 4];
    body[..4].copy_from_slice(&1u32.to_be_bytes());
    body[4..8].copy_from_slice(&2u32.to_be_bytes());
    // The last multiple of 8: its 32 bits would run past u64::MAX.
    body[8..16].copy_from_slice(&(u64::MAX - 7).to_be_bytes());
    assert!(ZeroMap::parse(&body).is_err());
    body[8..16].copy_from_slice(&(u64::MAX - 39).to_be_bytes());
    let z = ZeroMap::parse(&body).unwrap();
    assert!(!z.fits(u64::MAX));
    // Applying it to a bitmap is harmless.
    let mut b = crate::bitmap::PageBitmap::new(64);
    b.or_bytes_at(z.start_page, &[0xff; 4]);
    b.or_bytes_at(u64::MAX - 7, &[0xff; 4]);
    assert_eq!(b.count_ones(), 0);
}
