#!/usr/bin/env bash
# The Xen clone demo on a real Xen 4.17 booted under QEMU (TCG): builds Debian's hypervisor
# with memory paging (cached), the mcdist binaries dom0 needs, then boots Xen + dom0; a parent
# PVH domU fills a table and is frozen, its memory is served by `mcdist serve` in dom0, and
# two clones whose memory is all paged out are paged in by xen_memtap over mcdist; each sums
# its half of the table and the host checks it. With --linux the parent is a Linux PVH domU
# (Debian's kernel) whose userspace fills the table. Run as root. See mcdist-xen/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/xen-build.sh >/dev/null
cargo build -q -p mcdist --bin mcdist -p mcdist-examples --example xen_memtap \
    --features mcdist-xen/xen,mcdist-examples/xen
test=real_xen_fork_two_clones
if [ "${1:-}" = --linux ]; then test=real_xen_linux_fork_two_clones; fi
exec cargo test -q -p mcdist-xen --features xen --test real_xen "$test" -- --exact --nocapture
