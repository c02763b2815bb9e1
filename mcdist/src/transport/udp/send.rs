//! Batch send: one `sendmmsg` per batch, with runs of equal-sized datagrams
//! to one destination sent as one UDP GSO buffer (`UDP_SEGMENT`) when GSO is
//! on; if the kernel or device refuses GSO, it is switched off and the rest
//! of the batch goes datagram by datagram.

use super::{UdpTransport, MAX_BATCH};
use crate::transport::batch_datagram;
use crate::{Dest, Transmit};
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Largest UDP payload of one GSO buffer (64 KiB less the IPv4 and UDP headers).
pub(super) const GSO_MAX_BYTES: usize = 65_535 - 28;
/// Most datagrams in one GSO buffer (the kernel's `UDP_MAX_SEGMENTS` is 64 before Linux 6.9).
const GSO_MAX_SEGMENTS: usize = 64;

/// Items `first..first + count` of a batch, all to `to`; every one but the
/// last is `len` bytes long and the last is no longer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct GsoRun {
    pub(super) first: usize,
    pub(super) count: usize,
    pub(super) len: usize,
    pub(super) to: SocketAddr,
}

/// Cuts `items` into runs that can each go as one GSO buffer.
pub(super) fn gso_runs(
    items: &[Transmit],
    addr: impl Fn(Dest) -> SocketAddr,
    out: &mut Vec<GsoRun>,
) {
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
pub(super) fn gso_group(runs: &[GsoRun]) -> (usize, usize) {
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
pub(super) fn gso_refused(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_errno) if libc_errno == nix::errno::Errno::EINVAL as i32
            || libc_errno == nix::errno::Errno::EIO as i32
            || libc_errno == nix::errno::Errno::ENOPROTOOPT as i32
            || libc_errno == nix::errno::Errno::EOPNOTSUPP as i32
            || libc_errno == nix::errno::Errno::EMSGSIZE as i32
    )
}

impl UdpTransport {
    pub(super) fn dest_addr(&self, d: Dest) -> SocketAddr {
        match d {
            Dest::Group => self.group,
            Dest::Peer(p) => p,
        }
    }

    /// Sends `items`, many per `sendmmsg`. With `gso`, runs of datagrams to
    /// one destination go out as one UDP GSO buffer each; without, every
    /// datagram is a run of its own and no control message is attached. On
    /// error, returns how many items went out before it.
    pub(super) fn send_runs(
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
