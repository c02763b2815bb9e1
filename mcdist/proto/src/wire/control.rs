//! The session-control messages: [`Join`], [`Heartbeat`], [`Leave`] and [`End`].
//!
//! Join, heartbeat and leave carry the client's [`Token`]: the address-validation
//! token the server handed out in its announce reply to a join (all zero until
//! the client has one). A join is padded to [`Join::PADDED_LEN`] so the server's
//! announce reply to a not yet validated address fits three times its size.

use super::{check_emit, check_len, put, read_array, read_u16, read_u64, Field, WireError};
use super::{HeartbeatFlags, JoinFlags};

/// An address-validation token (see the server's `validate` rule).
pub type Token = [u8; TOKEN_LEN];
/// Length of a [`Token`].
pub const TOKEN_LEN: usize = 16;

/// Byte offsets of the [`Join`] body fields.
pub(super) mod join_field {
    use super::Field;
    /// Join flags.
    pub const FLAGS: usize = 0;
    /// Echoed address-validation token.
    pub const TOKEN: Field = 1..17;
}

/// Byte offsets of the [`Heartbeat`] body fields.
pub(super) mod heartbeat_field {
    use super::Field;
    /// Receive rate.
    pub const RX_RATE: Field = 0..8;
    /// Measured group loss.
    pub const LOSS_PERMILLE: Field = 8..10;
    /// Pages held.
    pub const HAVE_PAGES: Field = 10..18;
    /// Heartbeat flags.
    pub const FLAGS: usize = 18;
    /// Echoed address-validation token.
    pub const TOKEN: Field = 19..35;
    /// The part of the loss that was the receiver's own overload (appended
    /// field: a heartbeat without it reports 0).
    pub const OVERLOAD_PERMILLE: Field = 35..37;
}

/// Byte offsets of the [`Leave`] and [`End`] body fields.
pub(super) mod reason_field {
    use super::Field;
    /// Why the client leaves or the session ends.
    pub const REASON: usize = 0;
    /// Echoed address-validation token ([`Leave`](super::Leave) only).
    pub const TOKEN: Field = 1..17;
}

/// Body of [`Kind::Join`](super::Kind::Join).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Join {
    /// Join flags ([`Join::WANT_ZERO_MAP`]).
    pub flags: JoinFlags,
    /// The token of the server's announce reply, echoed (zero: none yet).
    pub token: Token,
}

impl Join {
    /// The client wants the zero map.
    pub const WANT_ZERO_MAP: JoinFlags = JoinFlags::WANT_ZERO_MAP;
    /// Body length (the fixed part; a shorter body is truncated).
    const LEN: usize = join_field::TOKEN.end;
    /// Body length as emitted: zero padding makes the whole datagram
    /// [`Join::PADDED_DATAGRAM`] bytes, as QUIC pads its Initial packets.
    pub const PADDED_LEN: usize = Self::PADDED_DATAGRAM - super::HEADER_LEN;
    /// Length of a join datagram as emitted (before any security trailer):
    /// three times this covers the announce reply and its trailer.
    pub const PADDED_DATAGRAM: usize = 96;

    /// Parse a join body (trailing bytes, the padding, are ignored).
    pub fn parse(body: &[u8]) -> Result<Join, WireError> {
        check_len(body, Self::LEN)?;
        Ok(Join {
            flags: JoinFlags::from_bits_retain(body[join_field::FLAGS]),
            token: read_array(body, join_field::TOKEN),
        })
    }

    /// Body bytes needed to emit this join (padding included).
    pub fn buffer_len(&self) -> usize {
        Self::PADDED_LEN
    }

    /// Emit the body, zero padded, into the start of `body`.
    pub fn emit(&self, body: &mut [u8]) -> Result<(), WireError> {
        check_emit(body, Self::PADDED_LEN)?;
        body[..Self::PADDED_LEN].fill(0);
        body[join_field::FLAGS] = self.flags.bits();
        put(body, join_field::TOKEN, &self.token);
        Ok(())
    }
}

/// Body of [`Kind::Heartbeat`](super::Kind::Heartbeat).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Receive rate, bytes per second.
    pub rx_rate: u64,
    /// Measured group loss, parts per thousand: every datagram the receiver
    /// did not get, whatever dropped it ([`super::LOSS_UNMEASURED`]: not measured yet).
    pub loss_permille: u16,
    /// The part of that loss (parts per thousand of the group datagrams) that
    /// the receiver dropped itself because it could not keep up: datagrams its
    /// socket buffer overflowed with (`SO_RXQ_OVFL`). The rest is path loss.
    pub overload_permille: u16,
    /// Pages the client holds (including zero pages).
    pub have_pages: u64,
    /// Heartbeat flags ([`Heartbeat::COMPLETE`]).
    pub flags: HeartbeatFlags,
    /// The client's address-validation token (zero: none yet).
    pub token: Token,
}

impl Heartbeat {
    /// Body length as emitted.
    pub const LEN: usize = heartbeat_field::OVERLOAD_PERMILLE.end;
    /// Shortest body accepted: a heartbeat of a sender that does not report
    /// overload ends after the token.
    pub const MIN_LEN: usize = heartbeat_field::TOKEN.end;
    /// The client holds the whole image and verified it.
    pub const COMPLETE: HeartbeatFlags = HeartbeatFlags::COMPLETE;

    /// Parse a heartbeat body (trailing bytes are ignored; without the
    /// overload field, overload is 0).
    pub fn parse(body: &[u8]) -> Result<Heartbeat, WireError> {
        check_len(body, Self::MIN_LEN)?;
        let overload_permille = if body.len() >= Self::LEN {
            read_u16(body, heartbeat_field::OVERLOAD_PERMILLE)
        } else {
            0
        };
        Ok(Heartbeat {
            rx_rate: read_u64(body, heartbeat_field::RX_RATE),
            loss_permille: read_u16(body, heartbeat_field::LOSS_PERMILLE),
            overload_permille,
            have_pages: read_u64(body, heartbeat_field::HAVE_PAGES),
            flags: HeartbeatFlags::from_bits_retain(body[heartbeat_field::FLAGS]),
            token: read_array(body, heartbeat_field::TOKEN),
        })
    }

    /// Body bytes needed to emit this heartbeat.
    pub fn buffer_len(&self) -> usize {
        Self::LEN
    }

    /// Emit the body into the start of `body`.
    pub fn emit(&self, body: &mut [u8]) -> Result<(), WireError> {
        check_emit(body, Self::LEN)?;
        put(body, heartbeat_field::RX_RATE, &self.rx_rate.to_be_bytes());
        put(
            body,
            heartbeat_field::LOSS_PERMILLE,
            &self.loss_permille.to_be_bytes(),
        );
        put(
            body,
            heartbeat_field::HAVE_PAGES,
            &self.have_pages.to_be_bytes(),
        );
        body[heartbeat_field::FLAGS] = self.flags.bits();
        put(body, heartbeat_field::TOKEN, &self.token);
        put(
            body,
            heartbeat_field::OVERLOAD_PERMILLE,
            &self.overload_permille.to_be_bytes(),
        );
        Ok(())
    }
}

/// Body of [`Kind::Leave`](super::Kind::Leave).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leave {
    /// 0: done, 1: aborted.
    pub reason: u8,
    /// The client's address-validation token (zero: none yet).
    pub token: Token,
}

impl Leave {
    const LEN: usize = reason_field::TOKEN.end;

    /// Parse a leave body (trailing bytes are ignored).
    pub fn parse(body: &[u8]) -> Result<Leave, WireError> {
        check_len(body, Self::LEN)?;
        Ok(Leave {
            reason: body[reason_field::REASON],
            token: read_array(body, reason_field::TOKEN),
        })
    }

    /// Body bytes needed to emit this leave.
    pub fn buffer_len(&self) -> usize {
        Self::LEN
    }

    /// Emit the body into the start of `body`.
    pub fn emit(&self, body: &mut [u8]) -> Result<(), WireError> {
        check_emit(body, Self::LEN)?;
        body[reason_field::REASON] = self.reason;
        put(body, reason_field::TOKEN, &self.token);
        Ok(())
    }
}

/// Body of [`Kind::End`](super::Kind::End).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct End {
    /// 0: normal end, 1: server shutting down on error.
    pub reason: u8,
}

impl End {
    const LEN: usize = reason_field::REASON + 1;

    /// Parse an end body (trailing bytes are ignored).
    pub fn parse(body: &[u8]) -> Result<End, WireError> {
        check_len(body, Self::LEN)?;
        Ok(End {
            reason: body[reason_field::REASON],
        })
    }

    /// Body bytes needed to emit this end.
    pub fn buffer_len(&self) -> usize {
        Self::LEN
    }

    /// Emit the body into the start of `body`.
    pub fn emit(&self, body: &mut [u8]) -> Result<(), WireError> {
        check_emit(body, Self::LEN)?;
        body[reason_field::REASON] = self.reason;
        Ok(())
    }
}
