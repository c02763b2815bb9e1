//! [`Data`]: one page, or one fragment of a page, and the zero-copy
//! [`emit_data_header`] the server fills a page in behind.

use super::{check_emit, check_len, put, read_u16, read_u64, Field, Header, Kind, WireError};
use super::{DataFlags, HEADER_LEN, MAX_FRAGMENTS};

/// Length of the fixed part of a [`Data`] body (before the payload).
pub const DATA_FIXED_LEN: usize = field::PAYLOAD.start;

/// Byte offsets of the [`Data`] body fields.
pub(super) mod field {
    use super::Field;
    /// Page number.
    pub const PFN: Field = 0..8;
    /// Fragment index.
    pub const FRAG_INDEX: Field = 8..10;
    /// Fragment count.
    pub const FRAG_COUNT: Field = 10..12;
    /// Data flags.
    pub const FLAGS: usize = 12;
    /// The page bytes, to the end of the datagram.
    pub const PAYLOAD: std::ops::RangeFrom<usize> = 13..;
}

/// One page, or one fragment of a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Data<'a> {
    /// Page number.
    pub pfn: u64,
    /// Fragment index, `< frag_count`.
    pub frag_index: u16,
    /// Number of fragments of this page (1 when the page fits a datagram).
    pub frag_count: u16,
    /// Data flags ([`Data::DEMAND`], ...).
    pub flags: DataFlags,
    /// Payload bytes (empty for [`Data::ZERO`]).
    pub payload: &'a [u8],
}

impl<'a> Data<'a> {
    /// Sent in answer to a demand request.
    pub const DEMAND: DataFlags = DataFlags::DEMAND;
    /// Pushed next to a recent fault.
    pub const PUSH: DataFlags = DataFlags::PUSH;
    /// Sent by the sequential whole-image sweep.
    pub const SWEEP: DataFlags = DataFlags::SWEEP;
    /// A repair in answer to a NACK or retry.
    pub const REPAIR: DataFlags = DataFlags::REPAIR;
    /// The page is all zero; the payload is empty.
    pub const ZERO: DataFlags = DataFlags::ZERO;
    /// Keep the page for FEC decoding (the server repairs by block since loss was reported).
    pub const KEEP: DataFlags = DataFlags::KEEP;

    /// Parse and validate a data body; the payload borrows the rest of `body`.
    pub fn parse(body: &'a [u8]) -> Result<Data<'a>, WireError> {
        check_len(body, DATA_FIXED_LEN)?;
        let pfn = read_u64(body, field::PFN);
        let frag_index = read_u16(body, field::FRAG_INDEX);
        let frag_count = read_u16(body, field::FRAG_COUNT);
        let flags = DataFlags::from_bits_retain(body[field::FLAGS]);
        if frag_count == 0 || frag_count > MAX_FRAGMENTS || frag_index >= frag_count {
            return Err(WireError::BadField("fragment"));
        }
        let payload = &body[field::PAYLOAD];
        if flags.contains(Data::ZERO) && !payload.is_empty() {
            return Err(WireError::BadField("zero page with payload"));
        }
        Ok(Data {
            pfn,
            frag_index,
            frag_count,
            flags,
            payload,
        })
    }

    /// Body bytes needed to emit this data message.
    pub fn buffer_len(&self) -> usize {
        DATA_FIXED_LEN + self.payload.len()
    }

    /// Emit the body into the start of `body`.
    pub fn emit(&self, body: &mut [u8]) -> Result<(), WireError> {
        check_emit(body, self.buffer_len())?;
        emit_fixed(body, self.pfn, self.frag_index, self.frag_count, self.flags);
        body[DATA_FIXED_LEN..self.buffer_len()].copy_from_slice(self.payload);
        Ok(())
    }
}

/// Write the fixed part of a data body; `body` holds at least [`DATA_FIXED_LEN`] bytes.
fn emit_fixed(body: &mut [u8], pfn: u64, frag_index: u16, frag_count: u16, flags: DataFlags) {
    put(body, field::PFN, &pfn.to_be_bytes());
    put(body, field::FRAG_INDEX, &frag_index.to_be_bytes());
    put(body, field::FRAG_COUNT, &frag_count.to_be_bytes());
    body[field::FLAGS] = flags.bits();
}

/// Write a Data header (header + fixed body) into `buf` and return the offset where
/// the payload of `payload_len` bytes must be written. Lets the server read a page
/// straight into the datagram buffer without an intermediate copy.
pub fn emit_data_header(
    buf: &mut [u8],
    header: &Header,
    pfn: u64,
    frag_index: u16,
    frag_count: u16,
    flags: DataFlags,
    payload_len: usize,
) -> Result<usize, WireError> {
    if buf.len() < HEADER_LEN + DATA_FIXED_LEN + payload_len {
        return Err(WireError::BufferTooSmall);
    }
    Header {
        kind: Kind::Data,
        ..*header
    }
    .emit(buf)?;
    emit_fixed(&mut buf[HEADER_LEN..], pfn, frag_index, frag_count, flags);
    Ok(HEADER_LEN + DATA_FIXED_LEN)
}
