//! Fuzz targets for mcdist (cargo-fuzz).
//!
//! Each target is a plain function here, so the committed corpus also runs as
//! an ordinary test (`cargo test -p mcdist-fuzz`), and the `fuzz_targets/`
//! binaries only wrap them for libFuzzer:
//!
//! - [`wire`]: `Message::parse` of arbitrary bytes never panics, and whatever
//!   parses re-emits to the same bytes' meaning (emit → parse identity).
//! - [`server`]: a [`Server`] driven by arbitrary datagrams, timeouts and
//!   polls from several peers.
//! - [`client`]: a [`Client`] likewise, with page requests and whole-image fetches;
//!   every page it hands over is exactly one page long and handed over once.
//! - [`reassembly`]: arbitrary fragments into a bounded [`Reassembler`].
//! - [`opener`]: the secure `Opener` on sealed datagrams, replayed and mutated: only
//!   datagrams exactly as sealed are accepted, each once.
//! - [`integrity`]: hash-page and data-page verification; only genuine pages verify.
//! - [`descriptor`]: the clone descriptor parser (mcdist-xen's).
//!
//! Inputs of the state-machine targets are a stream of operations (see
//! [`Ops`]); the seed corpus under `corpus/` holds real datagrams captured from
//! a simulated session, wrapped as such operations (regenerate with
//! `MCDIST_WRITE_CORPUS=1 cargo test -p mcdist-fuzz`).

mod descriptor;
mod integrity;
mod opener;

pub use descriptor::descriptor;
pub use integrity::integrity;
pub use opener::opener;

use bytes::Bytes;
use mcdist::bitmap::PageBitmap;
use mcdist::client::{Client, ClientConfig, ClientEvent};
use mcdist::reassembly::{fragment_slot, Reassembler};
use mcdist::server::{Server, ServerConfig};
use mcdist::sim::{test_image, Sim};
use mcdist::source::MemSource;
use mcdist::wire::Message;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Session id of the fuzzed server and of the sessions the corpus was captured from.
pub const SESSION: u64 = 0xf022;
/// Page size used by the state-machine targets.
pub const PAGE_SIZE: usize = 4096;
/// Pages in the fuzzed image.
pub const PAGES: usize = 64;
/// Largest datagram of the fuzzed session.
pub const MAX_DATAGRAM: usize = 1500;

/// Operation codes of the state-machine targets' input streams.
pub mod op {
    /// `[DATAGRAM, len_hi, len_lo, peer, bytes...]`: feed a datagram.
    pub const DATAGRAM: u8 = 0;
    /// `[ADVANCE, hi, lo]`: advance virtual time by that many 50 µs steps, then run timers.
    pub const ADVANCE: u8 = 1;
    /// `[POLL]`: drain transmits and events.
    pub const POLL: u8 = 2;
    /// `[REQUEST, pfn_hi, pfn_lo]`: client only, ask for a page.
    pub const REQUEST: u8 = 3;
    /// `[FETCH_ALL]`: client only, fetch the whole image.
    pub const FETCH_ALL: u8 = 4;
}

/// A reader over an operation stream.
#[derive(Debug)]
pub struct Ops<'a> {
    data: &'a [u8],
}

impl<'a> Ops<'a> {
    /// Wrap an input.
    pub fn new(data: &'a [u8]) -> Ops<'a> {
        Ops { data }
    }
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.data.split_first()?;
        self.data = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes([self.byte()?, self.byte()?]))
    }
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (h, t) = self.data.split_at(n);
        self.data = t;
        h
    }
}

/// Encode a datagram operation (for building corpora).
pub fn datagram_op(peer: u8, datagram: &[u8]) -> Vec<u8> {
    let len = u16::try_from(datagram.len()).unwrap_or(u16::MAX);
    let mut v = vec![op::DATAGRAM];
    v.extend_from_slice(&len.to_be_bytes());
    v.push(peer);
    v.extend_from_slice(&datagram[..usize::from(len)]);
    v
}

fn peer_addr(i: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 1, 0, 2 + (i % 8))), 9000)
}

/// The image every state-machine target serves or fetches.
pub fn image() -> Vec<u8> {
    test_image(PAGES, PAGE_SIZE, 5, 1)
}

/// Wire parser: never panics; a parsed message re-emits and re-parses identically.
pub fn wire(data: &[u8]) {
    let Ok(m) = Message::parse(data) else { return };
    let mut buf = vec![0u8; m.buffer_len()];
    let n = m.emit(&mut buf).expect("a parsed message must emit");
    assert_eq!(n, buf.len());
    let again = Message::parse(&buf).expect("an emitted message must parse");
    assert_eq!(again, m);
    // The emitted bytes equal the input's header and body (reserved bytes
    // aside; a join's zero padding aside).
    let n = match m.body {
        mcdist::wire::Body::Join(_) => mcdist::wire::HEADER_LEN + 1 + mcdist::wire::TOKEN_LEN,
        // A heartbeat too short for its appended overload field (u16) parses with
        // overload 0, and the bytes it has after its token are ignored.
        mcdist::wire::Body::Heartbeat(h) if data.len() < n => {
            assert_eq!(h.overload_permille, 0);
            n - 2
        }
        _ => n,
    };
    assert_eq!(&buf[..2], &data[..2]);
    assert_eq!(&buf[8..n], &data[8..n]);
}

/// The server under arbitrary datagrams, timeouts and polls.
pub fn server(data: &[u8]) {
    let t0 = Instant::now();
    let cfg = ServerConfig {
        session_id: Some(SESSION),
        max_datagram: MAX_DATAGRAM,
        sweep: true,
        sweep_min_clients: 1,
        max_clients: 6,
        seed: Some(1),
        ..ServerConfig::default()
    };
    let source = Arc::new(MemSource::new(image(), PAGE_SIZE));
    let Ok(mut s) = Server::with_info(
        cfg,
        source.clone(),
        mcdist::source::scan(source.as_ref()).expect("an in-memory image scans"),
        t0,
    ) else {
        return;
    };
    let mut now = t0;
    let mut buf = vec![0u8; 65_536];
    let mut ops = Ops::new(data);
    let mut sent = 0u64;
    let mut echoes = Vec::new();
    while let Some(code) = ops.byte() {
        match code % 5 {
            op::DATAGRAM => {
                let Some(len) = ops.u16() else { break };
                let Some(peer) = ops.byte() else { break };
                let d = ops.bytes(usize::from(len));
                s.handle_datagram(now, peer_addr(peer), d);
            }
            op::ADVANCE => {
                let Some(steps) = ops.u16() else { break };
                now += Duration::from_micros(50 * u64::from(steps));
                if s.poll_timeout().is_some_and(|t| t <= now) {
                    s.handle_timeout(now);
                }
            }
            _ => {
                // Bounded: a poll sends at most what the token bucket allows.
                for _ in 0..10_000 {
                    let Some(t) = s.poll_transmit(now, &mut buf) else {
                        break;
                    };
                    assert!(t.len <= MAX_DATAGRAM, "datagram of {} bytes", t.len);
                    let Ok(m) = Message::parse(&buf[..t.len]) else {
                        panic!("server sent garbage");
                    };
                    // A peer echoes the token of an announce sent to it, so
                    // fuzzed peers get their address validated.
                    if let (mcdist::Dest::Peer(p), mcdist::wire::Body::Announce(a)) =
                        (t.dest, m.body)
                    {
                        if a.flags & mcdist::wire::Announce::FLAG_VALIDATED
                            == mcdist::wire::AnnounceFlags::empty()
                        {
                            echoes.push((p, a.token));
                        }
                    }
                    sent += 1;
                }
                for (p, token) in echoes.drain(..) {
                    let join = mcdist::wire::Join {
                        flags: mcdist::wire::JoinFlags::from_bits_retain(1),
                        token,
                    };
                    let m = Message {
                        session: SESSION,
                        seq: 1,
                        flags: mcdist::wire::HeaderFlags::empty(),
                        body: mcdist::wire::Body::Join(join),
                    };
                    let mut d = vec![0u8; m.buffer_len()];
                    if let Ok(n) = m.emit(&mut d) {
                        s.handle_datagram(now, p, &d[..n]);
                    }
                }
                while s.poll_event().is_some() {}
            }
        }
    }
    assert!(s.client_count() <= 6);
    let _ = sent;
}

/// The client under arbitrary datagrams from its server, local requests and timeouts.
pub fn client(data: &[u8]) {
    let t0 = Instant::now();
    let server = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 7000);
    let mut cfg = ClientConfig::new(server);
    cfg.max_datagram = MAX_DATAGRAM;
    cfg.max_partial_pages = 16;
    cfg.fec_max_bytes = 1 << 20;
    // Whatever arrives, the receive buffers stay within their byte budgets.
    let bound = cfg.max_partial_bytes + cfg.fec_max_bytes / 2;
    let mut c = Client::new(cfg, t0);
    let mut now = t0;
    let mut buf = vec![0u8; 65_536];
    let mut ops = Ops::new(data);
    let mut ready: Option<PageBitmap> = None;
    let mut page_size = 0usize;
    while let Some(code) = ops.byte() {
        match code % 5 {
            op::DATAGRAM => {
                let Some(len) = ops.u16() else { break };
                let Some(how) = ops.byte() else { break };
                let d = ops.bytes(usize::from(len));
                // Every entry point: an owned datagram, one in a reused buffer, and one
                // whose whole pages are lent to a sink (the drivers' path).
                match how % 3 {
                    0 => c.handle_datagram(now, server, Bytes::copy_from_slice(d)),
                    1 => c.handle_datagram_slice(now, server, d),
                    _ => c.handle_datagram_borrowed(now, server, d, &mut |pfn, page| {
                        check_page(&mut ready, page_size, pfn, page.len())
                    }),
                }
            }
            op::ADVANCE => {
                let Some(steps) = ops.u16() else { break };
                now += Duration::from_micros(50 * u64::from(steps));
                if c.poll_timeout().is_some_and(|t| t <= now) {
                    c.handle_timeout(now);
                }
            }
            op::REQUEST => {
                let Some(pfn) = ops.u16() else { break };
                c.request_page(now, u64::from(pfn));
            }
            op::FETCH_ALL => c.fetch_all(now),
            _ => {
                for _ in 0..10_000 {
                    let Some(t) = c.poll_transmit(now, &mut buf) else {
                        break;
                    };
                    assert!(t.len <= MAX_DATAGRAM);
                    assert!(Message::parse(&buf[..t.len]).is_ok(), "client sent garbage");
                }
            }
        }
        while let Some(e) = c.poll_event() {
            match e {
                ClientEvent::SessionStarted(s) | ClientEvent::SessionResumed(s) => {
                    if ready.is_none() {
                        ready = Some(PageBitmap::new(s.page_count.min(1 << 20)));
                        page_size = s.page_size;
                    }
                }
                ClientEvent::PageReady { pfn, data } => {
                    check_page(&mut ready, page_size, pfn, data.len())
                }
                ClientEvent::WorkingSetHint(pages) => {
                    assert!(pages.windows(2).all(|w| w[0] < w[1]), "hint not ascending");
                }
                ClientEvent::Complete | ClientEvent::Failed(_) => {}
            }
        }
        assert!(
            c.buffered_bytes() <= bound,
            "{} bytes buffered",
            c.buffered_bytes()
        );
    }
}

/// A page the client handed over (lent or in an event): a page long, inside the image,
/// once.
fn check_page(ready: &mut Option<PageBitmap>, page_size: usize, pfn: u64, len: usize) {
    assert_eq!(len, page_size, "page {pfn} has the wrong length");
    let r = ready.as_mut().expect("page before session");
    assert!(pfn < r.len(), "page {pfn} past the end");
    assert!(r.set(pfn), "page {pfn} handed over twice");
}

/// Arbitrary fragments into a bounded reassembler.
pub fn reassembly(data: &[u8]) {
    let mut ops = Ops::new(data);
    let Some(pow) = ops.byte() else { return };
    let page_size = 1usize << (9 + u32::from(pow % 6));
    let mut r = Reassembler::new(page_size, 4);
    // Every fill sent for (page, fragment count, index): a completed page holds in each
    // fragment's slot one of the fills sent for it, never bytes of another page (page
    // buffers are handed back and reused).
    let mut sent: std::collections::HashMap<(u64, u16, u16), std::collections::HashSet<u8>> =
        std::collections::HashMap::new();
    while let (Some(pfn), Some(index), Some(count), Some(fill)) =
        (ops.byte(), ops.u16(), ops.u16(), ops.byte())
    {
        // Mostly well-sized payloads, sometimes arbitrary lengths.
        let len = match fragment_slot(page_size, count, index) {
            Some((_, l)) if fill % 8 != 0 => l,
            _ => usize::from(fill) * 17,
        };
        let pfn = u64::from(pfn % 16);
        sent.entry((pfn, count, index)).or_default().insert(fill);
        let payload = vec![fill; len];
        if let Ok(Some(page)) = r.insert(pfn, index, count, &payload) {
            assert_eq!(page.len(), page_size);
            if count > 1 {
                for i in 0..count {
                    let (st, l) =
                        fragment_slot(page_size, count, i).expect("a complete page's slot");
                    let b = page[st];
                    assert!(page[st..st + l].iter().all(|&x| x == b), "slot {i} mixed");
                    assert!(
                        sent.get(&(pfn, count, i)).is_some_and(|f| f.contains(&b)),
                        "slot {i} of page {pfn} holds bytes never sent for it"
                    );
                }
            }
            // Give most pages back, as the client does once its sink has them.
            if fill % 4 != 0 {
                r.recycle(page);
            }
        }
        assert!(r.in_progress() <= 4);
        assert!(r.held_bytes() <= r.max_held_bytes());
    }
}

/// Datagrams of a short simulated session with some loss: (server-sent, client-sent).
pub fn captured_session() -> (Vec<Bytes>, Vec<Bytes>) {
    capture(ServerConfig {
        session_id: Some(SESSION),
        max_datagram: MAX_DATAGRAM,
        sweep: true,
        sweep_min_clients: 2,
        ..ServerConfig::default()
    })
}

/// The same session with FEC repair symbols after every block of swept pages.
pub fn captured_fec_session() -> (Vec<Bytes>, Vec<Bytes>) {
    capture(ServerConfig {
        session_id: Some(SESSION),
        max_datagram: MAX_DATAGRAM,
        sweep: true,
        sweep_min_clients: 2,
        fec: true,
        fec_min_overhead: 0.2,
        fec_block_pages: 16,
        ..ServerConfig::default()
    })
}

fn capture(cfg: ServerConfig) -> (Vec<Bytes>, Vec<Bytes>) {
    let Ok(mut sim) = Sim::new(1, cfg, image(), PAGE_SIZE) else {
        return (Vec::new(), Vec::new());
    };
    sim.record(4000);
    let mut spec = mcdist::sim::ClientSpec::fetch_all(0.05);
    spec.config.max_datagram = MAX_DATAGRAM;
    sim.add_client(spec.clone());
    sim.add_client(mcdist::sim::ClientSpec::faults(
        0.05,
        vec![3, 9, 10, 40, 63],
        Duration::from_micros(100),
    ));
    let _ = sim.drive(Duration::from_secs(10));
    let mut from_server = Vec::new();
    let mut from_clients = Vec::new();
    for r in sim.recorded() {
        if r.from_server {
            from_server.push(r.data.clone());
        } else {
            from_clients.push(r.data.clone());
        }
    }
    (from_server, from_clients)
}

/// The seed corpus: `(target, file name, input)`.
pub fn seed_corpus() -> Vec<(&'static str, String, Vec<u8>)> {
    let (down, up) = captured_session();
    let mut out = Vec::new();
    // Wire: one file per distinct message kind and a few of each.
    let mut per_kind = std::collections::HashMap::new();
    for d in down.iter().chain(&up) {
        let k = d.get(3).copied().unwrap_or(0);
        let n = per_kind.entry(k).or_insert(0u32);
        if *n < 3 {
            out.push(("wire", format!("kind{k}-{n}"), d.to_vec()));
            *n += 1;
        }
    }
    // Server: the clients' datagrams of the session, interleaved with polls and time.
    for (chunk_i, chunk) in up.chunks(40).take(4).enumerate() {
        let mut v = Vec::new();
        for (i, d) in chunk.iter().enumerate() {
            v.extend(datagram_op((i % 2) as u8, d));
            v.push(op::POLL);
            v.extend([op::ADVANCE, 0, 20]);
        }
        out.push(("server", format!("session-{chunk_i}"), v));
    }
    // Client: the server's datagrams of the session.
    for (chunk_i, chunk) in down.chunks(120).take(4).enumerate() {
        let mut v = vec![op::FETCH_ALL, op::REQUEST, 0, 9];
        for d in chunk {
            v.extend(datagram_op(0, d));
            v.push(op::POLL);
            v.extend([op::ADVANCE, 0, 2]);
        }
        out.push(("client", format!("session-{chunk_i}"), v));
    }
    // Reassembly: a page in three fragments, in and out of order, with a duplicate.
    let mut v = vec![3u8]; // 4096-byte pages
    for idx in [2u16, 0, 0, 1] {
        v.push(5);
        v.extend(idx.to_be_bytes());
        v.extend(3u16.to_be_bytes());
        v.push(0x41);
    }
    out.push(("reassembly", "three-fragments".into(), v));
    // FEC: repair datagrams for the wire target, and a client fed a session with them.
    let (fec_down, _) = captured_fec_session();
    let repairs = fec_down
        .iter()
        .filter(|d| d.get(3) == Some(&(mcdist::wire::Kind::Repair as u8)));
    for (n, d) in repairs.take(3).enumerate() {
        out.push(("wire", format!("kind10-{n}"), d.to_vec()));
    }
    let mut v = vec![op::FETCH_ALL];
    for d in fec_down.iter().take(120) {
        v.extend(datagram_op(0, d));
        v.push(op::POLL);
        v.extend([op::ADVANCE, 0, 2]);
    }
    out.push(("client", "fec-session-0".into(), v));
    for (target, seeds) in [
        ("opener", opener::seeds()),
        ("integrity", integrity::seeds()),
        ("descriptor", descriptor::seeds()),
    ] {
        out.extend(seeds.into_iter().map(|(name, v)| (target, name, v)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn corpus_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus")
    }

    /// Every committed corpus file (seeds and anything the fuzzer found and
    /// we kept) runs through its target without panicking.
    #[test]
    fn corpus_replays() {
        if std::env::var_os("MCDIST_WRITE_CORPUS").is_some() {
            for (target, name, input) in seed_corpus() {
                let dir = corpus_dir().join(target);
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join(name), input).unwrap();
            }
        }
        let mut n = 0;
        for (target, f) in [
            ("wire", wire as fn(&[u8])),
            ("server", server),
            ("client", client),
            ("reassembly", reassembly),
            ("opener", |d| {
                opener(d);
            }),
            ("integrity", integrity),
            ("descriptor", descriptor),
        ] {
            let dir = corpus_dir().join(target);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                panic!("no corpus for {target} in {}", dir.display());
            };
            for e in entries {
                let input = std::fs::read(e.unwrap().path()).unwrap();
                f(&input);
                n += 1;
            }
        }
        assert!(n >= 10, "only {n} corpus files");
    }

    #[test]
    fn opener_seeds_accept_genuine_datagrams_only() {
        // Per mode: the three genuine datagrams are accepted (an announce and two pages at a
        // client, three pages at a server), forgeries and the replay never; a client requiring
        // encryption accepts nothing a sealer sent in the clear.
        let accepted: Vec<usize> = opener::seeds().iter().map(|(_, v)| opener(v)).collect();
        assert_eq!(accepted, [3, 0, 3, 3, 3, 3, 3, 3]);
    }

    #[test]
    fn seed_corpus_reaches_deep_states() {
        // The captured session really is a session: the client target fed the
        // server's datagrams gets pages out of it.
        let (down, up) = captured_session();
        assert!(down.len() > PAGES, "only {} server datagrams", down.len());
        assert!(!up.is_empty());
        let t0 = Instant::now();
        let server_addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 7000);
        let mut c = Client::new(ClientConfig::new(server_addr), t0);
        c.fetch_all(t0);
        for d in &down {
            c.handle_datagram(t0, server_addr, d.clone());
        }
        assert!(c.pages_present() > (PAGES / 2) as u64);
    }
}
