//! Page ranges and [`Request`], the body of both demand requests and NACKs.

use super::{check_emit, check_len, put, read_u16, read_u32, read_u64, Field, WireError};
use super::{RequestFlags, HEADER_LEN};

/// Length of one encoded page range in requests and NACKs.
pub const RANGE_LEN: usize = range_field::LEN.end;
/// Largest page count a single range may cover.
pub const MAX_RANGE_LEN: u32 = 1 << 24;

/// Byte offsets within one encoded [`PageRange`].
pub(super) mod range_field {
    use super::Field;
    /// First page.
    pub const START: Field = 0..8;
    /// Page count.
    pub const LEN: Field = 8..12;
}

/// Byte offsets of the [`Request`] body fields.
pub(super) mod field {
    use super::Field;
    /// Receive rate.
    pub const RX_RATE: Field = 0..8;
    /// Measured group loss.
    pub const LOSS_PERMILLE: Field = 8..10;
    /// Request flags.
    pub const FLAGS: usize = 10;
    /// The highest group sequence number the receiver had taken in.
    pub const HEARD_SEQ: Field = 11..19;
    /// Number of ranges that follow.
    pub const RANGE_COUNT: Field = 19..21;
    /// The ranges, [`RANGE_LEN`](super::RANGE_LEN) bytes each.
    pub const RANGES: std::ops::RangeFrom<usize> = 21..;
}

/// An inclusive-start, length-counted range of pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageRange {
    /// First page.
    pub start: u64,
    /// Number of pages, `1..=MAX_RANGE_LEN`.
    pub len: u32,
}

impl PageRange {
    /// One past the last page.
    pub fn end(&self) -> u64 {
        self.start.saturating_add(u64::from(self.len))
    }
}

/// A list of page ranges borrowed from a datagram; yields only validated ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ranges<'a> {
    raw: &'a [u8],
}

impl<'a> Ranges<'a> {
    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.raw.len() / RANGE_LEN
    }
    /// True when there are no ranges.
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }
    /// Iterate over the ranges.
    pub fn iter(&self) -> impl Iterator<Item = PageRange> + 'a {
        self.raw.chunks_exact(RANGE_LEN).map(|c| PageRange {
            start: read_u64(c, range_field::START),
            len: read_u32(c, range_field::LEN),
        })
    }
    /// Total pages covered (saturating).
    pub fn total_pages(&self) -> u64 {
        self.iter()
            .fold(0u64, |a, r| a.saturating_add(u64::from(r.len)))
    }
}

/// Body of [`Kind::Request`](super::Kind::Request), [`Kind::Nack`](super::Kind::Nack) and
/// [`Kind::Hint`](super::Kind::Hint) (whose rate, loss and flags are zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// Receiver's measured receive rate, bytes per second.
    pub rx_rate: u64,
    /// Loss the receiver measured on the group, in parts per thousand
    /// ([`LOSS_UNMEASURED`](super::LOSS_UNMEASURED): not measured yet).
    pub loss_permille: u16,
    /// Request flags ([`Request::RETRY`]).
    pub flags: RequestFlags,
    /// The highest group sequence number the receiver had taken in when it sent this
    /// (0: none yet; in a Hint, 0). An answer multicast after it was still on its way
    /// to the receiver.
    pub heard_seq: u64,
    /// Requested ranges.
    pub ranges: Ranges<'a>,
}

impl<'a> Request<'a> {
    /// Fixed part before the ranges.
    pub const FIXED_LEN: usize = field::RANGES.start;
    /// The request repeats an earlier one that got no answer.
    pub const RETRY: RequestFlags = RequestFlags::RETRY;

    /// How many ranges fit in a datagram of `max_datagram` bytes (with `trailer` bytes reserved).
    pub fn max_ranges(max_datagram: usize, trailer: usize) -> usize {
        max_datagram
            .saturating_sub(HEADER_LEN + Self::FIXED_LEN + trailer)
            .checked_div(RANGE_LEN)
            .unwrap_or(0)
            .min(usize::from(u16::MAX))
    }

    /// Parse and validate a request or NACK body (trailing bytes after the ranges are ignored).
    pub fn parse(body: &'a [u8]) -> Result<Request<'a>, WireError> {
        let (head, raw) = ListHead::parse(body)?;
        let ranges = Ranges { raw };
        if ranges.iter().any(|x| x.len == 0 || x.len > MAX_RANGE_LEN) {
            return Err(WireError::BadField("range length"));
        }
        Ok(Request {
            rx_rate: head.rx_rate,
            loss_permille: head.loss_permille,
            flags: head.flags,
            heard_seq: head.heard_seq,
            ranges,
        })
    }

    /// Body bytes needed to emit this request.
    pub fn buffer_len(&self) -> usize {
        Self::FIXED_LEN + self.ranges.raw.len()
    }

    /// Emit the body into the start of `body`.
    pub fn emit(&self, body: &mut [u8]) -> Result<(), WireError> {
        let head = ListHead {
            rx_rate: self.rx_rate,
            loss_permille: self.loss_permille,
            flags: self.flags,
            heard_seq: self.heard_seq,
        };
        head.emit(body, self.ranges.raw)
    }
}

/// The fixed part every list body shares ([`Request`], NACK, Hint and
/// [`FragmentNack`](super::FragmentNack)): rate, loss, flags and an entry count, then
/// [`RANGE_LEN`]-byte entries.
#[derive(Debug, Clone, Copy)]
pub(super) struct ListHead {
    pub(super) rx_rate: u64,
    pub(super) loss_permille: u16,
    pub(super) flags: RequestFlags,
    pub(super) heard_seq: u64,
}

impl ListHead {
    /// The fixed part and the entries' bytes (whole entries, as many as the count says).
    pub(super) fn parse(body: &[u8]) -> Result<(ListHead, &[u8]), WireError> {
        check_len(body, Request::FIXED_LEN)?;
        let n = usize::from(read_u16(body, field::RANGE_COUNT));
        let raw = body[field::RANGES]
            .get(..n * RANGE_LEN)
            .ok_or(WireError::Truncated)?;
        let head = ListHead {
            rx_rate: read_u64(body, field::RX_RATE),
            loss_permille: read_u16(body, field::LOSS_PERMILLE),
            flags: RequestFlags::from_bits_retain(body[field::FLAGS]),
            heard_seq: read_u64(body, field::HEARD_SEQ),
        };
        Ok((head, raw))
    }

    /// Emit the fixed part and the encoded entries `raw` into the start of `body`.
    pub(super) fn emit(&self, body: &mut [u8], raw: &[u8]) -> Result<(), WireError> {
        let len = Request::FIXED_LEN + raw.len();
        check_emit(body, len)?;
        let n = u16::try_from(raw.len() / RANGE_LEN).map_err(|_| WireError::BadField("ranges"))?;
        put(body, field::RX_RATE, &self.rx_rate.to_be_bytes());
        put(
            body,
            field::LOSS_PERMILLE,
            &self.loss_permille.to_be_bytes(),
        );
        body[field::FLAGS] = self.flags.bits();
        put(body, field::HEARD_SEQ, &self.heard_seq.to_be_bytes());
        put(body, field::RANGE_COUNT, &n.to_be_bytes());
        body[Request::FIXED_LEN..len].copy_from_slice(raw);
        Ok(())
    }
}

/// Encode page ranges into `out` (12 bytes each) for a [`Request`] body.
pub fn encode_ranges(ranges: &[PageRange], out: &mut Vec<u8>) {
    out.clear();
    for r in ranges {
        out.extend_from_slice(&r.start.to_be_bytes());
        out.extend_from_slice(&r.len.to_be_bytes());
    }
}

/// Borrow already-encoded range bytes as [`Ranges`] (for emitting).
pub fn ranges_from_encoded(raw: &[u8]) -> Ranges<'_> {
    let n = raw.len() - raw.len() % RANGE_LEN;
    Ranges { raw: &raw[..n] }
}
