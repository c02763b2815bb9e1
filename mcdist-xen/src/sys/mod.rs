//! Everything `unsafe` in mcdist-xen: page-sized anonymous mappings, the raw
//! view of a vm_event shared ring page, and (feature `xen`) the
//! FFI to libxenctrl, libxenevtchn and libxenforeignmemory.

use crate::abi::{self, VmEvent};
use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, Ordering};

#[cfg(feature = "xen")]
pub(crate) mod xen;

/// How a [`Mapping`] is released.
pub(crate) enum Release {
    /// `munmap(ptr, len)`.
    Munmap,
    /// Released by its owner (e.g. `xenforeignmemory_unmap`) before drop.
    #[cfg_attr(not(feature = "xen"), allow(dead_code))]
    External,
}

/// A page-aligned memory mapping.
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    release: Release,
}

// SAFETY: the mapping is plain memory owned by this value; all access to its
// bytes goes through atomics, volatile copies or `&mut self`, so moving or
// sharing the owner between threads is sound.
unsafe impl Send for Mapping {}
// SAFETY: see `Send`; shared access only reads/writes through atomics and
// volatile copies of whole entries (the ring protocol orders them).
unsafe impl Sync for Mapping {}

impl Mapping {
    /// An anonymous, zeroed, page-aligned mapping of `len` bytes, shared
    /// (`MAP_SHARED`) so that it behaves like a page shared with a hypervisor.
    pub(crate) fn anonymous(len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh anonymous mapping with no address hint; the result is
        // checked against MAP_FAILED before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Mapping {
            ptr,
            len,
            release: Release::Munmap,
        })
    }

    /// Wrap memory mapped by someone else.
    ///
    /// # Safety
    /// `ptr` must point to `len` bytes of readable and writable memory that stay
    /// mapped for the life of the returned value and are released by its creator.
    #[cfg(feature = "xen")]
    pub(crate) unsafe fn external(ptr: NonNull<u8>, len: usize) -> Mapping {
        Mapping {
            ptr,
            len,
            release: Release::External,
        }
    }

    /// Base address.
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The bytes, for exclusive use.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is valid for `len` bytes for our lifetime and `&mut self`
        // makes this the only access path from safe code.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, read-only.
    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` bytes for our lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if let Release::Munmap = self.release {
            // SAFETY: we created this mapping with mmap of exactly `len` bytes
            // and nothing refers to it after drop.
            unsafe {
                libc::munmap(self.ptr.as_ptr().cast(), self.len);
            }
        }
    }
}

/// Raw access to one vm_event shared ring page (`struct vm_event_sring`).
///
/// Index words are accessed as atomics (acquire loads, release stores stand in
/// for the `rmb()`/`wmb()` of `xen/io/ring.h`); entries are copied whole with
/// volatile reads and writes.
pub(crate) struct RawRing {
    map: Mapping,
}

impl RawRing {
    /// View `map` (at least one `XC_PAGE_SIZE` page) as a shared ring.
    pub(crate) fn new(map: Mapping) -> io::Result<RawRing> {
        if map.len < abi::XC_PAGE_SIZE || (map.as_ptr() as usize) % abi::XC_PAGE_SIZE != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a vm_event ring needs one aligned page",
            ));
        }
        Ok(RawRing { map })
    }

    /// Give back the mapping.
    #[cfg_attr(not(feature = "xen"), allow(dead_code))]
    pub(crate) fn into_mapping(self) -> Mapping {
        self.map
    }

    fn word(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off + 4 <= abi::SRING_RING_OFFSET && off % 4 == 0);
        // SAFETY: `off` is one of the 4-byte aligned header words inside the
        // page; the page lives as long as `self`, and AtomicU32 has the layout
        // of the u32 RING_IDX the other side writes.
        unsafe { &*(self.map.as_ptr().add(off).cast::<AtomicU32>()) }
    }

    /// Load a header word (acquire).
    pub(crate) fn load(&self, off: usize) -> u32 {
        self.word(off).load(Ordering::Acquire)
    }

    /// Store a header word (release).
    pub(crate) fn store(&self, off: usize, v: u32) {
        self.word(off).store(v, Ordering::Release)
    }

    /// Full barrier (`mb()`).
    pub(crate) fn mb(&self) {
        fence(Ordering::SeqCst)
    }

    fn entry_ptr(&self, idx: u32) -> *mut VmEvent {
        let slot = (idx & (abi::VM_EVENT_RING_SIZE - 1)) as usize;
        // SAFETY: slot < ring size, so the entry lies inside the page
        // (64 + 8 * 400 <= 4096); the page is 8-aligned, as is every entry.
        unsafe {
            self.map
                .as_ptr()
                .add(abi::SRING_RING_OFFSET + slot * abi::SRING_ENTRY_SIZE)
                .cast::<VmEvent>()
        }
    }

    /// Copy entry `idx` (masked) out of the ring.
    pub(crate) fn read_entry(&self, idx: u32) -> VmEvent {
        fence(Ordering::Acquire);
        // SAFETY: `entry_ptr` is in bounds and aligned; any bit pattern is a
        // valid `VmEvent` (integers and byte arrays only).
        unsafe { std::ptr::read_volatile(self.entry_ptr(idx)) }
    }

    /// Copy `ev` into entry `idx` (masked).
    pub(crate) fn write_entry(&self, idx: u32, ev: &VmEvent) {
        // SAFETY: `entry_ptr` is in bounds and aligned; the ring protocol gives
        // the producer exclusive use of slots it has not yet published.
        unsafe { std::ptr::write_volatile(self.entry_ptr(idx), *ev) };
        fence(Ordering::Release);
    }

    /// Zero the whole header (used by `SHARED_RING_INIT`).
    pub(crate) fn clear_header(&self) {
        for off in (0..abi::SRING_RING_OFFSET).step_by(4) {
            self.word(off).store(0, Ordering::Relaxed);
        }
        fence(Ordering::SeqCst);
    }
}
