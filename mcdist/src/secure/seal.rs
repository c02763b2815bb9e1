//! Sealing: one sender's datagrams get the AUTH (and ENCRYPTED) flag, are
//! encrypted or only authenticated under the sender's key, and get the
//! trailer (sender id, counter, tag). The counter starts at 1 and never
//! repeats; sealing refuses to wrap it.

use super::key::{derive_key, nonce};
use super::{be_u64, Protection, Psk, Role, Security, TRAILER_LEN};
use crate::wire::{self, HeaderFlags};
use ring::aead::{Aad, LessSafeKey};
use std::fmt;
use thiserror::Error;

/// Why sealing failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SealError {
    /// The datagram is shorter than an mcdist header.
    #[error("datagram shorter than an mcdist header")]
    NotMcdist,
    /// No room for the trailer after the datagram.
    #[error("no room for the {TRAILER_LEN}-byte authentication trailer")]
    BufferTooSmall,
    /// The sender's counter is exhausted (2⁶⁴ datagrams); a new sender id is needed.
    #[error("datagram counter exhausted")]
    CounterExhausted,
    /// The crypto library refused the operation.
    #[error("sealing failed")]
    Crypto,
}

/// Seals outgoing datagrams of one sender.
pub struct Sealer {
    psk: Psk,
    role: Role,
    protection: Protection,
    sender_id: u64,
    pub(super) counter: u64,
    key: Option<(u64, LessSafeKey)>,
    scratch: Vec<u8>,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("role", &self.role)
            .field("sender_id", &format_args!("{:016x}", self.sender_id))
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// A sealer for a sender of `role` with a fresh random sender id.
    pub fn new(sec: &Security, role: Role) -> Sealer {
        Sealer::with_sender_id(sec, role, rand::random())
    }

    /// A sealer with a given sender id. The id must never be reused with the
    /// same key and session by another sender instance; [`Sealer::new`] draws one.
    pub fn with_sender_id(sec: &Security, role: Role, sender_id: u64) -> Sealer {
        Sealer {
            psk: sec.psk.clone(),
            role,
            protection: sec.protection,
            sender_id,
            counter: 0,
            key: None,
            scratch: Vec::new(),
        }
    }

    /// This sender's id.
    pub fn sender_id(&self) -> u64 {
        self.sender_id
    }

    /// Seal the datagram in `buf[..len]` in place and append the trailer;
    /// `buf` must have [`TRAILER_LEN`] bytes of room after `len`. Returns the
    /// sealed length.
    pub fn seal(&mut self, buf: &mut [u8], len: usize) -> Result<usize, SealError> {
        if len < wire::HEADER_LEN {
            return Err(SealError::NotMcdist);
        }
        let total = len + TRAILER_LEN;
        if buf.len() < total {
            return Err(SealError::BufferTooSmall);
        }
        if self.counter == u64::MAX {
            return Err(SealError::CounterExhausted);
        }
        self.counter += 1;
        let counter = self.counter;
        let session = be_u64(&buf[8..16]);
        if self.key.as_ref().is_none_or(|(s, _)| *s != session) {
            let k = derive_key(&self.psk, session, self.role, self.sender_id)
                .ok_or(SealError::Crypto)?;
            self.key = Some((session, k));
        }
        let Some((_, key)) = self.key.as_ref() else {
            return Err(SealError::Crypto);
        };
        let encrypt = self.protection == Protection::Encrypted;
        let mut flags = HeaderFlags::from_bits_retain(buf[4]);
        flags.insert(HeaderFlags::AUTH);
        flags.set(HeaderFlags::ENCRYPTED, encrypt);
        buf[4] = flags.bits();
        let (head, rest) = buf.split_at_mut(wire::HEADER_LEN);
        let body = &mut rest[..len - wire::HEADER_LEN];
        let tag = if encrypt {
            key.seal_in_place_separate_tag(nonce(counter), Aad::from(&head[..]), body)
        } else {
            self.scratch.clear();
            self.scratch.extend_from_slice(body);
            key.seal_in_place_separate_tag(nonce(counter), Aad::from(&head[..]), &mut self.scratch)
        }
        .map_err(|_| SealError::Crypto)?;
        buf[len..len + 8].copy_from_slice(&self.sender_id.to_be_bytes());
        buf[len + 8..len + 16].copy_from_slice(&counter.to_be_bytes());
        buf[len + 16..total].copy_from_slice(tag.as_ref());
        Ok(total)
    }
}
