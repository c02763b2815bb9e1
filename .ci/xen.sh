#!/usr/bin/env bash
# What the real-Xen tests (mcdist-xen/tests/real_xen.rs) need on a fresh machine:
# build tools for the dom0 initramfs and the hypervisor, and Debian's Xen 4.17 hypervisor
# rebuilt with memory paging (cached under the mcdist cache folder by source version and
# config: a fresh machine builds it once, about 3-4 minutes on 2 cores; reruns reuse it).
# Also builds the mcdist binaries the fork test boots with. Called by .ci/test.sh; needs
# root (or sudo) for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
missing=()
command -v cpio >/dev/null || missing+=(cpio)
command -v as >/dev/null || missing+=(binutils)
command -v gzip >/dev/null || missing+=(gzip)
if [ "${#missing[@]}" -gt 0 ]; then
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
start=$(date +%s)
bash examples/xen-build.sh
echo "xen hypervisor ready in $(($(date +%s) - start)) s" >&2
# The dom0 binaries real_xen_fork_two_clones puts in the initramfs (the test profile's).
cargo build -q --locked -p mcdist --bin mcdist -p mcdist-examples --example xen_memtap \
    --features mcdist-xen/xen,mcdist-examples/xen
