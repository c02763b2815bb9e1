#!/usr/bin/env bash
# The Linux clone demo: boots Debian's cloud kernel under QEMU, freezes it once its init has
# filled a table in tmpfs, and starts 4 clones on 2 clone hosts (network namespaces on a
# private bridge). Each clone's RAM is a lazy FUSE file served by mcdist; each clone hashes its
# share of the table and the host checks the result. Run as root (namespaces, FUSE mounts).
# Extra arguments go to `mcdist-qemu fork` (e.g. --clones 8 --hosts 4 --mem-mib 512 --unicast).
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/qemu-setup.sh >/dev/null
cargo build -q --release -p mcdist-kvm --bin mcdist-qemu --bin mcdist-fuse
exec ./target/release/mcdist-qemu fork --clones 4 --hosts 2 "$@"
