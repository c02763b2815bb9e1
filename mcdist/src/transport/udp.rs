//! Real UDP transport: IPv4 multicast with socket2, polled with mio.
//!
//! The server has one socket bound to its request address; it sends group
//! traffic from it with `IP_MULTICAST_TTL` (1 by default), `IP_MULTICAST_LOOP`
//! and the egress interface pinned with `SO_BINDTODEVICE`. A client has two
//! sockets: one bound to the group address and port (joined on the named
//! interface by index) for multicast, and one ephemeral unicast socket for its
//! requests and the server's unicast replies.
//!
//! [`UdpTransport::watch_readable`] adds other descriptors (a userfaultfd, an
//! eventfd) to the same poll, so one thread can wait for datagrams and for its
//! own events in a single `recv`.
//!
//! Batches go out with one `sendmmsg` and come in with one `recvmmsg` per
//! socket (through `nix`'s safe wrappers), up to [`MAX_BATCH`] datagrams per
//! system call.
//!
//! With [`UdpConfig::gso`] (on by default), a batch is cut into runs of
//! datagrams to one destination whose lengths are all equal but for a
//! shorter last one (at most 64 datagrams and 64 KiB); each run is one
//! message of the `sendmmsg`, with a `UDP_SEGMENT` control message giving the
//! segment size, and the kernel splits it into the original datagrams as
//! late as it can (on a veth and bridge path: at the receiving socket). The
//! datagrams on the wire are the same as without GSO. The socket option is
//! probed once; if a send is refused (`EINVAL`, `EIO`, `EMSGSIZE`,
//! `ENOPROTOOPT`, `EOPNOTSUPP`) GSO is switched off for the transport and the
//! rest of the batch goes by plain `sendmmsg`.
//!
//! With [`UdpConfig::gro`] (on by default), a client's sockets set
//! `UDP_GRO`: one `recvmmsg` slot may then hold several datagrams of one
//! flow, and the `UDP_GRO` control message gives their size. Such buffers
//! are cut back into datagrams and handed out one per caller slot, in order,
//! so callers see exactly the datagrams that were sent; what does not fit in
//! one call is handed out by the next.

use super::{batch_datagram, Capabilities, Received, Transport, Wake};
use crate::{Dest, Transmit};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use socket2::{Domain, InterfaceIndexOrAddress, Protocol, SockAddr, Socket, Type};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

/// Whether [`UdpConfig::new`] turns UDP GSO on.
pub const DEFAULT_GSO: bool = true;
/// Whether [`UdpConfig::new`] turns UDP GRO on.
pub const DEFAULT_GRO: bool = true;

/// UDP transport settings.
#[derive(Debug, Clone)]
pub struct UdpConfig {
    /// Multicast group and port (239.255.0.0/16 for site-local use).
    pub group: SocketAddrV4,
    /// Interface to send and receive the group on (e.g. `eth0`, `lo`).
    pub iface: Option<String>,
    /// Server: the address to bind for requests. Defaults to `0.0.0.0:<group port + 1>`.
    pub listen: Option<SocketAddr>,
    /// Client: the server's request address (informational for the transport).
    pub server: Option<SocketAddr>,
    /// Multicast TTL.
    pub ttl: u32,
    /// Deliver our own multicast to local sockets (needed when receivers share the host).
    pub multicast_loop: bool,
    /// Socket receive and send buffer size request, bytes.
    pub buffer_bytes: usize,
    /// Join the group (false: unicast only, for unicast fan-out delivery).
    pub multicast: bool,
    /// Cap on the datagram size (the interface MTU minus IP/UDP headers is used when smaller).
    pub max_datagram: usize,
    /// Send runs of equal-sized datagrams to one destination as one UDP GSO
    /// buffer (`UDP_SEGMENT`), split into datagrams by the kernel. Probed
    /// once; falls back to plain `sendmmsg` where the kernel or the device
    /// refuses it.
    pub gso: bool,
    /// Receive with UDP GRO (`UDP_GRO`): the kernel may hand several
    /// datagrams of one flow over as one buffer, which is split back into
    /// the original datagrams before they are returned.
    pub gro: bool,
}

impl UdpConfig {
    /// Defaults for `group`: TTL 1, loop on, 8 MiB buffers, multicast on.
    pub fn new(group: SocketAddrV4) -> UdpConfig {
        UdpConfig {
            group,
            iface: None,
            listen: None,
            server: None,
            ttl: 1,
            multicast_loop: true,
            buffer_bytes: 8 << 20,
            multicast: true,
            max_datagram: 9000 - 28,
            gso: DEFAULT_GSO,
            gro: DEFAULT_GRO,
        }
    }
}

/// Setting up a UDP transport failed.
#[derive(Debug, Error)]
pub enum UdpSetupError {
    /// The named interface does not exist.
    #[error("network interface {0:?} does not exist")]
    NoSuchInterface(String),
    /// The group address is not IPv4 multicast.
    #[error("{0} is not an IPv4 multicast group address")]
    NotMulticast(Ipv4Addr),
    /// Binding failed (address in use, not local, permission...).
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// Another socket call failed.
    #[error("{what}: {source}")]
    Socket {
        /// Which step.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
}

fn sock_err(what: &'static str) -> impl FnOnce(io::Error) -> UdpSetupError {
    move |source| UdpSetupError::Socket { what, source }
}

/// Index and MTU of a network interface of the calling thread's network namespace.
///
/// The index comes from `if_nametoindex` (a socket of the thread's namespace). The MTU comes
/// from sysfs, which shows the namespace it was mounted in: a thread that entered another
/// namespace with `setns` may see other interfaces there, so the sysfs MTU is used only when
/// the index it lists is the same (1500 otherwise).
pub fn interface_info(name: &str) -> Result<(u32, usize), UdpSetupError> {
    if name.is_empty() || name.contains('/') || name.contains("..") {
        return Err(UdpSetupError::NoSuchInterface(name.to_string()));
    }
    let index = nix::net::if_::if_nametoindex(name)
        .map_err(|_| UdpSetupError::NoSuchInterface(name.to_string()))?;
    let base = std::path::Path::new("/sys/class/net").join(name);
    let read = |f: &str| -> Option<String> {
        std::fs::read_to_string(base.join(f))
            .ok()
            .map(|s| s.trim().to_string())
    };
    let mtu = match read("ifindex").and_then(|s| s.parse::<u32>().ok()) {
        Some(i) if i == index => read("mtu").and_then(|s| s.parse::<usize>().ok()),
        _ => {
            tracing::debug!(
                name,
                "sysfs shows another namespace; assuming an MTU of 1500"
            );
            None
        }
    };
    Ok((index, mtu.unwrap_or(1500)))
}

/// True when the kernel knows `UDP_SEGMENT` (Linux 4.18 and later).
fn gso_supported(s: &Socket) -> bool {
    use nix::sys::socket::{getsockopt, sockopt::UdpGsoSegment};
    match getsockopt(s, UdpGsoSegment) {
        Ok(_) => true,
        Err(e) => {
            tracing::debug!(error = %e, "no UDP GSO here; sending datagram by datagram");
            false
        }
    }
}

/// Turns `UDP_GRO` on; false when the kernel refuses it (before Linux 5.0).
fn enable_gro(s: &Socket) -> bool {
    use nix::sys::socket::{setsockopt, sockopt::UdpGroSegment};
    match setsockopt(s, UdpGroSegment, &true) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(error = %e, "no UDP GRO here; receiving datagram by datagram");
            false
        }
    }
}

/// Most datagrams moved by one `sendmmsg` or `recvmmsg`.
pub const MAX_BATCH: usize = 64;

/// Largest UDP payload of one GSO buffer (64 KiB less the IPv4 and UDP headers).
const GSO_MAX_BYTES: usize = 65_535 - 28;
/// Most datagrams in one GSO buffer (the kernel's `UDP_MAX_SEGMENTS` is 64 before Linux 6.9).
const GSO_MAX_SEGMENTS: usize = 64;

/// Items `first..first + count` of a batch, all to `to`; every one but the
/// last is `len` bytes long and the last is no longer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct GsoRun {
    first: usize,
    count: usize,
    len: usize,
    to: SocketAddr,
}

/// Cuts `items` into runs that can each go as one GSO buffer.
fn gso_runs(items: &[Transmit], addr: impl Fn(Dest) -> SocketAddr, out: &mut Vec<GsoRun>) {
    let mut i = 0;
    while i < items.len() {
        let to = addr(items[i].dest);
        let len = items[i].len;
        let mut count = 1;
        let mut bytes = len;
        while i + count < items.len() && count < GSO_MAX_SEGMENTS && len > 0 {
            let next = &items[i + count];
            if addr(next.dest) != to || next.len > len || bytes + next.len > GSO_MAX_BYTES {
                break;
            }
            count += 1;
            bytes += next.len;
            if next.len < len {
                // A shorter datagram ends the run.
                break;
            }
        }
        out.push(GsoRun {
            first: i,
            count,
            len,
            to,
        });
        i += count;
    }
}

/// How many of `runs` (from the first) share one `sendmmsg`, and the
/// segment size of its `UDP_SEGMENT` control message (0: none). A run of
/// one datagram goes with any segment size at least its length: the kernel
/// sends a buffer no longer than the segment size as a plain datagram.
fn gso_group(runs: &[GsoRun]) -> (usize, usize) {
    let mut segment = 0;
    let mut longest_single = 0;
    let mut n = 0;
    for r in runs.iter().take(MAX_BATCH) {
        if r.count > 1 {
            if segment == 0 && longest_single <= r.len {
                segment = r.len;
            } else if segment != r.len {
                break;
            }
        } else if segment == 0 {
            longest_single = longest_single.max(r.len);
        } else if r.len > segment {
            break;
        }
        n += 1;
    }
    (n.max(1), segment)
}

/// Errors that mean the kernel or the device will not do UDP GSO here:
/// no `UDP_SEGMENT` (`ENOPROTOOPT`, `EOPNOTSUPP`), no checksum offload on the
/// route (`EIO`), or a segment size the route's MTU no longer admits
/// (`EINVAL` before Linux 6.x, `EMSGSIZE` after).
fn gso_refused(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_errno) if libc_errno == nix::errno::Errno::EINVAL as i32
            || libc_errno == nix::errno::Errno::EIO as i32
            || libc_errno == nix::errno::Errno::ENOPROTOOPT as i32
            || libc_errno == nix::errno::Errno::EOPNOTSUPP as i32
            || libc_errno == nix::errno::Errno::EMSGSIZE as i32
    )
}

const MCAST: Token = Token(0);
const UCAST: Token = Token(1);
const WAKE: Token = Token(2);
/// Tokens of descriptors added by [`UdpTransport::watch_readable`] start here.
const WATCH_BASE: usize = 16;

struct MioWaker(Waker);

impl Wake for MioWaker {
    fn wake(&self) {
        if let Err(e) = self.0.wake() {
            tracing::debug!(error = %e, "waking the transport failed");
        }
    }
}

/// A UDP multicast transport.
pub struct UdpTransport {
    poll: Poll,
    events: Events,
    waker: Arc<MioWaker>,
    mcast: Option<UdpSocket>,
    ucast: UdpSocket,
    group: SocketAddr,
    caps: Capabilities,
    turn: bool,
    watched: AtomicUsize,
    /// Group sends use UDP GSO (configured and accepted by the kernel).
    gso: bool,
    /// Receives use UDP GRO.
    gro: Option<Gro>,
}

impl std::fmt::Debug for UdpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpTransport")
            .field("group", &self.group)
            .field("local", &self.ucast.local_addr().ok())
            .finish()
    }
}

fn new_socket(cfg: &UdpConfig) -> Result<Socket, UdpSetupError> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
        .map_err(sock_err("creating a UDP socket"))?;
    s.set_nonblocking(true)
        .map_err(sock_err("setting non-blocking mode"))?;
    s.set_cloexec(true)
        .map_err(sock_err("setting close-on-exec"))?;
    // Buffer sizes are requests; the kernel may cap them.
    let _ = s.set_recv_buffer_size(cfg.buffer_bytes);
    let _ = s.set_send_buffer_size(cfg.buffer_bytes);
    if let Some(name) = &cfg.iface {
        s.bind_device(Some(name.as_bytes()))
            .map_err(|e| match e.raw_os_error() {
                Some(19) => UdpSetupError::NoSuchInterface(name.clone()),
                _ => UdpSetupError::Socket {
                    what: "binding to the interface (SO_BINDTODEVICE)",
                    source: e,
                },
            })?;
    }
    Ok(s)
}

fn caps_for(cfg: &UdpConfig) -> Result<(Option<u32>, Capabilities), UdpSetupError> {
    let (index, mtu) = match &cfg.iface {
        Some(n) => {
            let (i, m) = interface_info(n)?;
            (Some(i), m)
        }
        None => (None, 1500),
    };
    let max_datagram = mtu
        .saturating_sub(28)
        .clamp(576, 65_507)
        .min(cfg.max_datagram);
    Ok((
        index,
        Capabilities {
            max_datagram,
            batch: MAX_BATCH,
        },
    ))
}

impl UdpTransport {
    fn finish(
        mcast: Option<Socket>,
        ucast: Socket,
        group: SocketAddr,
        caps: Capabilities,
    ) -> Result<UdpTransport, UdpSetupError> {
        let poll = Poll::new().map_err(sock_err("creating the poller"))?;
        let waker = Waker::new(poll.registry(), WAKE).map_err(sock_err("creating the waker"))?;
        let mut ucast = UdpSocket::from_std(ucast.into());
        poll.registry()
            .register(&mut ucast, UCAST, Interest::READABLE)
            .map_err(sock_err("registering the unicast socket"))?;
        let mcast = match mcast {
            Some(m) => {
                let mut m = UdpSocket::from_std(m.into());
                poll.registry()
                    .register(&mut m, MCAST, Interest::READABLE)
                    .map_err(sock_err("registering the multicast socket"))?;
                Some(m)
            }
            None => None,
        };
        Ok(UdpTransport {
            poll,
            events: Events::with_capacity(8),
            waker: Arc::new(MioWaker(waker)),
            mcast,
            ucast,
            group,
            caps,
            turn: false,
            watched: AtomicUsize::new(0),
            gso: false,
            gro: None,
        })
    }

    /// Adds `fd` to the descriptors [`Transport::recv`] waits on: when it
    /// becomes readable and no datagram is waiting, `recv` returns `Ok(None)`
    /// at once, so the caller can serve `fd` (for example a userfaultfd) and
    /// the sockets from one thread without a hand-off.
    ///
    /// Readiness is edge-triggered: read `fd` until it would block before the
    /// next `recv`, or that `recv` may sleep with events pending. `fd` must
    /// stay open while the transport is used; closing it removes it from the
    /// poll.
    pub fn watch_readable(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let raw = fd.as_raw_fd();
        let n = self.watched.fetch_add(1, Ordering::Relaxed);
        self.poll.registry().register(
            &mut mio::unix::SourceFd(&raw),
            Token(WATCH_BASE + n),
            Interest::READABLE,
        )
    }

    /// A server transport: bound to `cfg.listen` (default `0.0.0.0:<group port + 1>`),
    /// sending the group on `cfg.iface`.
    pub fn server(cfg: &UdpConfig) -> Result<UdpTransport, UdpSetupError> {
        if !cfg.group.ip().is_multicast() {
            return Err(UdpSetupError::NotMulticast(*cfg.group.ip()));
        }
        let (_, caps) = caps_for(cfg)?;
        let s = new_socket(cfg)?;
        s.set_multicast_ttl_v4(cfg.ttl)
            .map_err(sock_err("setting the multicast TTL"))?;
        s.set_multicast_loop_v4(cfg.multicast_loop)
            .map_err(sock_err("setting multicast loop"))?;
        let listen = cfg.listen.unwrap_or_else(|| {
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::UNSPECIFIED,
                cfg.group.port().wrapping_add(1),
            ))
        });
        s.bind(&SockAddr::from(listen))
            .map_err(|source| UdpSetupError::Bind {
                addr: listen,
                source,
            })?;
        let gso = cfg.gso && gso_supported(&s);
        let mut t = UdpTransport::finish(None, s, SocketAddr::V4(cfg.group), caps)?;
        t.gso = gso;
        Ok(t)
    }

    /// A client transport: joins `cfg.group` on `cfg.iface` (unless
    /// `cfg.multicast` is false) and opens an ephemeral unicast socket.
    pub fn client(cfg: &UdpConfig) -> Result<UdpTransport, UdpSetupError> {
        if !cfg.group.ip().is_multicast() {
            return Err(UdpSetupError::NotMulticast(*cfg.group.ip()));
        }
        let (index, caps) = caps_for(cfg)?;
        let mcast = if cfg.multicast {
            let m = new_socket(cfg)?;
            m.set_reuse_address(true)
                .map_err(sock_err("setting SO_REUSEADDR"))?;
            let bind = SocketAddr::V4(cfg.group);
            m.bind(&SockAddr::from(bind))
                .map_err(|source| UdpSetupError::Bind { addr: bind, source })?;
            let iface = match index {
                Some(i) => InterfaceIndexOrAddress::Index(i),
                None => InterfaceIndexOrAddress::Address(Ipv4Addr::UNSPECIFIED),
            };
            m.join_multicast_v4_n(cfg.group.ip(), &iface)
                .map_err(sock_err("joining the multicast group"))?;
            let _ = m.set_multicast_all_v4(false);
            Some(m)
        } else {
            None
        };
        let u = new_socket(cfg)?;
        let bind = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
        u.bind(&SockAddr::from(bind))
            .map_err(|source| UdpSetupError::Bind { addr: bind, source })?;
        let gro = cfg.gro && mcast.as_ref().is_none_or(enable_gro) && enable_gro(&u);
        let mut t = UdpTransport::finish(mcast, u, SocketAddr::V4(cfg.group), caps)?;
        t.gro = gro.then(Gro::new);
        Ok(t)
    }

    /// True when group sends go out as UDP GSO buffers.
    pub fn gso_active(&self) -> bool {
        self.gso
    }

    /// True when receives use UDP GRO.
    pub fn gro_active(&self) -> bool {
        self.gro.is_some()
    }

    /// How many received GRO buffers held more than one datagram.
    pub fn coalesced_buffers(&self) -> u64 {
        self.gro.as_ref().map_or(0, |g| g.coalesced)
    }

    fn try_recv(&mut self, buf: &mut [u8]) -> io::Result<Option<Received>> {
        // Alternate which socket goes first so neither starves.
        self.turn = !self.turn;
        for pass in 0..2 {
            let use_mcast = (pass == 0) == self.turn;
            let sock = if use_mcast {
                match &self.mcast {
                    Some(m) => m,
                    None => continue,
                }
            } else {
                &self.ucast
            };
            match sock.recv_from(buf) {
                Ok((len, from)) => return Ok(Some(Received { len, from })),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // ICMP errors from earlier sends surface here; they are not fatal.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }
}

/// One datagram taken by `recvmmsg`: its length (0 when truncated or not
/// from IPv4), its sender, and the GRO segment size when the kernel
/// coalesced several datagrams into it.
struct RawMsg {
    len: usize,
    from: Option<SocketAddr>,
    segment: usize,
}

/// `recvmmsg` on one socket without waiting; message `i` lands at `buf[i * slot..]`.
/// With `gro`, each message's `UDP_GRO` control message gives its segment size.
fn recv_raw(
    sock: &UdpSocket,
    buf: &mut [u8],
    slot: usize,
    gro: bool,
    out: &mut Vec<RawMsg>,
) -> io::Result<usize> {
    use nix::sys::socket::{
        recvmmsg, ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage,
    };
    use std::io::IoSliceMut;
    let n = (buf.len() / slot.max(1)).min(MAX_BATCH);
    if n == 0 {
        return Ok(0);
    }
    let cmsg = gro.then(|| nix::cmsg_space!(i32));
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
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => return Ok(0),
        // ICMP errors from earlier sends surface here; they are not fatal.
        Err(nix::errno::Errno::ECONNREFUSED) => return Ok(0),
        Err(e) => return Err(io::Error::from(e)),
    };
    let mut got = 0;
    for m in results {
        let from = m.address.and_then(|a| {
            a.as_sockaddr_in()
                .map(|s| SocketAddr::V4(SocketAddrV4::from(*s)))
        });
        let mut segment = 0;
        if gro {
            if let Ok(cmsgs) = m.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::UdpGroSegments(s) = c {
                        segment = usize::try_from(s).unwrap_or(0);
                    }
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
        });
    }
    Ok(got)
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
) -> io::Result<usize> {
    raw.clear();
    let got = recv_raw(sock, buf, slot, false, raw)?;
    out.extend(raw.drain(..).map(|m| Received {
        len: m.len,
        from: m.from.unwrap_or_else(unspecified),
    }));
    Ok(got)
}

/// Receive buffers for UDP GRO: coalesced buffers land in `buf`, are cut
/// into their datagrams (`pending`, in arrival order) and copied out to the
/// caller's slots; what does not fit waits for the next call.
struct Gro {
    buf: Vec<u8>,
    raw: Vec<RawMsg>,
    /// (offset in `buf`, length, sender) of datagrams not yet handed out.
    pending: std::collections::VecDeque<(usize, usize, SocketAddr)>,
    /// Buffers that held more than one datagram.
    coalesced: u64,
}

/// Largest UDP payload, and so the largest coalesced GRO buffer.
const GRO_SLOT: usize = 65_536;
/// GRO receive slots per socket and call.
const GRO_SLOTS: usize = 8;

impl Gro {
    fn new() -> Gro {
        Gro {
            buf: vec![0u8; GRO_SLOT * GRO_SLOTS * 2],
            raw: Vec::new(),
            pending: std::collections::VecDeque::new(),
            coalesced: 0,
        }
    }

    /// Cuts message `m` received at `base` into datagrams of its segment
    /// size; true when it held more than one.
    fn split(
        pending: &mut std::collections::VecDeque<(usize, usize, SocketAddr)>,
        base: usize,
        m: &RawMsg,
    ) -> bool {
        let from = m.from.unwrap_or_else(unspecified);
        if m.len == 0 || m.segment == 0 || m.len <= m.segment {
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
    fn sockets(&self, mcast_first: bool) -> impl Iterator<Item = &UdpSocket> {
        let (a, b) = if mcast_first {
            (self.mcast.as_ref(), Some(&self.ucast))
        } else {
            (Some(&self.ucast), self.mcast.as_ref())
        };
        a.into_iter().chain(b)
    }

    fn try_recv_batch(
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
        for sock in self.sockets(self.turn) {
            let start = total * slot;
            if start >= buf.len() {
                break;
            }
            total += recv_many(sock, &mut buf[start..], slot, &mut raw, out)?;
        }
        Ok(total)
    }

    fn try_recv_gro(
        &self,
        gro: &mut Gro,
        buf: &mut [u8],
        slot: usize,
        out: &mut Vec<Received>,
    ) -> io::Result<usize> {
        if gro.pending.is_empty() {
            let mut used = 0;
            for sock in self.sockets(self.turn) {
                gro.raw.clear();
                let area = &mut gro.buf[used * GRO_SLOT..(used + GRO_SLOTS) * GRO_SLOT];
                let n = recv_raw(sock, area, GRO_SLOT, true, &mut gro.raw)?;
                for (k, m) in gro.raw.iter().enumerate() {
                    if Gro::split(&mut gro.pending, (used + k) * GRO_SLOT, m) {
                        gro.coalesced += 1;
                    }
                }
                let _ = n;
                used += GRO_SLOTS;
            }
        }
        Ok(gro.hand_out(buf, slot, out))
    }
}

impl UdpTransport {
    fn dest_addr(&self, d: Dest) -> SocketAddr {
        match d {
            Dest::Group => self.group,
            Dest::Peer(p) => p,
        }
    }

    /// Sends `items`, many per `sendmmsg`. With `gso`, runs of datagrams to
    /// one destination go out as one UDP GSO buffer each; without, every
    /// datagram is a run of its own and no control message is attached. On
    /// error, returns how many items went out before it.
    fn send_runs(
        &mut self,
        buf: &[u8],
        slot: usize,
        items: &[Transmit],
        gso: bool,
    ) -> Result<(), (usize, io::Error)> {
        use nix::sys::socket::{sendmmsg, ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage};
        use std::io::IoSlice;
        let mut runs = Vec::with_capacity(items.len());
        if gso {
            gso_runs(items, |d| self.dest_addr(d), &mut runs);
        } else {
            runs.extend(items.iter().enumerate().map(|(i, t)| GsoRun {
                first: i,
                count: 1,
                len: t.len,
                to: self.dest_addr(t.dest),
            }));
        }
        let mut r = 0;
        let mut spins = 0u32;
        while r < runs.len() {
            let (group, segment) = gso_group(&runs[r..]);
            let chunk = &runs[r..r + group];
            let mut iovs: Vec<Vec<IoSlice<'_>>> = Vec::with_capacity(chunk.len());
            let mut addrs: Vec<Option<SockaddrStorage>> = Vec::with_capacity(chunk.len());
            for run in chunk {
                let mut v = Vec::with_capacity(run.count);
                for (i, t) in items.iter().enumerate().skip(run.first).take(run.count) {
                    let data = batch_datagram(buf, slot, i, t.len).map_err(|e| (run.first, e))?;
                    v.push(IoSlice::new(data));
                }
                iovs.push(v);
                addrs.push(Some(SockaddrStorage::from(run.to)));
            }
            let seg = u16::try_from(segment).unwrap_or(u16::MAX);
            let with = [ControlMessage::UdpGsoSegments(&seg)];
            let cmsgs: &[ControlMessage<'_>] = if segment > 0 { &with } else { &[] };
            let space = (segment > 0).then(|| nix::cmsg_space!(u16));
            let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(chunk.len(), space);
            match sendmmsg(
                self.ucast.as_raw_fd(),
                &mut headers,
                &iovs,
                &addrs,
                cmsgs,
                MsgFlags::empty(),
            ) {
                Ok(res) => {
                    let sent = res.count();
                    if sent == 0 {
                        spins += 1;
                        std::thread::sleep(Duration::from_micros(50));
                    }
                    r += sent;
                }
                Err(nix::errno::Errno::EAGAIN) if spins < 20_000 => {
                    spins += 1;
                    std::thread::sleep(Duration::from_micros(50));
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::ECONNREFUSED) => r += 1,
                Err(e) => return Err((runs[r].first, io::Error::from(e))),
            }
            if spins >= 20_000 {
                return Err((
                    runs.get(r).map_or(items.len(), |x| x.first),
                    io::Error::new(
                        io::ErrorKind::WouldBlock,
                        "send buffer stayed full for a second",
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl Transport for UdpTransport {
    fn send(&mut self, dest: Dest, data: &[u8]) -> io::Result<()> {
        let to = self.dest_addr(dest);
        let mut spins = 0u32;
        loop {
            match self.ucast.send_to(data, to) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && spins < 20_000 => {
                    spins += 1;
                    std::thread::sleep(Duration::from_micros(50));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A peer's port closed: the datagram is lost, like any other loss.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    fn recv(&mut self, buf: &mut [u8], timeout: Option<Duration>) -> io::Result<Option<Received>> {
        if self.gro.is_some() {
            // A GRO buffer holds several datagrams: take them one at a time.
            let mut one = Vec::with_capacity(1);
            let slot = buf.len();
            self.recv_batch(buf, slot, &mut one, timeout)?;
            return Ok(one.pop());
        }
        if let Some(r) = self.try_recv(buf)? {
            return Ok(Some(r));
        }
        if timeout == Some(Duration::ZERO) {
            return Ok(None);
        }
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(None),
            Err(e) => return Err(e),
        }
        self.try_recv(buf)
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.waker.clone()
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.ucast.local_addr()
    }

    fn send_batch(&mut self, buf: &[u8], slot: usize, items: &[Transmit]) -> io::Result<()> {
        let gso = self.gso;
        match self.send_runs(buf, slot, items, gso) {
            Ok(()) => Ok(()),
            Err((done, e)) if gso && gso_refused(&e) => {
                tracing::info!(error = %e, "UDP GSO refused; falling back to sendmmsg");
                self.gso = false;
                let rest = &items[done..];
                self.send_runs(&buf[(done * slot).min(buf.len())..], slot, rest, false)
                    .map_err(|(_, e)| e)
            }
            Err((_, e)) => Err(e),
        }
    }

    fn recv_batch(
        &mut self,
        buf: &mut [u8],
        slot: usize,
        out: &mut Vec<Received>,
        timeout: Option<Duration>,
    ) -> io::Result<usize> {
        let n = self.try_recv_batch(buf, slot, out)?;
        if n > 0 || timeout == Some(Duration::ZERO) {
            return Ok(n);
        }
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(0),
            Err(e) => return Err(e),
        }
        self.try_recv_batch(buf, slot, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixDatagram;
    use std::time::Instant;

    fn lo_client() -> Option<UdpTransport> {
        let mut cfg = UdpConfig::new(SocketAddrV4::new(Ipv4Addr::new(239, 255, 77, 3), 47_001));
        cfg.iface = Some("lo".into());
        match UdpTransport::client(&cfg) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("skipping: no loopback multicast socket here: {e}");
                None
            }
        }
    }

    fn tx(len: usize, to: u16) -> Transmit {
        Transmit {
            dest: if to == 0 {
                Dest::Group
            } else {
                Dest::Peer(SocketAddr::from((Ipv4Addr::LOCALHOST, to)))
            },
            len,
        }
    }

    fn runs_of(items: &[Transmit]) -> Vec<(usize, usize, usize)> {
        let group = SocketAddr::from((Ipv4Addr::new(239, 255, 0, 1), 1));
        let mut v = Vec::new();
        gso_runs(
            items,
            |d| match d {
                Dest::Group => group,
                Dest::Peer(p) => p,
            },
            &mut v,
        );
        v.iter().map(|r| (r.first, r.count, r.len)).collect()
    }

    #[test]
    fn gso_runs_split_on_destination_size_and_short_tail() {
        let mut items = vec![tx(1400, 0); 5];
        items.push(tx(700, 0)); // short tail ends the run
        items.push(tx(1400, 0));
        items.push(tx(1400, 9)); // another destination
        items.push(tx(1400, 9));
        items.push(tx(1500, 9)); // longer: a new run
        assert_eq!(
            runs_of(&items),
            vec![(0, 6, 1400), (6, 1, 1400), (7, 2, 1400), (9, 1, 1500)]
        );
        // A run never passes 64 segments nor 64 KiB.
        let many = vec![tx(100, 0); 70];
        assert_eq!(runs_of(&many), vec![(0, 64, 100), (64, 6, 100)]);
        let big = vec![tx(1400, 0); 60];
        let r = runs_of(&big);
        assert_eq!(r[0].1, GSO_MAX_BYTES / 1400);
        assert_eq!(r.iter().map(|x| x.1).sum::<usize>(), 60);
    }

    #[test]
    fn gso_groups_share_one_segment_size() {
        let to = SocketAddr::from((Ipv4Addr::LOCALHOST, 1));
        let run = |count, len| GsoRun {
            first: 0,
            count,
            len,
            to,
        };
        // Lone datagrams no longer than the segment size ride along.
        assert_eq!(
            gso_group(&[run(1, 300), run(4, 1400), run(1, 1400), run(3, 1400)]),
            (4, 1400)
        );
        // A run of another size starts a new group.
        assert_eq!(gso_group(&[run(4, 1400), run(2, 500)]), (1, 1400));
        // A lone datagram longer than the segment size too.
        assert_eq!(gso_group(&[run(2, 500), run(1, 600)]), (1, 500));
        // A lone datagram longer than a later run's size keeps it out.
        assert_eq!(gso_group(&[run(1, 900), run(2, 500)]), (1, 0));
        // Only lone datagrams: no control message.
        assert_eq!(gso_group(&[run(1, 900), run(1, 500)]), (2, 0));
    }

    #[test]
    fn gro_split_cuts_at_the_segment_size() {
        let from = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 5)));
        let mut q = std::collections::VecDeque::new();
        let m = RawMsg {
            len: 1400 * 3 + 200,
            from,
            segment: 1400,
        };
        assert!(Gro::split(&mut q, 100, &m));
        let got: Vec<(usize, usize)> = q.iter().map(|&(o, l, _)| (o, l)).collect();
        assert_eq!(
            got,
            vec![(100, 1400), (1500, 1400), (2900, 1400), (4300, 200)]
        );
        q.clear();
        let one = RawMsg {
            len: 800,
            from,
            segment: 1400,
        };
        assert!(!Gro::split(&mut q, 0, &one));
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn watched_descriptor_ends_a_blocking_recv() {
        let Some(mut t) = lo_client() else { return };
        let (a, b) = UnixDatagram::pair().expect("socket pair");
        a.set_nonblocking(true).expect("non-blocking");
        t.watch_readable(a.as_fd()).expect("watch");
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            b.send(b"x").map(|_| b)
        });
        let mut buf = [0u8; 2048];
        let t0 = Instant::now();
        let limit = Duration::from_secs(30);
        let r = t.recv(&mut buf, Some(limit)).expect("recv");
        assert!(r.is_none(), "no datagram was sent");
        assert!(t0.elapsed() < limit, "recv waited for its timeout");
        let _b = writer.join().expect("writer").expect("write");
        let mut one = [0u8; 8];
        assert_eq!(a.recv(&mut one).expect("readable"), 1);
    }

    #[test]
    fn datagrams_still_arrive_with_a_watched_descriptor() {
        let Some(mut t) = lo_client() else { return };
        let (a, _b) = UnixDatagram::pair().expect("socket pair");
        t.watch_readable(a.as_fd()).expect("watch");
        let to = t.local_addr().expect("local");
        let to = SocketAddr::from((Ipv4Addr::LOCALHOST, to.port()));
        let s = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        s.send_to(b"page", to).expect("send");
        let mut buf = [0u8; 2048];
        let r = t
            .recv(&mut buf, Some(Duration::from_secs(30)))
            .expect("recv")
            .expect("a datagram");
        assert_eq!(&buf[..r.len], b"page");
    }
}
