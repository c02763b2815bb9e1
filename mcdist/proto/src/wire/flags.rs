//! The flag byte of each message, as a typed set.
//!
//! Every flag byte is parsed with its unknown bits kept (`from_bits_retain`): a newer peer's
//! flags survive a round trip, and an endpoint acts only on the bits it knows.

use bitflags::bitflags;

bitflags! {
    /// Flags of the fixed header.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct HeaderFlags: u8 {
        /// The datagram carries an authentication tag trailer.
        const AUTH = 0x01;
        /// The body is encrypted.
        const ENCRYPTED = 0x02;
    }
}

bitflags! {
    /// Flags of an [`Announce`](super::Announce).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct AnnounceFlags: u8 {
        /// The server pushes pages next to faults.
        const PUSH = 0x01;
        /// The server sweeps the whole image.
        const SWEEP = 0x02;
        /// The sweep has passed every page.
        const SWEEP_DONE = 0x04;
        /// The server follows pushed and swept pages with FEC [`Repair`](super::Repair)
        /// symbols.
        const FEC = 0x08;
        /// The server serves the image's hash pages ([`crate::integrity`]) as page numbers
        /// `page_count..`: receivers verify every page against the digest. Receivers
        /// refuse a session without it.
        const HASH_PAGES = 0x10;
        /// In an announce to one receiver: its address is validated (its token came
        /// back), so its requests are served.
        const VALIDATED = 0x20;
    }
}

bitflags! {
    /// Flags of a [`Data`](super::Data) body: why the server sent the page, or that it
    /// is a zero reply.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct DataFlags: u8 {
        /// Sent in answer to a demand request.
        const DEMAND = 0x01;
        /// Pushed next to a recent fault.
        const PUSH = 0x02;
        /// Sent by the sequential whole-image sweep.
        const SWEEP = 0x04;
        /// A repair in answer to a NACK or retry.
        const REPAIR = 0x08;
        /// The page is all zero; the payload is empty.
        const ZERO = 0x10;
        /// Keep the page for FEC decoding: since a receiver reported loss, the server
        /// may repair the blocks this page belongs to (its own repair bursts and the
        /// blocks it forms to answer NACKs), so receivers keep it in their FEC cache.
        const KEEP = 0x20;
    }
}

bitflags! {
    /// Flags of a [`Request`](super::Request) or NACK.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct RequestFlags: u8 {
        /// The request repeats an earlier one that got no answer.
        const RETRY = 0x01;
    }
}

bitflags! {
    /// Flags of a [`Join`](super::Join).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct JoinFlags: u8 {
        /// The client wants the zero map.
        const WANT_ZERO_MAP = 0x01;
    }
}

bitflags! {
    /// Flags of a [`Heartbeat`](super::Heartbeat).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct HeartbeatFlags: u8 {
        /// The client holds the whole image and verified it.
        const COMPLETE = 0x01;
    }
}
