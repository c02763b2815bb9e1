//! The QEMU launcher's system calls: a seccomp filter that turns `madvise(.., MADV_HUGEPAGE)`
//! into a successful no-op in the child before it execs QEMU (so faults on a FUSE-backed guest
//! RAM file stay at 4 KiB).

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
const MADV_HUGEPAGE: u32 = 14;
/// `BPF_LD | BPF_W | BPF_ABS`.
const BPF_LD_W_ABS: u16 = 0x20;
/// `BPF_JMP | BPF_JEQ | BPF_K`.
const BPF_JMP_JEQ_K: u16 = 0x15;
/// `BPF_RET | BPF_K`.
const BPF_RET_K: u16 = 0x06;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const SECCOMP_SET_MODE_FILTER: libc::c_ulong = 1;
/// Offsets into `struct seccomp_data`.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARG2_LO: u32 = 16 + 2 * 8;

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jeq(k: u32, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: BPF_JMP_JEQ_K,
        jt: 0,
        jf,
        k,
    }
}

/// The filter program: on x86-64, `madvise(_, _, MADV_HUGEPAGE)` returns 0 without doing
/// anything; every other call is allowed.
fn program() -> Vec<libc::sock_filter> {
    vec![
        stmt(BPF_LD_W_ABS, OFF_ARCH),
        jeq(AUDIT_ARCH_X86_64, 5),
        stmt(BPF_LD_W_ABS, OFF_NR),
        jeq(libc::SYS_madvise as u32, 3),
        stmt(BPF_LD_W_ABS, OFF_ARG2_LO),
        jeq(MADV_HUGEPAGE, 1),
        stmt(BPF_RET_K, SECCOMP_RET_ERRNO),
        stmt(BPF_RET_K, SECCOMP_RET_ALLOW),
    ]
}

/// Installs the `MADV_HUGEPAGE` filter in the child of `cmd` between fork and exec.
pub(crate) fn neutralise_madvise_hugepage(cmd: &mut Command) {
    // Built before the fork: the child only makes two system calls.
    let filter = program();
    // SAFETY: the closure runs in the forked child before exec and only calls prctl and
    // seccomp (async-signal-safe system calls) on memory owned by the closure; `filter`
    // outlives the calls because the closure owns it.
    unsafe {
        cmd.pre_exec(move || {
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr().cast_mut(),
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::syscall(
                libc::SYS_seccomp,
                SECCOMP_SET_MODE_FILTER,
                0 as libc::c_ulong,
                &prog as *const libc::sock_fprog,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_jumps_land_on_the_allow_return() {
        let p = program();
        let allow = p.len() - 1;
        for (i, ins) in p.iter().enumerate() {
            if ins.code == BPF_JMP_JEQ_K {
                assert_eq!(i + 1 + ins.jf as usize, allow);
            }
        }
        assert_eq!(p[allow].k, SECCOMP_RET_ALLOW);
    }

    const PROBE: &str = "MCDIST_MADVISE_PROBE";

    /// Run as a child: `madvise` on an unaligned address fails with EINVAL unless the filter
    /// answers it first.
    #[test]
    fn madvise_hugepage_is_a_no_op_under_the_filter() {
        if std::env::var_os(PROBE).is_some() {
            let addr = std::ptr::dangling_mut::<libc::c_void>(); // address 1: unaligned
                                                                 // SAFETY: madvise on an unaligned address changes nothing; it only returns.
            let huge = unsafe { libc::madvise(addr, 4096, libc::MADV_HUGEPAGE) };
            // SAFETY: as above.
            let normal = unsafe { libc::madvise(addr, 4096, libc::MADV_NORMAL) };
            assert_eq!((huge, normal), (0, -1));
            return;
        }
        let probe = |filtered: bool| {
            let mut c = Command::new(std::env::current_exe().unwrap());
            c.args([
                "--exact",
                "qemu::sys::tests::madvise_hugepage_is_a_no_op_under_the_filter",
            ])
            .env(PROBE, "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
            if filtered {
                neutralise_madvise_hugepage(&mut c);
            }
            c.status().unwrap().success()
        };
        assert!(probe(true), "MADV_HUGEPAGE answered 0 under the filter");
        assert!(
            !probe(false),
            "without the filter the unaligned madvise fails"
        );
    }

    #[test]
    fn filtered_child_still_runs() {
        let mut c = Command::new("true");
        neutralise_madvise_hugepage(&mut c);
        assert!(c.status().unwrap().success());
    }
}
