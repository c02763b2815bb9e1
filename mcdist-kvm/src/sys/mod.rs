//! Raw system interfaces: anonymous and shared (memfd) mappings, userfaultfd ioctls, eventfd,
//! poll, descriptor passing and network-namespace switching. All `unsafe` of the crate lives
//! here.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

pub(crate) mod linux;

// ---- userfaultfd ABI (linux/userfaultfd.h) ------------------------------------------------

const UFFD_API: u64 = 0xAA;
const UFFDIO_API: libc::c_ulong = 0xC018_AA3F; // _IOWR(0xAA, 0x3F, struct uffdio_api)
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00; // _IOWR(0xAA, 0x00, struct uffdio_register)
const UFFDIO_WAKE: libc::c_ulong = 0x8010_AA02; // _IOR(0xAA, 0x02, struct uffdio_range)
const UFFDIO_COPY: libc::c_ulong = 0xC028_AA03; // _IOWR(0xAA, 0x03, struct uffdio_copy)
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xC020_AA04; // _IOWR(0xAA, 0x04, struct uffdio_zeropage)
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xAA00; // _IO(0xAA, 0x00)
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg` (32 bytes, packed); only the page-fault arm is decoded.
const UFFD_MSG_SIZE: usize = 32;

/// Outcome of an install ioctl.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Install {
    /// The page was installed now.
    Done,
    /// The page was already present (`EEXIST`): a push or an earlier copy won the race.
    AlreadyPresent,
}

/// A userfaultfd file descriptor (non-blocking, close-on-exec).
#[derive(Debug)]
pub(crate) struct Uffd {
    fd: OwnedFd,
}

impl Uffd {
    /// Opens a userfaultfd through the syscall, falling back to `/dev/userfaultfd`, and
    /// negotiates the API. Faults from kernel mode (KVM) are handled, so this needs
    /// privilege when `vm.unprivileged_userfaultfd` is 0.
    pub(crate) fn open() -> io::Result<Self> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: userfaultfd(2) takes one integer flag argument and returns a new fd or -1.
        let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        let fd = if raw >= 0 {
            // SAFETY: the syscall returned a fresh descriptor that nothing else owns.
            unsafe { OwnedFd::from_raw_fd(raw as RawFd) }
        } else {
            let path = CString::new("/dev/userfaultfd").map_err(io::Error::other)?;
            // SAFETY: `path` is a valid NUL-terminated string; open returns an fd or -1.
            let dev = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
            if dev < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `dev` is a fresh descriptor owned only here.
            let dev = unsafe { OwnedFd::from_raw_fd(dev) };
            // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its integer argument.
            let raw = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: the ioctl returned a fresh descriptor that nothing else owns.
            unsafe { OwnedFd::from_raw_fd(raw) }
        };
        let mut api = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        // SAFETY: `api` is a valid, writable uffdio_api for the duration of the call.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api as *mut UffdioApi) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// Registers `[addr, addr + len)` in missing mode.
    pub(crate) fn register_missing(&self, addr: usize, len: usize) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: addr as u64,
                len: len as u64,
            },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: `reg` is a valid, writable uffdio_register; the kernel validates the range.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                UFFDIO_REGISTER,
                &mut reg as *mut UffdioRegister,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Copies `src` into the registered page at `dst` and wakes its waiters.
    /// `EAGAIN` (mapping changing) is retried; `EEXIST` is reported as already present.
    pub(crate) fn copy(&self, dst: usize, src: &[u8]) -> io::Result<Install> {
        loop {
            let mut c = UffdioCopy {
                dst: dst as u64,
                src: src.as_ptr() as u64,
                len: src.len() as u64,
                mode: 0,
                copy: 0,
            };
            // SAFETY: `c` is valid and writable; `src` is readable for `len` bytes during the
            // call; the kernel only writes into the uffd-registered destination range.
            let rc =
                unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut c as *mut UffdioCopy) };
            if rc == 0 {
                return Ok(Install::Done);
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EEXIST) => return Ok(Install::AlreadyPresent),
                Some(libc::EAGAIN) => {
                    if c.copy > 0 {
                        // Partial copy of one page does not happen for len == page size;
                        // treat any progress as done.
                        return Ok(Install::Done);
                    }
                    std::thread::yield_now();
                }
                _ => return Err(err),
            }
        }
    }

    /// Maps the shared zero page at `[dst, dst + len)` and wakes its waiters.
    pub(crate) fn zeropage(&self, dst: usize, len: usize) -> io::Result<Install> {
        loop {
            let mut z = UffdioZeropage {
                range: UffdioRange {
                    start: dst as u64,
                    len: len as u64,
                },
                mode: 0,
                zeropage: 0,
            };
            // SAFETY: `z` is valid and writable; the kernel validates the range.
            let rc = unsafe {
                libc::ioctl(
                    self.fd.as_raw_fd(),
                    UFFDIO_ZEROPAGE,
                    &mut z as *mut UffdioZeropage,
                )
            };
            if rc == 0 {
                return Ok(Install::Done);
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EEXIST) => return Ok(Install::AlreadyPresent),
                Some(libc::EAGAIN) => std::thread::yield_now(),
                _ => return Err(err),
            }
        }
    }

    /// Wakes threads waiting on `[addr, addr + len)` (used when a fault raced an install).
    pub(crate) fn wake(&self, addr: usize, len: usize) -> io::Result<()> {
        let mut r = UffdioRange {
            start: addr as u64,
            len: len as u64,
        };
        // SAFETY: `r` is a valid uffdio_range for the duration of the call.
        let rc =
            unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &mut r as *mut UffdioRange) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one event. Returns `Ok(None)` when none is pending, `Ok(Some(addr))` for a page
    /// fault at `addr`, and skips other event kinds.
    pub(crate) fn read_fault(&self) -> io::Result<Option<u64>> {
        let mut msg = [0u8; UFFD_MSG_SIZE];
        loop {
            // SAFETY: `msg` is writable for UFFD_MSG_SIZE bytes.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    msg.as_mut_ptr() as *mut libc::c_void,
                    UFFD_MSG_SIZE,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                return match err.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(None),
                    Some(libc::EINTR) => continue,
                    _ => Err(err),
                };
            }
            if n as usize != UFFD_MSG_SIZE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("short userfaultfd read: {n} bytes"),
                ));
            }
            if msg[0] != UFFD_EVENT_PAGEFAULT {
                continue;
            }
            let mut addr = [0u8; 8];
            addr.copy_from_slice(&msg[16..24]);
            return Ok(Some(u64::from_ne_bytes(addr)));
        }
    }

    /// The raw descriptor, for polling.
    pub(crate) fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The descriptor, for registering with a poller.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

// ---- eventfd and poll ---------------------------------------------------------------------

/// An eventfd used to wake a thread blocked in [`poll_readable`].
#[derive(Debug)]
pub(crate) struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes an initial value and flags and returns an fd or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptor owned only here.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Self { fd })
    }

    pub(crate) fn signal(&self) -> io::Result<()> {
        let one: u64 = 1;
        // SAFETY: writes 8 readable bytes from `one`.
        let n = unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub(crate) fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Blocks until one of `fds` is readable or `timeout_ms` passes (-1: forever).
/// Returns a readiness flag per descriptor.
pub(crate) fn poll_readable<const N: usize>(
    fds: [RawFd; N],
    timeout_ms: i32,
) -> io::Result<[bool; N]> {
    let mut pfds = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    loop {
        // SAFETY: `pfds` is a valid array of N pollfd structs for the duration of the call.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), N as libc::nfds_t, timeout_ms) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(err);
        }
        return Ok(pfds.map(|p| p.revents != 0));
    }
}

// ---- anonymous memory ---------------------------------------------------------------------

/// A memory mapping, unmapped on drop: private anonymous (`MAP_NORESERVE`), or shared over a
/// memfd (writable by its creator, read-only in processes it is handed to).
#[derive(Debug)]
pub(crate) struct AnonMap {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
}

// SAFETY: the mapping is plain memory owned by this value; concurrent access is
// coordinated by the users (KVM, userfaultfd installs and bounds-checked copies).
unsafe impl Send for AnonMap {}
// SAFETY: as above; the safe accessors copy bytes and never hand out references.
unsafe impl Sync for AnonMap {}

impl AnonMap {
    pub(crate) fn new(len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        // SAFETY: anonymous mapping request with no address hint; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(p as *mut u8).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self {
            ptr,
            len,
            writable: true,
        })
    }

    /// A new memfd of `len` bytes (sparse: pages are allocated when first written) and a
    /// writable shared mapping of it.
    pub(crate) fn memfd(name: &str, len: usize) -> io::Result<(Self, OwnedFd)> {
        let cname =
            CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: `cname` is a valid NUL-terminated string; the result is checked.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let file = std::fs::File::from(fd);
        file.set_len(len as u64)?;
        let fd = OwnedFd::from(file);
        let map = Self::map_shared(fd.as_fd(), len, true)?;
        Ok((map, fd))
    }

    /// Maps `len` bytes of the memfd (or file) `fd` shared, read-only unless `writable`.
    /// Fails if the file is shorter than `len` (touching past its end would raise SIGBUS).
    pub(crate) fn map_shared(fd: BorrowedFd<'_>, len: usize, writable: bool) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        let size = std::fs::File::from(fd.try_clone_to_owned()?)
            .metadata()?
            .len();
        if size < len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("shared memory holds {size} bytes, {len} expected"),
            ));
        }
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: shared mapping of a descriptor we hold, no address hint; the result is
        // checked, and the file covers the whole length (checked above).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(p as *mut u8).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self { ptr, len, writable })
    }

    /// Lends `len` bytes at `offset` of a **read-only** mapping to `f` (no copy: for example
    /// straight into `UFFDIO_COPY`). Nothing in this process can write such a mapping; the
    /// process that shared it must not change a range after it announced it (the host page
    /// cache writes each page once, before telling anyone it is there).
    pub(crate) fn with_slice<R>(
        &self,
        offset: usize,
        len: usize,
        f: impl FnOnce(&[u8]) -> R,
    ) -> io::Result<R> {
        if self.writable {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "slices are lent from read-only mappings only",
            ));
        }
        check_range(offset, len, self.len)?;
        // SAFETY: the range is inside the mapping (checked above), the mapping lives as long
        // as `self`, and it is read-only here, so no write in this process aliases the slice.
        let s = unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(offset), len) };
        Ok(f(s))
    }

    pub(crate) fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Copies bytes out of the mapping. Touching a page registered with userfaultfd blocks
    /// until the page is installed.
    pub(crate) fn read(&self, offset: usize, buf: &mut [u8]) -> io::Result<()> {
        check_range(offset, buf.len(), self.len)?;
        // SAFETY: the range is inside the mapping (checked above) and `buf` does not overlap it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        Ok(())
    }

    /// Loads the 64-bit word at `offset` (8-aligned) with acquire ordering: for words that
    /// every process sharing the mapping only accesses atomically (a presence bitmap).
    pub(crate) fn load_u64_acquire(&self, offset: usize) -> io::Result<u64> {
        Ok(self
            .atomic_word(offset)?
            .load(std::sync::atomic::Ordering::Acquire))
    }

    /// Sets `bits` in the 64-bit word at `offset` (8-aligned) with release ordering (fails on
    /// a read-only mapping).
    pub(crate) fn or_u64_release(&self, offset: usize, bits: u64) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "read-only mapping",
            ));
        }
        self.atomic_word(offset)?
            .fetch_or(bits, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    fn atomic_word(&self, offset: usize) -> io::Result<&std::sync::atomic::AtomicU64> {
        check_range(offset, 8, self.len)?;
        if (self.addr() + offset) % 8 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "unaligned atomic word",
            ));
        }
        // SAFETY: the word is inside the mapping (checked), 8-aligned (checked), lives as
        // long as `self`, and `AtomicU64` has the layout of `u64`. The words handed out here
        // are only ever accessed atomically, in this process and in those sharing the memfd.
        Ok(unsafe { &*(self.ptr.as_ptr().add(offset) as *const std::sync::atomic::AtomicU64) })
    }

    /// Copies bytes into the mapping (fails on a read-only one).
    pub(crate) fn write(&self, offset: usize, data: &[u8]) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "read-only mapping",
            ));
        }
        check_range(offset, data.len(), self.len)?;
        // SAFETY: the range is inside the mapping (checked above) and `data` does not overlap it.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len())
        };
        Ok(())
    }
}

fn check_range(offset: usize, len: usize, total: usize) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= total => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {offset}+{len} outside mapping of {total} bytes"),
        )),
    }
}

impl Drop for AnonMap {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping created by `new` and not unmapped before.
        unsafe {
            libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len);
        }
    }
}

// ---- descriptor passing -------------------------------------------------------------------

/// Sends `data` on the unix stream `sock` with `fd` attached (`SCM_RIGHTS`).
pub(crate) fn send_with_fd(
    sock: &std::os::unix::net::UnixStream,
    data: &[u8],
    fd: BorrowedFd<'_>,
) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
    let fds = [fd.as_raw_fd()];
    let iov = [io::IoSlice::new(data)];
    let n = sendmsg::<UnixAddr>(
        sock.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(io::Error::from)?;
    if n < data.len() {
        use std::io::Write;
        let mut s: &std::os::unix::net::UnixStream = sock;
        s.write_all(&data[n..])?;
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes from the unix stream `sock` and the one descriptor sent
/// with them (`SCM_RIGHTS`), if any. Extra descriptors are closed.
pub(crate) fn recv_with_fd(
    sock: &std::os::unix::net::UnixStream,
    buf: &mut [u8],
) -> io::Result<Option<OwnedFd>> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let (n, raw) = {
        let mut iov = [io::IoSliceMut::new(buf)];
        let msg = recvmsg::<UnixAddr>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let mut raw = Vec::new();
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                raw.extend(fds);
            }
        }
        (msg.bytes, raw)
    };
    // SAFETY: the kernel just installed these descriptors in this process for us
    // (SCM_RIGHTS); nothing else owns them.
    let mut owned: Vec<OwnedFd> = raw
        .into_iter()
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
    }
    if n < buf.len() {
        use std::io::Read;
        let mut s: &std::os::unix::net::UnixStream = sock;
        s.read_exact(&mut buf[n..])?;
    }
    Ok(if owned.is_empty() {
        None
    } else {
        Some(owned.swap_remove(0))
    })
}

// ---- network namespaces -------------------------------------------------------------------

/// Moves the calling thread into the network namespace bound at `path`
/// (for example `/var/run/netns/NAME`). Sockets created afterwards by this thread and by
/// threads it spawns belong to that namespace.
pub(crate) fn setns_net(path: &std::path::Path) -> io::Result<()> {
    let f = std::fs::File::open(path)?;
    // SAFETY: `f` is an open namespace file; setns only changes this thread's namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

// ---- KVM memory slots ---------------------------------------------------------------------

/// Maps `[host_addr, host_addr + size)` at guest physical `gpa` in `slot`.
///
/// # Safety
///
/// `host_addr..host_addr + size` must be a valid mapping owned by the caller that stays mapped
/// for as long as `vm` (or any vCPU of it) can run.
pub(crate) unsafe fn set_memory_slot(
    vm: &kvm_ioctls::VmFd,
    slot: u32,
    gpa: u64,
    size: u64,
    host_addr: u64,
) -> Result<(), kvm_ioctls::Error> {
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot,
        flags: 0,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: host_addr,
    };
    // SAFETY: forwarded from this function's contract: the host range stays valid while the
    // VM can use it.
    unsafe { vm.set_user_memory_region(region) }
}
