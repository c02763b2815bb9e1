//! Hash-page and data-page verification ([`mcdist::integrity`]) fed arbitrary page
//! numbers and arbitrary changes to genuine pages, in any order: it never panics, and a
//! page is accepted only when its bytes are the genuine page's (its image bytes or its
//! chaining values, then zeros); genuine pages in sweep order always verify.

use mcdist::integrity::{HashTree, Verifier};

/// An image of `len` bytes from a seed.
fn image(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 10) as u8)
        .collect()
}

/// Input: `[shift, len_lo, len_hi, seed]` choose the page size (1 to 8 KiB) and an image
/// of up to 96 KiB, then 6-byte operations `[pfn_lo, pfn_hi, how, at_lo, at_hi, mask]`
/// offer a page (genuine when `mask` is 0, else with one byte XORed; `how` picks its
/// length and whether it is offered as a hash page or a data page).
pub fn integrity(data: &[u8]) {
    let [shift, a, b, seed, ops @ ..] = data else {
        return;
    };
    // Pages of 1 to 8 KiB, images up to 96 KiB: up to three levels at 1 KiB pages.
    let ps = 1usize << (10 + shift % 4);
    let len = usize::from(u16::from_le_bytes([*a, *b])) * 3 / 2;
    let img = image(len, *seed);
    let Ok(tree) = HashTree::from_image(&img, ps) else {
        return;
    };
    let layout = tree.layout().clone();
    let Ok(mut v) = Verifier::new(layout.clone(), tree.root()) else {
        return;
    };
    let genuine = |pfn: u64| -> Vec<u8> {
        if pfn < layout.data_pages() {
            let start = pfn as usize * ps;
            let mut p = img[start..(start + ps).min(img.len())].to_vec();
            p.resize(ps, 0);
            p
        } else {
            tree.page(pfn).map(<[u8]>::to_vec).unwrap_or_default()
        }
    };
    // Each op: page number (2 bytes, a little past the last page), a length choice, and
    // an XOR mask applied at an offset (zero mask: the genuine page).
    for op in ops.chunks(6) {
        let [p0, p1, how, at0, at1, mask] = *op else {
            return;
        };
        let pfn = u64::from(u16::from_le_bytes([p0, p1])) % (layout.total_pages() + 2);
        let _ = v.missing_for(pfn);
        let mut page = genuine(pfn);
        if page.is_empty() {
            page = vec![mask; usize::from(how)];
        } else {
            let exact = layout.page_len(pfn).unwrap_or(0);
            match how % 4 {
                0 => page.truncate(exact),
                1 => page.truncate(usize::from(how)),
                _ => {}
            }
            let at = usize::from(u16::from_le_bytes([at0, at1])) % page.len().max(1);
            if let Some(byte) = page.get_mut(at) {
                *byte ^= mask;
            }
        }
        let ok = if how & 0x80 != 0 {
            v.verify_hash_page(pfn, &page).is_ok()
        } else {
            v.verify_data_page(pfn, &page).is_ok()
        };
        if ok {
            let want = genuine(pfn);
            assert_eq!(&page[..], &want[..page.len()], "page {pfn} accepted forged");
        }
    }
    // Genuine pages in sweep order always verify, whatever came before.
    for pfn in layout.sweep_order() {
        let page = genuine(pfn);
        let r = if pfn < layout.data_pages() {
            v.verify_data_page(pfn, &page)
        } else {
            v.verify_hash_page(pfn, &page)
        };
        assert!(r.is_ok(), "genuine page {pfn}: {r:?}");
    }
}

/// Seed inputs: small images at each page size, genuine pages in and out of order, and
/// forged ones.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (shift, len) in [(0u8, 40_000u16), (1, 9_000), (2, 60_000), (3, 3_000)] {
        let mut v = vec![shift];
        v.extend(len.to_le_bytes());
        v.push(shift * 17 + 3);
        for pfn in [0u16, 1, 40, 45, 2, 3] {
            let p = pfn.to_le_bytes();
            v.extend([p[0], p[1], 2, 0, 0, 0]); // genuine data page
            v.extend([p[0], p[1], 0x82, 0, 0, 0]); // offered as a hash page
            v.extend([p[0], p[1], 3, 7, 0, 0x10]); // one byte changed
            v.extend([p[0], p[1], 1, 0, 0, 0]); // truncated
        }
        out.push((format!("image-{shift}"), v));
    }
    out
}
