//! Where the time of one remote fault goes, stage by stage, on the network side.
//!
//! A sans-IO `Server` (serving an in-memory image) on its own thread and a
//! `Client` on the calling thread talk over two plain UDP sockets on loopback,
//! the server answering each request to the client's address (a one-receiver
//! stand-in for the group). For each fault the client thread stamps: request
//! asked (`request_page`), request datagram emitted (`poll_transmit`), request
//! sent (`send_to` returned), answer received (`recv_from` returned), page
//! ready (`PageReady` polled); the server thread stamps: request received,
//! page datagram emitted, page sent. All stamps read the same monotonic clock.
//!
//! On loopback a `send_to` delivers the datagram to the receiving socket and wakes
//! its reader inside the system call, so the receiver often has it before the
//! sender's `send_to` returns: "sent" is no boundary between stages, and the two
//! `send_to` calls are shown on their own, as parts of the stages they lie in. A
//! server stamp can reach this thread after the page did; the client waits for it
//! (bounded) so that every fault is timed, not only those where the server won
//! that race.
//! The userfaultfd stages (fault event read, `UFFDIO_COPY`, vCPU resumed) are
//! what the local handler's latency measures and are not repeated here.

use mcdist::client::{Client, ClientConfig, ClientEvent};
use mcdist::server::{Server, ServerConfig};
use mcdist::source::scan;
use mcdist::{MemSource, PageSource};
use std::net::{SocketAddr, UdpSocket};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Stamps the server thread sends back for each page datagram: pfn, request
/// received, page emitted, page sent.
type ServerStamps = (u64, Instant, Instant, Instant);

const PAGES: u64 = 4096;
const PS: usize = 4096;
/// Data datagram kind and the offset of its page number (after the 24-byte header).
const KIND_DATA: u8 = 2;
const KIND_REQUEST: u8 = 3;
const PFN_AT: usize = 24;

/// Median per stage, in µs, over `faults` faults (after a warm-up).
pub struct Stages {
    pub names: [&'static str; 8],
    pub p50_us: [f64; 8],
    pub faults: usize,
    /// Faults asked for but not timed (a stamp missing: the page or the server's stamp did
    /// not come in time).
    pub untimed: usize,
}

fn image() -> Vec<u8> {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    (0..PAGES as usize * PS)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect()
}

fn server_thread(
    sock: UdpSocket,
    mut server: Server,
    stamps: mpsc::Sender<ServerStamps>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<()> {
    let mut rx = vec![0u8; 65_536];
    let mut tx = vec![0u8; 65_536];
    sock.set_read_timeout(Some(Duration::from_millis(2)))?;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let got = match sock.recv_from(&mut rx) {
            Ok(g) => Some(g),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => return Err(e),
        };
        let t_recv = Instant::now();
        let mut client = None;
        let mut was_request = false;
        if let Some((n, from)) = got {
            client = Some(from);
            was_request = rx.get(3) == Some(&KIND_REQUEST);
            server.handle_datagram(t_recv, from, &rx[..n]);
        }
        let now = Instant::now();
        if server.poll_timeout().is_some_and(|t| t <= now) {
            server.handle_timeout(now);
        }
        while let Some(t) = server.poll_transmit(Instant::now(), &mut tx) {
            let t_emit = Instant::now();
            let to = match t.dest {
                mcdist::Dest::Peer(a) => a,
                mcdist::Dest::Group => match client {
                    Some(c) => c,
                    None => continue,
                },
            };
            sock.send_to(&tx[..t.len], to)?;
            let t_sent = Instant::now();
            if was_request && tx[3] == KIND_DATA && t.len >= PFN_AT + 8 {
                let mut b = [0u8; 8];
                b.copy_from_slice(&tx[PFN_AT..PFN_AT + 8]);
                let _ = stamps.send((u64::from_be_bytes(b), t_recv, t_emit, t_sent));
            }
        }
        while server.poll_event().is_some() {}
    }
    Ok(())
}

/// Runs up to `faults` timed faults (at most half the image's pages; after 50
/// untimed ones) and returns the median of each stage.
pub fn measure(faults: usize) -> Result<Stages, String> {
    let err = |e: std::io::Error| e.to_string();
    let server_sock = UdpSocket::bind("127.0.0.1:0").map_err(err)?;
    let client_sock = UdpSocket::bind("127.0.0.1:0").map_err(err)?;
    let server_addr = server_sock.local_addr().map_err(err)?;
    let t0 = Instant::now();
    let source: Arc<dyn PageSource> = Arc::new(MemSource::new(image(), PS));
    let info = scan(source.as_ref()).map_err(err)?;
    let cfg = ServerConfig {
        push_neighbors: false,
        working_set_push: false,
        lockstep_window: Duration::ZERO,
        ..ServerConfig::default()
    };
    let server = Server::with_info(cfg, source, info, t0).map_err(|e| e.to_string())?;
    let (stamp_tx, stamp_rx) = mpsc::channel();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let thread = {
        let stop = stop.clone();
        std::thread::spawn(move || server_thread(server_sock, server, stamp_tx, stop))
    };
    let result = drive_client(&client_sock, server_addr, &stamp_rx, faults);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    thread
        .join()
        .map_err(|_| "server thread panicked".to_string())?
        .map_err(err)?;
    result
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn drive_client(
    sock: &UdpSocket,
    server: SocketAddr,
    stamps: &mpsc::Receiver<ServerStamps>,
    faults: usize,
) -> Result<Stages, String> {
    let err = |e: std::io::Error| e.to_string();
    sock.set_read_timeout(Some(Duration::from_millis(2)))
        .map_err(err)?;
    let mut client = Client::new(ClientConfig::new(server), Instant::now());
    let mut rx = vec![0u8; 65_536];
    let mut tx = vec![0u8; 65_536];
    // Join, validation and the first announce.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(300) {
        pump(&mut client, sock, &mut rx, &mut tx, server)?;
    }
    if client.session().is_none() {
        return Err("no session with the in-process server".into());
    }
    let warm = 50;
    let mut per_stage: [Vec<f64>; 8] = Default::default();
    let mut untimed = 0;
    for i in 0..warm + faults {
        // Distinct pages (37 is prime to the half image), warm-up in the first half.
        let pfn = (i as u64 * 37) % (PAGES / 2) + if i >= warm { PAGES / 2 } else { 0 };
        if client.has_page(pfn) {
            continue;
        }
        let t_ask = Instant::now();
        client.request_page(t_ask, pfn);
        let mut t_emit = None;
        let mut t_sent = None;
        while let Some(t) = client.poll_transmit(Instant::now(), &mut tx) {
            let e = Instant::now();
            sock.send_to(&tx[..t.len], server).map_err(err)?;
            if tx[3] == KIND_REQUEST && t_emit.is_none() {
                t_emit = Some(e);
                t_sent = Some(Instant::now());
            }
        }
        let mut t_rx = None;
        let mut t_ready = None;
        let deadline = Instant::now() + Duration::from_secs(2);
        while t_ready.is_none() && Instant::now() < deadline {
            match sock.recv_from(&mut rx) {
                Ok((n, from)) => {
                    let at = Instant::now();
                    if rx[3] == KIND_DATA
                        && rx
                            .get(PFN_AT..PFN_AT + 8)
                            .is_some_and(|b| b == pfn.to_be_bytes())
                    {
                        t_rx = Some(at);
                    }
                    client.handle_datagram_slice(at, from, &rx[..n]);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e.to_string()),
            }
            while let Some(ev) = client.poll_event() {
                if matches!(ev, ClientEvent::PageReady { pfn: p, .. } if p == pfn) {
                    t_ready = Some(Instant::now());
                }
            }
            let now = Instant::now();
            if client.poll_timeout().is_some_and(|t| t <= now) {
                client.handle_timeout(now);
            }
            while let Some(t) = client.poll_transmit(Instant::now(), &mut tx) {
                sock.send_to(&tx[..t.len], server).map_err(err)?;
            }
        }
        // The server stamps a page after its `send_to` returns, by which time this thread
        // may already have the page: wait for the stamp (bounded) rather than drop the fault.
        let srv = t_ready.and_then(|_| server_stamp(stamps, pfn));
        if i < warm {
            continue;
        }
        let (Some(e), Some(s), Some(r), Some(d), Some((_, sr, se, ss))) =
            (t_emit, t_sent, t_rx, t_ready, srv)
        else {
            untimed += 1;
            continue;
        };
        let us = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64() * 1e6;
        let v = [
            us(t_ask, e),
            us(e, sr),
            us(sr, se),
            us(se, r),
            us(r, d),
            us(t_ask, d),
            us(e, s),
            us(se, ss),
        ];
        for (k, x) in v.into_iter().enumerate() {
            per_stage[k].push(x);
        }
        std::thread::sleep(Duration::from_micros(20));
    }
    let n = per_stage[0].len();
    if n == 0 {
        return Err("no fault was timed".into());
    }
    Ok(Stages {
        names: [
            "asked -> request emitted",
            "request emitted -> server received",
            "server received -> page emitted",
            "page emitted -> client received",
            "client received -> page ready",
            "total (asked -> page ready)",
            "(client's send_to, within the above)",
            "(server's send_to, within the above)",
        ],
        p50_us: per_stage.map(median),
        faults: n,
        untimed,
    })
}

/// The server's stamps of page `pfn`, waiting up to 100 ms for them (stamps of earlier
/// pages still in the channel are skipped).
fn server_stamp(stamps: &mpsc::Receiver<ServerStamps>, pfn: u64) -> Option<ServerStamps> {
    let deadline = Instant::now() + Duration::from_millis(100);
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match stamps.recv_timeout(left) {
            Ok(s) if s.0 == pfn => return Some(s),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// One turn of the client's handshake loop: send what it has, take what came.
fn pump(
    client: &mut Client,
    sock: &UdpSocket,
    rx: &mut [u8],
    tx: &mut [u8],
    server: SocketAddr,
) -> Result<(), String> {
    while let Some(t) = client.poll_transmit(Instant::now(), tx) {
        sock.send_to(&tx[..t.len], server)
            .map_err(|e| e.to_string())?;
    }
    if let Ok((n, from)) = sock.recv_from(rx) {
        client.handle_datagram_slice(Instant::now(), from, &rx[..n]);
    }
    let now = Instant::now();
    if client.poll_timeout().is_some_and(|t| t <= now) {
        client.handle_timeout(now);
    }
    while client.poll_event().is_some() {}
    Ok(())
}
