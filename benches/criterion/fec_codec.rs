//! Erasure codes for mcdist's FEC blocks, compared on the protocol's shapes:
//! RaptorQ (RFC 6330, the `raptorq` crate, which mcdist used before its own sparse code) against
//! Reed–Solomon over GF(2^16) (the `reed-solomon-simd` crate: Leopard-style
//! O(n log n) with AVX2/SSSE3/Neon).
//!
//! A block is 128 pages of 4 KiB: at MTU 1500 each page is 3 source symbols of
//! 1366 bytes (`K = 384`), on loopback or jumbo frames 1 symbol of 4096 bytes
//! (`K = 128`). For each shape:
//! - `encode_{5,10}pct`: build the encoder from the block and produce the first
//!   5 % / 10 % repair symbols (what the server does when a block closes);
//! - `more_20_40`: repair symbols with repair indices 20..40, the encoder
//!   rebuilt from the block (a NACK round for a block whose encoder was
//!   dropped); `raptorq/more_20_40_kept`: the same from a kept encoder;
//! - `decode_4pct_loss`: 4 % of the source symbols lost (one in 25), recovered
//!   from the 5 % repair symbols, with a new decoder (`_reused`: one decoder
//!   reset between blocks, which `reed-solomon-simd` allows).
//!
//! `mcdist/*` is mcdist's own code (`mcdist::fec::code`: a sparse binary code, every
//! source symbol in `C` of a layer's repair symbols), whose decoding cost follows the
//! losses. Before the timings the bench prints how often each code fails to decode a
//! block at the protocol's repair counts: RaptorQ, mcdist's layout, and random layouts
//! of the same kind of code ([`sparse_code`]) at several densities.
//!
//! Reed–Solomon's repair symbols depend on how many recovery shards the
//! encoder is built for (its capacity), so a protocol must fix the capacity
//! from `K` on both sides, and a repair index is valid only below it; one
//! encode yields all of them. `rs_cap{C}` use capacity `C`: 128 (the most that
//! keeps the decoder's transform at 512 symbols for `K = 384`) and `K` (room for
//! `fec_max_overhead` = 0.5 plus NACK rounds). Run the pairs back to back and
//! compare ratios within one run: the machine's load moves absolute numbers.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use mcdist_benches::image;
use raptorq::{
    EncodingPacket, ObjectTransmissionInformation, PayloadId, SourceBlockDecoder,
    SourceBlockEncoder,
};
use reed_solomon_simd::{ReedSolomonDecoder, ReedSolomonEncoder};
use std::hint::black_box;

#[path = "sparse_code.rs"]
mod sparse_code;
use mcdist::fec::code::{self as mc, BlockEncoder, Layers};
use sparse_code::Random;

const PAGES: usize = 128;
const PAGE: usize = 4096;

/// The block as source symbols: each page's `frags` fragments, each zero-padded to `t`.
fn block(frags: usize) -> (usize, Vec<u8>) {
    let t = PAGE.div_ceil(frags);
    let img = image(PAGES, PAGE, 0);
    let mut data = vec![0u8; PAGES * frags * t];
    for (m, page) in img.chunks_exact(PAGE).enumerate() {
        for (i, frag) in page.chunks(t).enumerate() {
            let off = (m * frags + i) * t;
            data[off..off + frag.len()].copy_from_slice(frag);
        }
    }
    (t, data)
}

fn oti(k: usize, t: usize) -> ObjectTransmissionInformation {
    ObjectTransmissionInformation::new((k * t) as u64, t as u16, 1, 1, 1)
}

/// Reed–Solomon repair symbols `from..to` of `data` (`k` symbols of `t` bytes)
/// from an encoder of capacity `cap`.
fn rs_repairs(data: &[u8], t: usize, cap: usize, from: usize, to: usize) -> Vec<Vec<u8>> {
    let k = data.len() / t;
    let mut enc = ReedSolomonEncoder::new(k, cap, t).expect("supported shape");
    for s in data.chunks_exact(t) {
        enc.add_original_shard(s).expect("k shards of t bytes");
    }
    let res = enc.encode().expect("all shards added");
    (from..to)
        .map(|i| res.recovery(i).expect("below the capacity").to_vec())
        .collect()
}

/// Feed `data` less the `lost` source symbols and `repairs` to `dec`; the count restored.
fn rs_decode(
    dec: &mut ReedSolomonDecoder,
    data: &[u8],
    t: usize,
    lost: impl Fn(usize) -> bool,
    repairs: &[Vec<u8>],
) -> usize {
    for (i, s) in data.chunks_exact(t).enumerate() {
        if !lost(i) {
            dec.add_original_shard(i, s).expect("valid index");
        }
    }
    for (i, s) in repairs.iter().enumerate() {
        dec.add_recovery_shard(i, s).expect("valid index");
    }
    let res = dec.decode().expect("enough shards");
    res.restored_original_iter().count()
}

/// Sources per repair symbol for `r` repair symbols of a block of `k`, at density `c`.
fn sparse_d(k: usize, r: usize, c: usize) -> usize {
    (c * k).div_ceil(r.max(1)).clamp(1, k)
}

/// A uniform draw in [0, 1) from a SplitMix64 state.
fn uniform(state: &mut u64) -> f64 {
    (sparse_code::splitmix(state) >> 11) as f64 / (1u64 << 53) as f64
}

/// How often a block fails to decode: `K = 384` and `K = 128` symbols, every symbol (source and repair)
/// lost with probability `p`, `R = K × (2p + 2 %)` repair symbols sent (about what the
/// server's rule sends at that loss, rounded up to its burst shares), RaptorQ against
/// mcdist's code and random layouts at densities 4, 6 and 8, using every repair symbol
/// that arrived. Symbols are 16 bytes: whether a block decodes does not depend on their
/// size.
fn failure_study() {
    for k in [384usize, 128] {
        failure_rows(k);
    }
}

/// [`failure_study`]'s rows for blocks of `k` source symbols.
fn failure_rows(k: usize) {
    let (t, trials) = (16usize, 400u32);
    let data: Vec<u8> = (0..k * t).map(|i| (i * 31 % 251) as u8).collect();
    eprintln!("decode failures in {trials} blocks of K = {k}, loss p on every symbol, R = K x (2p + 2 %):");
    for p in [0.01f64, 0.05, 0.10] {
        let share = mc::burst_share(k, (k as f64 * (2.0 * p + 0.02)).ceil() as usize);
        let r = mc::burst_len(k, share);
        let enc = SourceBlockEncoder::new(0, &oti(k, t), &data);
        let rq_repairs = enc.repair_packets(0, r as u32);
        let mut randoms: Vec<Random> = [4usize, 6, 8]
            .iter()
            .map(|&c| Random::new(k, sparse_d(k, r, c), r))
            .collect();
        let mut repairs: Vec<Vec<(u32, Vec<u8>)>> =
            vec![BlockEncoder::new(data.clone(), t, share).repairs(0, r as u32)];
        for code in &mut randoms {
            repairs.push(sparse_code::encode(code, &data, t, r));
        }
        let mut layers = Layers::new(k, share);
        let mut fails = [0u32; 5];
        let mut state = 0x5eed_u64 ^ (p * 1e6) as u64;
        for _ in 0..trials {
            let have: Vec<bool> = (0..k).map(|_| uniform(&mut state) >= p).collect();
            let arrived: Vec<bool> = (0..r).map(|_| uniform(&mut state) >= p).collect();
            let pkts: Vec<EncodingPacket> = data
                .chunks_exact(t)
                .enumerate()
                .filter(|(i, _)| have[*i])
                .map(|(i, s)| EncodingPacket::new(PayloadId::new(0, i as u32), s.to_vec()))
                .chain(
                    rq_repairs
                        .iter()
                        .zip(&arrived)
                        .filter(|(_, a)| **a)
                        .map(|(x, _)| x.clone()),
                )
                .collect();
            let mut dec = SourceBlockDecoder::new(0, &oti(k, t), (k * t) as u64);
            fails[0] += u32::from(dec.decode(pkts).is_none());
            let held = |i: usize| have[i].then(|| &data[i * t..(i + 1) * t]);
            for (n, reps) in repairs.iter().enumerate() {
                let got: Vec<(u32, &[u8])> = reps
                    .iter()
                    .zip(&arrived)
                    .filter(|(_, a)| **a)
                    .map(|((j, s), _)| (*j, s.as_slice()))
                    .collect();
                let out = match n {
                    0 => mc::decode(k, t, &mut layers, held, &got),
                    _ => mc::decode(k, t, &mut randoms[n - 1], held, &got),
                };
                match out {
                    Ok(restored) => {
                        for (i, s) in restored {
                            assert_eq!(
                                s,
                                &data[i * t..(i + 1) * t],
                                "a sparse decode restored the block"
                            );
                        }
                    }
                    Err(_) => fails[n + 1] += 1,
                }
            }
        }
        let random: Vec<String> = ["random_c4", "random_c6", "random_c8"]
            .iter()
            .zip(&randoms)
            .zip(&fails[2..])
            .map(|((n, code), f)| format!("{n} {f} (d = {})", code.density()))
            .collect();
        eprintln!(
            "  p = {:.0} %, R = {r}: raptorq {}, mcdist {}, {}",
            p * 100.0,
            fails[0],
            fails[1],
            random.join(", ")
        );
    }
}

fn codecs(c: &mut Criterion) {
    failure_study();
    for frags in [3usize, 1] {
        let (t, data) = block(frags);
        let k = data.len() / t;
        let mut caps = vec![128.min(k), k];
        caps.dedup();
        let r5 = (k * 5).div_ceil(100);
        let lost = |i: usize| i % 25 == 3;
        let n_lost = (0..k).filter(|&i| lost(i)).count();
        let mut g = c.benchmark_group(format!("fec_codec/k{k}_t{t}"));
        g.sample_size(10);
        g.throughput(Throughput::Elements(PAGES as u64));

        // Each operation: RaptorQ, then Reed–Solomon, back to back.
        for pct in [5usize, 10] {
            let r = (k * pct).div_ceil(100);
            g.bench_function(format!("raptorq/encode_{pct}pct"), |b| {
                b.iter(|| {
                    let enc = SourceBlockEncoder::new(0, &oti(k, t), black_box(&data));
                    black_box(enc.repair_packets(0, r as u32))
                })
            });
            for &cap in &caps {
                g.bench_function(format!("rs_cap{cap}/encode_{pct}pct"), |b| {
                    b.iter(|| black_box(rs_repairs(black_box(&data), t, cap, 0, r)))
                });
            }
            let share = mc::burst_share(k, r);
            g.bench_function(format!("mcdist/encode_{pct}pct"), |b| {
                b.iter_batched(
                    || data.clone(),
                    |block| black_box(BlockEncoder::new(block, t, share).repairs(0, r as u32)),
                    BatchSize::LargeInput,
                )
            });
        }

        g.bench_function("raptorq/more_20_40", |b| {
            b.iter(|| {
                let enc = SourceBlockEncoder::new(0, &oti(k, t), black_box(&data));
                black_box(enc.repair_packets(20, 20))
            })
        });
        let enc = SourceBlockEncoder::new(0, &oti(k, t), &data);
        g.bench_function("raptorq/more_20_40_kept", |b| {
            b.iter(|| black_box(enc.repair_packets(20, 20)))
        });
        for &cap in caps.iter().filter(|&&c| c >= 40) {
            g.bench_function(format!("rs_cap{cap}/more_20_40"), |b| {
                b.iter(|| black_box(rs_repairs(black_box(&data), t, cap, 20, 40)))
            });
        }

        let rq_packets: Vec<EncodingPacket> = data
            .chunks_exact(t)
            .enumerate()
            .filter(|(i, _)| !lost(*i))
            .map(|(i, s)| EncodingPacket::new(PayloadId::new(0, i as u32), s.to_vec()))
            .chain(enc.repair_packets(0, r5 as u32))
            .collect();
        g.bench_function("raptorq/decode_4pct_loss", |b| {
            b.iter_batched(
                || rq_packets.clone(),
                |pkts| {
                    let mut dec = SourceBlockDecoder::new(0, &oti(k, t), (k * t) as u64);
                    black_box(dec.decode(pkts).expect("enough symbols"))
                },
                BatchSize::LargeInput,
            )
        });
        for &cap in &caps {
            let repairs = rs_repairs(&data, t, cap, 0, r5);
            g.bench_function(format!("rs_cap{cap}/decode_4pct_loss"), |b| {
                b.iter(|| {
                    let mut dec = ReedSolomonDecoder::new(k, cap, t).expect("supported shape");
                    let n = rs_decode(&mut dec, &data, t, lost, &repairs);
                    assert_eq!(n, n_lost, "every lost symbol restored");
                    black_box(n)
                })
            });
            let mut dec = ReedSolomonDecoder::new(k, cap, t).expect("supported shape");
            g.bench_function(format!("rs_cap{cap}/decode_4pct_loss_reused"), |b| {
                b.iter(|| {
                    let n = rs_decode(&mut dec, &data, t, lost, &repairs);
                    assert_eq!(n, n_lost, "every lost symbol restored");
                    black_box(n)
                })
            });
        }
        // mcdist's code at the repair count the server sends at this loss (10 %, about
        // 2 × 4 % + 2 %) and at 5 %, decoding with rows kept from the block before (as
        // receivers do) and with rows built anew.
        for pct in [10usize, 5] {
            let share = mc::burst_share(k, (k * pct).div_ceil(100));
            let r = mc::burst_len(k, share);
            let repairs = BlockEncoder::new(data.clone(), t, share).repairs(0, r as u32);
            let inhand: Vec<(u32, &[u8])> =
                repairs.iter().map(|(j, s)| (*j, s.as_slice())).collect();
            let held = |i: usize| (!lost(i)).then(|| &data[i * t..(i + 1) * t]);
            let mut layers = Layers::new(k, share);
            match mc::decode(k, t, &mut layers, held, &inhand) {
                Ok(got) => {
                    assert_eq!(got.len(), n_lost, "every lost symbol restored");
                    for (i, s) in got {
                        assert_eq!(
                            s,
                            &data[i * t..(i + 1) * t],
                            "sparse decode restores the block"
                        );
                    }
                }
                Err(e) => {
                    eprintln!(
                        "mcdist, K = {k}, {pct} % repairs: no decode of this loss pattern: {e:?}"
                    );
                    continue;
                }
            }
            g.bench_function(format!("mcdist/decode_4pct_loss_{pct}pct_repairs"), |b| {
                b.iter(|| black_box(mc::decode(k, t, &mut layers, held, &inhand)))
            });
            g.bench_function(
                format!("mcdist/decode_4pct_loss_{pct}pct_repairs_new_rows"),
                |b| {
                    b.iter(|| {
                        black_box(mc::decode(k, t, &mut Layers::new(k, share), held, &inhand))
                    })
                },
            );
        }
        g.finish();
    }
}

criterion_group!(benches, codecs);
criterion_main!(benches);
