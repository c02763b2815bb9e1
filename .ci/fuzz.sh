#!/usr/bin/env bash
# Build the fuzz crate with cargo-fuzz and run every target for a bounded time
# (FUZZ_SECONDS each, default 30), starting from the committed seed corpus.
# cargo-fuzz needs nightly flags; on a stable toolchain RUSTC_BOOTSTRAP=1
# unlocks them. No sanitizer: the core crate forbids unsafe code, and the
# targets assert the protocol's own invariants.
# Crashes are written to fuzz/artifacts/<target>/ and fail the script.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_TARGET="${FUZZ_SECONDS:-30}"
export RUSTC_BOOTSTRAP=1

if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked
fi

TARGETS=$(cargo fuzz list)
echo "== fuzz build"
cargo fuzz build -s none -O

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
for t in $TARGETS; do
    echo "== fuzz $t (${SECONDS_PER_TARGET}s)"
    mkdir -p "$work/$t"
    # New inputs go to the scratch directory; the committed corpus is read only.
    rc=0
    cargo fuzz run -s none -O "$t" "$work/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$SECONDS_PER_TARGET" -print_final_stats=1 >"$work/$t.log" 2>&1 || rc=$?
    grep -E "^(stat::number_of_executed_units|SUMMARY|Test unit written)" "$work/$t.log" || true
    if [ "$rc" != 0 ]; then
        echo "fuzz target $t failed; see fuzz/artifacts/$t" >&2
        tail -40 "$work/$t.log" >&2
        exit 1
    fi
done
echo "== fuzzing took $(( $(date +%s) - start ))s"
