#!/usr/bin/env bash
# The clone workload on the QEMU path: Linux clones (Debian's cloud kernel under QEMU) on
# several clone hosts (network namespaces on a private bridge), each clone hashing its share
# of a table its parent filled, with the clones' memory from
#   local        the parent's own RAM file (the ideal: nothing crosses the network),
#   lazy         a lazy FUSE file per host fed by mcdist multicast (the point of mcdist),
#   lazy-unicast the same with replies by unicast to each host,
#   eager        the whole image fetched to each host with mcdist first, then started.
# Modes take turns in every round; results.csv keeps every run, results.md the medians and
# each mode's ratio to local and to lazy-unicast, results.svg a bar chart of the medians.
#
#   benches/qemu-clones.sh [--reps N] [--rate MBIT] [--out DIR] [-- extra mcdist-qemu fork arguments]
#
# --rate caps the memory server's sending (the parent host's uplink, which unicast replies to
# every host share), 1000 Mbit/s by default. Under TCG the clones compute far slower than
# on hardware virtualization, so at 1000 Mbit/s their CPU, not the network, is the limit;
# a lower cap restores the balance of a real network.
#
# Defaults: 8 clones on 4 hosts, 512 MiB guests, a 128 MiB table, 2 rounds. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
reps=2
rate=1000
out=bench-results/qemu
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
    --reps) reps="$2"; shift 2 ;;
    --rate) rate="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h | --help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "qemu-clones.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
case "$reps" in '' | *[!0-9]* | 0) echo "qemu-clones.sh: --reps needs a positive number" >&2; exit 2 ;; esac
case "$rate" in '' | *[!0-9]* | 0) echo "qemu-clones.sh: --rate needs a positive number of Mbit/s" >&2; exit 2 ;; esac
bash examples/qemu-setup.sh >/dev/null
cargo build -q --release -p mcdist-kvm --bin mcdist-qemu --bin mcdist-fuse
mkdir -p "$out"
csv="$out/results.csv"
echo "round,mode,ok,clones,wall_s,resume_ms_p50,host_pages_fetched,fuse_read_us_p50,server_mb" >"$csv"
field() { sed -n "s/.*\"$1\":\\([^,}]*\\).*/\\1/p" <<<"$2"; }
first() { sed -n "s/.*\"$1\":\\[\\([0-9]*\\).*/\\1/p" <<<"$2"; }
for round in $(seq 1 "$reps"); do
    for mode in local lazy lazy-unicast eager; do
        args=(--clones 8 --hosts 4 --mem-mib 512 --table-mib 128 --rate "$rate")
        case "$mode" in
        lazy-unicast) args+=(--memory lazy --unicast) ;;
        *) args+=(--memory "$mode") ;;
        esac
        echo "== round $round/$reps: $mode" >&2
        line=$(./target/release/mcdist-qemu fork "${args[@]}" "${extra[@]}" 2>&1 | tee "$out/$mode-$round.log" | grep '^{' | tail -1) || true
        if [ -z "$line" ]; then
            echo "qemu-clones.sh: $mode round $round printed no result (see $out/$mode-$round.log)" >&2
            exit 1
        fi
        echo "$round,$mode,$(field ok "$line"),$(field clones "$line"),$(field wall_s "$line"),$(field resume_ms_p50 "$line"),$(first host_pages_fetched "$line"),$(first fuse_read_latency_us_p50 "$line"),$(awk -v b="$(field server_bytes_sent "$line")" 'BEGIN { if (b != "" && b != "null") printf "%.1f", b / 1e6 }')" >>"$csv"
    done
done
# Medians per mode, ratios, and the plot.
awk -F, -v md="$out/results.md" -v svg="$out/results.svg" -v rate="$rate" '
NR == 1 { next }
{ n[$2]++; w[$2, n[$2]] = $5; mb[$2, n[$2]] = $9; ok[$2] += ($3 == $4) }
function median(m, v,   k, i, j, t, a) {
    k = n[m]; for (i = 1; i <= k; i++) a[i] = v[m, i] + 0
    for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
    return k % 2 ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
}
END {
    split("local lazy lazy-unicast eager", modes, " ")
    for (i = 1; i <= 4; i++) med[modes[i]] = median(modes[i], w)
    print "| memory | runs all ok | workload wall s (median) | / local | / lazy-unicast | server sent, MB (median) |" > md
    print "|---|---|---|---|---|---|" > md
    max = 0
    for (i = 1; i <= 4; i++) {
        m = modes[i]
        printf "| %s | %d/%d | %.2f | %.2fx | %.2fx | %.0f |\n", m, ok[m], n[m], med[m], med[m] / med["local"], med[m] / med["lazy-unicast"], median(m, mb) > md
        if (med[m] > max) max = med[m]
    }
    W = 520; H = 300; bw = 80
    printf "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" font-size=\"12\">\n", W, H > svg
    printf "<text x=\"10\" y=\"18\">8 Linux clones on 4 hosts, server uplink %d Mbit/s: workload wall time, median (s)</text>\n", rate > svg
    for (i = 1; i <= 4; i++) {
        m = modes[i]; h = (H - 80) * med[m] / max; x = 40 + (i - 1) * (bw + 40); y = H - 40 - h
        printf "<rect x=\"%d\" y=\"%.1f\" width=\"%d\" height=\"%.1f\" fill=\"%s\"/>\n", x, y, bw, h, (m ~ /^lazy$/ ? "#2a7" : "#88a") > svg
        printf "<text x=\"%d\" y=\"%.1f\" text-anchor=\"middle\">%.2f</text>\n", x + bw / 2, y - 4, med[m] > svg
        printf "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">%s</text>\n", x + bw / 2, H - 22, m > svg
    }
    print "</svg>" > svg
}' "$csv"
cat "$out/results.md"
echo "wrote $csv, $out/results.md, $out/results.svg" >&2
