//! Wake-ups between threads and waiting on descriptors, on vmm-sys-util's `EventFd` and
//! `PollContext` (epoll).

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

pub(crate) use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK};
use vmm_sys_util::poll::PollContext;

/// A non-blocking, close-on-exec eventfd.
pub(crate) fn event_fd() -> io::Result<EventFd> {
    EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)
}

/// Adds one to the counter of `e` (wakes pollers); a saturated counter is not an error
/// (pollers are awake anyway).
pub(crate) fn signal(e: &EventFd) -> io::Result<()> {
    match e.write(1) {
        Err(err) if err.kind() != io::ErrorKind::WouldBlock => Err(err),
        _ => Ok(()),
    }
}

/// Resets the counter of `e`; returns whether it was signalled.
pub(crate) fn drain(e: &EventFd) -> io::Result<bool> {
    match e.read() {
        Ok(_) => Ok(true),
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(err) => Err(err),
    }
}

/// Waits on up to 64 descriptors at once.
pub(crate) struct Readable {
    ctx: PollContext<u32>,
}

impl Readable {
    /// Watches `fds` for reading (and errors or hang-ups, which also count as ready).
    pub(crate) fn new(fds: &[RawFd]) -> io::Result<Self> {
        let mut ctx = PollContext::new().map_err(io::Error::from)?;
        ctx.set_check_for_hangup(false);
        for (i, fd) in fds.iter().enumerate().take(64) {
            ctx.add(fd, i as u32).map_err(io::Error::from)?;
        }
        Ok(Self { ctx })
    }

    /// Waits until a watched descriptor is ready or `timeout` passes; bit `i` of the result
    /// says whether descriptor `i` is.
    pub(crate) fn wait(&self, timeout: Duration) -> io::Result<u64> {
        loop {
            match self.ctx.wait_timeout(timeout) {
                Ok(events) => return Ok(events.iter().fold(0, |m, e| m | 1 << e.token())),
                Err(e) if e.errno() == libc::EINTR => continue,
                Err(e) => return Err(io::Error::from(e)),
            }
        }
    }
}
