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
//! its `Repr` type and in the repository's `DESIGN.md`; each body module names
//! its field offsets in a private `field` module (smoltcp's style), so no
//! accessor uses a bare number.
//!
//! The module follows smoltcp's `wire` discipline: a `Packet<T: AsRef<[u8]>>`
//! view is created with [`Packet::new_checked`], which validates lengths, magic
//! and version; **after `check_len` succeeds no accessor panics**. The same rule
//! holds for the bodies: each representation's `parse` first checks the body's
//! length against its fixed part and only then reads the fields. [`Message::parse`]
//! validates the body and produces a typed representation whose payloads
//! borrow from the datagram. [`Message::emit`] writes a representation into a
//! caller-provided buffer of at least [`Message::buffer_len`] bytes.
//!
//! Parsing never allocates in proportion to an attacker-chosen count: range
//! lists are returned as borrowed iterators over the datagram.
//!
//! One module per message family:
//!
//! | module      | messages                                 |
//! |-------------|------------------------------------------|
//! | `header`    | [`Header`], [`Packet`], [`Kind`]         |
//! | `announce`  | [`Announce`]                             |
//! | `data`      | [`Data`], [`emit_data_header`]           |
//! | `ranges`    | [`Request`] (and NACK), [`PageRange`]    |
//! | `fragnack`  | [`FragmentNack`]                         |
//! | `control`   | [`Join`], [`Heartbeat`], [`Leave`], [`End`] |
//! | `zeromap`   | [`ZeroMap`]                              |
//! | `repair`    | [`Repair`] (FEC repair symbols)          |

use std::ops::Range;
use thiserror::Error;

mod announce;
mod control;
mod data;
mod flags;
mod fragnack;
mod header;
mod ranges;
mod repair;
#[cfg(test)]
mod tests;
mod zeromap;

pub use announce::Announce;
pub use control::{End, Heartbeat, Join, Leave, Token, TOKEN_LEN};
pub use data::{emit_data_header, Data, DATA_FIXED_LEN};
pub use flags::{AnnounceFlags, DataFlags, HeaderFlags, HeartbeatFlags, JoinFlags, RequestFlags};
pub use fragnack::{
    encode_fragment_entries, fragment_entries_from_encoded, FragmentEntries, FragmentNack,
    PageFragments, MAX_NACK_FRAGMENTS,
};
pub use header::{Header, Kind, Packet, HEADER_LEN, MAGIC, SEQ_UNICAST_BIT, VERSION};
pub use ranges::{
    encode_ranges, ranges_from_encoded, PageRange, Ranges, Request, MAX_RANGE_LEN, RANGE_LEN,
};
pub use repair::{Repair, MAX_FEC_ESI, MAX_FEC_SPAN, MAX_FEC_SYMBOLS};
pub use zeromap::ZeroMap;

/// Largest number of fragments a page may be split into.
pub const MAX_FRAGMENTS: u16 = 1024;

/// A loss report (`loss_permille` of a Heartbeat or a request) that says nothing yet:
/// the receiver has not seen enough group datagrams to measure its loss. Any value
/// above 1000 means the same to the server.
pub const LOSS_UNMEASURED: u16 = u16::MAX;

/// Whether a loss report says nothing yet ([`LOSS_UNMEASURED`], or any value above 1000).
pub fn loss_unmeasured(loss_permille: u16) -> bool {
    loss_permille > 1000
}

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

/// A field of fixed size: its byte range within the header or a body.
type Field = Range<usize>;

/// `Truncated` unless `b` holds at least `len` bytes (the fixed part of a body).
fn check_len(b: &[u8], len: usize) -> Result<(), WireError> {
    if b.len() < len {
        return Err(WireError::Truncated);
    }
    Ok(())
}

/// `BufferTooSmall` unless `b` has room for `len` bytes.
fn check_emit(b: &[u8], len: usize) -> Result<(), WireError> {
    if b.len() < len {
        return Err(WireError::BufferTooSmall);
    }
    Ok(())
}

/// The bytes of field `f`; `b` was checked to hold it.
fn read_array<const N: usize>(b: &[u8], f: Field) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[f]);
    a
}
fn read_u64(b: &[u8], f: Field) -> u64 {
    u64::from_be_bytes(read_array(b, f))
}
fn read_u32(b: &[u8], f: Field) -> u32 {
    u32::from_be_bytes(read_array(b, f))
}
fn read_u16(b: &[u8], f: Field) -> u16 {
    u16::from_be_bytes(read_array(b, f))
}

/// Write `v` (exactly the field's size) into field `f`; `b` was checked to hold it.
fn put(b: &mut [u8], f: Field, v: &[u8]) {
    b[f].copy_from_slice(v);
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
    /// See [`Request`]; pages the server recorded as the working set of earlier clones,
    /// which a receiver may prefetch.
    Hint(Request<'a>),
    /// See [`FragmentNack`]; a NACK of single fragments of pages held in part.
    FragmentNack(FragmentNack<'a>),
}

impl<'a> Body<'a> {
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
            Body::Hint(_) => Kind::Hint,
            Body::FragmentNack(_) => Kind::FragmentNack,
        }
    }

    /// Parse the body of a `kind` message (the bytes after the header).
    fn parse(kind: Kind, body: &'a [u8]) -> Result<Body<'a>, WireError> {
        Ok(match kind {
            Kind::Announce => Body::Announce(Announce::parse(body)?),
            Kind::Data => Body::Data(Data::parse(body)?),
            Kind::Request => Body::Request(Request::parse(body)?),
            Kind::Nack => Body::Nack(Request::parse(body)?),
            Kind::Join => Body::Join(Join::parse(body)?),
            Kind::Heartbeat => Body::Heartbeat(Heartbeat::parse(body)?),
            Kind::Leave => Body::Leave(Leave::parse(body)?),
            Kind::ZeroMap => Body::ZeroMap(ZeroMap::parse(body)?),
            Kind::End => Body::End(End::parse(body)?),
            Kind::Repair => Body::Repair(Repair::parse(body)?),
            Kind::Hint => Body::Hint(Request::parse(body)?),
            Kind::FragmentNack => Body::FragmentNack(FragmentNack::parse(body)?),
        })
    }

    /// Bytes the body takes after the header.
    fn buffer_len(&self) -> usize {
        match self {
            Body::Announce(a) => a.buffer_len(),
            Body::Data(d) => d.buffer_len(),
            Body::Request(q) | Body::Nack(q) | Body::Hint(q) => q.buffer_len(),
            Body::Join(j) => j.buffer_len(),
            Body::Heartbeat(h) => h.buffer_len(),
            Body::Leave(l) => l.buffer_len(),
            Body::ZeroMap(z) => z.buffer_len(),
            Body::End(e) => e.buffer_len(),
            Body::Repair(x) => x.buffer_len(),
            Body::FragmentNack(f) => f.buffer_len(),
        }
    }

    /// Emit the body into the start of `body`.
    fn emit(&self, body: &mut [u8]) -> Result<(), WireError> {
        match self {
            Body::Announce(a) => a.emit(body),
            Body::Data(d) => d.emit(body),
            Body::Request(q) | Body::Nack(q) | Body::Hint(q) => q.emit(body),
            Body::Join(j) => j.emit(body),
            Body::Heartbeat(h) => h.emit(body),
            Body::Leave(l) => l.emit(body),
            Body::ZeroMap(z) => z.emit(body),
            Body::End(e) => e.emit(body),
            Body::Repair(x) => x.emit(body),
            Body::FragmentNack(f) => f.emit(body),
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
        let body = Body::parse(h.kind, &datagram[HEADER_LEN..])?;
        Ok(Message {
            session: h.session,
            seq: h.seq,
            flags: h.flags,
            body,
        })
    }

    /// Bytes needed to emit this message.
    pub fn buffer_len(&self) -> usize {
        HEADER_LEN + self.body.buffer_len()
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
        self.body.emit(&mut buf[HEADER_LEN..len])?;
        Ok(len)
    }
}
