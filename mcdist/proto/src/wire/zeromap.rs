//! [`ZeroMap`]: one chunk of the bitmap of all-zero pages.

use super::{check_emit, check_len, put, read_u32, read_u64, Field, WireError};

/// Byte offsets of the [`ZeroMap`] body fields.
pub(super) mod field {
    use super::Field;
    /// Chunk index.
    pub const CHUNK: Field = 0..4;
    /// Chunk count.
    pub const CHUNK_COUNT: Field = 4..8;
    /// First page described.
    pub const START_PAGE: Field = 8..16;
    /// Bitmap bytes, to the end of the datagram.
    pub const BITS: std::ops::RangeFrom<usize> = 16..;
}

/// Body of [`Kind::ZeroMap`](super::Kind::ZeroMap): bits for pages `start_page ..`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroMap<'a> {
    /// Chunk index.
    pub chunk: u32,
    /// Number of chunks in the whole map.
    pub chunk_count: u32,
    /// First page this chunk describes (a multiple of 8).
    pub start_page: u64,
    /// Bitmap bytes, LSB first; bit set = page is all zero.
    pub bits: &'a [u8],
}

impl<'a> ZeroMap<'a> {
    /// Fixed part before the bits.
    pub const FIXED_LEN: usize = field::BITS.start;

    /// Parse and validate a zero-map body; the bits borrow the rest of `body`.
    pub fn parse(body: &'a [u8]) -> Result<ZeroMap<'a>, WireError> {
        check_len(body, Self::FIXED_LEN)?;
        let chunk = read_u32(body, field::CHUNK);
        let chunk_count = read_u32(body, field::CHUNK_COUNT);
        let start_page = read_u64(body, field::START_PAGE);
        let bits = &body[field::BITS];
        // The pages the bits describe must be numbers: `start_page + 8 × bits` fits a u64.
        let end = (bits.len() as u64)
            .checked_mul(8)
            .and_then(|n| start_page.checked_add(n));
        if chunk >= chunk_count || start_page % 8 != 0 || end.is_none() {
            return Err(WireError::BadField("zero map chunk"));
        }
        Ok(ZeroMap {
            chunk,
            chunk_count,
            start_page,
            bits,
        })
    }

    /// Whether this chunk lies where a server cuts the map of `page_count` pages: the
    /// map's `ceil(page_count / 8)` bytes in `chunk_count` chunks of one size (the last
    /// one shorter), so chunk `i` starts at `i` chunk sizes and ends at the next chunk or
    /// the map's end. The size is read off the chunk itself (a full chunk's length, or
    /// the last chunk's start over its index) and must give `chunk_count` chunks. A chunk
    /// that does not fit is dropped; chunks that each fit but disagree on the size fail the
    /// map's digest.
    pub fn fits(&self, page_count: u64) -> bool {
        let total = page_count.div_ceil(8);
        let (chunk, count) = (u64::from(self.chunk), u64::from(self.chunk_count));
        let start = self.start_page / 8;
        let len = self.bits.len() as u64;
        let size = if chunk + 1 < count {
            len
        } else if chunk > 0 {
            if start % chunk != 0 {
                return false;
            }
            start / chunk
        } else {
            len
        };
        size > 0
            && chunk.checked_mul(size) == Some(start)
            && start < total
            && count == total.div_ceil(size)
            && start.checked_add(len) == Some(total.min(start.saturating_add(size)))
    }

    /// Body bytes needed to emit this chunk.
    pub fn buffer_len(&self) -> usize {
        Self::FIXED_LEN + self.bits.len()
    }

    /// Emit the body into the start of `body`.
    pub fn emit(&self, body: &mut [u8]) -> Result<(), WireError> {
        check_emit(body, self.buffer_len())?;
        put(body, field::CHUNK, &self.chunk.to_be_bytes());
        put(body, field::CHUNK_COUNT, &self.chunk_count.to_be_bytes());
        put(body, field::START_PAGE, &self.start_page.to_be_bytes());
        body[Self::FIXED_LEN..self.buffer_len()].copy_from_slice(self.bits);
        Ok(())
    }
}
