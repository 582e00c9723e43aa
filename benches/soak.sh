#!/usr/bin/env bash
# Soak: the release qpq-server under the `mixed` load of qpq-bench (CONNS
# connections, each long-polling its own queue while its slots enqueue,
# batch, upload and pop KeyPackages) for SOAK_SECS, sampled every INTERVAL
# seconds: resident memory, open file descriptors, threads, connections,
# waiting long-polls, requests being served (open request streams) and the
# data directory's size on disk.
#
# Writes OUT/samples.csv, OUT/soak.svg (one panel per figure), OUT/bench.json
# (qpq-bench's report) and OUT/summary.txt, and prints the summary: each
# figure's first, median, last and largest sample, and its growth from the
# median of the first tenth of the run to the median of the last tenth.
#
# Usage: benches/soak.sh                 (one hour; from anywhere)
# Knobs (environment): SOAK_SECS=3600 INTERVAL=10 CONNS=50 IN_FLIGHT=2
#   PAYLOAD=512 OUT=target/soak CARGO_TARGET_DIR (where release binaries go)
#
# Every process it starts is stopped by its pid; the server's data lives in
# a temporary directory that is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

SOAK_SECS=${SOAK_SECS:-3600}
INTERVAL=${INTERVAL:-10}
CONNS=${CONNS:-50}
IN_FLIGHT=${IN_FLIGHT:-2}
PAYLOAD=${PAYLOAD:-512}
OUT=${OUT:-target/soak}
QPQ_PORT=7553
METRICS_PORT=9475
TARGET=${CARGO_TARGET_DIR:-target}

log() { echo "== $*" >&2; }

log "building release binaries"
cargo build --release -q -p quicproquo-server -p quicproquo-benches --bins
SERVER="$TARGET/release/qpq-server"
BENCH="$TARGET/release/qpq-bench"

mkdir -p "$OUT"
WORK=$(mktemp -d -t qpq-soak.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

DATA="$WORK/data"
mkdir -p "$DATA"
# KeyPackage pops are rate limited per target by default; the mix pops
# one package per eight requests of every slot.
QPQ_DATA_DIR="$DATA" QPQ_LISTEN="127.0.0.1:$QPQ_PORT" QPQ_CONFIG=/dev/null QPQ_LOG=warn \
    QPQ_METRICS_LISTEN="127.0.0.1:$METRICS_PORT" \
    QPQ_CONNECTIONS_PER_IP_MAX=1000 \
    QPQ_KEY_FETCH_PER_PAIR_PER_SEC=1000000 QPQ_KEY_FETCH_PER_PAIR_BURST=1000000 \
    QPQ_KEY_PACKAGE_FETCH_PER_TARGET_PER_SEC=1000000 \
    QPQ_KEY_PACKAGE_FETCH_PER_TARGET_BURST=1000000 \
    "$SERVER" >"$WORK/server.out" 2>"$WORK/server.err" &
SERVER_PID=$!
PIDS+=("$SERVER_PID")
fp=""
for _ in $(seq 1 200); do
    if grep -q 'fingerprint:' "$WORK/server.out" 2>/dev/null; then
        fp=$(grep 'fingerprint:' "$WORK/server.out" | awk '{print $NF}')
        break
    fi
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.err" >&2; exit 1; }
    sleep 0.05
done
[ -n "$fp" ] || { log "the server printed no fingerprint"; exit 1; }

log "soak: $CONNS connections x $IN_FLIGHT slots, $PAYLOAD-byte payloads, ${SOAK_SECS}s, a sample every ${INTERVAL}s"
"$BENCH" --server "127.0.0.1:$QPQ_PORT" --server-fingerprint "$fp" --workload mixed \
    --connections "$CONNS" --in-flight "$IN_FLIGHT" --payload "$PAYLOAD" \
    --duration "$SOAK_SECS" --warmup 0 \
    --metrics "http://127.0.0.1:$METRICS_PORT/metrics" --json >"$OUT/bench.json" &
BENCH_PID=$!
PIDS+=("$BENCH_PID")

metric() {
    # The sum of a gauge or counter over its label sets in the scrape in $1.
    awk -v name="$2" '$1 == name || index($1, name "{") == 1 { sum += $2; n++ }
        END { if (n) printf "%.0f", sum }' "$1"
}

CSV="$OUT/samples.csv"
echo "t_s,rss_kib,fds,threads,connections,waiters,requests_in_flight,disk_bytes,requests_total,load1" >"$CSV"
start=$(date +%s)
while kill -0 "$BENCH_PID" 2>/dev/null; do
    now=$(($(date +%s) - start))
    scrape="$WORK/scrape"
    curl -sf "http://127.0.0.1:$METRICS_PORT/metrics" >"$scrape" 2>/dev/null || : >"$scrape"
    rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$SERVER_PID/status")
    threads=$(awk '/^Threads:/ { print $2 }' "/proc/$SERVER_PID/status")
    fds=$(find "/proc/$SERVER_PID/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
    disk=$(du -sb "$DATA" | cut -f1)
    load1=$(cut -d' ' -f1 /proc/loadavg)
    echo "$now,$rss,$fds,$threads,$(metric "$scrape" qpq_connections),$(metric "$scrape" qpq_waiters),$(metric "$scrape" qpq_pending_requests),$disk,$(metric "$scrape" qpq_requests_total),$load1" >>"$CSV"
    # Sleep in short steps so the end of the run is noticed at once.
    for _ in $(seq 1 $((INTERVAL * 10))); do
        kill -0 "$BENCH_PID" 2>/dev/null || break
        sleep 0.1
    done
done
wait "$BENCH_PID"
kill -0 "$SERVER_PID" 2>/dev/null || { log "the server died"; cat "$WORK/server.err" >&2; exit 1; }

python3 - "$CSV" "$OUT/soak.svg" "$OUT/bench.json" >"$OUT/summary.txt" <<'EOF'
import csv, json, statistics, sys

rows = list(csv.DictReader(open(sys.argv[1])))
bench = json.load(open(sys.argv[3]))
figures = [
    ("rss_kib", "resident memory (KiB)"),
    ("fds", "open file descriptors"),
    ("threads", "threads"),
    ("connections", "connections"),
    ("waiters", "waiting long-polls"),
    ("requests_in_flight", "requests being served"),
    ("disk_bytes", "data directory (bytes)"),
]

def column(name):
    out = []
    for r in rows:
        try:
            out.append((float(r["t_s"]), float(r[name])))
        except (TypeError, ValueError):
            pass
    return out

print(f"samples: {len(rows)}, run: {rows[-1]['t_s'] if rows else 0} s")
print(f"requests: {bench['ops']} ({bench['ops_per_s']:.0f}/s), messages delivered: "
      f"{bench['items']}, errors: {bench['errors']}"
      + (f" (first: {bench['first_error']})" if bench.get("first_error") else ""))
loads = [float(r["load1"]) for r in rows if r["load1"]]
if loads:
    print(f"load average (1 min) during the run: median {statistics.median(loads):.2f}, max {max(loads):.2f}")
print(f"{'figure':<26}{'first':>14}{'median':>14}{'last':>14}{'max':>14}{'growth':>10}")
for name, title in figures:
    col = [v for _, v in column(name)]
    if not col:
        continue
    tenth = max(1, len(col) // 10)
    early, late = statistics.median(col[:tenth]), statistics.median(col[-tenth:])
    growth = f"{(late - early) / early * 100:+.1f}%" if early else "n/a"
    print(f"{title:<26}{col[0]:>14.0f}{statistics.median(col):>14.0f}{col[-1]:>14.0f}{max(col):>14.0f}{growth:>10}")

# One panel per figure, stacked; each scaled from 0 to its own maximum.
W, H, PAD, LEFT = 900, 120, 28, 90
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{(H + PAD) * len(figures) + PAD}" '
       'font-family="sans-serif" font-size="12">',
       f'<rect width="100%" height="100%" fill="white"/>']
t_max = max((float(r["t_s"]) for r in rows), default=1) or 1
for i, (name, title) in enumerate(figures):
    pts = column(name)
    top = PAD + i * (H + PAD)
    y_max = max((v for _, v in pts), default=1) or 1
    svg.append(f'<text x="{LEFT}" y="{top - 8}">{title}: max {y_max:.0f}</text>')
    svg.append(f'<rect x="{LEFT}" y="{top}" width="{W - LEFT - 10}" height="{H}" fill="none" stroke="#ccc"/>')
    svg.append(f'<text x="{LEFT - 6}" y="{top + 10}" text-anchor="end">{y_max:.0f}</text>')
    svg.append(f'<text x="{LEFT - 6}" y="{top + H}" text-anchor="end">0</text>')
    line = " ".join(f"{LEFT + t / t_max * (W - LEFT - 10):.1f},{top + H - v / y_max * H:.1f}" for t, v in pts)
    svg.append(f'<polyline points="{line}" fill="none" stroke="#1f5fbf" stroke-width="1.5"/>')
bottom = (H + PAD) * len(figures)
svg.append(f'<text x="{LEFT}" y="{bottom + 14}">0 s</text>')
svg.append(f'<text x="{W - 10}" y="{bottom + 14}" text-anchor="end">{t_max:.0f} s</text>')
svg.append("</svg>")
open(sys.argv[2], "w").write("\n".join(svg))
EOF
cat "$OUT/summary.txt"
log "samples: $CSV, plot: $OUT/soak.svg"
