//! The session-control messages: [`Join`], [`Heartbeat`], [`Leave`] and [`End`].

use super::{check_emit, check_len, put, read_u16, read_u64, Field, WireError};

/// Byte offsets of the [`Join`] body fields.
pub(super) mod join_field {
    /// Join flags.
    pub const FLAGS: usize = 0;
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
}

/// Byte offsets of the [`Leave`] and [`End`] body fields.
pub(super) mod reason_field {
    /// Why the client leaves or the session ends.
    pub const REASON: usize = 0;
}

/// Body of [`Kind::Join`](super::Kind::Join).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Join {
    /// Join flags ([`Join::WANT_ZERO_MAP`]).
    pub flags: u8,
}

impl Join {
    /// The client wants the zero map.
    pub const WANT_ZERO_MAP: u8 = 0x01;
    /// Body length.
    const LEN: usize = join_field::FLAGS + 1;

    /// Parse a join body (trailing bytes are ignored).
    pub fn parse(body: &[u8]) -> Result<Join, WireError> {
        check_len(body, Self::LEN)?;
        Ok(Join {
            flags: body[join_field::FLAGS],
        })
    }

    /// Body bytes needed to emit this join.
    pub fn buffer_len(&self) -> usize {
        Self::LEN
    }

    /// Emit the body into the start of `body`.
    pub fn emit(&self, body: &mut [u8]) -> Result<(), WireError> {
        check_emit(body, Self::LEN)?;
        body[join_field::FLAGS] = self.flags;
        Ok(())
    }
}

/// Body of [`Kind::Heartbeat`](super::Kind::Heartbeat).
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
    pub const LEN: usize = heartbeat_field::FLAGS + 1;
    /// The client holds the whole image and verified it.
    pub const COMPLETE: u8 = 0x01;

    /// Parse a heartbeat body (trailing bytes are ignored).
    pub fn parse(body: &[u8]) -> Result<Heartbeat, WireError> {
        check_len(body, Self::LEN)?;
        Ok(Heartbeat {
            rx_rate: read_u64(body, heartbeat_field::RX_RATE),
            loss_permille: read_u16(body, heartbeat_field::LOSS_PERMILLE),
            have_pages: read_u64(body, heartbeat_field::HAVE_PAGES),
            flags: body[heartbeat_field::FLAGS],
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
        body[heartbeat_field::FLAGS] = self.flags;
        Ok(())
    }
}

/// Body of [`Kind::Leave`](super::Kind::Leave).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leave {
    /// 0: done, 1: aborted.
    pub reason: u8,
}

/// Body of [`Kind::End`](super::Kind::End).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct End {
    /// 0: normal end, 1: server shutting down on error.
    pub reason: u8,
}

/// Parse, emit and size of the one-byte reason bodies ([`Leave`], [`End`]).
macro_rules! reason_body {
    ($ty:ident, $what:literal) => {
        impl $ty {
            const LEN: usize = reason_field::REASON + 1;

            #[doc = concat!("Parse ", $what, " body (trailing bytes are ignored).")]
            pub fn parse(body: &[u8]) -> Result<$ty, WireError> {
                check_len(body, Self::LEN)?;
                Ok($ty {
                    reason: body[reason_field::REASON],
                })
            }

            #[doc = concat!("Body bytes needed to emit this ", stringify!($ty), ".")]
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
    };
}

reason_body!(Leave, "a leave");
reason_body!(End, "an end");
