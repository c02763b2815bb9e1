//! Checked packet views and representations for every mcdist message.
//!
//! Every datagram starts with a fixed 24-byte [`Header`]:
//!
//! | offset | size | field                                                        |
//! |-------:|-----:|--------------------------------------------------------------|
//! | 0      | 2    | magic `"MD"`                                                 |
//! | 2      | 1    | protocol version ([`VERSION`])                               |
//! | 3      | 1    | message kind ([`Kind`])                                      |
//! | 4      | 1    | header flags ([`HeaderFlags`]: authenticated, encrypted)    |
//! | 5      | 3    | reserved, zero                                               |
//! | 8      | 8    | session id                                                   |
//! | 16     | 8    | sender sequence number (unique per sender and session)       |
//!
//! All integers are big-endian. The body layout of each kind is documented on
//! its `Repr` type and in the repository's `DESIGN.md`.
//!
//! The module follows smoltcp's `wire` discipline: a `Packet<T: AsRef<[u8]>>`
//! view is created with [`Packet::new_checked`], which validates lengths, magic
//! and version; **after `check_len` succeeds no accessor panics**. [`Message::parse`]
//! then validates the body and produces a typed representation whose payloads
//! borrow from the datagram. [`Message::emit`] writes a representation into a
//! caller-provided buffer of at least [`Message::buffer_len`] bytes.
//!
//! Parsing never allocates in proportion to an attacker-chosen count: range
//! lists are returned as borrowed iterators over the datagram.

use thiserror::Error;

/// Magic bytes at the start of every mcdist datagram.
pub const MAGIC: [u8; 2] = *b"MD";
/// Protocol version carried in every header. Other versions are rejected.
pub const VERSION: u8 = 1;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 24;
/// Length of the fixed part of a [`Data`] body (before the payload).
pub const DATA_FIXED_LEN: usize = 13;
/// Length of one encoded page range in requests and NACKs.
pub const RANGE_LEN: usize = 12;
/// Largest page count a single range may cover.
pub const MAX_RANGE_LEN: u32 = 1 << 24;
/// Largest number of fragments a page may be split into.
pub const MAX_FRAGMENTS: u16 = 1024;
/// Set in the sequence number of datagrams the server sends by unicast, so group
/// and unicast sequences never collide and loss can be measured on the group.
pub const SEQ_UNICAST_BIT: u64 = 1 << 63;

/// Errors from parsing a datagram. Such datagrams are dropped and counted, never fatal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum WireError {
    /// Shorter than the header or than its kind's fixed body.
    #[error("datagram truncated")]
    Truncated,
    /// Does not start with the mcdist magic.
    #[error("not an mcdist datagram (bad magic)")]
    BadMagic,
    /// Unknown protocol version.
    #[error("unsupported protocol version {0}")]
    BadVersion(u8),
    /// Unknown message kind.
    #[error("unknown message kind {0}")]
    BadKind(u8),
    /// A field holds a value outside its permitted range.
    #[error("invalid field: {0}")]
    BadField(&'static str),
    /// Output buffer too small for `emit`.
    #[error("buffer too small")]
    BufferTooSmall,
}

/// Message kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Server → group/peer: session parameters.
    Announce = 1,
    /// Server → group/peer: one page or one fragment of a page.
    Data = 2,
    /// Client → server: demand request for pages (a fault).
    Request = 3,
    /// Client → server: negative acknowledgement of detected gaps.
    Nack = 4,
    /// Client → server: join the session, ask for announce and zero map.
    Join = 5,
    /// Client → server: liveness and receive-rate report.
    Heartbeat = 6,
    /// Client → server: leaving (done or aborted).
    Leave = 7,
    /// Server → peer: a chunk of the zero-page map.
    ZeroMap = 8,
    /// Server → group: the session ends.
    End = 9,
    /// Server → group: one RaptorQ repair symbol for a block of pushed or swept pages.
    Repair = 10,
}

impl Kind {
    /// Decode a kind byte.
    pub fn from_u8(v: u8) -> Result<Kind, WireError> {
        Ok(match v {
            1 => Kind::Announce,
            2 => Kind::Data,
            3 => Kind::Request,
            4 => Kind::Nack,
            5 => Kind::Join,
            6 => Kind::Heartbeat,
            7 => Kind::Leave,
            8 => Kind::ZeroMap,
            9 => Kind::End,
            10 => Kind::Repair,
            other => return Err(WireError::BadKind(other)),
        })
    }
}

/// Header flag bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HeaderFlags(pub u8);

impl HeaderFlags {
    /// The datagram carries an authentication tag trailer.
    pub const AUTH: u8 = 0x01;
    /// The body is encrypted.
    pub const ENCRYPTED: u8 = 0x02;
}

/// The decoded fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Message kind.
    pub kind: Kind,
    /// Header flags.
    pub flags: HeaderFlags,
    /// Session id.
    pub session: u64,
    /// Sender sequence number.
    pub seq: u64,
}

impl Header {
    /// Emit the header into the first [`HEADER_LEN`] bytes of `buf`.
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), WireError> {
        let b = buf.get_mut(..HEADER_LEN).ok_or(WireError::BufferTooSmall)?;
        b[0..2].copy_from_slice(&MAGIC);
        b[2] = VERSION;
        b[3] = self.kind as u8;
        b[4] = self.flags.0;
        b[5..8].fill(0);
        b[8..16].copy_from_slice(&self.session.to_be_bytes());
        b[16..24].copy_from_slice(&self.seq.to_be_bytes());
        Ok(())
    }
}

/// A read-only view over a datagram with a checked header.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wrap a buffer without checking it.
    pub fn new_unchecked(buffer: T) -> Packet<T> {
        Packet { buffer }
    }

    /// Wrap a buffer and validate it with [`Packet::check_len`].
    pub fn new_checked(buffer: T) -> Result<Packet<T>, WireError> {
        let p = Packet::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }

    /// Validate length, magic, version and kind. After this succeeds no accessor panics.
    pub fn check_len(&self) -> Result<(), WireError> {
        let b = self.buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if b[0..2] != MAGIC {
            return Err(WireError::BadMagic);
        }
        if b[2] != VERSION {
            return Err(WireError::BadVersion(b[2]));
        }
        Kind::from_u8(b[3])?;
        Ok(())
    }

    /// The message kind.
    pub fn kind(&self) -> Kind {
        // check_len validated the byte; fall back to End is unreachable in practice.
        Kind::from_u8(self.buffer.as_ref()[3]).unwrap_or(Kind::End)
    }

    /// Header flags.
    pub fn flags(&self) -> HeaderFlags {
        HeaderFlags(self.buffer.as_ref()[4])
    }

    /// Session id.
    pub fn session(&self) -> u64 {
        be_u64(&self.buffer.as_ref()[8..16])
    }

    /// Sender sequence number.
    pub fn seq(&self) -> u64 {
        be_u64(&self.buffer.as_ref()[16..24])
    }

    /// The decoded header.
    pub fn header(&self) -> Header {
        Header {
            kind: self.kind(),
            flags: self.flags(),
            session: self.session(),
            seq: self.seq(),
        }
    }

    /// The body after the header.
    pub fn body(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }

    /// The whole datagram.
    pub fn as_bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    /// Consume the view.
    pub fn into_inner(self) -> T {
        self.buffer
    }
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}
fn be_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}
fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// A small cursor for reading a body; every read is bounds-checked.
struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(WireError::Truncated);
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(be_u16(self.take(2)?))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(be_u32(self.take(4)?))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(be_u64(self.take(8)?))
    }
    fn arr32(&mut self) -> Result<[u8; 32], WireError> {
        let mut a = [0u8; 32];
        a.copy_from_slice(self.take(32)?);
        Ok(a)
    }
    fn rest(self) -> &'a [u8] {
        self.b
    }
}

/// A bounds-checked writer.
struct Writer<'a> {
    b: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    fn put(&mut self, v: &[u8]) -> Result<(), WireError> {
        let end = self.pos + v.len();
        let dst = self
            .b
            .get_mut(self.pos..end)
            .ok_or(WireError::BufferTooSmall)?;
        dst.copy_from_slice(v);
        self.pos = end;
        Ok(())
    }
    fn u8(&mut self, v: u8) -> Result<(), WireError> {
        self.put(&[v])
    }
    fn u16(&mut self, v: u16) -> Result<(), WireError> {
        self.put(&v.to_be_bytes())
    }
    fn u32(&mut self, v: u32) -> Result<(), WireError> {
        self.put(&v.to_be_bytes())
    }
    fn u64(&mut self, v: u64) -> Result<(), WireError> {
        self.put(&v.to_be_bytes())
    }
}

/// Session parameters, announced by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announce {
    /// Image size in bytes.
    pub image_size: u64,
    /// Page size in bytes.
    pub page_size: u32,
    /// Number of pages (`ceil(image_size / page_size)`).
    pub page_count: u64,
    /// BLAKE3 digest of the image bytes.
    pub digest: [u8; 32],
    /// Number of all-zero pages.
    pub zero_count: u64,
    /// BLAKE3 digest of the zero-page bitmap bytes.
    pub zero_map_digest: [u8; 32],
    /// Number of [`ZeroMap`] chunks that carry the zero map.
    pub zero_map_chunks: u32,
    /// Background sweep frontier: every non-zero page below it was pushed at least
    /// once. [`Announce::SWEEP_NONE`] when the server does not sweep.
    pub sweep_pos: u64,
    /// Current paced send rate in bytes per second (informational).
    pub rate: u64,
    /// Announce flags ([`Announce::FLAG_PUSH`], ...).
    pub flags: u8,
    /// Largest page-fragment payload the server sends.
    pub frag_payload: u16,
}

impl Announce {
    /// Body length.
    pub const LEN: usize = 8 + 4 + 8 + 32 + 8 + 32 + 4 + 8 + 8 + 1 + 2;
    /// `sweep_pos` value meaning "no sweep".
    pub const SWEEP_NONE: u64 = u64::MAX;
    /// The server pushes pages next to faults.
    pub const FLAG_PUSH: u8 = 0x01;
    /// The server sweeps the whole image.
    pub const FLAG_SWEEP: u8 = 0x02;
    /// The sweep has passed every page.
    pub const FLAG_SWEEP_DONE: u8 = 0x04;
    /// The server follows pushed and swept pages with FEC [`Repair`] symbols.
    pub const FLAG_FEC: u8 = 0x08;

    fn parse(r: &mut Reader<'_>) -> Result<Announce, WireError> {
        let a = Announce {
            image_size: r.u64()?,
            page_size: r.u32()?,
            page_count: r.u64()?,
            digest: r.arr32()?,
            zero_count: r.u64()?,
            zero_map_digest: r.arr32()?,
            zero_map_chunks: r.u32()?,
            sweep_pos: r.u64()?,
            rate: r.u64()?,
            flags: r.u8()?,
            frag_payload: r.u16()?,
        };
        if a.page_size == 0 || !a.page_size.is_power_of_two() || a.page_size > (1 << 21) {
            return Err(WireError::BadField("page_size"));
        }
        let expect = a.image_size.div_ceil(u64::from(a.page_size));
        if a.page_count != expect {
            return Err(WireError::BadField("page_count"));
        }
        if a.zero_count > a.page_count {
            return Err(WireError::BadField("zero_count"));
        }
        if a.frag_payload == 0 {
            return Err(WireError::BadField("frag_payload"));
        }
        Ok(a)
    }

    fn emit(&self, w: &mut Writer<'_>) -> Result<(), WireError> {
        w.u64(self.image_size)?;
        w.u32(self.page_size)?;
        w.u64(self.page_count)?;
        w.put(&self.digest)?;
        w.u64(self.zero_count)?;
        w.put(&self.zero_map_digest)?;
        w.u32(self.zero_map_chunks)?;
        w.u64(self.sweep_pos)?;
        w.u64(self.rate)?;
        w.u8(self.flags)?;
        w.u16(self.frag_payload)
    }
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
    pub flags: u8,
    /// Payload bytes (empty for [`Data::ZERO`]).
    pub payload: &'a [u8],
}

impl Data<'_> {
    /// Sent in answer to a demand request.
    pub const DEMAND: u8 = 0x01;
    /// Pushed next to a recent fault.
    pub const PUSH: u8 = 0x02;
    /// Sent by the sequential whole-image sweep.
    pub const SWEEP: u8 = 0x04;
    /// A repair in answer to a NACK or retry.
    pub const REPAIR: u8 = 0x08;
    /// The page is all zero; the payload is empty.
    pub const ZERO: u8 = 0x10;
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
            start: be_u64(&c[0..8]),
            len: be_u32(&c[8..12]),
        })
    }
    /// Total pages covered (saturating).
    pub fn total_pages(&self) -> u64 {
        self.iter()
            .fold(0u64, |a, r| a.saturating_add(u64::from(r.len)))
    }
}

/// Body of [`Kind::Request`] and [`Kind::Nack`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// Receiver's measured receive rate, bytes per second.
    pub rx_rate: u64,
    /// Loss the receiver measured on the group, in parts per thousand.
    pub loss_permille: u16,
    /// Request flags ([`Request::RETRY`]).
    pub flags: u8,
    /// Requested ranges.
    pub ranges: Ranges<'a>,
}

impl Request<'_> {
    /// Fixed part before the ranges.
    pub const FIXED_LEN: usize = 8 + 2 + 1 + 2;
    /// The request repeats an earlier one that got no answer.
    pub const RETRY: u8 = 0x01;

    /// How many ranges fit in a datagram of `max_datagram` bytes (with `trailer` bytes reserved).
    pub fn max_ranges(max_datagram: usize, trailer: usize) -> usize {
        max_datagram
            .saturating_sub(HEADER_LEN + Self::FIXED_LEN + trailer)
            .checked_div(RANGE_LEN)
            .unwrap_or(0)
            .min(usize::from(u16::MAX))
    }
}

/// Body of [`Kind::Join`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Join {
    /// Join flags ([`Join::WANT_ZERO_MAP`]).
    pub flags: u8,
}

impl Join {
    /// The client wants the zero map.
    pub const WANT_ZERO_MAP: u8 = 0x01;
}

/// Body of [`Kind::Heartbeat`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Receive rate, bytes per second.
    pub rx_rate: u64,
    /// Measured group loss, parts per thousand.
    pub loss_permille: u16,
    /// Pages the client holds (including zero pages).
    pub have_pages: u64,
    /// Heartbeat flags ([`Heartbeat::COMPLETE`]).
    pub flags: u8,
}

impl Heartbeat {
    /// Body length.
    pub const LEN: usize = 8 + 2 + 8 + 1;
    /// The client holds the whole image and verified it.
    pub const COMPLETE: u8 = 0x01;
}

/// Body of [`Kind::Leave`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leave {
    /// 0: done, 1: aborted.
    pub reason: u8,
}

/// Body of [`Kind::ZeroMap`]: bits for pages `start_page ..`.
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

impl ZeroMap<'_> {
    /// Fixed part before the bits.
    pub const FIXED_LEN: usize = 4 + 4 + 8;
}

/// Body of [`Kind::End`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct End {
    /// 0: normal end, 1: server shutting down on error.
    pub reason: u8,
}

/// Body of [`Kind::Repair`]: one RaptorQ (RFC 6330) repair symbol for an FEC
/// block of pages the server multicast by push or sweep.
///
/// The block is the member pages of `first_pfn .. first_pfn + span` (bit `i`
/// of `members`, LSB first, set: page `first_pfn + i` is in the block), in
/// ascending page order. Each page is `symbols_per_page` source symbols of
/// `symbol_size` bytes: the page's fragments as sent in [`Data`] datagrams
/// (`symbols_per_page` is the fragment count), each zero-padded to
/// `symbol_size`. The block has `K = members × symbols_per_page` source
/// symbols with ESIs `0..K` in that order; repair symbols have ESIs `>= K`.
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
    /// Encoding symbol id (RFC 6330), `< 2^24`.
    pub esi: u32,
    /// Member bitmap, `ceil(span / 8)` bytes, LSB first; bits past `span` are zero.
    pub members: &'a [u8],
    /// The symbol, `symbol_size` bytes.
    pub symbol: &'a [u8],
}

/// Widest page span one FEC block may cover.
pub const MAX_FEC_SPAN: u16 = 1024;
/// Most source symbols one FEC block may have.
pub const MAX_FEC_SYMBOLS: u32 = 8192;
/// Largest encoding symbol id (RFC 6330 ESIs are 24 bits).
pub const MAX_FEC_ESI: u32 = (1 << 24) - 1;

impl<'a> Repair<'a> {
    /// Fixed part before the member bitmap.
    pub const FIXED_LEN: usize = 8 + 2 + 2 + 2 + 4;

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

    fn parse(r: &mut Reader<'a>) -> Result<Repair<'a>, WireError> {
        let first_pfn = r.u64()?;
        let span = r.u16()?;
        let symbols_per_page = r.u16()?;
        let symbol_size = r.u16()?;
        let esi = r.u32()?;
        if span == 0 || span > MAX_FEC_SPAN {
            return Err(WireError::BadField("fec span"));
        }
        if symbols_per_page == 0 || symbols_per_page > MAX_FRAGMENTS {
            return Err(WireError::BadField("fec symbols per page"));
        }
        if symbol_size == 0 {
            return Err(WireError::BadField("fec symbol size"));
        }
        if esi > MAX_FEC_ESI || first_pfn.checked_add(u64::from(span)).is_none() {
            return Err(WireError::BadField("fec symbol id"));
        }
        let members = r.take(usize::from(span).div_ceil(8))?;
        let tail = span % 8;
        if members[0] & 1 == 0 || (tail != 0 && members[members.len() - 1] >> tail != 0) {
            return Err(WireError::BadField("fec members"));
        }
        let symbol = std::mem::take(&mut r.b);
        if symbol.len() != usize::from(symbol_size) {
            return Err(WireError::BadField("fec symbol length"));
        }
        let rep = Repair {
            first_pfn,
            span,
            symbols_per_page,
            symbol_size,
            esi,
            members,
            symbol,
        };
        if rep.source_symbols() > MAX_FEC_SYMBOLS {
            return Err(WireError::BadField("fec block size"));
        }
        Ok(rep)
    }

    fn emit(&self, w: &mut Writer<'_>) -> Result<(), WireError> {
        w.u64(self.first_pfn)?;
        w.u16(self.span)?;
        w.u16(self.symbols_per_page)?;
        w.u16(self.symbol_size)?;
        w.u32(self.esi)?;
        w.put(self.members)?;
        w.put(self.symbol)
    }
}

/// A parsed message body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body<'a> {
    /// See [`Announce`].
    Announce(Announce),
    /// See [`Data`].
    Data(Data<'a>),
    /// See [`Request`].
    Request(Request<'a>),
    /// See [`Request`]; a NACK of detected gaps.
    Nack(Request<'a>),
    /// See [`Join`].
    Join(Join),
    /// See [`Heartbeat`].
    Heartbeat(Heartbeat),
    /// See [`Leave`].
    Leave(Leave),
    /// See [`ZeroMap`].
    ZeroMap(ZeroMap<'a>),
    /// See [`End`].
    End(End),
    /// See [`Repair`].
    Repair(Repair<'a>),
}

impl Body<'_> {
    /// The message kind of this body.
    pub fn kind(&self) -> Kind {
        match self {
            Body::Announce(_) => Kind::Announce,
            Body::Data(_) => Kind::Data,
            Body::Request(_) => Kind::Request,
            Body::Nack(_) => Kind::Nack,
            Body::Join(_) => Kind::Join,
            Body::Heartbeat(_) => Kind::Heartbeat,
            Body::Leave(_) => Kind::Leave,
            Body::ZeroMap(_) => Kind::ZeroMap,
            Body::End(_) => Kind::End,
            Body::Repair(_) => Kind::Repair,
        }
    }
}

/// A whole message: header fields plus body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    /// Session id.
    pub session: u64,
    /// Sender sequence number.
    pub seq: u64,
    /// Header flags.
    pub flags: HeaderFlags,
    /// The body.
    pub body: Body<'a>,
}

impl<'a> Message<'a> {
    /// Parse and validate a whole datagram.
    pub fn parse(datagram: &'a [u8]) -> Result<Message<'a>, WireError> {
        let p = Packet::new_checked(datagram)?;
        let h = p.header();
        let mut r = Reader {
            b: &datagram[HEADER_LEN..],
        };
        let body = match h.kind {
            Kind::Announce => Body::Announce(Announce::parse(&mut r)?),
            Kind::Data => {
                let pfn = r.u64()?;
                let frag_index = r.u16()?;
                let frag_count = r.u16()?;
                let flags = r.u8()?;
                if frag_count == 0 || frag_count > MAX_FRAGMENTS || frag_index >= frag_count {
                    return Err(WireError::BadField("fragment"));
                }
                let payload = r.rest();
                if flags & Data::ZERO != 0 && !payload.is_empty() {
                    return Err(WireError::BadField("zero page with payload"));
                }
                Body::Data(Data {
                    pfn,
                    frag_index,
                    frag_count,
                    flags,
                    payload,
                })
            }
            Kind::Request | Kind::Nack => {
                let rx_rate = r.u64()?;
                let loss_permille = r.u16()?;
                let flags = r.u8()?;
                let n = usize::from(r.u16()?);
                let raw = r.take(n * RANGE_LEN)?;
                let ranges = Ranges { raw };
                if ranges.iter().any(|x| x.len == 0 || x.len > MAX_RANGE_LEN) {
                    return Err(WireError::BadField("range length"));
                }
                let req = Request {
                    rx_rate,
                    loss_permille,
                    flags,
                    ranges,
                };
                if h.kind == Kind::Request {
                    Body::Request(req)
                } else {
                    Body::Nack(req)
                }
            }
            Kind::Join => Body::Join(Join { flags: r.u8()? }),
            Kind::Heartbeat => Body::Heartbeat(Heartbeat {
                rx_rate: r.u64()?,
                loss_permille: r.u16()?,
                have_pages: r.u64()?,
                flags: r.u8()?,
            }),
            Kind::Leave => Body::Leave(Leave { reason: r.u8()? }),
            Kind::ZeroMap => {
                let chunk = r.u32()?;
                let chunk_count = r.u32()?;
                let start_page = r.u64()?;
                if chunk >= chunk_count || start_page % 8 != 0 {
                    return Err(WireError::BadField("zero map chunk"));
                }
                Body::ZeroMap(ZeroMap {
                    chunk,
                    chunk_count,
                    start_page,
                    bits: r.rest(),
                })
            }
            Kind::End => Body::End(End { reason: r.u8()? }),
            Kind::Repair => Body::Repair(Repair::parse(&mut r)?),
        };
        Ok(Message {
            session: h.session,
            seq: h.seq,
            flags: h.flags,
            body,
        })
    }

    /// Bytes needed to emit this message.
    pub fn buffer_len(&self) -> usize {
        HEADER_LEN
            + match &self.body {
                Body::Announce(_) => Announce::LEN,
                Body::Data(d) => DATA_FIXED_LEN + d.payload.len(),
                Body::Request(q) | Body::Nack(q) => Request::FIXED_LEN + q.ranges.raw.len(),
                Body::Join(_) => 1,
                Body::Heartbeat(_) => Heartbeat::LEN,
                Body::Leave(_) => 1,
                Body::ZeroMap(z) => ZeroMap::FIXED_LEN + z.bits.len(),
                Body::End(_) => 1,
                Body::Repair(x) => Repair::FIXED_LEN + x.members.len() + x.symbol.len(),
            }
    }

    /// Emit into `buf`; returns the number of bytes written.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize, WireError> {
        let len = self.buffer_len();
        if buf.len() < len {
            return Err(WireError::BufferTooSmall);
        }
        Header {
            kind: self.body.kind(),
            flags: self.flags,
            session: self.session,
            seq: self.seq,
        }
        .emit(buf)?;
        let mut w = Writer {
            b: &mut buf[..len],
            pos: HEADER_LEN,
        };
        match &self.body {
            Body::Announce(a) => a.emit(&mut w)?,
            Body::Data(d) => emit_data_fixed(&mut w, d.pfn, d.frag_index, d.frag_count, d.flags)
                .and_then(|_| w.put(d.payload))?,
            Body::Request(q) | Body::Nack(q) => {
                w.u64(q.rx_rate)?;
                w.u16(q.loss_permille)?;
                w.u8(q.flags)?;
                let n = u16::try_from(q.ranges.len()).map_err(|_| WireError::BadField("ranges"))?;
                w.u16(n)?;
                w.put(q.ranges.raw)?;
            }
            Body::Join(j) => w.u8(j.flags)?,
            Body::Heartbeat(h) => {
                w.u64(h.rx_rate)?;
                w.u16(h.loss_permille)?;
                w.u64(h.have_pages)?;
                w.u8(h.flags)?;
            }
            Body::Leave(l) => w.u8(l.reason)?,
            Body::ZeroMap(z) => {
                w.u32(z.chunk)?;
                w.u32(z.chunk_count)?;
                w.u64(z.start_page)?;
                w.put(z.bits)?;
            }
            Body::End(e) => w.u8(e.reason)?,
            Body::Repair(x) => x.emit(&mut w)?,
        }
        Ok(len)
    }
}

fn emit_data_fixed(
    w: &mut Writer<'_>,
    pfn: u64,
    frag_index: u16,
    frag_count: u16,
    flags: u8,
) -> Result<(), WireError> {
    w.u64(pfn)?;
    w.u16(frag_index)?;
    w.u16(frag_count)?;
    w.u8(flags)
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
    flags: u8,
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
    let mut w = Writer {
        b: buf,
        pos: HEADER_LEN,
    };
    emit_data_fixed(&mut w, pfn, frag_index, frag_count, flags)?;
    Ok(HEADER_LEN + DATA_FIXED_LEN)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(m: Message<'_>) {
        let mut buf = vec![0u8; m.buffer_len()];
        let n = m.emit(&mut buf).unwrap();
        assert_eq!(n, buf.len());
        let p = Message::parse(&buf).unwrap();
        assert_eq!(p, m);
    }

    #[test]
    fn every_kind_roundtrips() {
        let ann = Announce {
            image_size: 10_000,
            page_size: 4096,
            page_count: 3,
            digest: [7; 32],
            zero_count: 1,
            zero_map_digest: [9; 32],
            zero_map_chunks: 1,
            sweep_pos: 2,
            rate: 1_000_000,
            flags: Announce::FLAG_PUSH,
            frag_payload: 1400,
        };
        let mut raw = Vec::new();
        encode_ranges(
            &[
                PageRange { start: 5, len: 3 },
                PageRange { start: 100, len: 1 },
            ],
            &mut raw,
        );
        let bodies = [
            Body::Announce(ann),
            Body::Data(Data {
                pfn: 42,
                frag_index: 1,
                frag_count: 3,
                flags: Data::PUSH,
                payload: b"hello",
            }),
            Body::Request(Request {
                rx_rate: 5,
                loss_permille: 12,
                flags: Request::RETRY,
                ranges: ranges_from_encoded(&raw),
            }),
            Body::Nack(Request {
                rx_rate: 0,
                loss_permille: 0,
                flags: 0,
                ranges: ranges_from_encoded(&raw),
            }),
            Body::Join(Join { flags: 1 }),
            Body::Heartbeat(Heartbeat {
                rx_rate: 9,
                loss_permille: 3,
                have_pages: 77,
                flags: Heartbeat::COMPLETE,
            }),
            Body::Leave(Leave { reason: 0 }),
            Body::ZeroMap(ZeroMap {
                chunk: 0,
                chunk_count: 2,
                start_page: 64,
                bits: &[1, 2, 3],
            }),
            Body::End(End { reason: 0 }),
            Body::Repair(Repair {
                first_pfn: 40,
                span: 10,
                symbols_per_page: 3,
                symbol_size: 4,
                esi: 30,
                members: &[0b1111_0111, 0b10],
                symbol: b"abcd",
            }),
        ];
        for (i, body) in bodies.into_iter().enumerate() {
            roundtrip(Message {
                session: 0xdead_beef,
                seq: i as u64,
                flags: HeaderFlags(0),
                body,
            });
        }
    }

    #[test]
    fn rejects_bad_headers() {
        assert_eq!(Message::parse(b"MD").unwrap_err(), WireError::Truncated);
        let mut buf = [0u8; 40];
        buf[0..2].copy_from_slice(b"XX");
        assert_eq!(Message::parse(&buf).unwrap_err(), WireError::BadMagic);
        buf[0..2].copy_from_slice(&MAGIC);
        buf[2] = 9;
        assert_eq!(Message::parse(&buf).unwrap_err(), WireError::BadVersion(9));
        buf[2] = VERSION;
        buf[3] = 200;
        assert_eq!(Message::parse(&buf).unwrap_err(), WireError::BadKind(200));
    }

    #[test]
    fn rejects_bad_fragments_and_ranges() {
        let mut buf = vec![0u8; 64];
        let m = Message {
            session: 1,
            seq: 1,
            flags: HeaderFlags(0),
            body: Body::Data(Data {
                pfn: 1,
                frag_index: 0,
                frag_count: 1,
                flags: 0,
                payload: &[],
            }),
        };
        let n = m.emit(&mut buf).unwrap();
        // frag_index (offset 32) = 5 >= frag_count 1
        buf[HEADER_LEN + 9] = 5;
        assert!(matches!(
            Message::parse(&buf[..n]),
            Err(WireError::BadField(_))
        ));
        // a request claiming 1000 ranges but carrying none
        let mut q = vec![0u8; HEADER_LEN + Request::FIXED_LEN];
        Header {
            kind: Kind::Request,
            flags: HeaderFlags(0),
            session: 1,
            seq: 1,
        }
        .emit(&mut q)
        .unwrap();
        let l = q.len();
        q[l - 2..].copy_from_slice(&1000u16.to_be_bytes());
        assert_eq!(Message::parse(&q).unwrap_err(), WireError::Truncated);
    }

    #[test]
    fn rejects_bad_repairs() {
        let good = Repair {
            first_pfn: 8,
            span: 10,
            symbols_per_page: 3,
            symbol_size: 4,
            esi: 12,
            members: &[0b0000_0101, 0b10],
            symbol: b"abcd",
        };
        let emit = |r: Repair<'_>| {
            let m = Message {
                session: 1,
                seq: 1,
                flags: HeaderFlags(0),
                body: Body::Repair(r),
            };
            let mut buf = vec![0u8; m.buffer_len()];
            m.emit(&mut buf).unwrap();
            buf
        };
        let ok = emit(good);
        let Body::Repair(p) = Message::parse(&ok).unwrap().body else {
            panic!("kind changed");
        };
        assert_eq!(p.member_pfns().collect::<Vec<_>>(), vec![8, 10, 17]);
        assert_eq!(p.source_symbols(), 9);
        let bad = [
            Repair {
                members: &[0b100, 0b10],
                ..good
            }, // first page not a member
            Repair {
                members: &[0b101, 0b110],
                ..good
            }, // bit past the span
            Repair {
                span: 0,
                members: &[],
                ..good
            }, // empty span
            Repair {
                span: MAX_FEC_SPAN + 8,
                members: &[1; 129],
                ..good
            }, // span too wide
            Repair {
                symbols_per_page: 0,
                ..good
            },
            Repair {
                symbols_per_page: MAX_FRAGMENTS + 1,
                ..good
            },
            Repair {
                esi: MAX_FEC_ESI + 1,
                ..good
            },
            Repair {
                symbol_size: 0,
                symbol: b"",
                ..good
            },
            Repair {
                first_pfn: u64::MAX - 3,
                ..good
            }, // span wraps
            // 1024 pages of 9 symbols: more than MAX_FEC_SYMBOLS
            Repair {
                span: 1024,
                symbols_per_page: 9,
                members: &[0xff; 128],
                ..good
            },
        ];
        for r in bad {
            assert!(
                matches!(Message::parse(&emit(r)), Err(WireError::BadField(_))),
                "{r:?}"
            );
        }
        // A symbol shorter or longer than its stated size.
        let mut buf = emit(good);
        buf.pop();
        assert!(Message::parse(&buf).is_err());
        let mut buf = emit(good);
        buf.push(0);
        assert!(Message::parse(&buf).is_err());
    }
}
