//! Per-page integrity against the image's BLAKE3 root.
//!
//! A session names its image by `blake3::hash(image)` (the digest of [`crate::digest`] and
//! the announce). BLAKE3 is a tree over 1 KiB chunks, left-balanced: a node's left child
//! covers the largest power of two of chunks shorter than the node. For pages that are a
//! power of two of at least one chunk, every aligned run of `2^k` pages inside the image
//! is therefore a node of that tree, and so is the run that starts at such a boundary and
//! ends with the image (its last, possibly short, page). Each page is a subtree, and a
//! receiver can verify one page against the root given the chaining values (CVs) of the
//! nodes on its way up.
//!
//! Those CVs travel as **hash pages**, numbered after the data pages (see [`HashLayout`]):
//!
//! - a level-1 hash page holds the CVs of `F = page_size / 32` consecutive data pages
//!   (128 for 4 KiB pages), 32 bytes each, padded with zeros to a whole page;
//! - a level-`j` hash page holds the CVs of the `F` consecutive subtrees that level
//!   `j - 1` pages cover (`F^(j-1)` data pages each);
//! - the top level is one page. Its CVs merge (left-balanced) into the root with BLAKE3's
//!   root flag, which must equal the digest; any other hash page's CVs merge into one
//!   non-root CV, which must equal its entry in its (already verified) parent.
//!
//! An image of at most one page has no hash pages: that page is the root itself. Overhead:
//! about `1 / (F - 1)` of the image (0.79 % at 4 KiB pages).
//!
//! The module is pure: [`TreeBuilder`] makes the hash pages (from the image, or from
//! per-page CVs computed elsewhere), [`Verifier`] checks hash pages top-down, caches them,
//! and checks data pages below them. No input panics; every refusal is an
//! [`IntegrityError`].
//!
//! ```
//! use mcdist_proto::integrity::{HashTree, IntegrityError, Verifier};
//! let image: Vec<u8> = (0..300 * 4096 + 5).map(|i| (i % 251) as u8).collect();
//! // Server: hash pages from the image; the root is the digest the descriptor carries.
//! let tree = HashTree::from_image(&image, 4096)?;
//! assert_eq!(tree.root(), *blake3::hash(&image).as_bytes());
//! // Receiver: knows only the layout and the root.
//! let mut v = Verifier::new(tree.layout().clone(), tree.root())?;
//! let page = &image[200 * 4096..201 * 4096];
//! let path = v.missing_for(200)?; // top level first
//! assert!(matches!(v.verify_data_page(200, page), Err(IntegrityError::Missing { .. })));
//! for pfn in path {
//!     v.verify_hash_page(pfn, tree.page(pfn).expect("hash page"))?;
//! }
//! v.verify_data_page(200, page)?;
//! assert!(v.verify_data_page(201, page).is_err());
//! # Ok::<(), IntegrityError>(())
//! ```

mod builder;
mod layout;
mod verify;

#[cfg(test)]
mod tests;

pub use builder::{page_chaining_value, HashTree, TreeBuilder};
pub use layout::{HashLayout, PageKind, Slot, SWEEP_HASH_GROUP};
pub use verify::Verifier;

use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, ChainingValue, Mode};

/// Bytes of one chaining value in a hash page.
pub const CV_LEN: usize = 32;

/// Why a page (or a layout) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IntegrityError {
    /// Pages are not subtrees of BLAKE3's tree: the page size is not a power of two of at
    /// least 1 KiB.
    #[error("page size {page_size} is not a power of two of at least 1024")]
    PageSize {
        /// The page size asked for.
        page_size: usize,
    },
    /// The image's page numbers (data and hash pages) do not fit in 64 bits.
    #[error("image of {image_size} bytes is too large to number its pages")]
    TooLarge {
        /// The image size asked for.
        image_size: u64,
    },
    /// A page number past the last hash page.
    #[error("page {pfn} is out of range ({total} pages with hash pages)")]
    OutOfRange {
        /// The page number.
        pfn: u64,
        /// Data pages plus hash pages.
        total: u64,
    },
    /// A data page where a hash page was expected, or the reverse.
    #[error("page {pfn} is not a {expected} page")]
    WrongKind {
        /// The page number.
        pfn: u64,
        /// "data" or "hash".
        expected: &'static str,
    },
    /// The bytes are neither a whole page nor exactly the page's meaningful length.
    #[error("page {pfn}: {len} bytes, expected {exact} or {page_size}")]
    Length {
        /// The page number.
        pfn: u64,
        /// Bytes given.
        len: usize,
        /// The page's meaningful bytes (image bytes, or CVs of a hash page).
        exact: usize,
        /// A whole page.
        page_size: usize,
    },
    /// A whole page whose bytes past the image (or past a hash page's CVs) are not zero.
    #[error("page {pfn}: non-zero padding")]
    Padding {
        /// The page number.
        pfn: u64,
    },
    /// The hash page above this one is not verified yet: fetch and verify it first
    /// ([`Verifier::missing_for`] lists the whole path).
    #[error("page {pfn} needs hash page {needs} verified first")]
    Missing {
        /// The page number.
        pfn: u64,
        /// The hash page to verify first.
        needs: u64,
    },
    /// The page does not hash to what its parent (or the root) says.
    #[error("page {pfn} does not match the image's hash tree")]
    Mismatch {
        /// The page number.
        pfn: u64,
    },
    /// The builder lacks pages.
    #[error("{missing} data pages not added")]
    Incomplete {
        /// Pages not added yet.
        missing: u64,
    },
    /// An image of at most one page is its own root: it has no chaining value to add.
    #[error("an image of one page is hashed as a whole, not by chaining value")]
    SinglePage,
}

/// A vector of `n` copies of `value`, or `TooLarge` when it cannot be allocated (an
/// allocation failure is an error here, not an abort).
fn filled<T: Clone>(n: u64, value: T, image_size: u64) -> Result<Vec<T>, IntegrityError> {
    let too_large = IntegrityError::TooLarge { image_size };
    let n = usize::try_from(n).map_err(|_| too_large.clone())?;
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| too_large)?;
    v.resize(n, value);
    Ok(v)
}

/// Merges the CVs of consecutive sibling subtrees (all but the last of one power-of-two
/// size, the last possibly shorter) into the CV of the node they make up, splitting the way
/// BLAKE3 does: the left part is the largest power of two of them, fewer than all.
/// `None` for an empty slice.
fn merge_non_root(cvs: &[ChainingValue]) -> Option<ChainingValue> {
    match cvs {
        [] => None,
        [one] => Some(*one),
        _ => {
            let (l, r) = cvs.split_at(left_count(cvs.len()));
            Some(merge_subtrees_non_root(
                &merge_non_root(l)?,
                &merge_non_root(r)?,
                Mode::Hash,
            ))
        }
    }
}

/// Like [`merge_non_root`] for the root node (at least two CVs; `None` otherwise).
fn merge_root(cvs: &[ChainingValue]) -> Option<blake3::Hash> {
    if cvs.len() < 2 {
        return None;
    }
    let (l, r) = cvs.split_at(left_count(cvs.len()));
    Some(merge_subtrees_root(
        &merge_non_root(l)?,
        &merge_non_root(r)?,
        Mode::Hash,
    ))
}

/// The largest power of two less than `n` (`n >= 2`).
fn left_count(n: usize) -> usize {
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}
