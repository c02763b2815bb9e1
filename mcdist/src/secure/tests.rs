//! Tests of sealing, opening, the replay window, session following, join
//! limits, key loading and the transport wrapper.

use super::*;
use crate::transport::Transport;
use crate::wire::{self, HeaderFlags};
use crate::wire::{Body, Data, Message};
use crate::{Dest, Transmit};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9))
}

fn data_msg(session: u64, seq: u64, pfn: u64, payload: &[u8]) -> Vec<u8> {
    let m = Message {
        session,
        seq,
        flags: HeaderFlags::empty(),
        body: Body::Data(Data {
            pfn,
            frag_index: 0,
            frag_count: 1,
            flags: crate::wire::DataFlags::empty(),
            payload,
        }),
    };
    let mut buf = vec![0u8; m.buffer_len() + TRAILER_LEN];
    let n = m.emit(&mut buf).unwrap();
    buf.truncate(n + TRAILER_LEN);
    buf
}

fn announce_msg(session: u64) -> Vec<u8> {
    let m = Message {
        session,
        seq: 1,
        flags: HeaderFlags::empty(),
        body: Body::Announce(wire::Announce {
            image_size: 4096,
            page_size: 4096,
            page_count: 1,
            digest: [0; 32],
            zero_count: 0,
            zero_map_digest: [0; 32],
            zero_map_chunks: 0,
            sweep_pos: wire::Announce::SWEEP_NONE,
            rate: 0,
            flags: crate::wire::AnnounceFlags::empty(),
            frag_payload: 4096,
            token: [0; 16],
        }),
    };
    let mut buf = vec![0u8; m.buffer_len() + TRAILER_LEN];
    let n = m.emit(&mut buf).unwrap();
    buf.truncate(n + TRAILER_LEN);
    buf
}

fn seal(s: &mut Sealer, mut buf: Vec<u8>) -> Vec<u8> {
    let len = buf.len() - TRAILER_LEN;
    let n = s.seal(&mut buf, len).unwrap();
    assert_eq!(n, buf.len());
    buf
}

fn sec(p: Protection) -> Security {
    Security {
        protection: p,
        ..Security::new(Psk::from_bytes([7; 32]))
    }
}

/// A client opener already following `session`.
fn following(sec: &Security, server: &mut Sealer, session: u64) -> Opener {
    let mut o = Opener::client(sec);
    let mut a = seal(server, announce_msg(session));
    o.open(Instant::now(), addr(), &mut a).unwrap();
    assert_eq!(o.current_session(), Some(session));
    o
}

#[test]
fn batches_are_sealed_and_opened_in_their_slots_and_forgeries_dropped() {
    use crate::transport::mem::MemNetwork;
    let net = MemNetwork::new(4096);
    let (sa, ca, ra): (SocketAddr, SocketAddr, SocketAddr) = (
        "10.0.0.1:1".parse().unwrap(),
        "10.0.0.2:1".parse().unwrap(),
        "10.0.0.3:1".parse().unwrap(),
    );
    let sec = sec(Protection::Encrypted);
    let mut server = SecureTransport::server(net.endpoint(sa, false), &sec, 9);
    let mut client = SecureTransport::client(net.endpoint(ca, true), &sec);
    let mut rogue = net.endpoint(ra, false);
    // Plaintexts of a batch: the announce, then pages 1..=3 of 1000 bytes each.
    let strip = |mut v: Vec<u8>| {
        v.truncate(v.len() - TRAILER_LEN);
        v
    };
    let msgs: Vec<Vec<u8>> = std::iter::once(strip(announce_msg(9)))
        .chain((1..=3).map(|p| strip(data_msg(9, p + 1, p, &[p as u8; 1000]))))
        .collect();
    let slot = msgs.iter().map(Vec::len).max().unwrap();
    let send = |t: &mut SecureTransport<_>, part: &[Vec<u8>]| {
        let mut buf = vec![0u8; slot * part.len()];
        let items: Vec<Transmit> = part
            .iter()
            .enumerate()
            .map(|(i, m)| {
                buf[i * slot..i * slot + m.len()].copy_from_slice(m);
                Transmit {
                    dest: Dest::Group,
                    len: m.len(),
                }
            })
            .collect();
        t.send_batch(&buf, slot, &items).unwrap();
    };
    send(&mut server, &msgs[..2]);
    // A forgery in the middle of the stream: an unsealed copy of page 2.
    rogue.send(Dest::Peer(ca), &msgs[2]).unwrap();
    send(&mut server, &msgs[2..]);
    let rslot = 2048;
    let mut buf = vec![0u8; rslot * 8];
    let mut got = Vec::new();
    let n = client
        .recv_batch(&mut buf, rslot, &mut got, Some(Duration::from_secs(1)))
        .unwrap();
    assert_eq!(n, 4, "{got:?}");
    for (i, (r, m)) in got.iter().zip(&msgs).enumerate() {
        assert_eq!(r.from, sa);
        // The sealed header differs only in its flag byte.
        assert_eq!(r.len, m.len(), "datagram {i}");
        assert_eq!(
            buf[i * rslot + 5..i * rslot + r.len],
            m[5..],
            "datagram {i}"
        );
    }
    let st = client.stats_handle().get();
    assert_eq!((st.opened, st.unauthenticated), (4, 1), "{st:?}");
    assert_eq!(server.stats_handle().get().sealed, 4);
}

#[test]
fn round_trip_both_modes() {
    for p in [Protection::Encrypted, Protection::AuthOnly] {
        let sec = sec(p);
        let mut srv = Sealer::new(&sec, Role::Server);
        let mut o = following(&sec, &mut srv, 5);
        let payload = vec![0xabu8; 4096];
        let plain = data_msg(5, 2, 3, &payload);
        let mut sealed = seal(&mut srv, plain.clone());
        let body_visible = sealed.windows(64).any(|w| w == &payload[..64]);
        assert_eq!(body_visible, p == Protection::AuthOnly, "{p:?}");
        let flags = sealed[4];
        assert!(HeaderFlags::from_bits_retain(flags).contains(HeaderFlags::AUTH));
        assert_eq!(
            HeaderFlags::from_bits_retain(flags).contains(HeaderFlags::ENCRYPTED),
            p == Protection::Encrypted
        );
        let n = o.open(Instant::now(), addr(), &mut sealed).unwrap();
        assert_eq!(n, plain.len() - TRAILER_LEN);
        assert_eq!(&sealed[5..n], &plain[5..n]);
        let msg = Message::parse(&sealed[..n]).unwrap();
        match msg.body {
            Body::Data(d) => assert_eq!(d.payload, &payload[..]),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(o.stats().opened, 2);
    }
}

#[test]
fn every_bit_flip_is_rejected() {
    for p in [Protection::Encrypted, Protection::AuthOnly] {
        let sec = sec(p);
        let mut srv = Sealer::new(&sec, Role::Server);
        let mut o = following(&sec, &mut srv, 5);
        let sealed = seal(&mut srv, data_msg(5, 2, 3, &[1, 2, 3, 4, 5, 6, 7, 8]));
        let mut rejected = 0;
        for i in 0..sealed.len() * 8 {
            let mut b = sealed.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(o.open(Instant::now(), addr(), &mut b).is_err(), "bit {i}");
            rejected += 1;
        }
        let s = o.stats();
        assert_eq!(s.dropped(), rejected);
        assert!(s.bad_tag > 0);
        // The original still opens: failed attempts did not consume its counter.
        let mut b = sealed.clone();
        assert!(o.open(Instant::now(), addr(), &mut b).is_ok());
    }
}

#[test]
fn wrong_key_wrong_role_and_unauthenticated_are_rejected() {
    let sec = sec(Protection::Encrypted);
    let mut srv = Sealer::new(&sec, Role::Server);
    let mut o = following(&sec, &mut srv, 5);
    let other = Security::new(Psk::from_bytes([8; 32]));
    let mut forger = Sealer::new(&other, Role::Server);
    let mut b = seal(&mut forger, data_msg(5, 2, 3, b"evil"));
    assert_eq!(o.open(Instant::now(), addr(), &mut b), Err(Reject::BadTag));
    // A client's datagram reflected at a client.
    let mut cl = Sealer::new(&sec, Role::Client);
    let mut b = seal(&mut cl, data_msg(5, 2, 3, b"evil"));
    assert_eq!(o.open(Instant::now(), addr(), &mut b), Err(Reject::BadTag));
    let mut b = data_msg(5, 2, 3, b"evil");
    assert_eq!(
        o.open(Instant::now(), addr(), &mut b),
        Err(Reject::Unauthenticated)
    );
    let mut b = vec![1u8; 10];
    assert_eq!(
        o.open(Instant::now(), addr(), &mut b),
        Err(Reject::Malformed)
    );
    let s = o.stats();
    assert_eq!((s.bad_tag, s.unauthenticated, s.malformed), (2, 1, 1));
}

#[test]
fn replays_and_old_counters_are_rejected() {
    let sec = Security {
        replay_window: 128,
        ..sec(Protection::AuthOnly)
    };
    let mut srv = Sealer::new(&sec, Role::Server);
    let mut o = following(&sec, &mut srv, 5);
    let first = seal(&mut srv, data_msg(5, 2, 0, b"page"));
    let mut b = first.clone();
    o.open(Instant::now(), addr(), &mut b).unwrap();
    let mut b = first.clone();
    assert_eq!(
        o.open(Instant::now(), addr(), &mut b),
        Err(Reject::Replayed)
    );
    // Out of order within the window is fine.
    let later: Vec<Vec<u8>> = (0..200)
        .map(|i| seal(&mut srv, data_msg(5, 3 + i, 0, b"page")))
        .collect();
    let mut b = later[150].clone();
    o.open(Instant::now(), addr(), &mut b).unwrap();
    let mut b = later[100].clone();
    o.open(Instant::now(), addr(), &mut b).unwrap();
    // 151 counters behind the top: outside a 128-entry window.
    let mut b = first.clone();
    assert_eq!(o.open(Instant::now(), addr(), &mut b), Err(Reject::TooOld));
    let mut b = later[0].clone();
    assert_eq!(o.open(Instant::now(), addr(), &mut b), Err(Reject::TooOld));
    let s = o.stats();
    assert_eq!((s.replayed, s.too_old), (1, 2));
}

#[test]
fn client_ignores_other_sessions_until_its_own_goes_quiet() {
    let sec = sec(Protection::Encrypted);
    let mut old = Sealer::new(&sec, Role::Server);
    let old_page = seal(&mut old, data_msg(4, 9, 0, b"stale"));
    let old_announce = seal(&mut old, announce_msg(4));
    let mut srv = Sealer::new(&sec, Role::Server);
    let t0 = Instant::now();
    let mut o = Opener::client(&sec);
    let mut a = seal(&mut srv, announce_msg(5));
    o.open(t0, addr(), &mut a).unwrap();
    let mut b = old_page.clone();
    assert_eq!(o.open(t0, addr(), &mut b), Err(Reject::OtherSession));
    let mut b = old_announce.clone();
    assert_eq!(o.open(t0, addr(), &mut b), Err(Reject::OtherSession));
    assert_eq!(o.current_session(), Some(5));
    // After the session went quiet a new session's announce is followed.
    let later = t0 + sec.session_switch_after;
    let mut srv2 = Sealer::new(&sec, Role::Server);
    let mut a = seal(&mut srv2, announce_msg(6));
    o.open(later, addr(), &mut a).unwrap();
    assert_eq!(o.current_session(), Some(6));
    assert_eq!(o.stats().other_session, 2);
}

#[test]
fn server_takes_its_session_and_rate_limits_joins() {
    let sec = Security {
        joins_per_second: 3,
        ..sec(Protection::Encrypted)
    };
    let mut o = Opener::server(&sec, 5);
    let mut cl = Sealer::new(&sec, Role::Client);
    let join = |s: &mut Sealer, session: u64| {
        let m = Message {
            session,
            seq: 1,
            flags: HeaderFlags::empty(),
            body: Body::Join(wire::Join {
                flags: crate::wire::JoinFlags::empty(),
                token: [0; 16],
            }),
        };
        let mut buf = vec![0u8; m.buffer_len() + TRAILER_LEN];
        let n = m.emit(&mut buf).unwrap();
        let n = s.seal(&mut buf, n).unwrap();
        buf.truncate(n);
        buf
    };
    let t = Instant::now();
    for _ in 0..3 {
        let mut b = join(&mut cl, 0);
        o.open(t, addr(), &mut b).unwrap();
    }
    let mut b = join(&mut cl, 0);
    assert_eq!(o.open(t, addr(), &mut b), Err(Reject::RateLimited));
    let mut b = join(&mut cl, 0);
    o.open(t + Duration::from_secs(1), addr(), &mut b).unwrap();
    let mut b = seal(&mut cl, data_msg(7, 1, 0, b"x"));
    assert_eq!(o.open(t, addr(), &mut b), Err(Reject::OtherSession));
    let mut b = seal(&mut cl, data_msg(0, 1, 0, b"x"));
    assert_eq!(o.open(t, addr(), &mut b), Err(Reject::OtherSession));
}

#[test]
fn group_backlog_survives_a_newer_unicast_datagram() {
    // The server's group and unicast streams have their own sender ids, so
    // a unicast datagram read ahead of a long queued group backlog does not
    // push the backlog out of the replay window.
    let sec = Security {
        replay_window: 256,
        ..sec(Protection::Encrypted)
    };
    let mut unicast = Sealer::new(&sec, Role::Server);
    let mut group = Sealer::new(&sec, Role::Server);
    let mut o = following(&sec, &mut unicast, 5);
    let backlog: Vec<Vec<u8>> = (0..1000)
        .map(|i| seal(&mut group, data_msg(5, i + 1, i, b"p")))
        .collect();
    for _ in 0..1000 {
        let mut u = seal(&mut unicast, data_msg(5, 1, 0, b"u"));
        o.open(Instant::now(), addr(), &mut u).unwrap();
    }
    for mut b in backlog {
        o.open(Instant::now(), addr(), &mut b).unwrap();
    }
    assert_eq!(o.stats().dropped(), 0);
}

#[test]
fn sealer_never_repeats_a_nonce() {
    let sec = sec(Protection::AuthOnly);
    let mut s = Sealer::new(&sec, Role::Client);
    let mut seen = std::collections::HashSet::new();
    for session in [0u64, 5, 0, 5] {
        for _ in 0..100 {
            let b = seal(&mut s, data_msg(session, 1, 0, b"x"));
            let n = b.len();
            assert!(seen.insert(b[n - 32..n - 16].to_vec()));
        }
    }
}

proptest::proptest! {
    #[test]
    fn arbitrary_datagrams_never_open(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
        let sec = sec(Protection::Encrypted);
        let mut c = Opener::client(&sec);
        let mut s = Opener::server(&sec, 5);
        let mut b = bytes.clone();
        proptest::prop_assert!(c.open(Instant::now(), addr(), &mut b).is_err());
        let mut b = bytes;
        proptest::prop_assert!(s.open(Instant::now(), addr(), &mut b).is_err());
    }

    #[test]
    fn any_change_to_a_sealed_datagram_is_rejected(
        pos in 0usize..1000,
        xor in 1u8..=255,
        cut in 0usize..40,
        auth_only in proptest::bool::ANY,
    ) {
        let p = if auth_only { Protection::AuthOnly } else { Protection::Encrypted };
        let sec = sec(p);
        let mut srv = Sealer::new(&sec, Role::Server);
        let mut o = following(&sec, &mut srv, 5);
        let good = seal(&mut srv, data_msg(5, 2, 3, &[9u8; 64]));
        let mut b = good.clone();
        let i = pos % b.len();
        b[i] ^= xor;
        proptest::prop_assert!(o.open(Instant::now(), addr(), &mut b).is_err());
        if cut > 0 {
            let mut b = good[..good.len() - cut].to_vec();
            proptest::prop_assert!(o.open(Instant::now(), addr(), &mut b).is_err());
        }
        let mut b = good;
        proptest::prop_assert!(o.open(Instant::now(), addr(), &mut b).is_ok());
    }
}

#[test]
fn key_parsing() {
    let raw = [0x5au8; 32];
    assert_eq!(Psk::parse(&raw).unwrap(), Psk::from_bytes(raw));
    let hex = format!("{}\n", "5a".repeat(32));
    assert_eq!(Psk::parse(hex.as_bytes()).unwrap(), Psk::from_bytes(raw));
    assert!(matches!(
        Psk::parse(b"short"),
        Err(KeyError::BadFormat { len: 5 })
    ));
    assert!(Psk::parse("zz".repeat(32).as_bytes()).is_err());
    assert_eq!(format!("{:?}", Psk::from_bytes(raw)), "Psk(<redacted>)");
    let k = Psk::generate();
    assert_eq!(Psk::parse(k.to_hex().as_bytes()).unwrap(), k);
}

#[test]
fn key_file_permissions_are_checked() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("key");
    std::fs::write(&p, "11".repeat(32)).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    let k = Psk::load(&p).unwrap();
    assert!(k.permission_warning.is_none());
    assert_eq!(k.psk, Psk::from_bytes([0x11; 32]));
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    let k = Psk::load(&p).unwrap();
    let w = k.permission_warning.unwrap();
    assert!(w.contains("0644") && w.contains("chmod 600"), "{w}");
    assert!(matches!(
        Psk::load(&dir.path().join("missing")),
        Err(KeyError::Read { .. })
    ));
}

#[test]
fn an_encrypting_client_drops_authentic_clear_datagrams() {
    let t = Instant::now();
    let enc = sec(Protection::Encrypted);
    assert!(enc.requires_encryption());
    let clear = Security::auth_only(Psk::from_bytes([7; 32]));
    assert!(!clear.requires_encryption());
    // A server misconfigured as authenticated-only: its announce is authentic but clear.
    let mut srv = Sealer::new(&clear, Role::Server);
    let mut o = Opener::client(&enc);
    let announce = seal(&mut srv, announce_msg(5));
    let mut a = announce.clone();
    assert_eq!(o.open(t, addr(), &mut a), Err(Reject::NotEncrypted));
    assert_eq!(
        o.current_session(),
        None,
        "a clear announce is not followed"
    );
    let mut d = seal(&mut srv, data_msg(5, 2, 0, &[0x42; 64]));
    assert_eq!(o.open(t, addr(), &mut d), Err(Reject::BeforeSession));
    // A forged clear datagram is a forgery, not a mismatch: only a key holder can
    // make the client report one.
    let mut f = announce.clone();
    f[wire::HEADER_LEN + 3] ^= 1;
    assert_eq!(o.open(t, addr(), &mut f), Err(Reject::BadTag));
    assert_eq!((o.stats().not_encrypted, o.stats().bad_tag), (1, 1));
    assert!(o.stats().to_string().contains("not encrypted 1"));
    // The same datagrams open where the requirement is off, and encrypted ones where on.
    let loose = Security {
        require_encryption: false,
        ..enc.clone()
    };
    let mut lo = Opener::client(&loose);
    let mut a = announce.clone();
    assert!(lo.open(t, addr(), &mut a).is_ok());
    let mut esrv = Sealer::new(&enc, Role::Server);
    let mut a = seal(&mut esrv, announce_msg(5));
    assert!(o.open(t, addr(), &mut a).is_ok());
    assert_eq!(o.current_session(), Some(5));
    // Following the session, a clear data datagram is dropped all the same.
    let mut d = seal(&mut srv, data_msg(5, 3, 0, &[0x42; 64]));
    assert_eq!(o.open(t, addr(), &mut d), Err(Reject::NotEncrypted));
    // A server does not require it: an authenticated-only client's requests carry no
    // page contents.
    let mut so = Opener::server(&enc, 5);
    let mut cl = Sealer::new(&clear, Role::Client);
    let mut r = seal(&mut cl, data_msg(5, 1, 0, b"x"));
    assert!(so.open(t, addr(), &mut r).is_ok());
}

#[test]
fn key_files_are_read_with_a_size_limit() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big");
    let mut text = "22".repeat(32);
    text.push_str(&" ".repeat(MAX_KEY_FILE_LEN as usize - 64));
    std::fs::write(&p, &text).unwrap();
    assert_eq!(Psk::load(&p).unwrap().psk, Psk::from_bytes([0x22; 32]));
    text.push(' ');
    std::fs::write(&p, &text).unwrap();
    let e = Psk::load(&p).unwrap_err();
    assert!(
        matches!(
            e,
            KeyError::TooLarge {
                limit: MAX_KEY_FILE_LEN,
                ..
            }
        ),
        "{e}"
    );
    // A device that never ends is refused after the limit, in one line.
    let zero = std::path::Path::new("/dev/zero");
    if zero.exists() {
        let e = Psk::load(zero).unwrap_err();
        assert!(matches!(e, KeyError::TooLarge { .. }), "{e}");
        assert!(!e.to_string().contains('\n'));
    }
}
