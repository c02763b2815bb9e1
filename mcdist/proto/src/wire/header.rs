//! The fixed 24-byte header every datagram starts with, and the checked
//! [`Packet`] view over a whole datagram.

use super::{read_u64, Field, HeaderFlags, WireError};

/// Magic bytes at the start of every mcdist datagram.
pub const MAGIC: [u8; 2] = *b"MD";
/// Protocol version carried in every header. Other versions are rejected. Version 3
/// pads the last fragment of a page with zeros to the other fragments' length
/// ([`crate::reassembly::fragment_bytes`]), which version 2 receivers refuse. Version 4
/// adds the receiver's heard sequence number to requests and NACKs
/// ([`Request::heard_seq`](super::Request::heard_seq)).
pub const VERSION: u8 = 4;
/// Length of the fixed header.
pub const HEADER_LEN: usize = field::SEQ.end;
/// Set in the sequence number of datagrams the server sends by unicast, so group
/// and unicast sequences never collide and loss can be measured on the group.
pub const SEQ_UNICAST_BIT: u64 = 1 << 63;

/// Byte offsets of the header fields.
pub(super) mod field {
    use super::Field;
    /// Magic `"MD"`.
    pub const MAGIC: Field = 0..2;
    /// Protocol version.
    pub const VERSION: usize = 2;
    /// Message kind.
    pub const KIND: usize = 3;
    /// Header flags.
    pub const FLAGS: usize = 4;
    /// Reserved, zero.
    pub const RESERVED: Field = 5..8;
    /// Session id.
    pub const SESSION: Field = 8..16;
    /// Sender sequence number.
    pub const SEQ: Field = 16..24;
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
    /// Server → group: one FEC repair symbol for a block of pushed or swept pages.
    Repair = 10,
    /// Server → peer: pages recorded as earlier clones' working set (a [`Request`] body:
    /// ranges), which a receiver may ask for in bulk (prefetch).
    ///
    /// [`Request`]: super::Request
    Hint = 11,
    /// Client → server: a NACK of single fragments of pages the receiver holds in part
    /// (a [`FragmentNack`] body).
    ///
    /// [`FragmentNack`]: super::FragmentNack
    FragmentNack = 12,
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
            11 => Kind::Hint,
            12 => Kind::FragmentNack,
            other => return Err(WireError::BadKind(other)),
        })
    }
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
        b[field::MAGIC].copy_from_slice(&MAGIC);
        b[field::VERSION] = VERSION;
        b[field::KIND] = self.kind as u8;
        b[field::FLAGS] = self.flags.bits();
        b[field::RESERVED].fill(0);
        b[field::SESSION].copy_from_slice(&self.session.to_be_bytes());
        b[field::SEQ].copy_from_slice(&self.seq.to_be_bytes());
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
        if b[field::MAGIC] != MAGIC {
            return Err(WireError::BadMagic);
        }
        if b[field::VERSION] != VERSION {
            return Err(WireError::BadVersion(b[field::VERSION]));
        }
        Kind::from_u8(b[field::KIND])?;
        Ok(())
    }

    /// The message kind.
    pub fn kind(&self) -> Kind {
        // check_len validated the byte; fall back to End is unreachable in practice.
        Kind::from_u8(self.buffer.as_ref()[field::KIND]).unwrap_or(Kind::End)
    }

    /// Header flags.
    pub fn flags(&self) -> HeaderFlags {
        HeaderFlags::from_bits_retain(self.buffer.as_ref()[field::FLAGS])
    }

    /// Session id.
    pub fn session(&self) -> u64 {
        read_u64(self.buffer.as_ref(), field::SESSION)
    }

    /// Sender sequence number.
    pub fn seq(&self) -> u64 {
        read_u64(self.buffer.as_ref(), field::SEQ)
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
