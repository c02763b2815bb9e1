//! [`Announce`]: the session parameters the server announces.

use super::{
    check_emit, check_len, put, read_array, read_u16, read_u32, read_u64, AnnounceFlags, Field,
    Token, WireError,
};

/// Byte offsets of the [`Announce`] body fields.
pub(super) mod field {
    use super::Field;
    /// Image size in bytes.
    pub const IMAGE_SIZE: Field = 0..8;
    /// Page size in bytes.
    pub const PAGE_SIZE: Field = 8..12;
    /// Number of pages.
    pub const PAGE_COUNT: Field = 12..20;
    /// BLAKE3 digest of the image.
    pub const DIGEST: Field = 20..52;
    /// Number of all-zero pages.
    pub const ZERO_COUNT: Field = 52..60;
    /// BLAKE3 digest of the zero-page bitmap.
    pub const ZERO_MAP_DIGEST: Field = 60..92;
    /// Number of zero-map chunks.
    pub const ZERO_MAP_CHUNKS: Field = 92..96;
    /// Sweep frontier.
    pub const SWEEP_POS: Field = 96..104;
    /// Paced send rate.
    pub const RATE: Field = 104..112;
    /// Announce flags.
    pub const FLAGS: usize = 112;
    /// Largest fragment payload.
    pub const FRAG_PAYLOAD: Field = 113..115;
    /// Address-validation token for the receiver (unicast replies to a join only).
    pub const TOKEN: Field = 115..131;
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
    /// Number of [`ZeroMap`](super::ZeroMap) chunks that carry the zero map.
    pub zero_map_chunks: u32,
    /// Background sweep frontier: every non-zero page below it was pushed at least
    /// once. [`Announce::SWEEP_NONE`] when the server does not sweep.
    pub sweep_pos: u64,
    /// Current paced send rate in bytes per second (informational).
    pub rate: u64,
    /// Announce flags ([`Announce::FLAG_PUSH`], ...).
    pub flags: AnnounceFlags,
    /// Largest page-fragment payload the server sends.
    pub frag_payload: u16,
    /// In a unicast reply to a join: the token that validates the receiver's
    /// address once echoed. All zero in group announces.
    pub token: Token,
}

impl Announce {
    /// Body length.
    pub const LEN: usize = field::TOKEN.end;
    /// `sweep_pos` value meaning "no sweep".
    pub const SWEEP_NONE: u64 = u64::MAX;
    /// The server pushes pages next to faults.
    pub const FLAG_PUSH: AnnounceFlags = AnnounceFlags::PUSH;
    /// The server sweeps the whole image.
    pub const FLAG_SWEEP: AnnounceFlags = AnnounceFlags::SWEEP;
    /// The sweep has passed every page.
    pub const FLAG_SWEEP_DONE: AnnounceFlags = AnnounceFlags::SWEEP_DONE;
    /// The server follows pushed and swept pages with FEC [`Repair`](super::Repair) symbols.
    pub const FLAG_FEC: AnnounceFlags = AnnounceFlags::FEC;
    /// The server serves the image's hash pages ([`crate::integrity`]) as page numbers
    /// `page_count..`: receivers verify every page against the digest. Receivers refuse
    /// a session without it.
    pub const FLAG_HASH_PAGES: AnnounceFlags = AnnounceFlags::HASH_PAGES;
    /// In an announce to one receiver: its address is validated (its token
    /// came back), so its requests are served.
    pub const FLAG_VALIDATED: AnnounceFlags = AnnounceFlags::VALIDATED;

    /// Parse and validate an announce body (bytes after the header; trailing bytes are ignored).
    pub fn parse(body: &[u8]) -> Result<Announce, WireError> {
        check_len(body, Self::LEN)?;
        let a = Announce {
            image_size: read_u64(body, field::IMAGE_SIZE),
            page_size: read_u32(body, field::PAGE_SIZE),
            page_count: read_u64(body, field::PAGE_COUNT),
            digest: read_array(body, field::DIGEST),
            zero_count: read_u64(body, field::ZERO_COUNT),
            zero_map_digest: read_array(body, field::ZERO_MAP_DIGEST),
            zero_map_chunks: read_u32(body, field::ZERO_MAP_CHUNKS),
            sweep_pos: read_u64(body, field::SWEEP_POS),
            rate: read_u64(body, field::RATE),
            flags: AnnounceFlags::from_bits_retain(body[field::FLAGS]),
            frag_payload: read_u16(body, field::FRAG_PAYLOAD),
            token: read_array(body, field::TOKEN),
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

    /// Body bytes needed to emit this announce.
    pub fn buffer_len(&self) -> usize {
        Self::LEN
    }

    /// Emit the body into the start of `body`.
    pub fn emit(&self, body: &mut [u8]) -> Result<(), WireError> {
        check_emit(body, Self::LEN)?;
        put(body, field::IMAGE_SIZE, &self.image_size.to_be_bytes());
        put(body, field::PAGE_SIZE, &self.page_size.to_be_bytes());
        put(body, field::PAGE_COUNT, &self.page_count.to_be_bytes());
        put(body, field::DIGEST, &self.digest);
        put(body, field::ZERO_COUNT, &self.zero_count.to_be_bytes());
        put(body, field::ZERO_MAP_DIGEST, &self.zero_map_digest);
        put(
            body,
            field::ZERO_MAP_CHUNKS,
            &self.zero_map_chunks.to_be_bytes(),
        );
        put(body, field::SWEEP_POS, &self.sweep_pos.to_be_bytes());
        put(body, field::RATE, &self.rate.to_be_bytes());
        body[field::FLAGS] = self.flags.bits();
        put(body, field::FRAG_PAYLOAD, &self.frag_payload.to_be_bytes());
        put(body, field::TOKEN, &self.token);
        Ok(())
    }
}
