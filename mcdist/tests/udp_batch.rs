//! `sendmmsg`/`recvmmsg` batches on real UDP sockets over loopback: every
//! datagram of a batch larger than one system call's worth arrives intact,
//! in its own slot, with the right sender.

use mcdist::transport::udp::{UdpConfig, UdpTransport, MAX_BATCH};
use mcdist::transport::{Received, Transport};
use mcdist::{Dest, Transmit};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

fn payload(i: usize, buf: &mut [u8]) -> usize {
    let len = 100 + (i * 37) % 1300;
    for (k, b) in buf[..len].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(k as u8);
    }
    buf[..4].copy_from_slice(&(i as u32).to_be_bytes());
    len
}

#[test]
fn batches_cross_loopback_intact() {
    let group = SocketAddrV4::new(Ipv4Addr::new(239, 255, 77, 1), 47_000);
    let mut scfg = UdpConfig::new(group);
    scfg.iface = Some("lo".into());
    scfg.listen = Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)));
    let mut server = UdpTransport::server(&scfg).expect("server socket on loopback");
    let mut ccfg = UdpConfig::new(group);
    ccfg.iface = Some("lo".into());
    ccfg.multicast = false;
    let mut client = UdpTransport::client(&ccfg).expect("client socket on loopback");
    assert_eq!(client.capabilities().batch, MAX_BATCH);
    let port = client.local_addr().expect("bound").port();
    let to = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));

    let count = MAX_BATCH * 2 + 17;
    let slot = 2048;
    let mut out = vec![0u8; slot * count];
    let mut items = Vec::new();
    for i in 0..count {
        let len = payload(i, &mut out[i * slot..(i + 1) * slot]);
        items.push(Transmit {
            dest: Dest::Peer(to),
            len,
        });
    }
    server.send_batch(&out, slot, &items).expect("sendmmsg");
    let server_addr = server.local_addr().expect("bound");

    let rslot = 65_536;
    let mut inbuf = vec![0u8; rslot * 32];
    let mut seen = vec![false; count];
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut expect = vec![0u8; slot];
    while got < count && Instant::now() < deadline {
        let mut rec: Vec<Received> = Vec::new();
        let n = client
            .recv_batch(
                &mut inbuf,
                rslot,
                &mut rec,
                Some(Duration::from_millis(200)),
            )
            .expect("recvmmsg");
        assert_eq!(n, rec.len());
        for (k, r) in rec.iter().enumerate() {
            let d = &inbuf[k * rslot..k * rslot + r.len];
            assert_eq!(r.from.port(), server_addr.port(), "sender address");
            let i = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize;
            assert!(
                i < count && !seen[i],
                "datagram {i} unexpected or duplicated"
            );
            seen[i] = true;
            let len = payload(i, &mut expect);
            assert_eq!(d, &expect[..len], "datagram {i} intact");
            got += 1;
        }
    }
    assert_eq!(got, count, "every datagram of the batch arrived");
}
