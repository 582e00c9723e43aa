#!/usr/bin/env bash
# A/B of two qpq-server binaries under the same load, alternating them:
# enqueue throughput and the server's CPU per enqueue (user + system time
# from /proc/<pid>/stat over a fixed count), then a fetch drain. On a shared
# or virtual machine wall-clock throughput varies by tens of percent from
# run to run; the CPU per request varies much less, so it is the figure to
# compare. Linux only (reads /proc).
#
#   bash benches/ab.sh OLD_BINARY NEW_BINARY
#
# Environment: MODE=buffered|fsync (default buffered), ROUNDS (default 3),
# COUNT enqueues per round (default 100000), CONNS (default 50),
# PORT (default 7743), BENCH (default target/release/qpq-bench, built with
# `cargo build --release -p quicproquo-benches --bins`).
set -euo pipefail
cd "$(dirname "$0")/.."

A=${1:?usage: ab.sh OLD_BINARY NEW_BINARY}
B=${2:?usage: ab.sh OLD_BINARY NEW_BINARY}
MODE=${MODE:-buffered}
ROUNDS=${ROUNDS:-3}
COUNT=${COUNT:-100000}
CONNS=${CONNS:-50}
PORT=${PORT:-7743}
BENCH=${BENCH:-${CARGO_TARGET_DIR:-target}/release/qpq-bench}

# Clock ticks of CPU time (user + system) a process has used.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
json() { python3 -c "import json,sys; print(round(json.load(sys.stdin)['$1']))"; }

run() {
    local bin=$1 tag=$2 dir
    dir=$(mktemp -d)
    QPQ_DATA_DIR="$dir" QPQ_LISTEN="127.0.0.1:$PORT" QPQ_DURABILITY="$MODE" QPQ_CONFIG=/dev/null \
        QPQ_LOG=warn QPQ_CONNECTIONS_PER_IP_MAX=1000 "$bin" >"$dir/out" 2>"$dir/err" &
    local pid=$!
    for _ in $(seq 100); do grep -q fingerprint "$dir/out" 2>/dev/null && break; sleep 0.1; done
    local fp
    fp=$(grep -o '[0-9a-f]\{64\}' "$dir/out" | head -1)
    local common=(--server "127.0.0.1:$PORT" --server-fingerprint "$fp" --connections "$CONNS"
        --in-flight 1 --payload 1024 --json)
    local t0 t1 enq fetch
    t0=$(ticks "$pid")
    enq=$("$BENCH" "${common[@]}" --workload enqueue --count "$COUNT" | json ops_per_s)
    t1=$(ticks "$pid")
    fetch=$("$BENCH" "${common[@]}" --workload fetch --prefill 2000 --fetch-limit 100 \
        --duration 5 --warmup 0 | json items_per_s)
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    rm -rf "$dir"
    local hz us
    hz=$(getconf CLK_TCK)
    us=$(( (t1 - t0) * 1000000 / hz / COUNT ))
    echo "$tag enqueue $enq/s, server CPU $us us per enqueue | fetch $fetch items/s"
}

echo "== $MODE, $ROUNDS rounds, load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for _ in $(seq "$ROUNDS"); do
    run "$A" A
    run "$B" B
done
