#!/usr/bin/env bash
# The whole mcdist test suite. Installs what it needs (as root), then runs
# formatting, lints and every test, including the ones that need network
# namespaces, /dev/kvm and userfaultfd.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

if [ -z "${MCDIST_SKIP_APT:-}" ]; then
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    # shellcheck disable=SC2046
    $SUDO apt-get install -y -qq --no-install-recommends $(grep -v '^#' .ci/packages.txt) >/dev/null
    # Debian's cloud kernel for the QEMU clone tests, unpacked into the cache folder.
    bash examples/qemu-setup.sh
    # The real-Xen tests: Debian's Xen hypervisor rebuilt with memory paging (cached).
    bash .ci/xen.sh
fi

# The Xen backend binds the real Xen libraries (libxen-dev) behind a feature.
FEATURES="--features mcdist-xen/xen,mcdist-examples/xen"

echo "== fmt"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --workspace --all-targets --locked $FEATURES -- -D warnings
echo "== tests"
if command -v cargo-nextest >/dev/null; then
    # Doc tests are not run by nextest; run them first so the summary comes last.
    cargo test --workspace --doc --locked $FEATURES
    cargo nextest run --workspace --locked --no-fail-fast $FEATURES
else
    cargo test --workspace --locked --no-fail-fast $FEATURES
fi
# The criterion benches, each function once: their own checks run (every page arrives
# or is decoded, the codecs restore every lost symbol); no timing is measured.
echo "== criterion benches, each once"
cargo test -p mcdist-benches --benches --locked
