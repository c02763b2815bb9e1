//! KVM calls that kvm-ioctls marks unsafe and that the Linux guest support needs, and the
//! signal used to kick a vCPU thread out of `KVM_RUN`.

use std::sync::{mpsc, Once};
use std::time::Duration;

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

/// Runs `body` on the calling thread while a helper thread checks `due` every 10 ms and,
/// once it holds, sends the calling thread [`kick_signal`] every 20 ms until `body` returns
/// (a `KVM_RUN` blocked, also in a userfaultfd fault, then returns `EINTR`). The helper is a
/// scoped thread: it is joined before this returns (also when `body` panics: the stop
/// channel's sender is dropped while unwinding, which ends the helper), so it never signals
/// a thread that has gone.
pub(crate) fn kicked_when<R>(due: impl Fn() -> bool + Send, body: impl FnOnce() -> R) -> R {
    // SAFETY: pthread_self has no preconditions and cannot fail.
    let me = unsafe { libc::pthread_self() };
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    std::thread::scope(move |s| {
        s.spawn(move || {
            let mut wait = Duration::from_millis(10);
            while let Err(mpsc::RecvTimeoutError::Timeout) = stop_rx.recv_timeout(wait) {
                if due() {
                    // SAFETY: `me` runs `body` inside this scope, which joins this thread
                    // before `me` can return from `kicked_when`, so `me` is alive; the
                    // signal's handler is installed by `install_kick_handler`.
                    unsafe { libc::pthread_kill(me, kick_signal()) };
                    wait = Duration::from_millis(20);
                }
            }
        });
        let r = body();
        let _ = stop_tx.send(());
        r
    })
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
