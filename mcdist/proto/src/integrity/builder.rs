//! Making the hash pages: from the image in one pass, or from per-page chaining values
//! computed elsewhere (a scan that reads every page anyway).
//!
//! Rule: a data page's chaining value is BLAKE3 of its image bytes (not the padding of a
//! short last page) at its offset in the image, as a non-root subtree; each level's CVs
//! are the merges of the level below in groups of the fan-out.

use super::{filled, merge_non_root, merge_root, HashLayout, IntegrityError, PageKind, CV_LEN};
use crate::bitmap::PageBitmap;
use blake3::hazmat::{ChainingValue, HasherExt};

/// The chaining value of data page `pfn` (its image bytes: the first
/// [`HashLayout::page_len`] bytes of `data`; a whole page may be given for the short last
/// page). Fails for an image of at most one page, whose page is the root itself.
pub fn page_chaining_value(
    layout: &HashLayout,
    pfn: u64,
    data: &[u8],
) -> Result<ChainingValue, IntegrityError> {
    if layout.data_pages() <= 1 {
        return Err(IntegrityError::SinglePage);
    }
    let bytes = image_bytes(layout, pfn, data)?;
    Ok(blake3::Hasher::new()
        .set_input_offset(layout.data_offset(pfn))
        .update(bytes)
        .finalize_non_root())
}

/// The image bytes of data page `pfn` from `data`, which holds at least them.
fn image_bytes<'a>(
    layout: &HashLayout,
    pfn: u64,
    data: &'a [u8],
) -> Result<&'a [u8], IntegrityError> {
    if layout.locate(pfn)? != PageKind::Data {
        return Err(IntegrityError::WrongKind {
            pfn,
            expected: "data",
        });
    }
    let exact = layout.page_len(pfn)?;
    data.get(..exact).ok_or(IntegrityError::Length {
        pfn,
        len: data.len(),
        exact,
        page_size: layout.page_size(),
    })
}

/// Collects the data pages' chaining values, in any order, and makes the hash pages.
#[derive(Debug, Clone)]
pub struct TreeBuilder {
    layout: HashLayout,
    cvs: Vec<ChainingValue>,
    have: PageBitmap,
    /// The page of an image of exactly one page (its root).
    single: Option<Vec<u8>>,
}

impl TreeBuilder {
    /// A builder for `layout`'s image. Fails when the image has more pages than this
    /// machine can index.
    pub fn new(layout: HashLayout) -> Result<Self, IntegrityError> {
        let n = layout.data_pages();
        // The chaining values first: the bitmap is 256 times smaller.
        let cvs = filled(if n > 1 { n } else { 0 }, [0; 32], layout.image_size())?;
        Ok(Self {
            cvs,
            have: PageBitmap::new(layout.data_pages()),
            single: None,
            layout,
        })
    }

    /// The layout.
    pub fn layout(&self) -> &HashLayout {
        &self.layout
    }

    /// Data pages not added yet.
    pub fn missing(&self) -> u64 {
        self.have.len() - self.have.count_ones()
    }

    /// Adds data page `pfn` (at least its image bytes; a whole last page may carry padding).
    pub fn add_page(&mut self, pfn: u64, data: &[u8]) -> Result<(), IntegrityError> {
        if self.layout.data_pages() == 1 {
            self.single = Some(image_bytes(&self.layout, pfn, data)?.to_vec());
            self.have.set(pfn);
            return Ok(());
        }
        let cv = page_chaining_value(&self.layout, pfn, data)?;
        self.add_chaining_value(pfn, cv)
    }

    /// Adds the data pages `first`, `first + 1`, … held back to back in `data` (whole
    /// pages; the last may be short at the end of the image).
    pub fn add_pages(&mut self, first: u64, data: &[u8]) -> Result<(), IntegrityError> {
        for (i, page) in data.chunks(self.layout.page_size()).enumerate() {
            self.add_page(first.saturating_add(i as u64), page)?;
        }
        Ok(())
    }

    /// Adds the chaining value of data page `pfn`, computed elsewhere with
    /// [`page_chaining_value`].
    pub fn add_chaining_value(
        &mut self,
        pfn: u64,
        cv: ChainingValue,
    ) -> Result<(), IntegrityError> {
        if self.layout.locate(pfn)? != PageKind::Data {
            return Err(IntegrityError::WrongKind {
                pfn,
                expected: "data",
            });
        }
        let slot = self
            .cvs
            .get_mut(pfn as usize)
            .ok_or(IntegrityError::SinglePage)?;
        *slot = cv;
        self.have.set(pfn);
        Ok(())
    }

    /// Takes the pages `other`, a builder of the same image, has and this one lacks:
    /// builders filled by several threads over disjoint parts of an image merge into one.
    pub fn absorb(&mut self, other: &TreeBuilder) {
        if other.layout != self.layout {
            return;
        }
        for pfn in 0..other.have.len() {
            if other.have.get(pfn) && !self.have.get(pfn) {
                if let (Some(to), Some(from)) =
                    (self.cvs.get_mut(pfn as usize), other.cvs.get(pfn as usize))
                {
                    *to = *from;
                }
                self.single.clone_from(&other.single);
                self.have.set(pfn);
            }
        }
    }

    /// The hash pages and the root, once every data page was added.
    pub fn finish(&self) -> Result<HashTree, IntegrityError> {
        let missing = self.missing();
        if missing > 0 {
            return Err(IntegrityError::Incomplete { missing });
        }
        let layout = self.layout.clone();
        let ps = layout.page_size();
        if layout.levels() == 0 {
            let root = blake3::hash(self.single.as_deref().unwrap_or_default());
            return Ok(HashTree {
                layout,
                root: *root.as_bytes(),
                bytes: Vec::new(),
            });
        }
        let mut bytes = filled(layout.overhead_bytes(), 0u8, layout.image_size())?;
        let fan = layout.fanout();
        let mut below = self.cvs.clone();
        let mut root = None;
        for level in 1..=layout.levels() {
            let first = layout
                .hash_pfn(level, 0)
                .map(|p| p - layout.data_pages())
                .unwrap_or_default() as usize;
            // A level's pages hold its children back to back, the last page padded.
            let at = first * ps;
            for (cv, out) in below.iter().zip(bytes[at..].chunks_exact_mut(CV_LEN)) {
                out.copy_from_slice(cv);
            }
            if level == layout.levels() {
                root = merge_root(&below);
                break;
            }
            below = below
                .chunks(fan)
                .map(|c| merge_non_root(c).unwrap_or_default())
                .collect();
        }
        // The top level holds at least two children (the layout stops above one page).
        let root = root.ok_or(IntegrityError::SinglePage)?;
        Ok(HashTree {
            layout,
            root: *root.as_bytes(),
            bytes,
        })
    }
}

/// An image's hash pages and root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashTree {
    layout: HashLayout,
    root: [u8; 32],
    /// Every hash page, whole, in page-number order.
    bytes: Vec<u8>,
}

impl HashTree {
    /// Builds the hash pages of `image` in pages of `page_size`, in one pass.
    pub fn from_image(image: &[u8], page_size: usize) -> Result<Self, IntegrityError> {
        let layout = HashLayout::new(image.len() as u64, page_size)?;
        let mut b = TreeBuilder::new(layout)?;
        b.add_pages(0, image)?;
        b.finish()
    }

    /// The layout.
    pub fn layout(&self) -> &HashLayout {
        &self.layout
    }

    /// The image's root: `blake3::hash(image)`.
    pub fn root(&self) -> [u8; 32] {
        self.root
    }

    /// Hash page `pfn` (a page number after the data pages), a whole page with zero padding.
    pub fn page(&self, pfn: u64) -> Option<&[u8]> {
        let h = pfn.checked_sub(self.layout.data_pages())?;
        let ps = self.layout.page_size();
        let at = usize::try_from(h).ok()?.checked_mul(ps)?;
        self.bytes.get(at..at.checked_add(ps)?)
    }

    /// Every hash page back to back, in page-number order (top level first).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}
