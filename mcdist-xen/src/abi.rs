//! The Xen 4.17 `vm_event` ABI, written by hand from `xen/vm_event.h` and
//! `xen/io/ring.h` (`VM_EVENT_INTERFACE_VERSION` 7).
//!
//! Only the parts a pager needs are spelled out field by field: the common
//! header and `struct vm_event_paging`. The rest of the request (the other
//! members of the `u` union and the register/emulation `data` union) is kept
//! as opaque bytes of the right size so the struct has the exact size and
//! alignment of `vm_event_request_t`. The `abi_layout` test compiles a C
//! program against the installed headers and compares every size and offset.

use std::mem::{offset_of, size_of};

/// `VM_EVENT_INTERFACE_VERSION` of Xen 4.17.
pub const VM_EVENT_INTERFACE_VERSION: u32 = 0x0000_0007;
/// `VM_EVENT_FLAG_VCPU_PAUSED`: the vCPU that raised the event is paused
/// until the response arrives.
pub const VM_EVENT_FLAG_VCPU_PAUSED: u32 = 1 << 0;
/// `VM_EVENT_FLAG_FOREIGN`: the event was raised by a foreign domain's access.
pub const VM_EVENT_FLAG_FOREIGN: u32 = 1 << 1;
/// `VM_EVENT_REASON_MEM_PAGING`.
pub const VM_EVENT_REASON_MEM_PAGING: u32 = 3;
/// `MEM_PAGING_DROP_PAGE`: the guest gave the paged-out gfn back; nothing to load.
pub const MEM_PAGING_DROP_PAGE: u32 = 1 << 0;
/// `MEM_PAGING_EVICT_FAIL`: an eviction could not complete.
pub const MEM_PAGING_EVICT_FAIL: u32 = 1 << 1;
/// `HVM_PARAM_PAGING_RING_PFN` (`xen/hvm/params.h`).
pub const HVM_PARAM_PAGING_RING_PFN: u32 = 27;
/// `XC_PAGE_SIZE`: the ring is one page of this size.
pub const XC_PAGE_SIZE: usize = 4096;

/// `struct vm_event_paging`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmEventPaging {
    /// Guest frame number that faulted (request) or was handled (response).
    pub gfn: u64,
    /// p2m type of the gfn when the request was raised.
    pub p2mt: u32,
    /// `MEM_PAGING_*` flags.
    pub flags: u32,
}

/// Size in bytes of the `u` union of `vm_event_request_t`.
pub const VM_EVENT_U_SIZE: usize = 32;
/// Size in bytes of the `data` union of `vm_event_request_t`.
pub const VM_EVENT_DATA_SIZE: usize = 344;

/// The `u` union of `vm_event_request_t`: the paging member plus padding to
/// the union's full size (its largest member, `vm_event_desc_access`, is 32 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmEventUnion {
    /// `u.mem_paging`.
    pub mem_paging: VmEventPaging,
    /// Bytes of the larger union members, unused by a pager.
    pub rest: [u8; VM_EVENT_U_SIZE - size_of::<VmEventPaging>()],
}

/// `vm_event_request_t` / `vm_event_response_t` (the same C type).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmEvent {
    /// `VM_EVENT_INTERFACE_VERSION`.
    pub version: u32,
    /// `VM_EVENT_FLAG_*`.
    pub flags: u32,
    /// `VM_EVENT_REASON_*`.
    pub reason: u32,
    /// vCPU that raised the event.
    pub vcpu_id: u32,
    /// altp2m view index.
    pub altp2m_idx: u16,
    /// Padding (`_pad[3]`).
    pub pad: [u16; 3],
    /// The reason-specific union `u`.
    pub u: VmEventUnion,
    /// The register / emulation-data union `data`, opaque to a pager.
    pub data: [u8; VM_EVENT_DATA_SIZE],
}

impl Default for VmEvent {
    fn default() -> Self {
        VmEvent {
            version: 0,
            flags: 0,
            reason: 0,
            vcpu_id: 0,
            altp2m_idx: 0,
            pad: [0; 3],
            u: VmEventUnion {
                mem_paging: VmEventPaging::default(),
                rest: [0; VM_EVENT_U_SIZE - size_of::<VmEventPaging>()],
            },
            data: [0; VM_EVENT_DATA_SIZE],
        }
    }
}

impl VmEvent {
    /// A paging request as Xen raises it for a vCPU that touched a paged-out gfn.
    pub fn paging_request(vcpu_id: u32, gfn: u64, flags: u32, paging_flags: u32) -> Self {
        let mut ev = VmEvent {
            version: VM_EVENT_INTERFACE_VERSION,
            flags,
            reason: VM_EVENT_REASON_MEM_PAGING,
            vcpu_id,
            ..VmEvent::default()
        };
        ev.u.mem_paging.gfn = gfn;
        ev.u.mem_paging.flags = paging_flags;
        ev
    }

    /// The response a pager puts on the ring for `req` (as xenpaging does:
    /// same vCPU, reason, flags and gfn; interface version set).
    pub fn paging_response(req: &VmEvent) -> Self {
        let mut ev = VmEvent {
            version: VM_EVENT_INTERFACE_VERSION,
            flags: req.flags,
            reason: req.reason,
            vcpu_id: req.vcpu_id,
            altp2m_idx: req.altp2m_idx,
            ..VmEvent::default()
        };
        ev.u.mem_paging.gfn = req.u.mem_paging.gfn;
        ev.u.mem_paging.p2mt = req.u.mem_paging.p2mt;
        ev
    }
}

/// Offset of `ring[]` in `struct vm_event_sring` (`req_prod`, `req_event`,
/// `rsp_prod`, `rsp_event`, the 4-byte `pvt` union and 44 bytes of padding).
pub const SRING_RING_OFFSET: usize = 64;
/// Offset of `req_prod` in the shared ring.
pub const SRING_REQ_PROD: usize = 0;
/// Offset of `req_event` in the shared ring.
pub const SRING_REQ_EVENT: usize = 4;
/// Offset of `rsp_prod` in the shared ring.
pub const SRING_RSP_PROD: usize = 8;
/// Offset of `rsp_event` in the shared ring.
pub const SRING_RSP_EVENT: usize = 12;
/// Size of one ring entry (`union vm_event_sring_entry`).
pub const SRING_ENTRY_SIZE: usize = size_of::<VmEvent>();

/// `__RING_SIZE` for a ring of `page_size` bytes: entries that fit after the
/// header, rounded down to a power of two.
pub const fn ring_size(page_size: usize) -> u32 {
    let n = (page_size - SRING_RING_OFFSET) / SRING_ENTRY_SIZE;
    if n == 0 {
        0
    } else {
        1u32 << (usize::BITS - 1 - n.leading_zeros())
    }
}

/// Entries of the one-page vm_event ring of Xen 4.17 (8).
pub const VM_EVENT_RING_SIZE: u32 = ring_size(XC_PAGE_SIZE);

/// Sizes and offsets of the Rust view, in the order `abi_layout` compares them
/// against the C headers.
pub fn layout_table() -> Vec<(&'static str, usize)> {
    vec![
        ("sizeof(vm_event_request_t)", size_of::<VmEvent>()),
        ("offsetof(version)", offset_of!(VmEvent, version)),
        ("offsetof(flags)", offset_of!(VmEvent, flags)),
        ("offsetof(reason)", offset_of!(VmEvent, reason)),
        ("offsetof(vcpu_id)", offset_of!(VmEvent, vcpu_id)),
        ("offsetof(altp2m_idx)", offset_of!(VmEvent, altp2m_idx)),
        ("offsetof(u)", offset_of!(VmEvent, u)),
        ("sizeof(u)", size_of::<VmEventUnion>()),
        (
            "offsetof(u.mem_paging.gfn)",
            offset_of!(VmEvent, u) + offset_of!(VmEventPaging, gfn),
        ),
        (
            "offsetof(u.mem_paging.p2mt)",
            offset_of!(VmEvent, u) + offset_of!(VmEventPaging, p2mt),
        ),
        (
            "offsetof(u.mem_paging.flags)",
            offset_of!(VmEvent, u) + offset_of!(VmEventPaging, flags),
        ),
        ("sizeof(struct vm_event_paging)", size_of::<VmEventPaging>()),
        ("offsetof(data)", offset_of!(VmEvent, data)),
        ("sizeof(data)", VM_EVENT_DATA_SIZE),
        (
            "alignof(vm_event_request_t)",
            std::mem::align_of::<VmEvent>(),
        ),
        ("offsetof(sring.req_prod)", SRING_REQ_PROD),
        ("offsetof(sring.req_event)", SRING_REQ_EVENT),
        ("offsetof(sring.rsp_prod)", SRING_RSP_PROD),
        ("offsetof(sring.rsp_event)", SRING_RSP_EVENT),
        ("offsetof(sring.ring)", SRING_RING_OFFSET),
        ("sizeof(union vm_event_sring_entry)", SRING_ENTRY_SIZE),
        ("__RING_SIZE(page)", VM_EVENT_RING_SIZE as usize),
        (
            "VM_EVENT_INTERFACE_VERSION",
            VM_EVENT_INTERFACE_VERSION as usize,
        ),
        (
            "VM_EVENT_REASON_MEM_PAGING",
            VM_EVENT_REASON_MEM_PAGING as usize,
        ),
        (
            "VM_EVENT_FLAG_VCPU_PAUSED",
            VM_EVENT_FLAG_VCPU_PAUSED as usize,
        ),
        ("VM_EVENT_FLAG_FOREIGN", VM_EVENT_FLAG_FOREIGN as usize),
        ("MEM_PAGING_DROP_PAGE", MEM_PAGING_DROP_PAGE as usize),
        ("MEM_PAGING_EVICT_FAIL", MEM_PAGING_EVICT_FAIL as usize),
        (
            "HVM_PARAM_PAGING_RING_PFN",
            HVM_PARAM_PAGING_RING_PFN as usize,
        ),
        ("XC_PAGE_SIZE", XC_PAGE_SIZE),
    ]
}

/// The C expressions matching [`layout_table`], for the layout test.
pub const C_LAYOUT_EXPRS: &[&str] = &[
    "sizeof(vm_event_request_t)",
    "offsetof(vm_event_request_t, version)",
    "offsetof(vm_event_request_t, flags)",
    "offsetof(vm_event_request_t, reason)",
    "offsetof(vm_event_request_t, vcpu_id)",
    "offsetof(vm_event_request_t, altp2m_idx)",
    "offsetof(vm_event_request_t, u)",
    "sizeof(((vm_event_request_t *)0)->u)",
    "offsetof(vm_event_request_t, u.mem_paging.gfn)",
    "offsetof(vm_event_request_t, u.mem_paging.p2mt)",
    "offsetof(vm_event_request_t, u.mem_paging.flags)",
    "sizeof(struct vm_event_paging)",
    "offsetof(vm_event_request_t, data)",
    "sizeof(((vm_event_request_t *)0)->data)",
    "_Alignof(vm_event_request_t)",
    "offsetof(struct vm_event_sring, req_prod)",
    "offsetof(struct vm_event_sring, req_event)",
    "offsetof(struct vm_event_sring, rsp_prod)",
    "offsetof(struct vm_event_sring, rsp_event)",
    "offsetof(struct vm_event_sring, ring)",
    "sizeof(union vm_event_sring_entry)",
    "__RING_SIZE((struct vm_event_sring *)0, XC_PAGE_SIZE)",
    "VM_EVENT_INTERFACE_VERSION",
    "VM_EVENT_REASON_MEM_PAGING",
    "VM_EVENT_FLAG_VCPU_PAUSED",
    "VM_EVENT_FLAG_FOREIGN",
    "MEM_PAGING_DROP_PAGE",
    "MEM_PAGING_EVICT_FAIL",
    "HVM_PARAM_PAGING_RING_PFN",
    "XC_PAGE_SIZE",
];

const _: () = assert!(size_of::<VmEvent>() == 400);
const _: () = assert!(VM_EVENT_RING_SIZE == 8);
