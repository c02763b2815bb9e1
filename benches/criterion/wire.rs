//! Wire encode and decode: a 4 KiB data page, a request with 64 ranges, an announce.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mcdist::wire::{
    self, encode_ranges, ranges_from_encoded, Announce, Body, Header, HeaderFlags, Kind, Message,
    PageRange, Request,
};
use std::hint::black_box;

fn data(c: &mut Criterion) {
    let page = vec![0xa5u8; 4096];
    let mut buf = vec![0u8; 8192];
    let mut g = c.benchmark_group("wire/data");
    g.throughput(Throughput::Elements(1));
    g.bench_function("emit_4k", |b| {
        let mut seq = 0u64;
        b.iter(|| {
            seq += 1;
            let h = Header {
                kind: Kind::Data,
                flags: HeaderFlags::empty(),
                session: 7,
                seq,
            };
            let off = wire::emit_data_header(&mut buf, &h, seq, 0, 1, wire::Data::SWEEP, 4096)
                .expect("buffer is large enough");
            buf[off..off + 4096].copy_from_slice(black_box(&page));
            black_box(off + 4096)
        })
    });
    let h = Header {
        kind: Kind::Data,
        flags: HeaderFlags::empty(),
        session: 7,
        seq: 1,
    };
    let off = wire::emit_data_header(&mut buf, &h, 42, 0, 1, wire::Data::SWEEP, 4096)
        .expect("buffer is large enough");
    buf[off..off + 4096].copy_from_slice(&page);
    let dgram = buf[..off + 4096].to_vec();
    g.bench_function("parse_4k", |b| {
        b.iter(|| {
            let m = Message::parse(black_box(&dgram)).expect("valid datagram");
            match m.body {
                Body::Data(d) => black_box(d.payload.len()),
                _ => 0,
            }
        })
    });
    g.finish();
}

fn request(c: &mut Criterion) {
    let mut g = c.benchmark_group("wire/request");
    for n in [1usize, 64] {
        let ranges: Vec<PageRange> = (0..n as u64)
            .map(|i| PageRange {
                start: i * 100,
                len: 7,
            })
            .collect();
        let mut raw = Vec::new();
        encode_ranges(&ranges, &mut raw);
        let m = Message {
            session: 7,
            seq: 3,
            flags: HeaderFlags::empty(),
            body: Body::Request(Request {
                rx_rate: 1 << 27,
                loss_permille: 3,
                flags: mcdist::wire::RequestFlags::empty(),
                heard_seq: 1 << 20,
                ranges: ranges_from_encoded(&raw),
            }),
        };
        let mut buf = vec![0u8; m.buffer_len()];
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::new("emit", n), &m, |b, m| {
            b.iter(|| black_box(m.emit(&mut buf).expect("sized buffer")))
        });
        let len = m.emit(&mut buf).expect("sized buffer");
        let dgram = buf[..len].to_vec();
        g.bench_with_input(BenchmarkId::new("parse", n), &dgram, |b, d| {
            b.iter(|| {
                let m = Message::parse(black_box(d)).expect("valid datagram");
                match m.body {
                    Body::Request(q) => black_box(q.ranges.total_pages()),
                    _ => 0,
                }
            })
        });
    }
    g.finish();
}

fn announce(c: &mut Criterion) {
    let m = Message {
        session: 7,
        seq: 1,
        flags: HeaderFlags::empty(),
        body: Body::Announce(Announce {
            image_size: 1 << 28,
            page_size: 4096,
            page_count: 1 << 16,
            digest: [3; 32],
            zero_count: 100,
            zero_map_digest: [4; 32],
            zero_map_chunks: 1,
            sweep_pos: 5,
            rate: 1 << 27,
            flags: Announce::FLAG_PUSH,
            frag_payload: 4096,
            token: [0; 16],
        }),
    };
    let mut buf = vec![0u8; m.buffer_len()];
    let len = m.emit(&mut buf).expect("sized buffer");
    let dgram = buf[..len].to_vec();
    let mut g = c.benchmark_group("wire/announce");
    g.bench_function("emit", |b| {
        b.iter(|| black_box(black_box(&m).emit(&mut buf).expect("sized buffer")))
    });
    g.bench_function("parse", |b| {
        b.iter(|| black_box(Message::parse(black_box(&dgram)).expect("valid datagram")))
    });
    g.finish();
}

criterion_group!(benches, data, request, announce);
criterion_main!(benches);
