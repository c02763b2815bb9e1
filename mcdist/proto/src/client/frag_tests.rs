//! NACKs of single fragments: a page held in part is NACKed by its missing fragments, and
//! the server resends only those.

use super::{Client, ClientConfig};
use crate::wire::{Body, Message};
use crate::{Dest, MemSource, Server, ServerConfig, ServerStats};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

const PAGE: usize = 4096;
const PAGES: u64 = 64;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// What one fetch over a path that loses the middle fragment of every page the sweep
/// sends saw: the fragment NACKs the client sent, with their masks, and the server's
/// counters.
struct Run {
    masks: Vec<u32>,
    whole_nacks: usize,
    server: ServerStats,
}

fn fetch_losing_middle_fragments(fragment_nacks: bool) -> Run {
    fetch(fragment_nacks, true)
}

/// [`fetch_losing_middle_fragments`] from a server that knows fragment NACKs or drops
/// them as an older one would.
fn fetch(fragment_nacks: bool, server_knows_them: bool) -> Run {
    let img: Vec<u8> = (0..PAGE * PAGES as usize)
        .map(|i| (i % 253 + 1) as u8)
        .collect();
    let now = Instant::now();
    let scfg = ServerConfig {
        // An Ethernet MTU: 3 fragments a page.
        max_datagram: 1472,
        sweep: true,
        push_neighbors: false,
        ..ServerConfig::default()
    };
    let source = Arc::new(MemSource::new(img.clone(), PAGE));
    let info = crate::source::scan(source.as_ref()).expect("an in-memory image scans");
    let mut server = Server::with_info(scfg, source, info, now).expect("server configuration");
    let cfg = ClientConfig {
        max_datagram: 1472,
        fragment_nacks,
        ..ClientConfig::new(addr(1))
    };
    let mut c = Client::new(cfg, now);
    c.fetch_all(now);
    let mut run = Run {
        masks: Vec::new(),
        whole_nacks: 0,
        server: ServerStats::default(),
    };
    super::tests::run_lockstep(
        &mut server,
        &mut c,
        now,
        |d| match Message::parse(d).unwrap().body {
            Body::FragmentNack(f) => {
                run.masks.extend(f.entries.iter().map(|e| e.missing));
                server_knows_them
            }
            Body::Nack(_) => {
                run.whole_nacks += 1;
                true
            }
            _ => true,
        },
        |_, dest, d| {
            if let Ok(Message {
                body: Body::Data(d),
                ..
            }) = Message::parse(d)
            {
                // The sweep's middle fragments are lost on the way, the repairs are not.
                if d.flags.contains(crate::wire::Data::SWEEP) && d.frag_index == 1 {
                    assert_eq!(dest, Dest::Group);
                    return false;
                }
            }
            true
        },
    );
    assert!(c.is_complete(), "fetch did not complete: {:?}", c.stats());
    run.server = server.stats().clone();
    run
}

#[test]
fn a_page_held_in_part_is_nacked_by_its_missing_fragments_and_only_they_are_resent() {
    let run = fetch_losing_middle_fragments(true);
    assert!(!run.masks.is_empty(), "no fragment NACK sent");
    assert!(run.masks.iter().all(|&m| m == 0b010), "{:?}", run.masks);
    let s = &run.server;
    // Every data page and hash page is resent as its middle fragment alone.
    assert!(s.fragment_answers >= PAGES, "{s:?}");
    assert_eq!(s.fragments_resent, s.fragment_answers, "{s:?}");
    assert_eq!(s.repair_pages, 0, "{s:?}");
    assert_eq!(run.whole_nacks, 0);
}

#[test]
fn with_fragment_nacks_off_whole_pages_are_nacked_and_resent() {
    let on = fetch_losing_middle_fragments(true);
    let off = fetch_losing_middle_fragments(false);
    assert!(off.masks.is_empty());
    assert!(off.whole_nacks > 0);
    assert_eq!(off.server.fragment_answers, 0);
    assert!(off.server.repair_pages >= PAGES, "{:?}", off.server);
    // Three fragments a page resent against one.
    let (b_on, b_off) = (on.server.bytes_sent, off.server.bytes_sent);
    assert!(b_off > b_on + PAGES * 2 * 1400, "{b_off} vs {b_on}");
}

#[test]
fn a_page_whose_fragment_nacks_go_unanswered_is_nacked_whole() {
    // A server that drops kind 12 (one that predates it) still completes the fetch.
    let run = fetch(true, false);
    assert!(!run.masks.is_empty());
    assert!(run.whole_nacks > 0);
    assert_eq!(run.server.fragment_answers, 0);
    assert!(run.server.repair_pages >= PAGES, "{:?}", run.server);
}
