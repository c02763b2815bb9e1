//! Raw system interfaces: anonymous and shared (memfd) mappings ([`mem`]), userfaultfd
//! ([`uffd`]), descriptor passing, network-namespace switching and KVM memory slots. All
//! `unsafe` of the crate lives here.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

pub(crate) mod fcuffd;
pub(crate) mod linux;
mod mem;
mod uffd;

pub(crate) use mem::AnonMap;
pub(crate) use uffd::{Install, Uffd};

/// The descriptor of `e`, for registering with a poller that takes borrowed descriptors.
pub(crate) fn event_fd(e: &vmm_sys_util::eventfd::EventFd) -> BorrowedFd<'_> {
    // SAFETY: the eventfd's descriptor stays open as long as `e`, which the result borrows.
    unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) }
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
    let (n, fd) = recv_some_with_fd(sock, buf)?;
    if n == 0 {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
    }
    if n < buf.len() {
        use std::io::Read;
        let mut s: &std::os::unix::net::UnixStream = sock;
        s.read_exact(&mut buf[n..])?;
    }
    Ok(fd)
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
