//! The system calls of the Firecracker page-fault handler ([`crate::fcuffd`]) and of the
//! Firecracker side it is tested against: userfaultfd events other than page faults
//! (`UFFD_EVENT_REMOVE` from a balloon), a userfaultfd created with Firecracker's features,
//! and `madvise(MADV_DONTNEED)` on guest memory.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use linux_raw_sys::general::{
    uffd_msg, uffdio_api, UFFD_API, UFFD_EVENT_PAGEFAULT, UFFD_EVENT_REMOVE,
    UFFD_FEATURE_EVENT_REMOVE,
};
use linux_raw_sys::ioctl::UFFDIO_API;
use vmm_sys_util::ioctl::ioctl_with_mut_ref;

use super::{AnonMap, Uffd};

/// One userfaultfd event the handler acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UffdEvent {
    /// A missing-page fault at this address.
    Fault(u64),
    /// `[start, end)` was removed (`madvise(MADV_DONTNEED)`, a balloon inflating).
    Remove {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// Another event kind (fork, remap, unmap), read and ignored.
    Other(u8),
}

/// Reads one event from `uffd`: `Ok(None)` when none is pending.
pub(crate) fn read_event(uffd: &Uffd) -> io::Result<Option<UffdEvent>> {
    const MSG_SIZE: usize = std::mem::size_of::<uffd_msg>();
    loop {
        let mut msg = std::mem::MaybeUninit::<uffd_msg>::zeroed();
        // SAFETY: `msg` is writable for MSG_SIZE bytes.
        let n = unsafe {
            libc::read(
                uffd.fd().as_raw_fd(),
                msg.as_mut_ptr() as *mut libc::c_void,
                MSG_SIZE,
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
        if n as usize != MSG_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("short userfaultfd read: {n} bytes"),
            ));
        }
        // SAFETY: the kernel filled the whole message (checked above); uffd_msg is plain
        // data, valid for any bytes.
        let msg = unsafe { msg.assume_init() };
        let event = u32::from(msg.event);
        return Ok(Some(if event == UFFD_EVENT_PAGEFAULT {
            // SAFETY: a page-fault event holds the page-fault arm of the union (integers).
            UffdEvent::Fault(unsafe { msg.arg.pagefault.address })
        } else if event == UFFD_EVENT_REMOVE {
            // SAFETY: a remove event holds the remove arm of the union (integers).
            let r = unsafe { msg.arg.remove };
            UffdEvent::Remove {
                start: r.start,
                end: r.end,
            }
        } else {
            UffdEvent::Other(msg.event)
        }));
    }
}

/// Opens a non-blocking, close-on-exec userfaultfd that also reports faults from kernel mode
/// and asks for `UFFD_FEATURE_EVENT_REMOVE`, as Firecracker's `persist.rs` does.
pub(crate) fn open_uffd_with_remove() -> io::Result<Uffd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: userfaultfd(2) takes one integer flag argument and returns a new fd or -1.
    let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw as RawFd) };
    let mut api = uffdio_api {
        api: u64::from(UFFD_API),
        features: u64::from(UFFD_FEATURE_EVENT_REMOVE),
        ioctls: 0,
    };
    // SAFETY: `api` is a valid, writable uffdio_api for the duration of the call.
    let rc = unsafe { ioctl_with_mut_ref(&fd, UFFDIO_API.into(), &mut api) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Uffd::from_owned(fd))
}

/// `madvise(MADV_DONTNEED)` on `len` bytes at `offset` of `map` (what a balloon does to guest
/// memory): the pages are dropped, and the next touch faults again.
pub(crate) fn madvise_dontneed(map: &AnonMap, offset: usize, len: usize) -> io::Result<()> {
    let ptr = map.range_ptr(offset, len)?;
    // SAFETY: the range lies inside `map` (checked by `range_ptr`); MADV_DONTNEED on a private
    // anonymous mapping only drops its pages, and no Rust reference covers guest memory.
    let rc = unsafe { libc::madvise(ptr as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One `recvmsg` on `sock` into `buf`: the bytes read and the first descriptor sent with them
/// (`SCM_RIGHTS`), if any; extra descriptors are closed. End of stream with nothing read is
/// `UnexpectedEof`.
pub(crate) fn recv_some_with_fd(
    sock: &std::os::unix::net::UnixStream,
    buf: &mut [u8],
) -> io::Result<(usize, Option<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
    let mut space = nix::cmsg_space!([RawFd; 4]);
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
    let n = msg.bytes;
    // SAFETY: the kernel just installed these descriptors in this process for us
    // (SCM_RIGHTS); nothing else owns them.
    let mut owned: Vec<OwnedFd> = raw
        .into_iter()
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 && owned.is_empty() {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
    }
    let fd = if owned.is_empty() {
        None
    } else {
        Some(owned.swap_remove(0))
    };
    Ok((n, fd))
}
