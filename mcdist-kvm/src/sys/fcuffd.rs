//! The system calls of the Firecracker page-fault handler ([`crate::fcuffd`]) and of the
//! Firecracker side it is tested against: userfaultfd events other than page faults
//! (`UFFD_EVENT_REMOVE` from a balloon), a userfaultfd created with Firecracker's features,
//! and `madvise(MADV_DONTNEED)` on guest memory.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use linux_raw_sys::general::{uffdio_api, UFFD_API, UFFD_FEATURE_EVENT_REMOVE};
use linux_raw_sys::ioctl::UFFDIO_API;
use vmm_sys_util::ioctl::ioctl_with_mut_ref;

use super::{AnonMap, Uffd};

pub(crate) use super::uffd::UffdEvent;

/// Reads one event from `uffd`: `Ok(None)` when none is pending.
pub(crate) fn read_event(uffd: &Uffd) -> io::Result<Option<UffdEvent>> {
    uffd.read_event()
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

pub(crate) use super::recv_some_with_fd;
