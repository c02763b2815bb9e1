#!/usr/bin/env bash
# mcdist multicast demo: one server and N receivers, each in its own network
# namespace on a private bridge (nothing is sent on the host's interfaces).
# The server sends a random image once by multicast; each receiver fetches it,
# verifies the digest and prints a one-line summary.
#
#   sudo examples/multicast-demo.sh            # 4 receivers, 256 MiB
#   CLIENTS=8 SIZE_MIB=64 sudo -E examples/multicast-demo.sh
#   UNICAST=1 ...                              # unicast fan-out, for comparison
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${CLIENTS:-4}
SIZE_MIB=${SIZE_MIB:-256}
RATE=${RATE:-1000}
EXTRA=()
if [ -n "${UNICAST:-}" ]; then EXTRA=(--unicast); fi

if [ "$(id -u)" != 0 ]; then
    echo "multicast-demo: needs root to create network namespaces (run with sudo)" >&2
    exit 1
fi
command -v ip >/dev/null || { echo "multicast-demo: needs iproute2 (apt-get install iproute2)" >&2; exit 1; }

cargo build --release -q -p mcdist
BIN=$PWD/${CARGO_TARGET_DIR:-target}/release/mcdist
TAG=mcd$$
WORK=$(mktemp -d)
cleanup() {
    for i in $(seq 0 "$CLIENTS"); do ip netns del "${TAG}h$i" 2>/dev/null || true; done
    ip netns del "${TAG}br" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

ip netns add "${TAG}br"
ip -n "${TAG}br" link set lo up
ip -n "${TAG}br" link add br0 type bridge
ip -n "${TAG}br" link set br0 type bridge mcast_snooping 0
ip -n "${TAG}br" link set br0 up
for i in $(seq 0 "$CLIENTS"); do
    ns="${TAG}h$i"
    ip netns add "$ns"
    ip -n "${TAG}br" link add "p$i" type veth peer name eth0 netns "$ns"
    ip -n "${TAG}br" link set "p$i" master br0
    ip -n "${TAG}br" link set "p$i" up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "198.18.42.$((i + 1))/24" dev eth0
    ip -n "$ns" link set eth0 up
done

echo "making a ${SIZE_MIB} MiB image (random, with a zero stretch)..."
head -c $((SIZE_MIB * 1048576)) /dev/urandom > "$WORK/image"
dd if=/dev/zero of="$WORK/image" bs=1M count=$((SIZE_MIB / 8 + 1)) seek=$((SIZE_MIB / 4)) conv=notrunc status=none

GROUP=239.255.42.1:7000
SERVER=198.18.42.1:7001
ip netns exec "${TAG}h0" "$BIN" serve --image "$WORK/image" --group $GROUP --iface eth0 \
    --listen $SERVER --clients "$CLIENTS" --exit-when-done --rate "$RATE" --timeout 300 "${EXTRA[@]}" &
SPID=$!
PIDS=()
for i in $(seq 1 "$CLIENTS"); do
    ip netns exec "${TAG}h$i" "$BIN" fetch --group $GROUP --iface eth0 --server $SERVER \
        --out "$WORK/out$i" --timeout 300 "${EXTRA[@]}" | sed "s/^/receiver $i: /" &
    PIDS+=($!)
done
FAIL=0
for p in "${PIDS[@]}"; do wait "$p" || FAIL=1; done
wait $SPID || FAIL=1
for i in $(seq 1 "$CLIENTS"); do
    cmp -s "$WORK/image" "$WORK/out$i" || { echo "receiver $i: output differs from the image"; FAIL=1; }
done
if [ $FAIL = 0 ]; then echo "all $CLIENTS receivers hold an identical image"; fi
exit $FAIL
