//! KVM calls that kvm-ioctls marks unsafe and that the Linux guest support needs, and the
//! signal used to kick a vCPU thread out of `KVM_RUN`.

use std::sync::Once;

use kvm_bindings::kvm_xsave;
use kvm_ioctls::VcpuFd;

/// Restores XSAVE state captured with `VcpuFd::get_xsave`.
pub(crate) fn set_xsave(vcpu: &VcpuFd, xsave: &kvm_xsave) -> Result<(), kvm_ioctls::Error> {
    // SAFETY: mcdist-kvm never enables KVM_CAP_XSAVE2, so KVM_SET_XSAVE reads exactly
    // `size_of::<kvm_xsave>()` bytes, which `xsave` provides.
    unsafe { vcpu.set_xsave(xsave) }
}

/// The real-time signal that interrupts `KVM_RUN` (it has an empty handler, so a blocked
/// `KVM_RUN` returns `EINTR`).
pub(crate) fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 3
}

extern "C" fn on_kick(_num: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {}

/// Installs the empty handler for [`kick_signal`] once per process.
pub(crate) fn install_kick_handler() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut res = Ok(());
    ONCE.call_once(|| {
        res = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    res
}

/// The calling thread's pthread id, for [`kick`].
pub(crate) fn current_thread() -> libc::pthread_t {
    // SAFETY: pthread_self has no preconditions and cannot fail.
    unsafe { libc::pthread_self() }
}

/// Sends [`kick_signal`] to `thread`.
///
/// # Safety
///
/// `thread` must be a thread of this process that has not exited yet (a pthread id is not
/// valid after its thread is joined or detached and gone).
pub(crate) unsafe fn kick(thread: libc::pthread_t) {
    // SAFETY: forwarded from the contract: `thread` is alive; the signal has a handler.
    unsafe {
        libc::pthread_kill(thread, kick_signal());
    }
}

/// The `internal` arm of `kvm_run` after a `KVM_EXIT_INTERNAL_ERROR`: suberror and data words.
pub(crate) fn internal_error(vcpu: &mut VcpuFd) -> (u32, Vec<u64>) {
    let run = vcpu.get_kvm_run();
    // SAFETY: called only right after KVM_RUN returned KVM_EXIT_INTERNAL_ERROR, when KVM has
    // filled the `internal` arm of the union; every bit pattern is a valid u32/u64.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    (internal.suberror, internal.data[..n].to_vec())
}
