//! Checking pages against the root, top-down.
//!
//! Rule: a hash page is accepted only when its parent is verified (the top one against the
//! root) and its chaining values merge into its parent's entry; a data page only when its
//! level-1 hash page is verified and its chaining value is that page's entry. Verified
//! hash pages are cached, so a data page costs one BLAKE3 of the page and one compare.

use super::{filled, merge_non_root, merge_root, HashLayout, IntegrityError, PageKind, CV_LEN};
use blake3::hazmat::{ChainingValue, HasherExt};

/// Verifies pages of one image against its root, caching verified hash pages.
#[derive(Debug, Clone)]
pub struct Verifier {
    layout: HashLayout,
    root: blake3::Hash,
    /// Verified hash pages' chaining values, by hash index.
    cache: Vec<Option<Box<[ChainingValue]>>>,
    verified: u64,
}

impl Verifier {
    /// A verifier of `layout`'s image, whose BLAKE3 hash is `root`.
    pub fn new(layout: HashLayout, root: [u8; 32]) -> Result<Self, IntegrityError> {
        Ok(Self {
            cache: filled(layout.hash_pages(), None, layout.image_size())?,
            layout,
            root: blake3::Hash::from_bytes(root),
            verified: 0,
        })
    }

    /// The layout.
    pub fn layout(&self) -> &HashLayout {
        &self.layout
    }

    /// Hash pages verified so far.
    pub fn verified_hash_pages(&self) -> u64 {
        self.verified
    }

    /// Whether hash page `pfn` is verified (false for data pages and out-of-range numbers).
    pub fn is_verified(&self, pfn: u64) -> bool {
        self.cached(pfn).is_some()
    }

    fn cached(&self, pfn: u64) -> Option<&[ChainingValue]> {
        let h = pfn.checked_sub(self.layout.data_pages())?;
        self.cache.get(usize::try_from(h).ok()?)?.as_deref()
    }

    /// The hash pages that must be fetched and verified before `pfn` can be, top level
    /// first (empty when `pfn` can be verified now).
    pub fn missing_for(&self, pfn: u64) -> Result<Vec<u64>, IntegrityError> {
        let mut missing = Vec::new();
        let mut at = pfn;
        // Verified pages have verified parents: stop at the first one.
        while let Some(slot) = self.layout.parent(at)? {
            if self.is_verified(slot.pfn) {
                break;
            }
            missing.push(slot.pfn);
            at = slot.pfn;
        }
        missing.reverse();
        Ok(missing)
    }

    /// The entry of `pfn` in its verified parent; `Ok(None)` when `pfn` is checked against
    /// the root.
    fn expected(&self, pfn: u64) -> Result<Option<ChainingValue>, IntegrityError> {
        let Some(slot) = self.layout.parent(pfn)? else {
            return Ok(None);
        };
        let cvs = self.cached(slot.pfn).ok_or(IntegrityError::Missing {
            pfn,
            needs: slot.pfn,
        })?;
        cvs.get(slot.entry)
            .copied()
            .map(Some)
            .ok_or(IntegrityError::Mismatch { pfn })
    }

    /// Verifies hash page `pfn` and caches it. `bytes` is the whole page (zero padded) or
    /// exactly its chaining values. Verifying a page again is allowed.
    pub fn verify_hash_page(&mut self, pfn: u64, bytes: &[u8]) -> Result<(), IntegrityError> {
        let PageKind::Hash { level, index } = self.layout.locate(pfn)? else {
            return Err(IntegrityError::WrongKind {
                pfn,
                expected: "hash",
            });
        };
        let body = checked_body(&self.layout, pfn, bytes)?;
        let cvs: Box<[ChainingValue]> = body
            .chunks_exact(CV_LEN)
            .map(|c| {
                let mut cv = [0u8; CV_LEN];
                cv.copy_from_slice(c);
                cv
            })
            .collect();
        let ok = if level == self.layout.levels() && index == 0 {
            merge_root(&cvs).is_some_and(|r| r == self.root)
        } else {
            let want = self
                .expected(pfn)?
                .ok_or(IntegrityError::Mismatch { pfn })?;
            merge_non_root(&cvs)
                .is_some_and(|got| blake3::Hash::from_bytes(got) == blake3::Hash::from_bytes(want))
        };
        if !ok {
            return Err(IntegrityError::Mismatch { pfn });
        }
        let h = (pfn - self.layout.data_pages()) as usize;
        if let Some(slot) = self.cache.get_mut(h) {
            if slot.is_none() {
                self.verified += 1;
            }
            *slot = Some(cvs);
        }
        Ok(())
    }

    /// Verifies data page `pfn`: `data` is its image bytes, or a whole page whose bytes
    /// past the image are zero.
    pub fn verify_data_page(&self, pfn: u64, data: &[u8]) -> Result<(), IntegrityError> {
        if self.layout.locate(pfn)? != PageKind::Data {
            return Err(IntegrityError::WrongKind {
                pfn,
                expected: "data",
            });
        }
        let body = checked_body(&self.layout, pfn, data)?;
        let ok = match self.expected(pfn)? {
            // An image of one page is its own root.
            None => blake3::hash(body) == self.root,
            Some(want) => {
                let got = blake3::Hasher::new()
                    .set_input_offset(self.layout.data_offset(pfn))
                    .update(body)
                    .finalize_non_root();
                blake3::Hash::from_bytes(got) == blake3::Hash::from_bytes(want)
            }
        };
        if ok {
            Ok(())
        } else {
            Err(IntegrityError::Mismatch { pfn })
        }
    }
}

/// The meaningful bytes of page `pfn` from `bytes`: exactly them, or a whole page whose
/// remaining bytes are zero.
fn checked_body<'a>(
    layout: &HashLayout,
    pfn: u64,
    bytes: &'a [u8],
) -> Result<&'a [u8], IntegrityError> {
    let exact = layout.page_len(pfn)?;
    let page_size = layout.page_size();
    if bytes.len() != exact && bytes.len() != page_size {
        return Err(IntegrityError::Length {
            pfn,
            len: bytes.len(),
            exact,
            page_size,
        });
    }
    let (body, pad) = bytes.split_at(exact);
    if !crate::source::is_zero(pad) {
        return Err(IntegrityError::Padding { pfn });
    }
    Ok(body)
}
