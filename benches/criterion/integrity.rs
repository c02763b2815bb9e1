//! Per-page integrity: CPU per verified 4 KiB page, hash-page verification, building the
//! hash pages, their byte overhead, and the `bao-tree` crate verifying a 4 KiB range of the
//! same image for comparison.

use bao_tree::io::outboard::PreOrderMemOutboard;
use bao_tree::io::sync::{encode_ranges_validated, DecodeResponseIter};
use bao_tree::{BaoTree, BlockSize, ChunkNum, ChunkRanges};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mcdist::integrity::{HashLayout, HashTree, Verifier};
use std::hint::black_box;
use std::io::Cursor;
use std::time::{Duration, Instant};

const PAGE: usize = 4096;
const MIB: usize = 1 << 20;

fn image(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut v = vec![0u8; len];
    for c in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    v
}

/// CPU time this thread has run (the scheduler's count, `/proc/thread-self/schedstat`),
/// or wall time where that file is missing. On a machine shared with other work the wall
/// time of a microsecond-long call includes time spent descheduled; CPU time does not.
fn cpu_now() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .map(Duration::from_nanos)
        .unwrap_or_else(|| {
            static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
            START.get_or_init(Instant::now).elapsed()
        })
}

/// Runs `f` `iters` times and returns the CPU time it took.
fn cpu_time<R>(iters: u64, mut f: impl FnMut() -> R) -> Duration {
    let start = cpu_now();
    for _ in 0..iters {
        black_box(f());
    }
    cpu_now().saturating_sub(start)
}

/// Hash pages of 256 MiB and 1 GiB images in 4 KiB pages, and bao-tree's outboards.
fn report_overhead() {
    for (name, size) in [("256 MiB", 256u64 << 20), ("1 GiB", 1u64 << 30)] {
        let l = HashLayout::new(size, PAGE).expect("4 KiB pages");
        let levels: Vec<u64> = (1..=l.levels()).map(|j| l.level_pages(j)).collect();
        eprintln!(
            "overhead {name}: {} hash pages (levels 1.. = {levels:?}), {} bytes, {:.3} % of the image",
            l.hash_pages(),
            l.overhead_bytes(),
            l.overhead_bytes() as f64 * 100.0 / size as f64
        );
        for log in [2u8, 4] {
            let t = BaoTree::new(size, BlockSize::from_chunk_log(log));
            eprintln!(
                "  bao-tree outboard, {} KiB chunk groups: {} bytes, {:.3} %",
                1 << log,
                t.outboard_size(),
                t.outboard_size() as f64 * 100.0 / size as f64
            );
        }
    }
}

fn verify(c: &mut Criterion) {
    report_overhead();
    let img = image(256 * MIB);
    let tree = HashTree::from_image(&img, PAGE).expect("tree");
    assert_eq!(tree.root(), *blake3::hash(&img).as_bytes());
    let l = tree.layout().clone();
    let mut v = Verifier::new(l.clone(), tree.root()).expect("verifier");
    let pfn = 12_345u64;
    let path = l.path(pfn).expect("in range");
    for &p in &path {
        v.verify_hash_page(p, tree.page(p).expect("hash page"))
            .expect("genuine");
    }
    let data = &img[pfn as usize * PAGE..][..PAGE];
    // CPU time per call; samples of about 200 ms so the scheduler's tick-grained count is
    // exact to a few percent.
    let mut g = c.benchmark_group("integrity/verify_cpu");
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(4));
    g.throughput(Throughput::Elements(1));
    g.bench_function("data_page_4k", |b| {
        b.iter_custom(|n| cpu_time(n, || v.verify_data_page(black_box(pfn), black_box(data))))
    });
    g.bench_function("blake3_hash_4k_reference", |b| {
        b.iter_custom(|n| cpu_time(n, || blake3::hash(black_box(data))))
    });
    // A whole-image fetch: one level-1 hash page and the 128 data pages below it (the
    // levels above are 1/128 of that again).
    let first = pfn / 128 * 128;
    let region = &img[first as usize * PAGE..][..128 * PAGE];
    let l1 = l.parent(first).expect("in range").expect("level 1").pfn;
    let mut sv = v.clone();
    g.throughput(Throughput::Elements(128));
    g.bench_function("level1_page_and_its_128_data_pages", |b| {
        b.iter_custom(|n| {
            cpu_time(n, || {
                sv.verify_hash_page(l1, tree.page(l1).expect("hash page"))
                    .expect("genuine");
                region
                    .chunks(PAGE)
                    .zip(first..)
                    .all(|(d, p)| sv.verify_data_page(p, d).is_ok())
            })
        })
    });
    // A demand fault with nothing cached: a fresh verifier takes the three hash pages of
    // the path, top first, then the page.
    g.throughput(Throughput::Elements(1));
    g.bench_function("cold_fault_path_3_hash_pages_and_page", |b| {
        b.iter_custom(|n| {
            cpu_time(n, || {
                let mut cold = Verifier::new(l.clone(), tree.root()).expect("verifier");
                for &p in &path {
                    cold.verify_hash_page(p, tree.page(p).expect("hash page"))
                        .expect("genuine");
                }
                cold.verify_data_page(pfn, data)
            })
        })
    });
    let level1 = *path.last().expect("three levels");
    let top = path[0];
    let mut hv = v.clone();
    g.bench_function("hash_page_level1_128_cvs", |b| {
        let page = tree.page(level1).expect("hash page");
        b.iter_custom(|n| {
            cpu_time(n, || {
                hv.verify_hash_page(black_box(level1), black_box(page))
            })
        })
    });
    g.bench_function("hash_page_top_against_root", |b| {
        let page = tree.page(top).expect("hash page");
        b.iter_custom(|n| cpu_time(n, || hv.verify_hash_page(black_box(top), black_box(page))))
    });
    // bao-tree: a standalone response for the 4 KiB range (its path of parents plus the
    // data) decoded and verified against the root, chunk groups of 4 KiB and 16 KiB.
    for log in [2u8, 4] {
        let bs = BlockSize::from_chunk_log(log);
        let ob = PreOrderMemOutboard::create(&img, bs);
        let bt = BaoTree::new(img.len() as u64, bs);
        assert_eq!(ob.root, blake3::hash(&img));
        let first = ChunkNum(pfn * 4);
        let ranges = ChunkRanges::from(first..ChunkNum(pfn * 4 + 4));
        let mut encoded = Vec::new();
        encode_ranges_validated(&img[..], &ob, &ranges, Cursor::new(&mut encoded)).expect("encode");
        eprintln!(
            "bao-tree {} KiB groups: response for one 4 KiB page {} bytes ({} of proof)",
            1 << log,
            encoded.len(),
            encoded.len().saturating_sub(PAGE)
        );
        let decode = || {
            let mut leaf = 0usize;
            for item in DecodeResponseIter::new(ob.root, bt, Cursor::new(&encoded[..]), &ranges) {
                if let bao_tree::io::BaoContentItem::Leaf(l) =
                    item.expect("verifies against the root")
                {
                    leaf += l.data.len();
                }
            }
            leaf
        };
        // Within a chunk group the encoder hashes the group's data to send only the
        // requested chunks: the response holds the one page either way.
        assert_eq!(decode(), PAGE);
        g.bench_function(format!("bao_tree_range_4k_groups_{}k", 1 << log), |b| {
            b.iter_custom(|n| cpu_time(n, decode))
        });
    }
    g.finish();
}

fn build(c: &mut Criterion) {
    let img = image(32 * MIB);
    let mut g = c.benchmark_group("integrity/build_32mib");
    g.throughput(Throughput::Bytes(img.len() as u64));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(4));
    g.bench_function("hash_tree_from_image_cpu", |b| {
        b.iter_custom(|n| {
            cpu_time(n, || {
                HashTree::from_image(black_box(&img), PAGE)
                    .expect("tree")
                    .root()
            })
        })
    });
    g.bench_function("blake3_hash_reference_cpu", |b| {
        b.iter_custom(|n| cpu_time(n, || blake3::hash(black_box(&img))))
    });
    g.finish();
}

criterion_group!(benches, verify, build);
criterion_main!(benches);
