//! Socket setup: the transport's configuration ([`UdpConfig`]), interface
//! index and MTU lookup, socket options (non-blocking, close-on-exec, buffer
//! sizes, `SO_BINDTODEVICE`, multicast TTL and loop, group membership), the
//! one-time GSO and GRO probes, and building a server or client transport.
//! Every failure here is a [`UdpSetupError`] naming the step.

use super::recv::Gro;
use super::{MioWaker, UdpTransport, MAX_BATCH, MCAST, UCAST, WAKE, WATCH_BASE};
use crate::transport::Capabilities;
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use socket2::{Domain, InterfaceIndexOrAddress, Protocol, SockAddr, Socket, Type};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
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
    #[error("network interface {name:?} does not exist")]
    NoSuchInterface {
        /// The name asked for.
        name: String,
        /// What the kernel said, when it was asked (a name that cannot be an
        /// interface's is refused before).
        #[source]
        source: Option<io::Error>,
    },
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
        return Err(UdpSetupError::NoSuchInterface {
            name: name.to_string(),
            source: None,
        });
    }
    let index =
        nix::net::if_::if_nametoindex(name).map_err(|e| UdpSetupError::NoSuchInterface {
            name: name.to_string(),
            source: Some(io::Error::from(e)),
        })?;
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

/// Turns `SO_RXQ_OVFL` on: each datagram then comes with the socket's running
/// count of datagrams dropped because its receive buffer was full. False when
/// the kernel refuses it.
fn enable_rxq_ovfl(s: &Socket) -> bool {
    use nix::sys::socket::{setsockopt, sockopt::RxqOvfl};
    match setsockopt(s, RxqOvfl, &1) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(error = %e, "no SO_RXQ_OVFL here; receive-buffer drops are not counted");
            false
        }
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
    let _ = enable_rxq_ovfl(&s);
    if let Some(name) = &cfg.iface {
        s.bind_device(Some(name.as_bytes()))
            .map_err(|e| match e.raw_os_error() {
                Some(19) => UdpSetupError::NoSuchInterface {
                    name: name.clone(),
                    source: Some(e),
                },
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
            received: Vec::new(),
            drops: [0; 2],
            dropped: 0,
            group_seq: [None; 2],
            may_read: [true; 2],
            watched_ready: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// Adds `fd` to the descriptors [`Transport::recv`](crate::transport::Transport::recv) waits on: when it
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
}
