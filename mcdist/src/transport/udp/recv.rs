//! Batch receive: `recvmmsg` on each socket (alternating which goes first so
//! neither starves), and with UDP GRO, coalesced buffers cut back at their
//! segment size into the datagrams that were sent, handed out one per caller
//! slot in order; what does not fit waits for the next call.

use super::{UdpTransport, MAX_BATCH};
use crate::transport::Received;
use mio::net::UdpSocket;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;

impl UdpTransport {
    /// One datagram from a socket that may hold one (alternating which goes first so
    /// neither starves).
    pub(super) fn try_recv(&mut self, buf: &mut [u8]) -> io::Result<Option<Received>> {
        self.turn = !self.turn;
        let mut may_read = self.may_read;
        let mut got = None;
        for (i, sock) in self.sockets(self.turn) {
            match sock.recv_from(buf) {
                Ok((len, from)) => {
                    got = Some(Received { len, from });
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => may_read[i] = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // ICMP errors from earlier sends surface here; they are not fatal.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(e) => return Err(e),
            }
        }
        self.may_read = may_read;
        Ok(got)
    }
}

/// One datagram taken by `recvmmsg`: its length (0 when truncated or not
/// from IPv4), its sender, the GRO segment size when the kernel
/// coalesced several datagrams into it, and the socket's running count of
/// receive-buffer drops when the kernel sent one (`SO_RXQ_OVFL`).
pub(super) struct RawMsg {
    pub(super) len: usize,
    pub(super) from: Option<SocketAddr>,
    pub(super) segment: usize,
    pub(super) drops: Option<u32>,
}

impl RawMsg {
    /// Where the last datagram of the message starts in it.
    pub(super) fn last_datagram_offset(&self) -> usize {
        (self.datagrams() - 1) * self.segment
    }

    /// Datagrams the message holds: a GRO buffer of `len` bytes longer than its segment
    /// size is cut into `len / segment` of them (rounded up); any other message is one.
    pub(super) fn datagrams(&self) -> usize {
        match self.segment {
            s if s == 0 || self.len <= s => 1,
            s => self.len.div_ceil(s),
        }
    }
}

/// How many messages one `recvmmsg` took, and whether it found the socket empty (it
/// would block, or it took fewer messages than it had room for).
#[derive(Debug, Clone, Copy)]
pub(super) struct Took {
    n: usize,
    drained: bool,
}

/// `recvmmsg` on one socket without waiting; message `i` lands at `buf[i * slot..]`.
/// With `gro`, each message's `UDP_GRO` control message gives its segment size.
fn recv_raw(
    sock: &UdpSocket,
    buf: &mut [u8],
    slot: usize,
    gro: bool,
    out: &mut Vec<RawMsg>,
) -> io::Result<Took> {
    use nix::sys::socket::{
        recvmmsg, ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage,
    };
    use std::io::IoSliceMut;
    let n = (buf.len() / slot.max(1)).min(MAX_BATCH);
    let none = |drained| Ok(Took { n: 0, drained });
    if n == 0 {
        return none(false);
    }
    // Room for the GRO segment size and the SO_RXQ_OVFL drop count.
    let cmsg = Some(nix::cmsg_space!(i32, u32));
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(n, cmsg);
    let mut iovs: Vec<[IoSliceMut<'_>; 1]> = buf
        .chunks_exact_mut(slot)
        .take(n)
        .map(|c| [IoSliceMut::new(c)])
        .collect();
    let res = recvmmsg(
        sock.as_raw_fd(),
        &mut headers,
        iovs.iter_mut(),
        MsgFlags::MSG_DONTWAIT,
        None,
    );
    let results = match res {
        Ok(r) => r,
        Err(nix::errno::Errno::EAGAIN) => return none(true),
        Err(nix::errno::Errno::EINTR) => return none(false),
        // ICMP errors from earlier sends surface here; they are not fatal (and datagrams
        // may wait behind them).
        Err(nix::errno::Errno::ECONNREFUSED) => return none(false),
        Err(e) => return Err(io::Error::from(e)),
    };
    let mut got = 0;
    for m in results {
        let from = m.address.and_then(|a| {
            a.as_sockaddr_in()
                .map(|s| SocketAddr::V4(SocketAddrV4::from(*s)))
        });
        let mut segment = 0;
        let mut drops = None;
        if let Ok(cmsgs) = m.cmsgs() {
            for c in cmsgs {
                match c {
                    ControlMessageOwned::UdpGroSegments(s) if gro => {
                        segment = usize::try_from(s).unwrap_or(0);
                    }
                    ControlMessageOwned::RxqOvfl(d) => drops = Some(d),
                    _ => {}
                }
            }
        }
        got += 1;
        // Truncated or not IPv4: keep the slot (indices must match) but mark it empty.
        let ok = from.is_some() && !m.flags.contains(MsgFlags::MSG_TRUNC);
        out.push(RawMsg {
            len: if ok { m.bytes.min(slot) } else { 0 },
            from,
            segment,
            drops,
        });
    }
    Ok(Took {
        n: got,
        drained: got < n,
    })
}

fn unspecified() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))
}

/// `recvmmsg` on one socket without waiting; datagram `i` lands at `buf[i * slot..]`.
fn recv_many(
    sock: &UdpSocket,
    buf: &mut [u8],
    slot: usize,
    raw: &mut Vec<RawMsg>,
    out: &mut Vec<Received>,
) -> io::Result<Took> {
    raw.clear();
    let took = recv_raw(sock, buf, slot, false, raw)?;
    out.extend(raw.iter().map(|m| Received {
        len: m.len,
        from: m.from.unwrap_or_else(unspecified),
    }));
    Ok(took)
}

/// The session and sequence number of `datagram` if it is an mcdist datagram sent to
/// the group (unicast ones have their own numbering).
fn group_seq(datagram: &[u8]) -> Option<(u64, u64)> {
    let p = mcdist_proto::wire::Packet::new_checked(datagram).ok()?;
    (p.seq() & mcdist_proto::wire::SEQ_UNICAST_BIT == 0).then(|| (p.session(), p.seq()))
}

/// Most datagrams one GSO or GRO buffer holds (the kernel's `UDP_MAX_SEGMENTS`).
const MAX_SEGMENTS: u64 = 128;

/// Datagrams in the `rise` buffers the kernel dropped between a buffer whose last group
/// datagram was `before` and one whose first is `after`: the group sequence numbers
/// between the two, within what `rise` buffers can hold. Without both numbers (another
/// sender, unicast, the first buffer), `per` datagrams each (the average of the buffers
/// received with the count). A datagram the path lost between the two counts as dropped
/// here too: the receiver cannot tell, and it errs towards its own overload.
pub(super) fn datagrams_dropped(
    rise: u64,
    before: Option<(u64, u64)>,
    after: Option<(u64, u64)>,
    per: u64,
) -> u64 {
    match (before, after) {
        (Some((s0, a)), Some((s1, b))) if s0 == s1 && b > a => {
            (b - a - 1).clamp(rise, rise.saturating_mul(MAX_SEGMENTS))
        }
        _ => rise.saturating_mul(per),
    }
}

/// The latest running drop count among `raw`, if any message carried one.
fn latest_drops(raw: &[RawMsg]) -> Option<u32> {
    raw.iter().rev().find_map(|m| m.drops)
}

/// Datagrams per received buffer in `raw` ([`RawMsg::datagrams`]), rounded, at least 1.
pub(super) fn datagrams_per_buffer(raw: &[RawMsg]) -> u64 {
    let buffers = raw.len() as u64;
    let datagrams: u64 = raw.iter().map(|m| m.datagrams() as u64).sum();
    match buffers {
        0 => 1,
        b => ((datagrams + b / 2) / b).max(1),
    }
}

/// Receive buffers for UDP GRO: coalesced buffers land in `buf`, are cut
/// into their datagrams (`pending`, in arrival order) and copied out to the
/// caller's slots; what does not fit waits for the next call.
pub(super) struct Gro {
    buf: Vec<u8>,
    raw: Vec<RawMsg>,
    /// (offset in `buf`, length, sender) of datagrams not yet handed out.
    pending: std::collections::VecDeque<(usize, usize, SocketAddr)>,
    /// Buffers that held more than one datagram.
    pub(super) coalesced: u64,
}

/// Largest UDP payload, and so the largest coalesced GRO buffer.
const GRO_SLOT: usize = 65_536;
/// GRO receive slots per socket and call.
const GRO_SLOTS: usize = 8;

impl Gro {
    pub(super) fn new() -> Gro {
        Gro {
            buf: vec![0u8; GRO_SLOT * GRO_SLOTS * 2],
            raw: Vec::new(),
            pending: std::collections::VecDeque::new(),
            coalesced: 0,
        }
    }

    /// Whether datagrams of the last receive wait to be handed out.
    pub(super) fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Cuts message `m` received at `base` into datagrams of its segment
    /// size; true when it held more than one.
    pub(super) fn split(
        pending: &mut std::collections::VecDeque<(usize, usize, SocketAddr)>,
        base: usize,
        m: &RawMsg,
    ) -> bool {
        let from = m.from.unwrap_or_else(unspecified);
        if m.datagrams() == 1 {
            pending.push_back((base, m.len, from));
            return false;
        }
        let mut off = 0;
        while off < m.len {
            let len = m.segment.min(m.len - off);
            pending.push_back((base + off, len, from));
            off += len;
        }
        true
    }

    /// Fills the caller's slots from `pending`; returns how many were filled.
    fn hand_out(&mut self, buf: &mut [u8], slot: usize, out: &mut Vec<Received>) -> usize {
        let mut n = 0;
        for dst in buf.chunks_exact_mut(slot.max(1)) {
            let Some((off, len, from)) = self.pending.pop_front() else {
                break;
            };
            if len <= dst.len() {
                dst[..len].copy_from_slice(&self.buf[off..off + len]);
                out.push(Received { len, from });
            } else {
                // Does not fit the caller's slot: dropped like a truncated datagram.
                out.push(Received {
                    len: 0,
                    from: unspecified(),
                });
            }
            n += 1;
        }
        n
    }
}

impl UdpTransport {
    /// The sockets that may hold datagrams, with their index in `drops` and `may_read`
    /// (0 multicast, 1 unicast).
    fn sockets(&self, mcast_first: bool) -> impl Iterator<Item = (usize, &UdpSocket)> {
        let m = self.mcast.as_ref().map(|m| (0, m));
        let u = Some((1, &self.ucast));
        let (a, b) = if mcast_first { (m, u) } else { (u, m) };
        let may_read = self.may_read;
        a.into_iter().chain(b).filter(move |(i, _)| may_read[*i])
    }

    pub(super) fn try_recv_batch(
        &mut self,
        buf: &mut [u8],
        slot: usize,
        out: &mut Vec<Received>,
    ) -> io::Result<usize> {
        self.turn = !self.turn;
        if let Some(mut gro) = self.gro.take() {
            let r = self.try_recv_gro(&mut gro, buf, slot, out);
            self.gro = Some(gro);
            return r;
        }
        let mut total = 0;
        let mut raw = Vec::new();
        let mut drops = self.drops;
        let mut dropped = self.dropped;
        let mut may_read = self.may_read;
        for (i, sock) in self.sockets(self.turn) {
            let start = total * slot;
            if start >= buf.len() {
                break;
            }
            let took = recv_many(sock, &mut buf[start..], slot, &mut raw, out)?;
            total += took.n;
            may_read[i] = !took.drained;
            if let Some(d) = latest_drops(&raw) {
                dropped += u64::from(d.wrapping_sub(drops[i]));
                drops[i] = d;
            }
        }
        self.drops = drops;
        self.dropped = dropped;
        self.may_read = may_read;
        Ok(total)
    }

    fn try_recv_gro(
        &mut self,
        gro: &mut Gro,
        buf: &mut [u8],
        slot: usize,
        out: &mut Vec<Received>,
    ) -> io::Result<usize> {
        self.fill_gro(gro)?;
        Ok(gro.hand_out(buf, slot, out))
    }

    /// When every datagram of the last receive was handed out: one `recvmmsg` per socket
    /// into the GRO buffers, cut into datagrams.
    fn fill_gro(&mut self, gro: &mut Gro) -> io::Result<()> {
        if !gro.pending.is_empty() {
            return Ok(());
        }
        let mut used = 0;
        let mut drops = self.drops;
        let mut dropped = self.dropped;
        let mut may_read = self.may_read;
        let mut last_seq = self.group_seq;
        for (i, sock) in self.sockets(self.turn) {
            gro.raw.clear();
            let area = &mut gro.buf[used * GRO_SLOT..(used + GRO_SLOTS) * GRO_SLOT];
            may_read[i] = !recv_raw(sock, area, GRO_SLOT, true, &mut gro.raw)?.drained;
            let per = datagrams_per_buffer(&gro.raw);
            for (k, m) in gro.raw.iter().enumerate() {
                let base = (used + k) * GRO_SLOT;
                let msg = &gro.buf[base..base + m.len];
                if let Some(d) = m.drops.filter(|&d| d != drops[i]) {
                    // The count this buffer came with rose by `d - drops[i]` buffers
                    // since the one before it: the datagrams between the two.
                    let rise = u64::from(d.wrapping_sub(drops[i]));
                    let first = group_seq(msg);
                    dropped += datagrams_dropped(rise, last_seq[i], first, per);
                    drops[i] = d;
                }
                if let Some(last) = group_seq(&msg[m.last_datagram_offset()..]) {
                    last_seq[i] = Some(last);
                }
                if Gro::split(&mut gro.pending, base, m) {
                    gro.coalesced += 1;
                }
            }
            used += GRO_SLOTS;
        }
        self.drops = drops;
        self.dropped = dropped;
        self.may_read = may_read;
        self.group_seq = last_seq;
        Ok(())
    }

    /// `recv_in_place` with GRO: every datagram of one receive (waiting at most `timeout`
    /// for it) is lent to `f` where it lies in the GRO buffers.
    pub(super) fn recv_gro_in_place(
        &mut self,
        gro: &mut Gro,
        timeout: Option<std::time::Duration>,
        f: &mut dyn FnMut(SocketAddr, &mut [u8]),
    ) -> io::Result<usize> {
        self.turn = !self.turn;
        let zero = timeout == Some(std::time::Duration::ZERO);
        if zero && !gro.has_pending() {
            self.poll_events(timeout)?;
        }
        self.fill_gro(gro)?;
        if !gro.has_pending() && !zero {
            if !self.poll_events(timeout)? {
                return Ok(0);
            }
            self.fill_gro(gro)?;
        }
        let mut n = 0;
        while let Some((off, len, from)) = gro.pending.pop_front() {
            n += 1;
            if len > 0 {
                f(from, &mut gro.buf[off..off + len]);
            }
        }
        Ok(n)
    }
}
