//! [`FragmentNack`]: a NACK of single fragments of pages the receiver holds in part.
//!
//! A 4 KiB page travels in 3 datagrams at MTU 1500, so at 5 % datagram loss a receiver
//! misses some fragment of 14 % of the pages; with a plain NACK the server sends the
//! whole page again. A receiver that holds the other fragments names just the missing
//! ones here, and the server sends those.

use super::ranges::ListHead;
use super::{read_u32, read_u64, RequestFlags, WireError, RANGE_LEN};

/// Most fragments of a page a [`FragmentNack`] entry can name (the mask's width). Pages
/// cut into more fragments are NACKed whole.
pub const MAX_NACK_FRAGMENTS: u16 = 32;

/// Byte offsets within one encoded [`PageFragments`] entry.
mod entry_field {
    use super::super::Field;
    /// The page.
    pub const PFN: Field = 0..8;
    /// Missing fragments: bit `i` set for fragment `i`.
    pub const MISSING: Field = 8..12;
}

/// One page and the fragments of it the receiver misses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageFragments {
    /// The page.
    pub pfn: u64,
    /// Bit `i` set: fragment `i` is missing. Never zero on the wire.
    pub missing: u32,
}

/// Entries borrowed from a datagram; yields only validated entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FragmentEntries<'a> {
    raw: &'a [u8],
}

impl<'a> FragmentEntries<'a> {
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.raw.len() / RANGE_LEN
    }
    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }
    /// Iterate over the entries.
    pub fn iter(&self) -> impl Iterator<Item = PageFragments> + 'a {
        self.raw.chunks_exact(RANGE_LEN).map(|c| PageFragments {
            pfn: read_u64(c, entry_field::PFN),
            missing: read_u32(c, entry_field::MISSING),
        })
    }
}

/// Body of [`Kind::FragmentNack`](super::Kind::FragmentNack): the fixed part of a
/// [`Request`](super::Request) (rate, loss, flags, count), then entries of a page number
/// (u64) and a mask of its missing fragments (u32), 12 bytes each like a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FragmentNack<'a> {
    /// Receiver's measured receive rate, bytes per second.
    pub rx_rate: u64,
    /// Loss the receiver measured on the group, in parts per thousand
    /// ([`LOSS_UNMEASURED`](super::LOSS_UNMEASURED): not measured yet).
    pub loss_permille: u16,
    /// Request flags ([`Request::RETRY`](super::Request::RETRY)).
    pub flags: RequestFlags,
    /// The highest group sequence number the receiver had taken in
    /// ([`Request::heard_seq`](super::Request::heard_seq)).
    pub heard_seq: u64,
    /// The pages and their missing fragments.
    pub entries: FragmentEntries<'a>,
}

impl<'a> FragmentNack<'a> {
    /// Parse and validate the body (trailing bytes after the entries are ignored).
    pub fn parse(body: &'a [u8]) -> Result<FragmentNack<'a>, WireError> {
        let (head, raw) = ListHead::parse(body)?;
        let entries = FragmentEntries { raw };
        if entries.iter().any(|e| e.missing == 0) {
            return Err(WireError::BadField("fragment mask"));
        }
        Ok(FragmentNack {
            rx_rate: head.rx_rate,
            loss_permille: head.loss_permille,
            flags: head.flags,
            heard_seq: head.heard_seq,
            entries,
        })
    }

    /// Body bytes needed to emit it.
    pub fn buffer_len(&self) -> usize {
        super::Request::FIXED_LEN + self.entries.raw.len()
    }

    /// Emit the body into the start of `body`.
    pub fn emit(&self, body: &mut [u8]) -> Result<(), WireError> {
        let head = ListHead {
            rx_rate: self.rx_rate,
            loss_permille: self.loss_permille,
            flags: self.flags,
            heard_seq: self.heard_seq,
        };
        head.emit(body, self.entries.raw)
    }
}

/// Encode entries into `out` (12 bytes each) for a [`FragmentNack`] body.
pub fn encode_fragment_entries(entries: &[PageFragments], out: &mut Vec<u8>) {
    out.clear();
    for e in entries {
        out.extend_from_slice(&e.pfn.to_be_bytes());
        out.extend_from_slice(&e.missing.to_be_bytes());
    }
}

/// Borrow already-encoded entries as [`FragmentEntries`] (for emitting).
pub fn fragment_entries_from_encoded(raw: &[u8]) -> FragmentEntries<'_> {
    let n = raw.len() - raw.len() % RANGE_LEN;
    FragmentEntries { raw: &raw[..n] }
}
