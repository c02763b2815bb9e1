//! Where hash pages live: how many per level, how they are numbered, which page covers which.
//!
//! Rule: hash page `h` has page number `page_count + h`, numbered top level first (then
//! each level below, in image order), so a sweep in page order sends every hash page ahead
//! of the pages it covers. Level 1 covers data pages; level `j` covers level `j - 1`.

use super::{IntegrityError, CV_LEN};
use std::ops::Range;

/// Level-1 hash pages sent together in a sweep, ahead of the data pages they cover
/// ([`HashLayout::sweep_order`]): 64 pages, 32 MiB of data at 4 KiB pages.
pub const SWEEP_HASH_GROUP: u64 = 64;

/// What a page number names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageKind {
    /// A page of the image.
    Data,
    /// Hash page `index` of `level` (1 = just above the data pages).
    Hash {
        /// Level, from 1.
        level: u32,
        /// Index within the level, in image order.
        index: u64,
    },
}

/// The place of a page's chaining value in the hash page above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Page number of the hash page.
    pub pfn: u64,
    /// Its level.
    pub level: u32,
    /// Entry (0-based, 32 bytes each) that holds the page's chaining value.
    pub entry: usize,
}

/// The hash pages of an image: counts per level and the numbering after the data pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashLayout {
    image_size: u64,
    page_size: usize,
    /// log2 of the fan-out, `page_size / 32`.
    fan_shift: u32,
    data_pages: u64,
    /// Pages of level `j` at `[j - 1]`.
    counts: Vec<u64>,
    /// Hash index of the first page of level `j` at `[j - 1]` (top level first).
    firsts: Vec<u64>,
    hash_pages: u64,
}

impl HashLayout {
    /// The layout of an image of `image_size` bytes in pages of `page_size` bytes (a power
    /// of two of at least 1 KiB; the last page may be short).
    pub fn new(image_size: u64, page_size: usize) -> Result<Self, IntegrityError> {
        if page_size < blake3::CHUNK_LEN || !page_size.is_power_of_two() {
            return Err(IntegrityError::PageSize { page_size });
        }
        let data_pages = image_size.div_ceil(page_size as u64);
        let fan_shift = (page_size / CV_LEN).trailing_zeros();
        let mut counts = Vec::new();
        // Until one page holds a level with at least two entries; an image of one page or
        // less is its own root.
        let mut below = data_pages;
        while below > 1 {
            let n = below.div_ceil(1 << fan_shift);
            counts.push(n);
            below = n;
        }
        let mut firsts = vec![0u64; counts.len()];
        let mut next = 0u64;
        for j in (0..counts.len()).rev() {
            firsts[j] = next;
            next += counts[j];
        }
        let hash_pages = next;
        if data_pages.checked_add(hash_pages).is_none() {
            return Err(IntegrityError::TooLarge { image_size });
        }
        Ok(Self {
            image_size,
            page_size,
            fan_shift,
            data_pages,
            counts,
            firsts,
            hash_pages,
        })
    }

    /// Image size in bytes.
    pub fn image_size(&self) -> u64 {
        self.image_size
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Chaining values per hash page (`page_size / 32`).
    pub fn fanout(&self) -> usize {
        1 << self.fan_shift
    }

    /// Data pages.
    pub fn data_pages(&self) -> u64 {
        self.data_pages
    }

    /// Hash levels (0 for an image of at most one page).
    pub fn levels(&self) -> u32 {
        self.counts.len() as u32
    }

    /// Hash pages of `level` (1..=[`levels`](Self::levels); 0 for any other).
    pub fn level_pages(&self, level: u32) -> u64 {
        self.level_at(level).map_or(0, |j| self.counts[j])
    }

    /// Hash pages of all levels.
    pub fn hash_pages(&self) -> u64 {
        self.hash_pages
    }

    /// Data pages plus hash pages: page numbers run from 0 to this.
    pub fn total_pages(&self) -> u64 {
        self.data_pages + self.hash_pages
    }

    /// Bytes the hash pages add when sent as whole pages.
    pub fn overhead_bytes(&self) -> u64 {
        self.hash_pages.saturating_mul(self.page_size as u64)
    }

    /// `[level - 1]` when `level` exists.
    fn level_at(&self, level: u32) -> Option<usize> {
        let j = (level as usize).checked_sub(1)?;
        (j < self.counts.len()).then_some(j)
    }

    /// Page number of hash page `index` of `level`.
    pub fn hash_pfn(&self, level: u32, index: u64) -> Option<u64> {
        let j = self.level_at(level)?;
        (index < self.counts[j]).then(|| self.data_pages + self.firsts[j] + index)
    }

    /// What page `pfn` is.
    pub fn locate(&self, pfn: u64) -> Result<PageKind, IntegrityError> {
        if pfn < self.data_pages {
            return Ok(PageKind::Data);
        }
        let h = pfn - self.data_pages;
        (0..self.counts.len())
            .find(|&j| h >= self.firsts[j] && h - self.firsts[j] < self.counts[j])
            .map(|j| PageKind::Hash {
                level: j as u32 + 1,
                index: h - self.firsts[j],
            })
            .ok_or(IntegrityError::OutOfRange {
                pfn,
                total: self.total_pages(),
            })
    }

    /// Children of hash page `index` of `level` (CVs it holds): up to the fan-out, fewer in
    /// the last page of a level. 0 for a page that does not exist.
    pub fn entries(&self, level: u32, index: u64) -> usize {
        let Some(j) = self.level_at(level) else {
            return 0;
        };
        let below = if j == 0 {
            self.data_pages
        } else {
            self.counts[j - 1]
        };
        let first = index.saturating_mul(self.fanout() as u64);
        below.saturating_sub(first).min(self.fanout() as u64) as usize
    }

    /// The hash page that holds page `pfn`'s chaining value, and where. `None` for the top
    /// hash page (checked against the root) and for the data page of an image of at most
    /// one page (the root itself).
    pub fn parent(&self, pfn: u64) -> Result<Option<Slot>, IntegrityError> {
        let (level, index) = match self.locate(pfn)? {
            PageKind::Data => (1, pfn),
            PageKind::Hash { level, index } => (level + 1, index),
        };
        let mask = self.fanout() as u64 - 1;
        Ok(self.hash_pfn(level, index >> self.fan_shift).map(|p| Slot {
            pfn: p,
            level,
            entry: (index & mask) as usize,
        }))
    }

    /// The hash pages above `pfn`, top level first (what a receiver must hold verified
    /// before it can verify `pfn`).
    pub fn path(&self, pfn: u64) -> Result<Vec<u64>, IntegrityError> {
        let mut path = Vec::with_capacity(self.counts.len());
        let mut at = pfn;
        while let Some(slot) = self.parent(at)? {
            path.push(slot.pfn);
            at = slot.pfn;
        }
        path.reverse();
        Ok(path)
    }

    /// Data pages that page `pfn` covers (itself for a data page).
    pub fn covered(&self, pfn: u64) -> Result<Range<u64>, IntegrityError> {
        match self.locate(pfn)? {
            PageKind::Data => Ok(pfn..pfn + 1),
            PageKind::Hash { level, index } => {
                let shift = self.fan_shift.saturating_mul(level);
                // Saturating: past the image is clipped to it below.
                let scale = |x: u64| {
                    1u64.checked_shl(shift)
                        .and_then(|m| x.checked_mul(m))
                        .unwrap_or(u64::MAX)
                };
                let (start, end) = (scale(index), scale(index + 1));
                Ok(start.min(self.data_pages)..end.min(self.data_pages))
            }
        }
    }

    /// Meaningful bytes of page `pfn`: image bytes of a data page (the last may be short),
    /// 32 per chaining value of a hash page.
    pub fn page_len(&self, pfn: u64) -> Result<usize, IntegrityError> {
        match self.locate(pfn)? {
            PageKind::Data => {
                let start = pfn * self.page_size as u64;
                Ok((self.image_size - start).min(self.page_size as u64) as usize)
            }
            PageKind::Hash { level, index } => Ok(self.entries(level, index) * CV_LEN),
        }
    }

    /// Every page number once, each hash page before the pages it covers: the levels above
    /// level 1 (top first), then the level-1 hash pages in groups of [`SWEEP_HASH_GROUP`],
    /// each group followed by the data pages it covers. A sweep in this order lets a
    /// receiver verify every page as it arrives and keeps hash pages near their data, and
    /// a group's hash pages, numbered one after another, make one FEC block together
    /// (alone among data pages, each hash page made a block of its own, whose repair
    /// symbols cost as much as the page).
    pub fn sweep_order(&self) -> impl Iterator<Item = u64> + '_ {
        let n = self.data_pages;
        let upper = self.hash_pfn(1, 0).unwrap_or(n);
        let (fan, g, l1) = (self.fanout() as u64, SWEEP_HASH_GROUP, self.level_pages(1));
        let level1 = (0..l1.div_ceil(g)).flat_map(move |j| {
            let hashes = upper + j * g..upper + ((j + 1) * g).min(l1);
            hashes.chain(j * g * fan..((j + 1) * g * fan).min(n))
        });
        // An image of at most one page has no hash pages: its page alone.
        let single = 0..if self.counts.is_empty() { n } else { 0 };
        (n..upper).chain(level1).chain(single)
    }

    /// Where position `pos` of [`HashLayout::sweep_order`] falls past the upper levels:
    /// its group, its place in the group, and the group's hash pages. `None` within the
    /// upper levels.
    fn sweep_group(&self, pos: u64) -> Option<(u64, u64, u64)> {
        let upper = self.hash_pfn(1, 0)?;
        let k = pos.checked_sub(upper - self.data_pages)?;
        let (g, l1) = (SWEEP_HASH_GROUP, self.level_pages(1));
        let per = g * (self.fanout() as u64 + 1);
        let (j, r) = (k / per, k % per);
        Some((j, r, l1.saturating_sub(j * g).min(g)))
    }

    /// The page at position `pos` of [`HashLayout::sweep_order`] (`pos` below
    /// [`HashLayout::total_pages`]), computed without walking the order.
    pub fn sweep_at(&self, pos: u64) -> u64 {
        let n = self.data_pages;
        let Some(upper) = self.hash_pfn(1, 0) else {
            return pos;
        };
        match self.sweep_group(pos) {
            None => n + pos,
            Some((j, r, hashes)) if r < hashes => upper + j * SWEEP_HASH_GROUP + r,
            Some((j, r, hashes)) => j * SWEEP_HASH_GROUP * self.fanout() as u64 + r - hashes,
        }
    }

    /// Data pages before position `pos` of [`HashLayout::sweep_order`]: how far a sweep
    /// that reached `pos` has come through the image.
    pub fn sweep_data_before(&self, pos: u64) -> u64 {
        let n = self.data_pages;
        if self.counts.is_empty() {
            return pos.min(n);
        }
        let Some((j, r, hashes)) = self.sweep_group(pos) else {
            return 0;
        };
        (j * SWEEP_HASH_GROUP * self.fanout() as u64 + r.saturating_sub(hashes)).min(n)
    }

    /// Byte offset of data page `pfn` in the image.
    pub(super) fn data_offset(&self, pfn: u64) -> u64 {
        pfn * self.page_size as u64
    }
}
