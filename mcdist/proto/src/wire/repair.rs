//! [`Repair`]: one repair symbol for an FEC block of multicast pages.

use super::MAX_FRAGMENTS;
use super::{check_emit, check_len, put, read_u16, read_u32, read_u64, Field, WireError};

/// Widest page span one FEC block may cover.
pub const MAX_FEC_SPAN: u16 = 1024;
/// Most source symbols one FEC block may have.
pub const MAX_FEC_SYMBOLS: u32 = 8192;
/// Largest encoding symbol id (24 bits).
pub const MAX_FEC_ESI: u32 = (1 << 24) - 1;

/// Byte offsets of the [`Repair`] body fields.
pub(super) mod field {
    use super::Field;
    /// First page of the block's span.
    pub const FIRST_PFN: Field = 0..8;
    /// Pages the span covers.
    pub const SPAN: Field = 8..10;
    /// Source symbols per page.
    pub const SYMBOLS_PER_PAGE: Field = 10..12;
    /// Symbol size in bytes.
    pub const SYMBOL_SIZE: Field = 12..14;
    /// The first burst's share of the block (top byte), then the encoding symbol id
    /// (24 bits).
    pub const ESI: Field = 14..18;
    /// The member bitmap (`ceil(span / 8)` bytes), then the symbol to the end.
    pub const MEMBERS: std::ops::RangeFrom<usize> = 18..;
}

/// Body of [`Kind::Repair`](super::Kind::Repair): one repair symbol of mcdist's sparse
/// erasure code (`fec::code`) for an FEC block of pages the server multicast by push or
/// sweep.
///
/// The block is the member pages of `first_pfn .. first_pfn + span` (bit `i`
/// of `members`, LSB first, set: page `first_pfn + i` is in the block), in
/// ascending page order. Each page is `symbols_per_page` source symbols of
/// `symbol_size` bytes: the page's fragments as sent in [`Data`](super::Data) datagrams
/// (`symbols_per_page` is the fragment count), each zero-padded to
/// `symbol_size`. The block has `K = members × symbols_per_page` source
/// symbols with ESIs `0..K` in that order; repair symbols have ESIs `>= K`: ESI `K + j`
/// is repair symbol `j`, the XOR of the source symbols its row names, which follow from
/// `K`, `burst_share` (the size of the block's first burst of repair symbols, the
/// code's layer size: `ceil(K × burst_share / 256)`) and `j`. The share rides in the
/// top byte of the ESI field, so that a repair datagram is no longer than a page
/// fragment's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repair<'a> {
    /// First page of the block's span (always a member).
    pub first_pfn: u64,
    /// Pages the span covers, `1..=MAX_FEC_SPAN`.
    pub span: u16,
    /// Source symbols per page (the page's fragment count), `1..=MAX_FRAGMENTS`.
    pub symbols_per_page: u16,
    /// Symbol size in bytes.
    pub symbol_size: u16,
    /// Encoding symbol id, `< 2^24`.
    pub esi: u32,
    /// The block's first burst of repair symbols, `ceil(K × burst_share / 256)` of
    /// them, `>= 1`.
    pub burst_share: u8,
    /// Member bitmap, `ceil(span / 8)` bytes, LSB first; bits past `span` are zero.
    pub members: &'a [u8],
    /// The symbol, `symbol_size` bytes.
    pub symbol: &'a [u8],
}

impl<'a> Repair<'a> {
    /// Fixed part before the member bitmap.
    pub const FIXED_LEN: usize = field::MEMBERS.start;

    /// Number of member pages.
    pub fn member_count(&self) -> u32 {
        self.members.iter().map(|b| b.count_ones()).sum()
    }

    /// Source symbols in the block (`K`).
    pub fn source_symbols(&self) -> u32 {
        self.member_count() * u32::from(self.symbols_per_page)
    }

    /// The member pages, ascending.
    pub fn member_pfns(&self) -> impl Iterator<Item = u64> + 'a {
        let first = self.first_pfn;
        let members = self.members;
        (0..members.len() * 8)
            .filter(move |i| members[i / 8] & (1 << (i % 8)) != 0)
            .map(move |i| first + i as u64)
    }

    /// Parse and validate a repair body; the members and symbol borrow from `body`.
    pub fn parse(body: &'a [u8]) -> Result<Repair<'a>, WireError> {
        check_len(body, Self::FIXED_LEN)?;
        let first_pfn = read_u64(body, field::FIRST_PFN);
        let span = read_u16(body, field::SPAN);
        let symbols_per_page = read_u16(body, field::SYMBOLS_PER_PAGE);
        let symbol_size = read_u16(body, field::SYMBOL_SIZE);
        let raw = read_u32(body, field::ESI);
        let (burst_share, esi) = ((raw >> 24) as u8, raw & MAX_FEC_ESI);
        if span == 0 || span > MAX_FEC_SPAN {
            return Err(WireError::BadField("fec span"));
        }
        if symbols_per_page == 0 || symbols_per_page > MAX_FRAGMENTS {
            return Err(WireError::BadField("fec symbols per page"));
        }
        if symbol_size == 0 {
            return Err(WireError::BadField("fec symbol size"));
        }
        if first_pfn.checked_add(u64::from(span)).is_none() {
            return Err(WireError::BadField("fec symbol id"));
        }
        if burst_share == 0 {
            return Err(WireError::BadField("fec burst share"));
        }
        let (members, symbol) = body[field::MEMBERS]
            .split_at_checked(usize::from(span).div_ceil(8))
            .ok_or(WireError::Truncated)?;
        let tail = span % 8;
        if members[0] & 1 == 0 || (tail != 0 && members[members.len() - 1] >> tail != 0) {
            return Err(WireError::BadField("fec members"));
        }
        if symbol.len() != usize::from(symbol_size) {
            return Err(WireError::BadField("fec symbol length"));
        }
        let rep = Repair {
            first_pfn,
            span,
            symbols_per_page,
            symbol_size,
            esi,
            burst_share,
            members,
            symbol,
        };
        if rep.source_symbols() > MAX_FEC_SYMBOLS {
            return Err(WireError::BadField("fec block size"));
        }
        Ok(rep)
    }

    /// Body bytes needed to emit this repair symbol.
    pub fn buffer_len(&self) -> usize {
        Self::FIXED_LEN + self.members.len() + self.symbol.len()
    }

    /// Emit the body into the start of `body`.
    pub fn emit(&self, body: &mut [u8]) -> Result<(), WireError> {
        check_emit(body, self.buffer_len())?;
        if self.esi > MAX_FEC_ESI {
            return Err(WireError::BadField("fec symbol id"));
        }
        put(body, field::FIRST_PFN, &self.first_pfn.to_be_bytes());
        put(body, field::SPAN, &self.span.to_be_bytes());
        put(
            body,
            field::SYMBOLS_PER_PAGE,
            &self.symbols_per_page.to_be_bytes(),
        );
        put(body, field::SYMBOL_SIZE, &self.symbol_size.to_be_bytes());
        let raw = (u32::from(self.burst_share) << 24) | self.esi;
        put(body, field::ESI, &raw.to_be_bytes());
        let (members, symbol) = body[field::MEMBERS].split_at_mut(self.members.len());
        members.copy_from_slice(self.members);
        symbol[..self.symbol.len()].copy_from_slice(self.symbol);
        Ok(())
    }
}
