//! A client's receive buffers stay within their byte budgets whatever arrives: a hostile
//! stream (or anyone spoofing the server) sending first fragments of many pages that
//! never complete, FEC repair symbols for many blocks, blocks too large to decode, and
//! whole pages that fill the FEC cache. Measured through [`Client::buffered_bytes`], after
//! every datagram, for 4 KiB pages with small budgets and for 2 MiB pages with the
//! defaults (where the page-count bounds alone allowed gigabytes).

use bytes::Bytes;
use mcdist::client::{Client, ClientConfig};
use mcdist::reassembly::fragment_slot;
use mcdist::server::{Server, ServerConfig};
use mcdist::source::MemSource;
use mcdist::wire::{Announce, Body, Data, HeaderFlags, Message, Repair};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

const SESSION: u64 = 0x5e55;

fn server_addr() -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], 7000))
}

fn datagram(seq: u64, body: Body<'_>) -> Bytes {
    let m = Message {
        session: SESSION,
        seq,
        flags: HeaderFlags::empty(),
        body,
    };
    let mut buf = vec![0u8; m.buffer_len()];
    m.emit(&mut buf).expect("sized by buffer_len");
    Bytes::from(buf)
}

/// The announce a real server sends for `pages` pages of `page_size` with FEC on.
fn announce(page_size: usize, pages: usize, max_datagram: usize) -> (Bytes, Announce) {
    let cfg = ServerConfig {
        session_id: Some(SESSION),
        max_datagram,
        fec: true,
        ..ServerConfig::default()
    };
    let img = vec![0x5au8; page_size * pages];
    let src = Arc::new(MemSource::new(img, page_size));
    let t0 = Instant::now();
    let info = mcdist::source::scan(src.as_ref()).expect("an in-memory image scans");
    let mut s = Server::with_info(cfg, src, info, t0).expect("server");
    let mut buf = vec![0u8; 65_536];
    for _ in 0..1000 {
        let Some(t) = s.poll_transmit(t0, &mut buf) else {
            continue;
        };
        if let Ok(Message {
            body: Body::Announce(a),
            ..
        }) = Message::parse(&buf[..t.len])
        {
            return (Bytes::copy_from_slice(&buf[..t.len]), a);
        }
    }
    panic!("the server sent no announce");
}

/// Feeds `d` and checks the bound; returns the bytes buffered.
fn feed(c: &mut Client, d: Bytes, bound: usize) -> usize {
    c.handle_datagram(Instant::now(), server_addr(), d);
    while c.poll_event().is_some() {}
    let held = c.buffered_bytes();
    assert!(held <= bound, "{held} bytes buffered, bound {bound}");
    held
}

#[test]
fn hostile_fragments_and_repairs_stay_within_small_budgets() {
    let ps = 4096;
    let pages = 2048u64;
    let (ann, a) = announce(ps, pages as usize, 1500);
    let spp = ps.div_ceil(usize::from(a.frag_payload)) as u16;
    let t = usize::from(a.frag_payload);
    let mut cfg = ClientConfig::new(server_addr());
    cfg.max_partial_bytes = 64 << 10;
    cfg.fec_max_bytes = 1 << 20;
    let bound = cfg.max_partial_bytes + cfg.fec_max_bytes / 2;
    let mut c = Client::new(cfg, Instant::now());
    c.fetch_all(Instant::now());
    feed(&mut c, ann, bound);
    assert!(c.session().is_some());
    let frag = |pfn: u64, i: u16, fill: u8| {
        let (_, len) = fragment_slot(ps, spp, i).expect("a slot");
        let payload = vec![fill; len];
        datagram(
            pfn + 10,
            Body::Data(Data {
                pfn,
                frag_index: i,
                frag_count: spp,
                flags: Data::SWEEP,
                payload: &payload,
            }),
        )
    };
    let symbol = vec![0xa5u8; t];
    let repair = |first: u64, span: u16, esi: u32| {
        let members = vec![0xffu8; usize::from(span).div_ceil(8)];
        datagram(
            esi.into(),
            Body::Repair(Repair {
                first_pfn: first,
                span,
                symbols_per_page: spp,
                symbol_size: t as u16,
                // Repair symbol `esi` of the block: ESIs start at K.
                esi: esi + u32::from(span) * u32::from(spp),
                burst_share: 4,
                members: &members,
                symbol: &symbol,
            }),
        )
    };
    let mut peak = 0;
    for round in 0..600u64 {
        // A first fragment of a page that never completes.
        peak = peak.max(feed(&mut c, frag((round * 7) % pages, 0, 1), bound));
        // Repair symbols for blocks of 8 pages, many per block, never enough to decode.
        let first = (round % 200) * 8;
        // (Repair indices a block may use: each visit to a block brings 4 new ones.)
        for esi in 0..4 {
            let esi = (round / 200) as u32 * 4 + esi;
            peak = peak.max(feed(&mut c, repair(first, 8, esi), bound));
        }
        // A block far too large to decode within the budget: refused outright.
        feed(
            &mut c,
            repair(pages - 1024, 1024, 20_000 + round as u32),
            bound,
        );
        // A whole page every few rounds: it fills the FEC cache.
        if round % 3 == 0 {
            let pfn = pages - 1 - round % 512;
            for i in 0..spp {
                peak = peak.max(feed(&mut c, frag(pfn, i, 2), bound));
            }
        }
    }
    let st = c.stats();
    assert!(st.fragments_evicted > 0, "reassembly never hit its bound");
    assert!(
        st.fec_blocks_dropped > 0,
        "FEC never dropped a block for room"
    );
    assert!(st.fec_repairs_refused >= 600, "oversized blocks were taken");
    assert!(
        peak > bound / 2,
        "the stream never filled the buffers: peak {peak}"
    );
    println!("peak {peak} of {bound} bytes; {st:?}");
}

#[test]
fn huge_pages_stay_within_the_default_budgets() {
    let ps = 2 << 20;
    let pages = 48u64;
    let (ann, a) = announce(ps, pages as usize, 65_507);
    let spp = ps.div_ceil(usize::from(a.frag_payload)) as u16;
    let cfg = ClientConfig::new(server_addr());
    // The page-count bounds alone: 4096 partial pages and 4096 cached pages of 2 MiB.
    assert!(cfg.max_partial_pages * ps >= 8 << 30);
    let bound = cfg.max_partial_bytes + cfg.fec_max_bytes / 2;
    let mut c = Client::new(cfg, Instant::now());
    c.fetch_all(Instant::now());
    feed(&mut c, ann, bound);
    assert!(c.session().is_some());
    let frag = |pfn: u64, i: u16, flags| {
        let (_, len) = fragment_slot(ps, spp, i).expect("a slot");
        let payload = vec![3u8; len];
        datagram(
            1,
            Body::Data(Data {
                pfn,
                frag_index: i,
                frag_count: spp,
                flags,
                payload: &payload,
            }),
        )
    };
    // Every page started, none finished: more than the reassembly budget holds.
    let mut peak = 0;
    for pfn in 0..pages / 2 {
        peak = peak.max(feed(&mut c, frag(pfn, 1, Data::SWEEP), bound));
    }
    // Then whole pages, marked to be kept for FEC: each fills the FEC cache further.
    for pfn in pages / 2..pages {
        for i in 0..spp {
            peak = peak.max(feed(&mut c, frag(pfn, i, Data::SWEEP | Data::KEEP), bound));
        }
    }
    assert!(c.stats().fragments_evicted > 0);
    assert!(peak > bound / 2, "peak {peak} of {bound}");
    println!("peak {peak} of {bound} bytes");
}
