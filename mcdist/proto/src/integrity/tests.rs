//! Layout, build and verification against `blake3::hash`, for every length class: empty,
//! short, one page, a short last page, full levels and one past them.

use super::*;
use proptest::prelude::*;

fn image(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Whole page `pfn` of `img`, zero padded.
fn data_page(img: &[u8], ps: usize, pfn: u64) -> Vec<u8> {
    let start = pfn as usize * ps;
    let mut page = img[start..(start + ps).min(img.len())].to_vec();
    page.resize(ps, 0);
    page
}

/// Builds, checks the root and the layout, verifies every page top-down (whole and exact
/// lengths), and checks that data before its hash page is reported missing.
fn check_image(img: &[u8], ps: usize) -> Result<HashTree, TestCaseError> {
    let tree = HashTree::from_image(img, ps).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let l = tree.layout();
    prop_assert_eq!(tree.root(), *blake3::hash(img).as_bytes());
    check_layout(l)?;
    // The same tree from chaining values added in reverse order by two builders, odd and
    // even pages, merged into one.
    if l.data_pages() > 1 {
        let mut b = TreeBuilder::new(l.clone()).expect("layout");
        let mut odd = b.clone();
        for pfn in (0..l.data_pages()).rev() {
            let cv = page_chaining_value(l, pfn, &data_page(img, ps, pfn)).expect("cv");
            let to = if pfn % 2 == 1 { &mut odd } else { &mut b };
            to.add_chaining_value(pfn, cv).expect("data page");
        }
        prop_assert_eq!(b.missing(), l.data_pages() / 2);
        b.absorb(&odd);
        prop_assert_eq!(&b.finish().expect("complete"), &tree);
    }
    let mut v = Verifier::new(l.clone(), tree.root()).expect("verifier");
    // Data first: refused as missing, naming the top of its path.
    for pfn in 0..l.data_pages() {
        let missing = v.missing_for(pfn).expect("in range");
        prop_assert_eq!(&missing, &l.path(pfn).expect("in range"));
        let r = v.verify_data_page(pfn, &data_page(img, ps, pfn));
        if let Some(&needs) = missing.last() {
            prop_assert_eq!(r, Err(IntegrityError::Missing { pfn, needs }));
        } else {
            prop_assert_eq!(r, Ok(()));
        }
    }
    // A lower hash page before its parent: missing too.
    if l.levels() >= 2 {
        let low = l.hash_pfn(1, 0).expect("level 1");
        let page = tree.page(low).expect("hash page");
        let r = v.verify_hash_page(low, page);
        prop_assert!(matches!(r, Err(IntegrityError::Missing { .. })), "{:?}", r);
    }
    // Hash pages in page-number order (top first): each verifies, whole or exact.
    for pfn in l.data_pages()..l.total_pages() {
        prop_assert_eq!(v.missing_for(pfn).expect("in range"), Vec::<u64>::new());
        let page = tree.page(pfn).expect("hash page");
        let exact = l.page_len(pfn).expect("in range");
        prop_assert_eq!(v.verify_hash_page(pfn, &page[..exact]), Ok(()));
        prop_assert_eq!(v.verify_hash_page(pfn, page), Ok(()));
    }
    prop_assert_eq!(v.verified_hash_pages(), l.hash_pages());
    for pfn in 0..l.data_pages() {
        prop_assert!(v.missing_for(pfn).expect("in range").is_empty());
        let page = data_page(img, ps, pfn);
        let exact = l.page_len(pfn).expect("in range");
        prop_assert_eq!(v.verify_data_page(pfn, &page), Ok(()));
        prop_assert_eq!(v.verify_data_page(pfn, &page[..exact]), Ok(()));
    }
    Ok(tree)
}

/// Counts, numbering, parents, paths and coverage agree with each other.
fn check_layout(l: &HashLayout) -> Result<(), TestCaseError> {
    let fan = l.fanout() as u64;
    prop_assert_eq!(
        l.data_pages(),
        l.image_size().div_ceil(l.page_size() as u64)
    );
    let sum: u64 = (1..=l.levels()).map(|j| l.level_pages(j)).sum();
    prop_assert_eq!(sum, l.hash_pages());
    prop_assert_eq!(l.levels() == 0, l.data_pages() <= 1);
    if l.levels() > 0 {
        prop_assert_eq!(l.level_pages(l.levels()), 1);
        // The top page holds at least two entries: it merges into the root.
        prop_assert!(l.entries(l.levels(), 0) >= 2);
    }
    let mut below = l.data_pages();
    for j in 1..=l.levels() {
        prop_assert_eq!(l.level_pages(j), below.div_ceil(fan));
        let entries: u64 = (0..l.level_pages(j)).map(|i| l.entries(j, i) as u64).sum();
        prop_assert_eq!(entries, below);
        below = l.level_pages(j);
    }
    // Top level first: levels occupy consecutive numbers, higher levels lower numbers.
    let mut next = l.data_pages();
    for j in (1..=l.levels()).rev() {
        prop_assert_eq!(l.hash_pfn(j, 0), Some(next));
        next += l.level_pages(j);
        prop_assert_eq!(l.hash_pfn(j, l.level_pages(j)), None);
    }
    prop_assert_eq!(next, l.total_pages());
    prop_assert_eq!(l.overhead_bytes(), l.hash_pages() * l.page_size() as u64);
    for pfn in 0..l.total_pages() {
        let kind = l.locate(pfn).expect("in range");
        let covered = l.covered(pfn).expect("in range");
        prop_assert!(!covered.is_empty());
        match (kind, l.parent(pfn).expect("in range")) {
            (PageKind::Data, None) => prop_assert_eq!(l.data_pages(), 1),
            (PageKind::Hash { level, .. }, None) => prop_assert_eq!(level, l.levels()),
            (kind, Some(slot)) => {
                // The parent comes earlier in page-number order for hash pages, covers
                // this page, and holds it in one of its entries.
                let PageKind::Hash { level, index } = l.locate(slot.pfn).expect("parent") else {
                    return Err(TestCaseError::fail("parent is a data page"));
                };
                prop_assert_eq!(level, slot.level);
                prop_assert!(slot.entry < l.entries(level, index));
                let pc = l.covered(slot.pfn).expect("parent");
                prop_assert!(pc.start <= covered.start && covered.end <= pc.end);
                if let PageKind::Hash { level: own, .. } = kind {
                    prop_assert_eq!(level, own + 1);
                    prop_assert!(slot.pfn < pfn);
                } else {
                    prop_assert_eq!(level, 1);
                }
            }
        }
        let path = l.path(pfn).expect("in range");
        prop_assert_eq!(
            path.len() as u32,
            match kind {
                PageKind::Data => l.levels(),
                PageKind::Hash { level, .. } => l.levels() - level,
            }
        );
        prop_assert!(path.windows(2).all(|w| w[0] < w[1]));
    }
    // The sweep order: every page once, each after the hash page above it.
    let mut seen = crate::bitmap::PageBitmap::new(l.total_pages());
    for pfn in l.sweep_order() {
        prop_assert!(!seen.get(pfn), "page {} twice", pfn);
        if let Some(slot) = l.parent(pfn).expect("in range") {
            prop_assert!(seen.get(slot.pfn), "page {} before its parent", pfn);
        }
        seen.set(pfn);
    }
    prop_assert!(seen.is_full());
    let end = l.total_pages();
    let r = l.locate(end);
    prop_assert!(
        matches!(r, Err(IntegrityError::OutOfRange { .. })),
        "{:?}",
        r
    );
    prop_assert!(l.parent(u64::MAX).is_err() && l.path(end).is_err() && l.covered(end).is_err());
    Ok(())
}

/// A copy of `bytes` with byte `at` changed.
fn flipped(bytes: &[u8], at: usize) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[at] ^= 0x5a;
    b
}

#[test]
fn edge_lengths_give_the_image_hash_and_verify() {
    for ps in [1024usize, 4096] {
        for len in [
            0,
            1,
            1023,
            1024,
            ps - 1,
            ps,
            ps + 1,
            2 * ps,
            3 * ps + 17,
            (ps / 32) * ps,
            (ps / 32) * ps + 1,
            (ps / 32 + 1) * ps,
        ] {
            check_image(&image(len, len as u64), ps).unwrap_or_else(|e| panic!("{len}/{ps}: {e}"));
        }
    }
    // Three levels at 1 KiB pages (fan-out 32): 32 * 32 pages and one byte more.
    let img = image(32 * 32 * 1024 + 1, 9);
    let tree = check_image(&img, 1024).expect("three levels");
    assert_eq!(tree.layout().levels(), 3);
    assert_eq!(
        (1..=3)
            .map(|j| tree.layout().level_pages(j))
            .collect::<Vec<_>>(),
        [33, 2, 1]
    );
}

#[test]
fn layout_of_large_images_and_its_overhead() {
    let mib = 1u64 << 20;
    let l = HashLayout::new(256 * mib, 4096).expect("4 KiB pages");
    assert_eq!(l.fanout(), 128);
    assert_eq!(
        (l.level_pages(1), l.level_pages(2), l.level_pages(3)),
        (512, 4, 1)
    );
    assert_eq!(l.hash_pages(), 517);
    let l = HashLayout::new(1024 * mib, 4096).expect("4 KiB pages");
    assert_eq!(l.hash_pages(), 2048 + 16 + 1);
    assert!(l.overhead_bytes() * 100 < 2 * l.image_size(), "under 2 %");
    // Top first: the root page right after the data, level 1 last.
    let n = l.data_pages();
    assert_eq!(l.locate(n), Ok(PageKind::Hash { level: 3, index: 0 }));
    assert_eq!(l.locate(n + 1), Ok(PageKind::Hash { level: 2, index: 0 }));
    assert_eq!(l.locate(n + 17), Ok(PageKind::Hash { level: 1, index: 0 }));
    assert_eq!(l.path(130), Ok(vec![n, n + 1, n + 18]));
    assert_eq!(l.covered(n + 1), Ok(0..128 * 128));
    // Huge images: numbered or refused, never a panic.
    assert!(HashLayout::new(u64::MAX, 1024).is_ok());
    assert!(HashLayout::new(u64::MAX, 1 << 21).is_ok());
    let huge = HashLayout::new(u64::MAX, 1024).expect("numbered");
    assert!(matches!(
        TreeBuilder::new(huge.clone()),
        Err(IntegrityError::TooLarge { .. })
    ));
    assert!(huge.covered(huge.total_pages() - 1).is_ok());
    for ps in [0usize, 512, 1000, 3 << 10] {
        assert_eq!(
            HashLayout::new(4096, ps),
            Err(IntegrityError::PageSize { page_size: ps })
        );
    }
}

#[test]
fn sweep_positions_follow_the_sweep_order() {
    // Sizes with no hash pages, one short group, and many groups (the last one short).
    for (size, ps) in [
        (0u64, 4096usize),
        (100, 4096),
        (300 * 4096 + 5, 4096),
        (20_000 * 1024, 1024),
        (200_000 * 4096 + 7, 4096),
    ] {
        let l = HashLayout::new(size, ps).unwrap();
        let order: Vec<u64> = l.sweep_order().collect();
        assert_eq!(order.len() as u64, l.total_pages());
        let mut data = 0;
        for (i, &p) in order.iter().enumerate() {
            assert_eq!(l.sweep_at(i as u64), p, "{size} bytes, position {i}");
            assert_eq!(
                l.sweep_data_before(i as u64),
                data,
                "{size} bytes, position {i}"
            );
            data += u64::from(p < l.data_pages());
        }
        assert_eq!(l.sweep_data_before(l.total_pages()), l.data_pages());
        // Level-1 hash pages go out in runs of consecutive numbers, a group at a time.
        let level1: Vec<usize> = order
            .iter()
            .enumerate()
            .filter(|(_, &p)| matches!(l.locate(p), Ok(PageKind::Hash { level: 1, .. })))
            .map(|(i, _)| i)
            .collect();
        for (n, w) in level1.windows(2).enumerate() {
            let same_group = (n as u64 + 1) % SWEEP_HASH_GROUP != 0;
            assert_eq!(
                w[1] == w[0] + 1,
                same_group,
                "{size} bytes, level-1 page {n}"
            );
        }
    }
}

#[test]
fn bad_input_is_refused_without_panic() {
    let ps = 4096;
    let img = image(5 * ps + 100, 3);
    let tree = HashTree::from_image(&img, ps).expect("tree");
    let l = tree.layout().clone();
    let top = l.data_pages();
    let mut v = Verifier::new(l.clone(), tree.root()).expect("verifier");
    let top_page = tree.page(top).expect("top");
    for bad in [&top_page[..31], &top_page[..0], &[0u8; 4097][..]] {
        assert!(matches!(
            v.verify_hash_page(top, bad),
            Err(IntegrityError::Length { .. })
        ));
    }
    let mut padded = top_page.to_vec();
    padded[ps - 1] = 1;
    assert_eq!(
        v.verify_hash_page(top, &padded),
        Err(IntegrityError::Padding { pfn: top })
    );
    assert_eq!(
        v.verify_hash_page(0, top_page),
        Err(IntegrityError::WrongKind {
            pfn: 0,
            expected: "hash"
        })
    );
    for pfn in [top + 1, u64::MAX] {
        assert!(matches!(
            v.verify_hash_page(pfn, top_page),
            Err(IntegrityError::OutOfRange { .. })
        ));
        assert!(matches!(
            v.verify_data_page(pfn, top_page),
            Err(IntegrityError::OutOfRange { .. })
        ));
        assert!(v.missing_for(pfn).is_err());
        assert!(!v.is_verified(pfn));
    }
    v.verify_hash_page(top, top_page).expect("top page");
    assert_eq!(
        v.verify_data_page(top, top_page),
        Err(IntegrityError::WrongKind {
            pfn: top,
            expected: "data"
        })
    );
    // The last page: image bytes or a whole page with zero padding, nothing else.
    let last = data_page(&img, ps, 5);
    assert_eq!(v.verify_data_page(5, &last[..100]), Ok(()));
    assert!(matches!(
        v.verify_data_page(5, &last[..101]),
        Err(IntegrityError::Length { .. })
    ));
    assert_eq!(
        v.verify_data_page(5, &flipped(&last, 100)),
        Err(IntegrityError::Padding { pfn: 5 })
    );
    // Another image's pages, or a page at another number, do not verify.
    let other = image(5 * ps + 100, 4);
    assert_eq!(
        v.verify_data_page(1, &other[ps..2 * ps]),
        Err(IntegrityError::Mismatch { pfn: 1 })
    );
    assert_eq!(
        v.verify_data_page(1, &img[..ps]),
        Err(IntegrityError::Mismatch { pfn: 1 })
    );
    let wrong_root = Verifier::new(l.clone(), [7; 32]).expect("verifier");
    let mut wrong_root = wrong_root;
    assert_eq!(
        wrong_root.verify_hash_page(top, top_page),
        Err(IntegrityError::Mismatch { pfn: top })
    );
    // The builder: incomplete, wrong numbers, short pages, one-page images.
    let mut b = TreeBuilder::new(l.clone()).expect("builder");
    assert_eq!(b.finish(), Err(IntegrityError::Incomplete { missing: 6 }));
    assert!(matches!(
        b.add_page(6, &img[..ps]),
        Err(IntegrityError::WrongKind { .. })
    ));
    assert!(matches!(
        b.add_page(99, &img[..ps]),
        Err(IntegrityError::OutOfRange { .. })
    ));
    assert!(matches!(
        b.add_page(0, &img[..10]),
        Err(IntegrityError::Length { .. })
    ));
    let one = HashLayout::new(100, ps).expect("one page");
    assert_eq!(
        page_chaining_value(&one, 0, &img[..100]),
        Err(IntegrityError::SinglePage)
    );
    let mut b = TreeBuilder::new(one).expect("builder");
    assert_eq!(
        b.add_chaining_value(0, [0; 32]),
        Err(IntegrityError::SinglePage)
    );
    b.add_page(0, &img[..ps])
        .expect("whole page, image bytes taken");
    assert_eq!(
        b.finish().map(|t| t.root()),
        Ok(*blake3::hash(&img[..100]).as_bytes())
    );
    let empty = HashTree::from_image(&[], ps).expect("empty image");
    assert_eq!(empty.root(), *blake3::hash(&[]).as_bytes());
    let v = Verifier::new(empty.layout().clone(), empty.root()).expect("verifier");
    assert!(matches!(
        v.verify_data_page(0, &[]),
        Err(IntegrityError::OutOfRange { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Any length up to a bit over 1 MiB, pages of 1 to 8 KiB: the root is the image's
    /// BLAKE3, every page verifies, and one flipped byte in any data or hash page is refused.
    #[test]
    fn every_page_verifies_and_any_flip_is_refused(
        len in prop_oneof![0usize..3 * 8192, 0usize..(1 << 20) + 8192],
        shift in 10u32..=13,
        seed in any::<u64>(),
        data_at in any::<prop::sample::Index>(),
        hash_at in any::<prop::sample::Index>(),
        byte in any::<prop::sample::Index>(),
    ) {
        let ps = 1usize << shift;
        let img = image(len, seed);
        let tree = check_image(&img, ps)?;
        let l = tree.layout();
        let mut v = Verifier::new(l.clone(), tree.root()).expect("verifier");
        // A forged hash page, at every level of a path, is refused and not cached.
        if l.hash_pages() > 0 {
            let pfn = l.data_pages() + hash_at.index(l.hash_pages() as usize) as u64;
            for p in l.path(pfn).expect("in range") {
                v.verify_hash_page(p, tree.page(p).expect("hash page")).expect("path");
            }
            let page = tree.page(pfn).expect("hash page");
            let exact = l.page_len(pfn).expect("in range");
            let bad = flipped(&page[..exact], byte.index(exact));
            prop_assert_eq!(v.verify_hash_page(pfn, &bad), Err(IntegrityError::Mismatch { pfn }));
            prop_assert!(!v.is_verified(pfn));
            // A flip in the padding is refused too.
            if exact < ps {
                let bad = flipped(page, exact + byte.index(ps - exact));
                prop_assert_eq!(v.verify_hash_page(pfn, &bad), Err(IntegrityError::Padding { pfn }));
            }
            prop_assert_eq!(v.verify_hash_page(pfn, page), Ok(()));
        }
        if l.data_pages() > 0 {
            let pfn = data_at.index(l.data_pages() as usize) as u64;
            for p in l.path(pfn).expect("in range") {
                v.verify_hash_page(p, tree.page(p).expect("hash page")).expect("path");
            }
            let page = data_page(&img, ps, pfn);
            let exact = l.page_len(pfn).expect("in range");
            let bad = flipped(&page[..exact], byte.index(exact));
            prop_assert_eq!(v.verify_data_page(pfn, &bad), Err(IntegrityError::Mismatch { pfn }));
            prop_assert_eq!(v.verify_data_page(pfn, &page), Ok(()));
        }
    }

    /// Every byte of a small image's pages, flipped, is refused.
    #[test]
    fn every_byte_of_a_small_image_is_covered(len in 1usize..3 * 1024 + 10, seed in any::<u64>()) {
        let ps = 1024;
        let img = image(len, seed);
        let tree = check_image(&img, ps)?;
        let l = tree.layout();
        let mut v = Verifier::new(l.clone(), tree.root()).expect("verifier");
        for pfn in l.data_pages()..l.total_pages() {
            let page = tree.page(pfn).expect("hash page");
            for at in 0..ps {
                prop_assert!(v.verify_hash_page(pfn, &flipped(page, at)).is_err());
            }
            v.verify_hash_page(pfn, page).expect("genuine");
        }
        for pfn in 0..l.data_pages() {
            let page = data_page(&img, ps, pfn);
            for at in 0..ps {
                prop_assert!(v.verify_data_page(pfn, &flipped(&page, at)).is_err());
            }
        }
    }
}
