//! A Firecracker-compatible external page-fault handler (`mcdist-uffd`): restore one snapshot
//! on many hosts at once, its memory file served by mcdist.
//!
//! Firecracker's contract (`docs/snapshotting/handling-page-faults-on-snapshot-resume.md` in
//! its repository): on `PUT /snapshot/load` with `mem_backend: {"backend_type": "Uffd",
//! "backend_path": SOCKET}`, Firecracker maps guest memory anonymously, registers it with a
//! userfaultfd (with `UFFD_FEATURE_EVENT_REMOVE`), connects to `SOCKET` and sends one message:
//! a JSON array of regions (`base_host_virt_addr`, `size`, `offset` into the snapshot memory
//! file, and `page_size` in bytes, or only `page_size_kib` in older versions) with the
//! userfaultfd attached as `SCM_RIGHTS`. Nothing else is said on that socket; Firecracker
//! keeps it open until it exits.
//!
//! The handler ([`Handler`]) takes each connection ([`Handler::handshake`]: one message, a
//! bounded wait, the peer's pid from `SO_PEERCRED`), checks the regions against the image,
//! and serves the microVM's faults on a thread of its own ([`ServedVmm`]):
//!
//! - page `p` of the memory file is `offset / page size + i` for the `i`-th page of a region;
//! - zero pages of the image and pages a balloon removed (`UFFD_EVENT_REMOVE`) are filled
//!   locally with `UFFDIO_ZEROPAGE`;
//! - other pages come from the host's [`HostCache`]: one mcdist client and one page cache for
//!   every microVM of this host, so a page crosses the network once per host; a page another
//!   microVM (or a push) already brought is copied from the cache;
//! - `EEXIST` (the page is already there) wakes the faulting thread and is not an error;
//!   `EAGAIN` is retried;
//! - if the memory session is lost, or a page does not arrive within the fetch timeout, the
//!   handler fails closed ([`OnLoss`]): it kills the microVM (`SIGKILL` to the pid from
//!   `SO_PEERCRED`) or stops serving with an error log line; it never leaves it hung.
//!
//! [`Backend::Local`] serves the same protocol from a local memory file, as Firecracker's own
//! `on_demand` example handler does (the baseline for measurements). [`firecracker_side`]
//! plays Firecracker's side of the handshake for tests. Regions must use 4 KiB pages (2 MiB
//! hugetlbfs regions are refused with [`HandshakeError::PageSize`]).

use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::share::HostCache;
use crate::source::{PageBitmap, PageSource};
use crate::sys::Uffd;

pub mod firecracker_side;
mod plain;
mod regions;
mod vmm;

pub use plain::plain_descriptor;
pub use regions::{parse_regions, Region};
pub use vmm::{ServedVmm, VmmEnd, VmmLost, VmmStats};

/// Most bytes of the handshake message.
pub const MAX_MESSAGE: usize = 1 << 20;

/// Why a connection was refused.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Reading the message failed.
    #[error("reading the handshake: {0}")]
    Io(#[source] std::io::Error),
    /// No complete message within the handshake timeout.
    #[error("no complete handshake message within {0:?}")]
    Timeout(Duration),
    /// The peer closed the connection before a complete message.
    #[error("the peer closed the connection before a complete handshake message")]
    Closed,
    /// The message is longer than [`MAX_MESSAGE`].
    #[error("the handshake message exceeds {MAX_MESSAGE} bytes")]
    TooLong,
    /// The message is not Firecracker's JSON array of regions.
    #[error("malformed handshake message: {0}")]
    Json(#[source] serde_json::Error),
    /// No userfaultfd came with the message.
    #[error("the handshake message carried no userfaultfd (SCM_RIGHTS)")]
    NoUffd,
    /// The region list is empty.
    #[error("the handshake lists no memory regions")]
    NoRegions,
    /// A region gives no page size.
    #[error("region {0} has neither page_size nor page_size_kib")]
    NoPageSize(usize),
    /// A region's page size is not the image's.
    #[error(
        "region {region} has page size {page_size}; this handler serves {supported}-byte pages"
    )]
    PageSize {
        /// The region.
        region: usize,
        /// Its page size in bytes.
        page_size: u64,
        /// The page size served.
        supported: usize,
    },
    /// A region's address, size or offset is not a multiple of its page size, or its size
    /// is zero.
    #[error("region {0} is empty or not page-aligned")]
    Misaligned(usize),
    /// A region reaches past the end of the snapshot memory file.
    #[error("region {region} ends at byte {end} of the memory file, which has {image} bytes")]
    PastImage {
        /// The region.
        region: usize,
        /// Its end in the file.
        end: u64,
        /// The file's size.
        image: u64,
    },
    /// The peer's credentials could not be read.
    #[error("cannot read the peer's credentials (SO_PEERCRED): {0}")]
    PeerCred(#[source] std::io::Error),
    /// Starting the fault thread failed.
    #[error("cannot start serving the microVM: {0}")]
    Start(#[source] std::io::Error),
}

/// Where pages come from.
#[derive(Clone)]
pub enum Backend {
    /// The host's mcdist client and page cache; `zero` lists the image's zero pages.
    Host {
        /// The host cache.
        cache: Arc<HostCache>,
        /// Zero pages of the image (filled locally).
        zero: Arc<PageBitmap>,
    },
    /// A local memory file read on each fault (Firecracker's `on_demand` handler).
    Local(Arc<dyn PageSource>),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Host { cache, .. } => f.debug_tuple("Host").field(cache).finish(),
            Backend::Local(_) => f.write_str("Local"),
        }
    }
}

impl Backend {
    fn page_size(&self) -> usize {
        match self {
            Backend::Host { cache, .. } => cache.page_size(),
            Backend::Local(s) => s.page_size(),
        }
    }

    fn image_size(&self) -> u64 {
        match self {
            Backend::Host { cache, .. } => cache.page_count() * cache.page_size() as u64,
            Backend::Local(s) => s.image_size(),
        }
    }
}

/// What the handler does when a microVM's pages can no longer be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnLoss {
    /// Kill the microVM (`SIGKILL` to its pid) and log why.
    #[default]
    KillVmm,
    /// Log why and stop serving it (Firecracker keeps its own copy of the userfaultfd, so
    /// its faults then block until it is killed by someone else).
    Stop,
}

/// Handler options.
#[derive(Debug, Clone)]
pub struct HandlerConfig {
    /// How long a connection may take to send its message.
    pub handshake_timeout: Duration,
    /// A fault whose page has not arrived within this time is a lost session.
    pub fetch_timeout: Duration,
    /// Pages still awaited are asked for again at this interval.
    pub rerequest_interval: Duration,
    /// What to do on a lost session.
    pub on_loss: OnLoss,
}

impl Default for HandlerConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(5),
            fetch_timeout: Duration::from_secs(10),
            rerequest_interval: Duration::from_millis(250),
            on_loss: OnLoss::KillVmm,
        }
    }
}

/// A Firecracker page-fault handler serving one snapshot image.
#[derive(Debug, Clone)]
pub struct Handler {
    backend: Backend,
    cfg: HandlerConfig,
}

impl Handler {
    /// A handler serving from `backend`.
    pub fn new(backend: Backend, cfg: HandlerConfig) -> Self {
        Self { backend, cfg }
    }

    /// Reads Firecracker's message on `stream`, checks it and starts serving the microVM.
    pub fn handshake(&self, stream: UnixStream) -> Result<ServedVmm, HandshakeError> {
        let pid = peer_pid(&stream)?;
        let (bytes, fd) = read_message(&stream, self.cfg.handshake_timeout)?;
        let raw: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(HandshakeError::Json)?;
        let regions = parse_regions(raw, self.backend.page_size(), self.backend.image_size())?;
        let uffd = Uffd::from_owned(fd.ok_or(HandshakeError::NoUffd)?);
        tracing::info!(pid, regions = regions.len(), "serving a microVM");
        vmm::start(
            self.backend.clone(),
            self.cfg.clone(),
            regions,
            uffd,
            stream,
            pid,
        )
        .map_err(HandshakeError::Start)
    }

    /// Accepts connections on `listener` until `keep_going` returns false (checked after each
    /// connection), serving each microVM on its own thread; refused connections are logged.
    /// Returns the microVMs served, still running or ended.
    pub fn serve(
        &self,
        listener: &UnixListener,
        mut keep_going: impl FnMut(&[ServedVmm]) -> bool,
    ) -> std::io::Result<Vec<ServedVmm>> {
        let mut served = Vec::new();
        loop {
            let (stream, _) = listener.accept()?;
            match self.handshake(stream) {
                Ok(v) => served.push(v),
                Err(e) => tracing::error!("refused a connection: {e}"),
            }
            if !keep_going(&served) {
                return Ok(served);
            }
        }
    }
}

/// The pid of the process at the other end of `stream` (as of its `connect`).
fn peer_pid(stream: &UnixStream) -> Result<i32, HandshakeError> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let cred = getsockopt(stream, PeerCredentials)
        .map_err(|e| HandshakeError::PeerCred(std::io::Error::from(e)))?;
    Ok(cred.pid())
}

/// Reads one message and the descriptor sent with it: the first `recvmsg` carries the fd;
/// more bytes are read until the bytes parse as JSON (or cannot), the peer closes, or
/// `timeout` passes.
fn read_message(
    stream: &UnixStream,
    timeout: Duration,
) -> Result<(Vec<u8>, Option<OwnedFd>), HandshakeError> {
    let deadline = Instant::now() + timeout;
    let set_timeout = |s: &UnixStream| {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HandshakeError::Timeout(timeout));
        }
        s.set_read_timeout(Some(left)).map_err(HandshakeError::Io)
    };
    let timed_out = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            HandshakeError::Timeout(timeout)
        }
        std::io::ErrorKind::UnexpectedEof => HandshakeError::Closed,
        _ => HandshakeError::Io(e),
    };
    set_timeout(stream)?;
    let mut buf = vec![0u8; 64 << 10];
    let (n, fd) = crate::sys::fcuffd::recv_some_with_fd(stream, &mut buf).map_err(timed_out)?;
    buf.truncate(n);
    loop {
        match serde_json::from_slice::<serde_json::Value>(&buf) {
            Err(e) if e.is_eof() => {}
            _ => return Ok((buf, fd)),
        }
        if buf.len() >= MAX_MESSAGE {
            return Err(HandshakeError::TooLong);
        }
        set_timeout(stream)?;
        let mut more = [0u8; 64 << 10];
        let mut s: &UnixStream = stream;
        let k = s.read(&mut more).map_err(timed_out)?;
        if k == 0 {
            return Err(HandshakeError::Closed);
        }
        buf.extend_from_slice(&more[..k]);
    }
}
