//! FFI to the Xen 4.17 user-space libraries (Debian `libxen-dev`).
//!
//! Declarations are written by hand from `xenctrl.h`, `xenevtchn.h` and
//! `xenforeignmemory.h`; the `abi_layout` test checks every prototype against
//! the installed headers with `__builtin_types_compatible_p`.

use super::Mapping;
use std::ffi::{c_int, c_uint, c_ulong, c_void};
use std::io;
use std::ptr::NonNull;

/// `xc_interface` (opaque).
#[repr(C)]
pub(crate) struct XcInterface {
    _opaque: [u8; 0],
}
/// `xenevtchn_handle` (opaque).
#[repr(C)]
pub(crate) struct XenevtchnHandle {
    _opaque: [u8; 0],
}
/// `xenforeignmemory_handle` (opaque).
#[repr(C)]
pub(crate) struct XenforeignmemoryHandle {
    _opaque: [u8; 0],
}
/// `xen_pfn_t` on x86-64.
pub(crate) type XenPfn = c_ulong;

extern "C" {
    fn xc_interface_open(
        logger: *mut c_void,
        dombuild_logger: *mut c_void,
        open_flags: c_uint,
    ) -> *mut XcInterface;
    fn xc_interface_close(xch: *mut XcInterface) -> c_int;
    fn xc_hvm_param_get(xch: *mut XcInterface, dom: u32, param: u32, value: *mut u64) -> c_int;
    fn xc_domain_populate_physmap_exact(
        xch: *mut XcInterface,
        domid: u32,
        nr_extents: c_ulong,
        extent_order: c_uint,
        mem_flags: c_uint,
        extent_start: *mut XenPfn,
    ) -> c_int;
    fn xc_domain_decrease_reservation_exact(
        xch: *mut XcInterface,
        domid: u32,
        nr_extents: c_ulong,
        extent_order: c_uint,
        extent_start: *mut XenPfn,
    ) -> c_int;
    fn xc_domain_maximum_gpfn(xch: *mut XcInterface, domid: u32, gpfns: *mut XenPfn) -> c_int;
    fn xc_vm_event_get_version(xch: *mut XcInterface) -> c_int;
    fn xc_domain_hvm_getcontext(
        xch: *mut XcInterface,
        domid: u32,
        ctxt_buf: *mut u8,
        size: u32,
    ) -> c_int;
    fn xc_domain_hvm_setcontext(
        xch: *mut XcInterface,
        domid: u32,
        hvm_ctxt: *mut u8,
        size: u32,
    ) -> c_int;
    fn xc_mem_paging_enable(xch: *mut XcInterface, domain_id: u32, port: *mut u32) -> c_int;
    fn xc_mem_paging_disable(xch: *mut XcInterface, domain_id: u32) -> c_int;
    fn xc_mem_paging_nominate(xch: *mut XcInterface, domain_id: u32, gfn: u64) -> c_int;
    fn xc_mem_paging_evict(xch: *mut XcInterface, domain_id: u32, gfn: u64) -> c_int;
    fn xc_mem_paging_load(
        xch: *mut XcInterface,
        domain_id: u32,
        gfn: u64,
        buffer: *mut c_void,
    ) -> c_int;

    fn xenevtchn_open(logger: *mut c_void, flags: c_uint) -> *mut XenevtchnHandle;
    fn xenevtchn_close(xce: *mut XenevtchnHandle) -> c_int;
    fn xenevtchn_fd(xce: *mut XenevtchnHandle) -> c_int;
    fn xenevtchn_notify(xce: *mut XenevtchnHandle, port: u32) -> c_int;
    fn xenevtchn_bind_interdomain(xce: *mut XenevtchnHandle, domid: u32, remote_port: u32)
        -> c_int;
    fn xenevtchn_unbind(xce: *mut XenevtchnHandle, port: u32) -> c_int;
    fn xenevtchn_pending(xce: *mut XenevtchnHandle) -> c_int;
    fn xenevtchn_unmask(xce: *mut XenevtchnHandle, port: u32) -> c_int;

    fn xenforeignmemory_open(
        logger: *mut c_void,
        open_flags: c_uint,
    ) -> *mut XenforeignmemoryHandle;
    fn xenforeignmemory_close(fmem: *mut XenforeignmemoryHandle) -> c_int;
    fn xenforeignmemory_map(
        fmem: *mut XenforeignmemoryHandle,
        dom: u32,
        prot: c_int,
        pages: usize,
        arr: *const XenPfn,
        err: *mut c_int,
    ) -> *mut c_void;
    fn xenforeignmemory_unmap(
        fmem: *mut XenforeignmemoryHandle,
        addr: *mut c_void,
        pages: usize,
    ) -> c_int;
}

/// The C prototypes the declarations above must match, for the layout test.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) const C_PROTOTYPE_CHECKS: &[(&str, &str)] = &[
    (
        "xc_interface_open",
        "xc_interface *(*)(xentoollog_logger *, xentoollog_logger *, unsigned)",
    ),
    ("xc_interface_close", "int (*)(xc_interface *)"),
    (
        "xc_hvm_param_get",
        "int (*)(xc_interface *, uint32_t, uint32_t, uint64_t *)",
    ),
    (
        "xc_domain_populate_physmap_exact",
        "int (*)(xc_interface *, uint32_t, unsigned long, unsigned int, unsigned int, xen_pfn_t *)",
    ),
    (
        "xc_domain_decrease_reservation_exact",
        "int (*)(xc_interface *, uint32_t, unsigned long, unsigned int, xen_pfn_t *)",
    ),
    (
        "xc_domain_maximum_gpfn",
        "int (*)(xc_interface *, uint32_t, xen_pfn_t *)",
    ),
    ("xc_vm_event_get_version", "int (*)(xc_interface *)"),
    (
        "xc_domain_hvm_getcontext",
        "int (*)(xc_interface *, uint32_t, uint8_t *, uint32_t)",
    ),
    (
        "xc_domain_hvm_setcontext",
        "int (*)(xc_interface *, uint32_t, uint8_t *, uint32_t)",
    ),
    (
        "xc_mem_paging_enable",
        "int (*)(xc_interface *, uint32_t, uint32_t *)",
    ),
    ("xc_mem_paging_disable", "int (*)(xc_interface *, uint32_t)"),
    (
        "xc_mem_paging_nominate",
        "int (*)(xc_interface *, uint32_t, uint64_t)",
    ),
    (
        "xc_mem_paging_evict",
        "int (*)(xc_interface *, uint32_t, uint64_t)",
    ),
    (
        "xc_mem_paging_load",
        "int (*)(xc_interface *, uint32_t, uint64_t, void *)",
    ),
    (
        "xenevtchn_open",
        "xenevtchn_handle *(*)(struct xentoollog_logger *, unsigned int)",
    ),
    ("xenevtchn_close", "int (*)(xenevtchn_handle *)"),
    ("xenevtchn_fd", "int (*)(xenevtchn_handle *)"),
    (
        "xenevtchn_notify",
        "int (*)(xenevtchn_handle *, evtchn_port_t)",
    ),
    (
        "xenevtchn_bind_interdomain",
        "xenevtchn_port_or_error_t (*)(xenevtchn_handle *, uint32_t, evtchn_port_t)",
    ),
    (
        "xenevtchn_unbind",
        "int (*)(xenevtchn_handle *, evtchn_port_t)",
    ),
    (
        "xenevtchn_pending",
        "xenevtchn_port_or_error_t (*)(xenevtchn_handle *)",
    ),
    (
        "xenevtchn_unmask",
        "int (*)(xenevtchn_handle *, evtchn_port_t)",
    ),
    (
        "xenforeignmemory_open",
        "xenforeignmemory_handle *(*)(struct xentoollog_logger *, unsigned)",
    ),
    (
        "xenforeignmemory_close",
        "int (*)(xenforeignmemory_handle *)",
    ),
    (
        "xenforeignmemory_map",
        "void *(*)(xenforeignmemory_handle *, uint32_t, int, size_t, const xen_pfn_t *, int *)",
    ),
    (
        "xenforeignmemory_unmap",
        "int (*)(xenforeignmemory_handle *, void *, size_t)",
    ),
];

fn check(rc: c_int) -> io::Result<c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Open handles to libxenctrl, libxenevtchn and libxenforeignmemory.
pub(crate) struct XenHandles {
    xch: NonNull<XcInterface>,
    xce: NonNull<XenevtchnHandle>,
    fmem: NonNull<XenforeignmemoryHandle>,
}

// SAFETY: the libraries' handles may be used from any thread as long as calls
// are not concurrent; `XenHandles` is only used through `&mut self` or by one
// owner at a time.
unsafe impl Send for XenHandles {}

impl XenHandles {
    /// Open all three handles. Errors name the call that failed.
    pub(crate) fn open() -> Result<XenHandles, (&'static str, io::Error)> {
        // SAFETY: null loggers select the libraries' default stderr logger.
        let xch = unsafe { xc_interface_open(std::ptr::null_mut(), std::ptr::null_mut(), 0) };
        let xch =
            NonNull::new(xch).ok_or_else(|| ("xc_interface_open", io::Error::last_os_error()))?;
        // SAFETY: as above; flags 0 = close-on-exec handle.
        let xce = unsafe { xenevtchn_open(std::ptr::null_mut(), 0) };
        let Some(xce) = NonNull::new(xce) else {
            let e = io::Error::last_os_error();
            // SAFETY: `xch` was opened above and is not used again.
            unsafe { xc_interface_close(xch.as_ptr()) };
            return Err(("xenevtchn_open", e));
        };
        // SAFETY: as above.
        let fmem = unsafe { xenforeignmemory_open(std::ptr::null_mut(), 0) };
        let Some(fmem) = NonNull::new(fmem) else {
            let e = io::Error::last_os_error();
            // SAFETY: both handles were opened above and are not used again.
            unsafe {
                xenevtchn_close(xce.as_ptr());
                xc_interface_close(xch.as_ptr());
            }
            return Err(("xenforeignmemory_open", e));
        };
        Ok(XenHandles { xch, xce, fmem })
    }

    /// `xc_vm_event_get_version`.
    pub(crate) fn vm_event_version(&mut self) -> io::Result<u32> {
        // SAFETY: `xch` is a live handle.
        check(unsafe { xc_vm_event_get_version(self.xch.as_ptr()) }).map(|v| v as u32)
    }

    /// `xc_hvm_param_get`.
    pub(crate) fn hvm_param_get(&mut self, domid: u32, param: u32) -> io::Result<u64> {
        let mut v = 0u64;
        // SAFETY: `xch` is live, `v` is a live out-parameter.
        check(unsafe { xc_hvm_param_get(self.xch.as_ptr(), domid, param, &mut v) })?;
        Ok(v)
    }

    /// `xc_domain_hvm_getcontext`: the domain's whole HVM save record
    /// (vCPU registers, local APICs, ...), as `xl save` writes it.
    pub(crate) fn hvm_getcontext(&mut self, domid: u32) -> io::Result<Vec<u8>> {
        // SAFETY: `xch` is live; a null buffer asks for the size only.
        let size = check(unsafe {
            xc_domain_hvm_getcontext(self.xch.as_ptr(), domid, std::ptr::null_mut(), 0)
        })?;
        let mut buf = vec![0u8; size as usize];
        // SAFETY: `buf` is a live buffer of the length passed.
        let len = check(unsafe {
            xc_domain_hvm_getcontext(self.xch.as_ptr(), domid, buf.as_mut_ptr(), size as u32)
        })?;
        buf.truncate(len as usize);
        Ok(buf)
    }

    /// `xc_domain_hvm_setcontext`: load an HVM save record into a (paused) domain.
    pub(crate) fn hvm_setcontext(&mut self, domid: u32, ctxt: &mut [u8]) -> io::Result<()> {
        let len =
            u32::try_from(ctxt.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
        // SAFETY: `ctxt` is a live buffer of the length passed; Xen only reads it.
        check(unsafe {
            xc_domain_hvm_setcontext(self.xch.as_ptr(), domid, ctxt.as_mut_ptr(), len)
        })?;
        Ok(())
    }

    /// `xc_domain_maximum_gpfn`.
    pub(crate) fn maximum_gpfn(&mut self, domid: u32) -> io::Result<u64> {
        let mut v: XenPfn = 0;
        // SAFETY: `xch` is live, `v` is a live out-parameter.
        check(unsafe { xc_domain_maximum_gpfn(self.xch.as_ptr(), domid, &mut v) })?;
        Ok(v as u64)
    }

    /// `xc_domain_populate_physmap_exact` of one 4 KiB page at `gfn`.
    pub(crate) fn populate_one(&mut self, domid: u32, gfn: u64) -> io::Result<()> {
        let mut pfn: XenPfn = gfn as XenPfn;
        // SAFETY: `xch` is live; `pfn` is a live one-element array.
        check(unsafe {
            xc_domain_populate_physmap_exact(self.xch.as_ptr(), domid, 1, 0, 0, &mut pfn)
        })?;
        Ok(())
    }

    /// `xc_domain_decrease_reservation_exact` of one 4 KiB page at `gfn`.
    pub(crate) fn decrease_one(&mut self, domid: u32, gfn: u64) -> io::Result<()> {
        let mut pfn: XenPfn = gfn as XenPfn;
        // SAFETY: `xch` is live; `pfn` is a live one-element array.
        check(unsafe {
            xc_domain_decrease_reservation_exact(self.xch.as_ptr(), domid, 1, 0, &mut pfn)
        })?;
        Ok(())
    }

    /// `xenforeignmemory_map` of one page of `domid` read-write.
    pub(crate) fn map_page(&mut self, domid: u32, gfn: u64) -> io::Result<Mapping> {
        let pfn: XenPfn = gfn as XenPfn;
        let mut err: c_int = 0;
        // SAFETY: `fmem` is live; `pfn` and `err` are live one-element arrays.
        let p = unsafe {
            xenforeignmemory_map(
                self.fmem.as_ptr(),
                domid,
                libc::PROT_READ | libc::PROT_WRITE,
                1,
                &pfn,
                &mut err,
            )
        };
        let Some(p) = NonNull::new(p.cast::<u8>()) else {
            return Err(io::Error::last_os_error());
        };
        if err != 0 {
            // SAFETY: `p` was mapped above with one page and is not used again.
            unsafe { xenforeignmemory_unmap(self.fmem.as_ptr(), p.as_ptr().cast(), 1) };
            return Err(io::Error::from_raw_os_error(err.abs()));
        }
        // SAFETY: `p` is a one-page read-write mapping that stays mapped until
        // `unmap_page` is called with it, which the owner does before dropping.
        Ok(unsafe { Mapping::external(p, crate::abi::XC_PAGE_SIZE) })
    }

    /// `xenforeignmemory_unmap` of a mapping made by [`XenHandles::map_page`].
    pub(crate) fn unmap_page(&mut self, map: Mapping) -> io::Result<()> {
        // SAFETY: `map` came from `map_page` on this handle and is consumed.
        let rc = unsafe { xenforeignmemory_unmap(self.fmem.as_ptr(), map.as_ptr().cast(), 1) };
        drop(map);
        check(rc).map(|_| ())
    }

    /// `xc_mem_paging_enable`; returns the remote event-channel port.
    pub(crate) fn paging_enable(&mut self, domid: u32) -> io::Result<u32> {
        let mut port = 0u32;
        // SAFETY: `xch` is live, `port` is a live out-parameter.
        check(unsafe { xc_mem_paging_enable(self.xch.as_ptr(), domid, &mut port) })?;
        Ok(port)
    }

    /// `xc_mem_paging_disable`.
    pub(crate) fn paging_disable(&mut self, domid: u32) -> io::Result<()> {
        // SAFETY: `xch` is live.
        check(unsafe { xc_mem_paging_disable(self.xch.as_ptr(), domid) }).map(|_| ())
    }

    /// `xc_mem_paging_nominate`.
    pub(crate) fn paging_nominate(&mut self, domid: u32, gfn: u64) -> io::Result<()> {
        // SAFETY: `xch` is live.
        check(unsafe { xc_mem_paging_nominate(self.xch.as_ptr(), domid, gfn) }).map(|_| ())
    }

    /// `xc_mem_paging_evict`.
    pub(crate) fn paging_evict(&mut self, domid: u32, gfn: u64) -> io::Result<()> {
        // SAFETY: `xch` is live.
        check(unsafe { xc_mem_paging_evict(self.xch.as_ptr(), domid, gfn) }).map(|_| ())
    }

    /// `xc_mem_paging_load` from a page-aligned one-page buffer.
    pub(crate) fn paging_load(
        &mut self,
        domid: u32,
        gfn: u64,
        buf: &mut Mapping,
    ) -> io::Result<()> {
        // SAFETY: `xch` is live; `buf` is a page-aligned mapping of at least one
        // page, as libxenctrl requires (it checks alignment and mlocks it).
        check(unsafe { xc_mem_paging_load(self.xch.as_ptr(), domid, gfn, buf.as_ptr().cast()) })
            .map(|_| ())
    }

    /// `xenevtchn_bind_interdomain`; returns the local port.
    pub(crate) fn bind_interdomain(&mut self, domid: u32, remote_port: u32) -> io::Result<u32> {
        // SAFETY: `xce` is live.
        check(unsafe { xenevtchn_bind_interdomain(self.xce.as_ptr(), domid, remote_port) })
            .map(|p| p as u32)
    }

    /// `xenevtchn_unbind`.
    pub(crate) fn unbind(&mut self, port: u32) -> io::Result<()> {
        // SAFETY: `xce` is live.
        check(unsafe { xenevtchn_unbind(self.xce.as_ptr(), port) }).map(|_| ())
    }

    /// `xenevtchn_fd`: pollable descriptor.
    pub(crate) fn evtchn_fd(&mut self) -> io::Result<i32> {
        // SAFETY: `xce` is live.
        check(unsafe { xenevtchn_fd(self.xce.as_ptr()) })
    }

    /// `xenevtchn_notify`.
    pub(crate) fn notify(&mut self, port: u32) -> io::Result<()> {
        // SAFETY: `xce` is live.
        check(unsafe { xenevtchn_notify(self.xce.as_ptr(), port) }).map(|_| ())
    }

    /// `xenevtchn_pending`; returns the pending port.
    pub(crate) fn pending(&mut self) -> io::Result<u32> {
        // SAFETY: `xce` is live.
        check(unsafe { xenevtchn_pending(self.xce.as_ptr()) }).map(|p| p as u32)
    }

    /// `xenevtchn_unmask`.
    pub(crate) fn unmask(&mut self, port: u32) -> io::Result<()> {
        // SAFETY: `xce` is live.
        check(unsafe { xenevtchn_unmask(self.xce.as_ptr(), port) }).map(|_| ())
    }
}

impl Drop for XenHandles {
    fn drop(&mut self) {
        // SAFETY: the handles were opened in `open` and are not used after drop.
        unsafe {
            xenforeignmemory_close(self.fmem.as_ptr());
            xenevtchn_close(self.xce.as_ptr());
            xc_interface_close(self.xch.as_ptr());
        }
    }
}
