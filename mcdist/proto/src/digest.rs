//! The image digest computed page by page, in whatever order pages arrive.
//!
//! A session names its image by the BLAKE3 hash of the whole image. A receiver that checks
//! its copy by hashing it once complete reads the whole image a second time, after the
//! last page, and every receiver on a host does so at the same moment. BLAKE3 is a tree
//! hash: each page-aligned page (for page sizes that are a power of two of at least one
//! BLAKE3 chunk, 1 KiB) is a complete subtree of the image's tree. [`PageDigest`] hashes
//! each page into its subtree's chaining value when the page arrives, while it is still in
//! the cache, and at the end merges the chaining values the way BLAKE3's tree does
//! (`blake3::hazmat`), giving exactly `blake3::hash(image)`.
//!
//! Memory: 32 bytes per page (1/128 of the image at 4 KiB pages) plus one bit per page.

use crate::bitmap::PageBitmap;
use blake3::hazmat::{self, ChainingValue, HasherExt, Mode};

/// BLAKE3's chunk length: the smallest subtree.
const CHUNK_LEN: usize = 1024;

/// BLAKE3 of an image built from its pages in any order.
///
/// ```
/// use mcdist_proto::digest::PageDigest;
/// let image: Vec<u8> = (0..5 * 4096 + 100).map(|i| (i % 251) as u8).collect();
/// let mut d = PageDigest::new(image.len() as u64, 4096).expect("4 KiB pages");
/// for pfn in [3u64, 0, 5, 1, 4, 2] {
///     let start = pfn as usize * 4096;
///     d.add_page(pfn, &image[start..(start + 4096).min(image.len())]);
/// }
/// assert_eq!(d.finalize(), Some(*blake3::hash(&image).as_bytes()));
/// ```
#[derive(Clone)]
pub struct PageDigest {
    image_size: u64,
    page_size: usize,
    /// Chaining value of the subtree that starts at each page: one page, or a run of
    /// `1 << span` pages added together ([`PageDigest::add_run`]).
    cvs: Vec<ChainingValue>,
    span: Vec<u8>,
    have: PageBitmap,
    /// An image of at most one page is the tree's root: its bytes are kept to hash at the end.
    single: Option<Vec<u8>>,
}

impl std::fmt::Debug for PageDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageDigest")
            .field("image_size", &self.image_size)
            .field("page_size", &self.page_size)
            .field("missing", &self.missing())
            .finish()
    }
}

impl PageDigest {
    /// A digest of an image of `image_size` bytes in pages of `page_size` bytes (the last
    /// page may be shorter). `None` when `page_size` is not a power of two of at least
    /// 1 KiB: such pages are not subtrees of BLAKE3's tree (hash the whole image instead).
    pub fn new(image_size: u64, page_size: usize) -> Option<Self> {
        if page_size < CHUNK_LEN || !page_size.is_power_of_two() {
            return None;
        }
        let pages = image_size.div_ceil(page_size as u64);
        let count = usize::try_from(pages).ok()?;
        Some(Self {
            image_size,
            page_size,
            cvs: if pages > 1 {
                vec![[0u8; 32]; count]
            } else {
                Vec::new()
            },
            span: if pages > 1 {
                vec![0; count]
            } else {
                Vec::new()
            },
            have: PageBitmap::new(pages),
            single: None,
        })
    }

    /// Number of pages of the image.
    pub fn page_count(&self) -> u64 {
        self.have.len()
    }

    /// Pages not added yet.
    pub fn missing(&self) -> u64 {
        self.have.len() - self.have.count_ones()
    }

    /// Bytes of page `pfn` that belong to the image (the last page may be short).
    fn page_len(&self, pfn: u64) -> usize {
        let start = pfn * self.page_size as u64;
        (self.image_size - start).min(self.page_size as u64) as usize
    }

    /// Adds page `pfn`. `data` may be a whole page even where the image ends inside the last
    /// page: bytes past the image are left out. Out-of-range pages and short data are
    /// ignored (returns false); a page already added keeps its first contents (returns
    /// true: a session delivers each page of one image, whose contents do not change).
    pub fn add_page(&mut self, pfn: u64, data: &[u8]) -> bool {
        if pfn >= self.have.len() {
            return false;
        }
        let len = self.page_len(pfn);
        let Some(data) = data.get(..len) else {
            return false;
        };
        if self.have.get(pfn) {
            return true;
        }
        if self.have.len() == 1 {
            self.single = Some(data.to_vec());
        } else {
            self.cvs[pfn as usize] = self.chaining_value(pfn, data);
            self.span[pfn as usize] = 0;
        }
        self.have.set(pfn);
        true
    }

    /// Adds the pages `first`, `first + 1`, … held back to back in `data` (whole pages;
    /// the last may run past the end of the image). Aligned runs of 2, 4, … pages are
    /// hashed as one subtree, which BLAKE3 does several chunks at a time: faster than page
    /// by page. Returns false, adding nothing, when the run does not fit the image or
    /// `data` is not whole pages.
    pub fn add_run(&mut self, first: u64, data: &[u8]) -> bool {
        let ps = self.page_size;
        let n = (data.len() / ps) as u64;
        if data.len() % ps != 0 || first.checked_add(n).is_none_or(|end| end > self.have.len()) {
            return false;
        }
        let mut pfn = first;
        while pfn < first + n {
            let e = self.run_exponent(pfn, first + n - pfn);
            let at = (pfn - first) as usize * ps;
            let k = 1u64 << e;
            if e == 0 || (pfn..pfn + k).any(|p| self.have.get(p)) {
                self.add_page(pfn, &data[at..at + ps]);
                pfn += 1;
                continue;
            }
            let bytes = &data[at..at + k as usize * ps];
            self.cvs[pfn as usize] = self.chaining_value(pfn, bytes);
            self.span[pfn as usize] = e;
            for p in pfn..pfn + k {
                self.have.set(p);
            }
            pfn += k;
        }
        true
    }

    /// The largest `e` such that the `1 << e` pages from `pfn` are aligned to their count,
    /// at most `left`, whole pages of the image, and not the whole image (the tree's root).
    fn run_exponent(&self, pfn: u64, left: u64) -> u8 {
        let mut e = 0u8;
        loop {
            let k = 2u64 << e;
            let end = (pfn + k) * self.page_size as u64;
            if e >= 62
                || pfn % k != 0
                || k > left
                || end > self.image_size
                || end == self.image_size && pfn == 0
            {
                return e;
            }
            e += 1;
        }
    }

    /// Chaining value of `data`, the subtree starting at page `pfn` (not the root).
    fn chaining_value(&self, pfn: u64, data: &[u8]) -> ChainingValue {
        let mut h = blake3::Hasher::new();
        h.set_input_offset(pfn * self.page_size as u64);
        h.update(data);
        h.finalize_non_root()
    }

    /// Adds page `pfn` as all zero (a page of the session's zero map, filled locally).
    pub fn add_zero_page(&mut self, pfn: u64) -> bool {
        // One page of zeros; `add_page` takes the image's part of it.
        thread_local!(static ZEROS: Vec<u8> = vec![0u8; 1 << 16]);
        if self.page_size <= 1 << 16 {
            ZEROS.with(|z| self.add_page(pfn, &z[..self.page_size]))
        } else {
            self.add_page(pfn, &vec![0u8; self.page_size])
        }
    }

    /// Takes what `other`, a digest of the same image, has and this one lacks: digests built
    /// by several threads over disjoint parts of an image merge into one. A run `other`
    /// added whole moves as one piece, and is left out if this digest has any of its pages.
    pub fn absorb(&mut self, other: &PageDigest) {
        if other.image_size != self.image_size || other.page_size != self.page_size {
            return;
        }
        let mut p = 0;
        while p < other.have.len() {
            if !other.have.get(p) {
                p += 1;
                continue;
            }
            // A run other added whole moves as one subtree (its pages have no values of
            // their own); a page moves alone.
            let k = if self.have.len() > 1 {
                1u64 << other.span[p as usize]
            } else {
                1
            };
            if (p..p + k).all(|q| !self.have.get(q)) {
                if self.have.len() > 1 {
                    self.cvs[p as usize] = other.cvs[p as usize];
                    self.span[p as usize] = other.span[p as usize];
                } else {
                    self.single.clone_from(&other.single);
                }
                for q in p..p + k {
                    self.have.set(q);
                }
            }
            p += k;
        }
    }

    /// The image's BLAKE3 hash, once every page was added (`None` before).
    pub fn finalize(&self) -> Option<[u8; 32]> {
        if !self.have.is_full() {
            return None;
        }
        if self.have.len() <= 1 {
            let data = self.single.as_deref().unwrap_or_default();
            return Some(*blake3::hash(data).as_bytes());
        }
        let split = hazmat::left_subtree_len(self.image_size);
        let left = self.subtree(0, split);
        let right = self.subtree(split, self.image_size - split);
        Some(*hazmat::merge_subtrees_root(&left, &right, Mode::Hash).as_bytes())
    }

    /// Chaining value of the subtree of `len` bytes at `offset` (page aligned; `len` is a
    /// power-of-two multiple of the page size, or what is left of the image).
    fn subtree(&self, offset: u64, len: u64) -> ChainingValue {
        let ps = self.page_size as u64;
        let pfn = (offset / ps) as usize;
        // A run added whole is exactly one of these subtrees (aligned runs of a power of two
        // of pages are nodes of BLAKE3's tree).
        if len <= ps || len == ps << self.span[pfn] {
            return self.cvs[pfn];
        }
        // Left subtrees are a power of two of chunks, at least one page long here.
        let split = hazmat::left_subtree_len(len);
        let left = self.subtree(offset, split);
        let right = self.subtree(offset + split, len - split);
        hazmat::merge_subtrees_non_root(&left, &right, Mode::Hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect()
    }

    #[test]
    fn any_order_gives_the_image_hash() {
        for &(len, page) in &[
            (0usize, 4096usize),
            (1, 4096),
            (4096, 4096),
            (4097, 4096),
            (3 * 4096, 4096),
            (17 * 4096 + 1000, 4096),
            (64 * 4096, 4096),
            (5 * 1024 + 7, 1024),
            (9 * 65536, 65536),
        ] {
            let img = image(len);
            let mut d = PageDigest::new(len as u64, page).expect("power of two");
            let pages = len.div_ceil(page) as u64;
            // Reverse order, with whole last pages (padding past the image).
            for pfn in (0..pages).rev() {
                let start = pfn as usize * page;
                let mut buf = vec![0u8; page];
                let end = (start + page).min(len);
                buf[..end - start].copy_from_slice(&img[start..end]);
                assert!(d.add_page(pfn, &buf));
            }
            assert_eq!(d.missing(), 0);
            assert_eq!(
                d.finalize(),
                Some(*blake3::hash(&img).as_bytes()),
                "{len} bytes in pages of {page}"
            );
        }
    }

    #[test]
    fn runs_and_single_pages_mix_in_any_order() {
        let page = 4096;
        for &len in &[2 * page, 16 * page, 37 * page + 5, 64 * page, 100 * page] {
            let img = image(len);
            let pages = len.div_ceil(page) as u64;
            let mut padded = img.clone();
            padded.resize(pages as usize * page, 0);
            let whole =
                |first: u64, n: u64| &padded[first as usize * page..(first + n) as usize * page];
            let mut d = PageDigest::new(len as u64, page).expect("digest");
            // Runs from odd places (3..19 crosses several alignments), a run over the end,
            // singles, and a run over pages already added.
            let mid = pages / 2;
            assert!(d.add_run(
                3.min(pages - 1),
                whole(3.min(pages - 1), (16).min(pages - 3.min(pages - 1)))
            ));
            assert!(d.add_run(mid, whole(mid, pages - mid)));
            for p in (0..pages).rev() {
                assert!(d.add_page(p, whole(p, 1)));
            }
            assert!(d.add_run(0, whole(0, pages)));
            assert_eq!(
                d.finalize(),
                Some(*blake3::hash(&img).as_bytes()),
                "{len} bytes"
            );
            // One run of the whole image (the root cannot be a run; it is split).
            let mut d = PageDigest::new(len as u64, page).expect("digest");
            assert!(d.add_run(0, whole(0, pages)));
            assert_eq!(
                d.finalize(),
                Some(*blake3::hash(&img).as_bytes()),
                "{len} bytes, one run"
            );
            assert!(!d.add_run(pages, whole(0, 1)), "past the end");
            assert!(!d.add_run(0, &padded[..page + 1]), "not whole pages");
        }
    }

    #[test]
    fn incomplete_wrong_or_unsupported_input_gives_no_digest() {
        assert!(PageDigest::new(4096, 4000).is_none());
        assert!(PageDigest::new(4096, 512).is_none());
        let img = image(4 * 4096);
        let mut d = PageDigest::new(img.len() as u64, 4096).expect("digest");
        for pfn in 0..3 {
            d.add_page(pfn, &img[pfn as usize * 4096..][..4096]);
        }
        assert_eq!(d.finalize(), None);
        assert!(!d.add_page(4, &img[..4096]), "out of range");
        assert!(!d.add_page(3, &img[..100]), "short page");
        assert_eq!(d.missing(), 1);
        // Zero pages hash like zeros; a wrong page gives another digest.
        d.add_zero_page(3);
        let mut zeroed = img.clone();
        zeroed[3 * 4096..].fill(0);
        assert_eq!(d.finalize(), Some(*blake3::hash(&zeroed).as_bytes()));
        assert_ne!(d.finalize(), Some(*blake3::hash(&img).as_bytes()));
    }
}
