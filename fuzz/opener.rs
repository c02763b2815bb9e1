//! The secure [`Opener`] on datagrams sealed by a real [`Sealer`], then replayed,
//! bit-flipped, truncated or extended: it never panics, and it accepts only datagrams
//! exactly as sealed, each once, with the plain bytes that were sealed. A client that
//! requires encryption accepts nothing sealed in authenticated-only mode.

use mcdist::secure::{Opener, Protection, Psk, Role, Sealer, Security, TRAILER_LEN};
use mcdist::server::{Server, ServerConfig};
use mcdist::source::MemSource;
use mcdist::wire::{Body, Data, HeaderFlags, Message, HEADER_LEN};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Session of the sealed datagrams.
const SESSION: u64 = 0x5ea1;

/// A real server's announce of [`SESSION`] (plain), computed once.
fn announce() -> &'static [u8] {
    static ANNOUNCE: OnceLock<Vec<u8>> = OnceLock::new();
    ANNOUNCE.get_or_init(|| {
        let cfg = ServerConfig {
            session_id: Some(SESSION),
            ..ServerConfig::default()
        };
        let src = Arc::new(MemSource::new(vec![7u8; 4 * 4096], 4096));
        let t0 = Instant::now();
        let mut buf = vec![0u8; 65_536];
        let info = mcdist::source::scan(src.as_ref()).expect("an in-memory image scans");
        if let Ok(mut s) = Server::with_info(cfg, src, info, t0) {
            for _ in 0..100 {
                let Some(t) = s.poll_transmit(t0, &mut buf) else {
                    continue;
                };
                if matches!(Message::parse(&buf[..t.len]), Ok(m) if matches!(m.body, Body::Announce(_)))
                {
                    return buf[..t.len].to_vec();
                }
            }
        }
        Vec::new()
    })
}

fn data(seq: u64, pfn: u64, payload: &[u8]) -> Vec<u8> {
    let m = Message {
        session: SESSION,
        seq,
        flags: HeaderFlags::empty(),
        body: Body::Data(Data {
            pfn,
            frag_index: 0,
            frag_count: 1,
            flags: mcdist::wire::DataFlags::empty(),
            payload,
        }),
    };
    let mut buf = vec![0u8; m.buffer_len()];
    let _ = m.emit(&mut buf);
    buf
}

/// Input: a mode byte (bit 0: the sealer authenticates only; bit 1: the opener does;
/// bit 2: the opener is a server and the sealer a client), then 5-byte operations
/// `[op, pos_hi, pos_lo, mask, x]`: seal and deliver a new datagram, deliver a sealed
/// one with a byte XORed, resized, or unchanged (a replay, after `x` ms). Returns how
/// many datagrams were accepted.
pub fn opener(data_in: &[u8]) -> usize {
    let Some((&mode, ops)) = data_in.split_first() else {
        return 0;
    };
    let prot = |bit: u8| {
        if mode & bit != 0 {
            Protection::AuthOnly
        } else {
            Protection::Encrypted
        }
    };
    let psk = Psk::from_bytes([0x42; 32]);
    let seal_sec = Security {
        protection: prot(1),
        ..Security::new(psk.clone())
    };
    let open_sec = Security {
        protection: prot(2),
        replay_window: 64,
        ..Security::new(psk)
    };
    let server_side = mode & 4 != 0;
    let (mut sealer, mut opener) = if server_side {
        (
            Sealer::new(&seal_sec, Role::Client),
            Opener::server(&open_sec, SESSION),
        )
    } else {
        (
            Sealer::new(&seal_sec, Role::Server),
            Opener::client(&open_sec),
        )
    };
    let strict = !server_side && open_sec.requires_encryption();
    let from = SocketAddr::from(([10, 0, 0, 1], 7000));
    let mut now = Instant::now();
    // (sealed, plain) of every datagram sealed so far.
    let mut sealed: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut accepted = HashSet::new();
    for op in ops.chunks_exact(5) {
        let &[code, p0, p1, mask, x] = op else {
            break;
        };
        let pos = usize::from(u16::from_be_bytes([p0, p1]));
        let candidate = if code % 4 == 0 || sealed.is_empty() {
            // A new genuine datagram: the announce first, then pages.
            let plain = if sealed.is_empty() && !server_side {
                announce().to_vec()
            } else {
                data(sealed.len() as u64, u64::from(x), &vec![x; pos % 1500])
            };
            let mut buf = plain.clone();
            buf.resize(plain.len() + TRAILER_LEN, 0);
            let Ok(n) = sealer.seal(&mut buf, plain.len()) else {
                break;
            };
            buf.truncate(n);
            sealed.push((buf.clone(), plain));
            buf
        } else {
            let mut buf = sealed[usize::from(x) % sealed.len()].0.clone();
            match code % 4 {
                1 => {
                    let at = pos % buf.len();
                    buf[at] ^= mask;
                }
                2 => buf.resize(pos % (buf.len() + 64), mask),
                _ => now += Duration::from_millis(u64::from(x)),
            }
            buf
        };
        let mut buf = candidate.clone();
        let Ok(n) = opener.open(now, from, &mut buf) else {
            continue;
        };
        let Some(i) = sealed.iter().position(|(s, _)| *s == candidate) else {
            panic!("accepted a datagram that was never sealed: {candidate:02x?}");
        };
        assert!(accepted.insert(i), "sealed datagram {i} accepted twice");
        let plain = &sealed[i].1;
        assert_eq!(n, plain.len());
        assert_eq!(
            &buf[HEADER_LEN..n],
            &plain[HEADER_LEN..],
            "opened other bytes"
        );
        assert!(
            !strict || seal_sec.protection == Protection::Encrypted,
            "a client requiring encryption accepted a clear datagram"
        );
    }
    accepted.len()
}

/// Seed inputs: each mode with new datagrams, flips, resizes and replays.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for mode in 0..8u8 {
        let mut v = vec![mode];
        v.extend([0, 0, 0, 0, 0]); // announce (client) or a first page
        v.extend([0, 0x04, 0x00, 0, 9]); // a page of 1024 bytes
        v.extend([1, 0x00, 0x05, 0x80, 1]); // a header bit flipped
        v.extend([1, 0x00, 0x30, 0x01, 1]); // a body bit flipped
        v.extend([2, 0x00, 0x20, 0x00, 1]); // truncated
        v.extend([3, 0, 0, 0, 1]); // replayed
        v.extend([0, 0x00, 0x10, 0, 3]);
        out.push((format!("mode{mode}"), v));
    }
    out
}
