//! Clone processes attached to a [`HostCache`] over a unix socket.
//!
//! ```text
//! hello   cache → clone  56 bytes + memfd: "MDHC", version u32 (1), pages u64,
//!                        page size u64, image digest [32]
//! frames  16 bytes each: kind u32, reserved u32, value u64 (little-endian)
//!         1 Request(pfn)  clone → cache
//!         2 Ready(pfn)    cache → clone: page pfn is in the shared mapping
//!         3 Failed        cache → clone: the host's session failed
//! ```
//!
//! Malformed frames (unknown kind, page out of range) are dropped and counted. The socket is
//! created with mode 0600: whoever can connect gets the memory image. A clone process that
//! stops reading its frames for a second is cut off (its connection is shut down and it
//! fails) rather than stalling the host's client.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{bitmap_layout, is_present, Attached, Cache, CacheFailure, HostCache, Next};
use crate::descriptor::Descriptor;
use crate::lazy::{LazyHandle, PageFetcher};
use crate::sys::AnonMap;

const HELLO_MAGIC: &[u8; 4] = b"MDHC";
const HELLO_VERSION: u32 = 1;
const HELLO_LEN: usize = 56;
const FRAME_LEN: usize = 16;
const KIND_REQUEST: u32 = 1;
const KIND_READY: u32 = 2;
const KIND_FAILED: u32 = 3;

fn frame(kind: u32, value: u64) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0..4].copy_from_slice(&kind.to_le_bytes());
    f[8..16].copy_from_slice(&value.to_le_bytes());
    f
}

fn parse_frame(f: &[u8; FRAME_LEN]) -> (u32, u64) {
    let mut k = [0u8; 4];
    k.copy_from_slice(&f[0..4]);
    let mut v = [0u8; 8];
    v.copy_from_slice(&f[8..16]);
    (u32::from_le_bytes(k), u64::from_le_bytes(v))
}

/// How long a frame to a clone process may wait for room in its socket.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// A clone process attached over a unix socket: told which pages are ready.
struct ProcessClone {
    out: Mutex<UnixStream>,
    dead: AtomicBool,
}

impl ProcessClone {
    fn send(&self, kind: u32, value: u64) {
        if self.dead.load(Ordering::SeqCst) {
            return;
        }
        let mut s = self.out.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = s.write_all(&frame(kind, value)) {
            // Gone, or not reading: cut it off so that it fails instead of waiting, and so
            // that its reader sees the end and detaches it.
            tracing::debug!(error = %e, "clone process connection lost");
            self.dead.store(true, Ordering::SeqCst);
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Attached for ProcessClone {
    fn arrived(&self, _cache: &Cache, pfn: u64, _data: &[u8]) {
        self.send(KIND_READY, pfn);
    }
    fn cached(&self, _cache: &Cache, pfn: u64) {
        self.send(KIND_READY, pfn);
    }
    fn fail(&self, _why: &CacheFailure) {
        self.send(KIND_FAILED, 0);
    }
}

/// A [`HostCache`] serving clone processes on a unix socket; stops (and removes the socket)
/// when dropped.
#[derive(Debug)]
pub struct CacheServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl CacheServer {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for CacheServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds a unix socket at `path` that only this user can connect to (see
/// [`HostCache::serve_unix`]).
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let private = parent.join(format!(
        ".mcdist-host-cache.{}.{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let inside = private.join("socket");
    let bound = UnixListener::bind(&inside).and_then(|l| {
        std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&inside, path)?;
        Ok(l)
    });
    let _ = std::fs::remove_file(&inside);
    let _ = std::fs::remove_dir(&private);
    bound
}

impl HostCache {
    /// Serves clone processes of this host on a unix socket at `path` (replacing a stale
    /// socket file). Each connection gets the cache's memfd and is attached as one clone.
    ///
    /// Whoever can connect gets the memory image, so only the owner may: the socket is
    /// created inside a fresh directory of mode 0700 (`mkdir` makes it or fails, following
    /// no symlink), made 0600 there, where nobody else can reach it, and only then renamed
    /// to `path` (`rename` replaces whatever is at `path`, a symlink included, without
    /// following it). There is no moment at which others could connect.
    pub fn serve_unix(self: &Arc<Self>, path: &Path) -> io::Result<CacheServer> {
        let listener = bind_private(path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let host = self.clone();
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("mcdist-host-cache".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop2.load(Ordering::SeqCst) {
                        return;
                    }
                    match conn {
                        Ok(c) => {
                            let host = host.clone();
                            let spawned = std::thread::Builder::new()
                                .name("mcdist-host-clone".into())
                                .spawn(move || host.serve_clone(c));
                            if let Err(e) = spawned {
                                tracing::warn!(error = %e, "cannot serve a clone process");
                            }
                        }
                        Err(e) => tracing::debug!(error = %e, "accept failed"),
                    }
                }
            })?;
        Ok(CacheServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    /// One clone process: hello with the memfd, then its requests until it hangs up.
    fn serve_clone(&self, conn: UnixStream) {
        let cache = &*self.cache;
        let mut hello = [0u8; HELLO_LEN];
        hello[0..4].copy_from_slice(HELLO_MAGIC);
        hello[4..8].copy_from_slice(&HELLO_VERSION.to_le_bytes());
        hello[8..16].copy_from_slice(&cache.pages.to_le_bytes());
        hello[16..24].copy_from_slice(&(cache.page_size as u64).to_le_bytes());
        hello[24..56].copy_from_slice(&cache.digest);
        let out = match conn.try_clone() {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %e, "cannot serve a clone process");
                return;
            }
        };
        if let Err(e) = crate::sys::send_with_fd(&conn, &hello, cache.memfd.as_fd()) {
            tracing::debug!(error = %e, "clone process left before the hello");
            return;
        }
        if let Err(e) = out.set_write_timeout(Some(SEND_TIMEOUT)) {
            tracing::warn!(error = %e, "cannot serve a clone process");
            return;
        }
        let clone = Arc::new(ProcessClone {
            out: Mutex::new(out),
            dead: AtomicBool::new(false),
        });
        let slot = cache.attach(clone.clone());
        let mut conn = conn;
        let mut f = [0u8; FRAME_LEN];
        while conn.read_exact(&mut f).is_ok() {
            match parse_frame(&f) {
                (KIND_REQUEST, pfn) if pfn < cache.pages => match cache.request(slot, pfn) {
                    Next::FromCache => clone.cached(cache, pfn),
                    Next::Ask => self.client.request(pfn),
                    Next::Wait | Next::Nothing => {}
                },
                (kind, value) => {
                    tracing::debug!(kind, value, "dropping a malformed frame from a clone");
                    cache.lock().stats.malformed_frames += 1;
                }
            }
        }
        cache.detach(slot);
    }
}

/// Errors attaching a clone process to its host's cache.
#[derive(Debug, thiserror::Error)]
pub enum HostCacheError {
    /// The socket could not be reached or broke during the hello.
    #[error("host cache socket: {0}")]
    Io(#[from] io::Error),
    /// The hello came without the shared memory.
    #[error("host cache hello: no shared memory came with it")]
    NoMemory,
    /// The hello does not start with the magic.
    #[error("host cache hello: bad magic")]
    BadMagic,
    /// The hello has another protocol version.
    #[error("host cache hello: version {0}")]
    Version(u32),
    /// The `mcdist-host-cache` process has no standard output.
    #[error("mcdist-host-cache: no standard output")]
    NoOutput,
    /// The `mcdist-host-cache` process did not say it serves.
    #[error("mcdist-host-cache did not start: {0:?}")]
    NotStarted(String),
    /// The `mcdist-host-cache` process ended without its counters line.
    #[error("mcdist-host-cache ended with {status}: {line:?}")]
    Ended {
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed instead.
        line: String,
    },
    /// The cache serves another image.
    #[error("the host cache serves another image than the descriptor describes")]
    ImageMismatch,
}

/// A clone process's fetcher: requests go to the host cache process, pages are installed
/// straight from the shared mapping when the cache says they are there.
struct ProcessFetcher {
    out: Mutex<UnixStream>,
    map: Arc<AnonMap>,
    pages: u64,
    page_size: usize,
    handle: LazyHandle,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

/// Why a clone process lost its host cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheLost {
    /// Sending a request failed.
    #[error("the host cache connection broke: {0}")]
    Broke(#[source] io::Error),
    /// The cache process closed the connection.
    #[error("the host cache closed the connection")]
    Closed,
    /// The cache reported that the host's session failed.
    #[error("the host's mcdist session failed")]
    SessionFailed,
}

/// Installs page `pfn` into `handle` straight from the shared mapping.
fn install_shared(map: &AnonMap, page_size: usize, pfn: u64, handle: &LazyHandle) {
    handle.install_mapped(pfn, map, pfn as usize * page_size, page_size);
}

impl PageFetcher for ProcessFetcher {
    fn request(&self, pfn: u64) {
        if pfn >= self.pages {
            return;
        }
        if is_present(&self.map, self.pages, self.page_size, pfn) {
            // Already in the host cache: no need to ask.
            install_shared(&self.map, self.page_size, pfn, &self.handle);
            return;
        }
        let mut s = self.out.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = s.write_all(&frame(KIND_REQUEST, pfn)) {
            self.handle.fail(CacheLost::Broke(e));
        }
    }
}

impl Drop for ProcessFetcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self
            .out
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
    }
}

/// Attaches this process's clone memory (`handle`, started from `desc`) to the host cache
/// process listening at `path`: a clone process's counterpart of [`HostCache::fetcher`].
pub fn connect_host_cache(
    path: &Path,
    desc: &Descriptor,
    handle: LazyHandle,
) -> Result<Arc<dyn PageFetcher>, HostCacheError> {
    let conn = UnixStream::connect(path)?;
    let mut hello = [0u8; HELLO_LEN];
    let fd = crate::sys::recv_with_fd(&conn, &mut hello)?.ok_or(HostCacheError::NoMemory)?;
    if &hello[0..4] != HELLO_MAGIC {
        return Err(HostCacheError::BadMagic);
    }
    let mut u4 = [0u8; 4];
    u4.copy_from_slice(&hello[4..8]);
    let version = u32::from_le_bytes(u4);
    if version != HELLO_VERSION {
        return Err(HostCacheError::Version(version));
    }
    let mut u8s = [0u8; 8];
    u8s.copy_from_slice(&hello[8..16]);
    let pages = u64::from_le_bytes(u8s);
    u8s.copy_from_slice(&hello[16..24]);
    let page_size = u64::from_le_bytes(u8s);
    if pages != desc.page_count()
        || page_size != u64::from(desc.page_size)
        || hello[24..56] != desc.digest
        || handle.page_count() != pages
    {
        return Err(HostCacheError::ImageMismatch);
    }
    let (bits, bitmap_bytes) = bitmap_layout(pages, page_size as usize);
    let map = Arc::new(AnonMap::map_shared(fd.as_fd(), bits + bitmap_bytes, false)?);
    drop(fd);
    let out = conn.try_clone()?;
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, handle, map) = (stop.clone(), handle.clone(), map.clone());
        let ps = page_size as usize;
        let mut conn = conn;
        std::thread::Builder::new()
            .name("mcdist-cache-rx".into())
            .spawn(move || {
                let mut f = [0u8; FRAME_LEN];
                loop {
                    if conn.read_exact(&mut f).is_err() {
                        if !stop.load(Ordering::SeqCst) {
                            handle.fail(CacheLost::Closed);
                        }
                        return;
                    }
                    match parse_frame(&f) {
                        (KIND_READY, pfn) if pfn < pages => install_shared(&map, ps, pfn, &handle),
                        (KIND_FAILED, _) => handle.fail(CacheLost::SessionFailed),
                        (kind, value) => {
                            tracing::debug!(
                                kind,
                                value,
                                "dropping a malformed frame from the host cache"
                            )
                        }
                    }
                }
            })?
    };
    Ok(Arc::new(ProcessFetcher {
        out: Mutex::new(out),
        map,
        pages,
        page_size: page_size as usize,
        handle,
        stop,
        reader: Some(reader),
    }))
}

/// A running `mcdist-host-cache` process (for launchers, tests and the demo).
#[derive(Debug)]
pub struct HostCacheProcess {
    child: std::process::Child,
    out: io::BufReader<std::process::ChildStdout>,
    socket: PathBuf,
}

impl HostCacheProcess {
    /// Starts the `mcdist-host-cache` binary `exe` inside network namespace `netns` (with
    /// `ip netns exec`), joining the session of the descriptor file `descriptor` on `iface`
    /// and serving clone processes on `socket`; returns once it serves.
    pub fn start(
        exe: &Path,
        netns: &str,
        descriptor: &Path,
        socket: PathBuf,
        iface: &str,
    ) -> Result<Self, HostCacheError> {
        Self::start_with_args(exe, netns, descriptor, socket, iface, &[])
    }

    /// [`HostCacheProcess::start`] with more arguments for the cache (its `--key FILE`).
    pub fn start_with_args(
        exe: &Path,
        netns: &str,
        descriptor: &Path,
        socket: PathBuf,
        iface: &str,
        extra: &[std::ffi::OsString],
    ) -> Result<Self, HostCacheError> {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(exe)
            .arg("--descriptor")
            .arg(descriptor)
            .arg("--socket")
            .arg(&socket)
            .args(["--iface", iface])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().ok_or(HostCacheError::NoOutput)?;
        let mut out = io::BufReader::new(stdout);
        let mut line = String::new();
        out.read_line(&mut line)?;
        if !line.starts_with("MCDIST-HOST-CACHE ready") {
            let _ = child.kill();
            let _ = child.wait();
            return Err(HostCacheError::NotStarted(line.trim().to_string()));
        }
        Ok(Self { child, out, socket })
    }

    /// The socket clone processes attach to (`mcdist-clone --host-cache`).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Closes the process's standard input, which stops it, and returns the counters it
    /// prints on the way out (`clones`, `network_pages`, `host_requests`, `cache_hits`,
    /// `joined`, `waiter_installs`, `stale_requests`, `malformed`, `bytes_received`, `duplicates`,
    /// `requests_sent`).
    pub fn finish(mut self) -> Result<HashMap<String, u64>, HostCacheError> {
        use std::io::BufRead;
        drop(self.child.stdin.take());
        let mut line = String::new();
        self.out.read_line(&mut line)?;
        let status = self.child.wait()?;
        let counters = line
            .trim()
            .strip_prefix("MCDIST-HOST-CACHE ")
            .filter(|_| status.success())
            .ok_or_else(|| HostCacheError::Ended {
                status,
                line: line.clone(),
            })?;
        Ok(counters
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
            .collect())
    }
}
