//! Memory mappings shared with vCPUs, the kernel and other processes: guest RAM (private
//! anonymous, written by vCPUs and by `UFFDIO_COPY`) and the host page cache (a memfd, written
//! by the cache process and read by clone processes). Bytes go in and out with volatile copies
//! over raw pointers; no Rust reference into such memory is ever created, except the
//! presence-bitmap words, which every party only touches atomically.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

/// A memory mapping, unmapped on drop: private anonymous (`MAP_NORESERVE`), or shared over a
/// memfd (writable by its creator, read-only in processes it is handed to).
#[derive(Debug)]
pub(crate) struct AnonMap {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
}

// SAFETY: the mapping is owned by this value (unmapped on drop) and holds no thread-local
// state; moving it to another thread moves only the pointer.
unsafe impl Send for AnonMap {}
// SAFETY: the memory is written concurrently by others: vCPU threads (KVM runs the guest on
// it), the kernel (`UFFDIO_COPY`/`UFFDIO_ZEROPAGE` from whichever thread installs a page),
// and, for a shared memfd, the process that created it. Every access through `&AnonMap` is
// either a bounds-checked volatile copy through raw pointers ([`AnonMap::read`],
// [`AnonMap::write`]), a pointer handed to the kernel ([`AnonMap::range_ptr`] for
// `UFFDIO_COPY`), or an atomic access to a presence-bitmap word that every party only
// accesses atomically. No `&[u8]`/`&mut [u8]` into the mapping exists, so concurrent writers
// cannot invalidate a reference, and a torn read is at worst stale bytes (readers that need a
// whole page wait until its presence bit or the fault says it is complete).
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
    /// writable shared mapping of it, the only one there will ever be: the memfd is sealed
    /// (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL`), so whoever else
    /// gets the descriptor can map it read-only but cannot write it (`write`, a writable
    /// `mmap` or `mprotect` fail with `EPERM`/`EACCES`), resize it or lift the seals.
    pub(crate) fn memfd(name: &str, len: usize) -> io::Result<(Self, OwnedFd)> {
        let cname =
            CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: `cname` is a valid NUL-terminated string; the result is checked.
        let fd = unsafe {
            libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let file = std::fs::File::from(fd);
        file.set_len(len as u64)?;
        let fd = OwnedFd::from(file);
        let map = Self::map_shared(fd.as_fd(), len, true)?;
        // The writable mapping made above survives F_SEAL_FUTURE_WRITE; no later one can be made.
        let seals =
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_FUTURE_WRITE | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on a descriptor we own with an integer argument; the result is checked.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(io::Error::last_os_error());
        }
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

    /// The address of `len` bytes at `offset` (bounds-checked), for handing to the kernel
    /// (`UFFDIO_COPY` reads its source itself; no reference is made here).
    pub(crate) fn range_ptr(&self, offset: usize, len: usize) -> io::Result<*const u8> {
        check_range(offset, len, self.len)?;
        Ok(self.ptr.as_ptr().wrapping_add(offset))
    }

    pub(crate) fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Copies bytes out of the mapping (volatile: vCPUs and the kernel may write it
    /// meanwhile). Touching a page registered with userfaultfd blocks until the page is
    /// installed.
    pub(crate) fn read(&self, offset: usize, buf: &mut [u8]) -> io::Result<()> {
        check_range(offset, buf.len(), self.len)?;
        // SAFETY: the range is inside the mapping (checked above), which lives as long as
        // `self`; `buf` is ordinary memory of this thread and does not overlap it.
        unsafe { volatile_copy(self.ptr.as_ptr().add(offset), buf.as_mut_ptr(), buf.len()) };
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

    /// The presence-bitmap word at `offset`. The reference lives only inside the two
    /// accessors above, and such words are only ever accessed atomically, in this process and
    /// in those sharing the memfd.
    fn atomic_word(&self, offset: usize) -> io::Result<&AtomicU64> {
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
        Ok(unsafe { &*(self.ptr.as_ptr().add(offset) as *const AtomicU64) })
    }

    /// Copies bytes into the mapping (volatile, as [`AnonMap::read`]; fails on a read-only
    /// mapping).
    pub(crate) fn write(&self, offset: usize, data: &[u8]) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "read-only mapping",
            ));
        }
        check_range(offset, data.len(), self.len)?;
        // SAFETY: the range is inside the writable mapping (checked above), which lives as
        // long as `self`; `data` is ordinary memory and does not overlap it.
        unsafe { volatile_copy(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len()) };
        Ok(())
    }
}

/// Copies `len` bytes from `src` to `dst` with volatile accesses, 8 bytes at a time where both
/// are 8-aligned (as vm-memory's `VolatileSlice` copies do), so that the compiler neither
/// elides nor merges accesses to memory that others write concurrently.
///
/// # Safety
///
/// `src` must be readable and `dst` writable for `len` bytes, and the ranges must not overlap.
unsafe fn volatile_copy(src: *const u8, dst: *mut u8, len: usize) {
    let mut i = 0;
    if (src as usize) % 8 == (dst as usize) % 8 {
        while i < len && (src as usize + i) % 8 != 0 {
            // SAFETY: `i < len`, inside both ranges (caller's contract).
            unsafe { dst.add(i).write_volatile(src.add(i).read_volatile()) };
            i += 1;
        }
        while i + 8 <= len {
            // SAFETY: `i + 8 <= len`, inside both ranges, and both addresses are 8-aligned
            // (same alignment, advanced to a multiple of 8 above).
            unsafe {
                (dst.add(i) as *mut u64).write_volatile((src.add(i) as *const u64).read_volatile())
            };
            i += 8;
        }
    }
    while i < len {
        // SAFETY: `i < len`, inside both ranges (caller's contract).
        unsafe { dst.add(i).write_volatile(src.add(i).read_volatile()) };
        i += 1;
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
