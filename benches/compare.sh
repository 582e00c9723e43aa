#!/usr/bin/env bash
# Side-by-side comparison on loopback, in one run, alternating ROUNDS times:
#   qpq-server durable (fsync) and buffered under qpq-bench,
#   the bare-QUIC baseline (qpq-bench baseline-server + workload quic-echo),
#   Redis over TLS under redis-benchmark, `appendfsync always` and default
#   persistence (RPUSH, and LPOP key 100 for fetch).
# Every figure is taken at CONNS connections x 1 in flight, PAYLOAD bytes.
# Prints R1-R5 (see BENCHMARKS.md) with the median of the rounds.
#
# Usage: benches/compare.sh            (from the repository root or anywhere)
# Knobs (environment): ROUNDS=3 DURATION=5 CONNS=50 PAYLOAD=1024
#   RPUSH_N=100000 (requests per redis-benchmark RPUSH run)
#   LPOP_N=2000 (LPOP key 100 requests; the list is prefilled with 100x that)
#   PREFILL=2000 (messages per qpq queue before the fetch run)
#   CARGO_TARGET_DIR (where the release binaries are built)
#
# Every process it starts is stopped by its pid; all data lives in a
# temporary directory that is removed at the end. Redis is installed from
# Debian with apt-get if redis-server is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
CONNS=${CONNS:-50}
PAYLOAD=${PAYLOAD:-1024}
RPUSH_N=${RPUSH_N:-100000}
LPOP_N=${LPOP_N:-2000}
PREFILL=${PREFILL:-2000}
QPQ_PORT=7543
ECHO_PORT=7544
METRICS_PORT=9465
REDIS_PORT=6390
TARGET=${CARGO_TARGET_DIR:-target}

log() { echo "== $*" >&2; }

if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null; then
    log "installing redis-server and redis-tools from Debian"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null
fi
log "$(redis-server --version | cut -d' ' -f1-3)"

log "building release binaries"
cargo build --release -q -p quicproquo-server -p quicproquo-benches --bins
SERVER="$TARGET/release/qpq-server"
BENCH="$TARGET/release/qpq-bench"

WORK=$(mktemp -d -t qpq-compare.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

# Waits until FILE contains the fingerprint line and prints the fingerprint.
fingerprint_of() {
    local file=$1 pid=$2
    for _ in $(seq 1 200); do
        if grep -q 'fingerprint:' "$file" 2>/dev/null; then
            grep 'fingerprint:' "$file" | awk '{print $NF}'
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || { cat "$file" >&2; return 1; }
        sleep 0.05
    done
    echo "no fingerprint from pid $pid" >&2
    return 1
}

stop() {
    local pid=$1
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    local keep=()
    for p in "${PIDS[@]}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
    PIDS=("${keep[@]+"${keep[@]}"}")
}

# json FIELD < report -> the number
json() { grep -o "\"$1\":[-0-9.e+]*" | head -1 | cut -d: -f2; }

# One qpq-server run: enqueue, then fetch (drain of prefilled queues).
qpq_round() {
    local mode=$1 round=$2 dir="$WORK/qpq-$1-$2"
    mkdir -p "$dir"
    QPQ_DATA_DIR="$dir" QPQ_LISTEN="127.0.0.1:$QPQ_PORT" QPQ_DURABILITY="$mode" \
        QPQ_METRICS_LISTEN="127.0.0.1:$METRICS_PORT" QPQ_CONFIG=/dev/null QPQ_LOG=warn \
        QPQ_CONNECTIONS_PER_IP_MAX=1000 \
        "$SERVER" >"$dir/out" 2>"$dir/err" &
    local pid=$!
    PIDS+=("$pid")
    local fp
    fp=$(fingerprint_of "$dir/out" "$pid")
    local common=(--server "127.0.0.1:$QPQ_PORT" --server-fingerprint "$fp"
        --connections "$CONNS" --in-flight 1 --payload "$PAYLOAD" --json
        --metrics "http://127.0.0.1:$METRICS_PORT/metrics")
    "$BENCH" "${common[@]}" --workload enqueue --duration "$DURATION" >"$dir/enqueue.json"
    "$BENCH" "${common[@]}" --workload fetch --prefill "$PREFILL" --fetch-limit 100 \
        --duration "$DURATION" --warmup 0 >"$dir/fetch.json"
    stop "$pid"
    json ops_per_s <"$dir/enqueue.json" >>"$WORK/qpq_${mode}_enqueue"
    json items_per_s <"$dir/fetch.json" >>"$WORK/qpq_${mode}_fetch"
    json messages_per_fsync <"$dir/enqueue.json" >>"$WORK/qpq_${mode}_per_fsync"
    json p99_us <"$dir/enqueue.json" >>"$WORK/qpq_${mode}_p99"
}

echo_round() {
    local round=$1 dir="$WORK/echo-$1"
    mkdir -p "$dir"
    "$BENCH" baseline-server --listen "127.0.0.1:$ECHO_PORT" --data-dir "$dir" >"$dir/out" 2>"$dir/err" &
    local pid=$!
    PIDS+=("$pid")
    local fp
    fp=$(fingerprint_of "$dir/out" "$pid")
    "$BENCH" --server "127.0.0.1:$ECHO_PORT" --server-fingerprint "$fp" --workload quic-echo \
        --connections "$CONNS" --in-flight 1 --payload "$PAYLOAD" --duration "$DURATION" \
        --json >"$dir/echo.json"
    stop "$pid"
    json ops_per_s <"$dir/echo.json" >>"$WORK/echo"
}

# Redis over TLS with the certificate qpq-server generated (a self-signed
# P-256 certificate for localhost), persistence `always` or `default`.
redis_round() {
    local mode=$1 round=$2 dir="$WORK/redis-$1-$2"
    mkdir -p "$dir"
    local cert="$WORK/qpq-fsync-1/server-cert.pem" key="$WORK/qpq-fsync-1/server-key.pem"
    local persistence=()
    if [[ $mode == always ]]; then
        persistence=(--appendonly yes --appendfsync always)
    fi
    redis-server --port 0 --tls-port "$REDIS_PORT" --bind 127.0.0.1 \
        --tls-cert-file "$cert" --tls-key-file "$key" --tls-ca-cert-file "$cert" \
        --tls-auth-clients no --dir "$dir" --daemonize no --logfile "$dir/log" \
        "${persistence[@]}" &
    local pid=$!
    PIDS+=("$pid")
    local tls=(--tls --cacert "$cert" --sni localhost -h localhost -p "$REDIS_PORT")
    for _ in $(seq 1 100); do
        redis-cli "${tls[@]}" ping >/dev/null 2>&1 && break
        sleep 0.05
    done
    redis-benchmark "${tls[@]}" -c "$CONNS" -n "$RPUSH_N" -d "$PAYLOAD" -t rpush --csv -q \
        >"$dir/rpush.csv"
    grep -i '"RPUSH' "$dir/rpush.csv" | head -1 | cut -d, -f2 | tr -d '"' >>"$WORK/redis_${mode}_rpush"
    if [[ $mode == default ]]; then
        # Fill the list (pipelined, not measured), then pop 100 at a time.
        redis-cli "${tls[@]}" del mylist >/dev/null
        redis-benchmark "${tls[@]}" -c "$CONNS" -n $((LPOP_N * 100)) -d "$PAYLOAD" -t rpush \
            -P 32 -q >/dev/null
        redis-benchmark "${tls[@]}" -c "$CONNS" -n "$LPOP_N" --csv -q LPOP mylist 100 \
            >"$dir/lpop.csv"
        grep -i '"LPOP' "$dir/lpop.csv" | head -1 | cut -d, -f2 | tr -d '"' |
            awk '{print $1 * 100}' >>"$WORK/redis_lpop100_items"
    fi
    stop "$pid"
}

median() {
    sort -g "$1" | awk '{a[NR]=$1} END {if (NR == 0) print "nan"; else if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "nan" }'; }

log "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq 1 "$ROUNDS"); do
    log "round $round/$ROUNDS: qpq-server fsync"
    qpq_round fsync "$round"
    log "round $round/$ROUNDS: qpq-server buffered"
    qpq_round buffered "$round"
    log "round $round/$ROUNDS: bare QUIC"
    echo_round "$round"
    log "round $round/$ROUNDS: redis appendfsync always"
    redis_round always "$round"
    log "round $round/$ROUNDS: redis default persistence"
    redis_round default "$round"
done
log "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

q_fsync=$(median "$WORK/qpq_fsync_enqueue")
q_buf=$(median "$WORK/qpq_buffered_enqueue")
q_fetch=$(median "$WORK/qpq_fsync_fetch")
q_fetch_buf=$(median "$WORK/qpq_buffered_fetch")
per_fsync=$(median "$WORK/qpq_fsync_per_fsync")
echo_ops=$(median "$WORK/echo")
r_always=$(median "$WORK/redis_always_rpush")
r_default=$(median "$WORK/redis_default_rpush")
r_lpop=$(median "$WORK/redis_lpop100_items")

echo
echo "medians of $ROUNDS rounds; $CONNS connections x 1 in flight, $PAYLOAD B payload, loopback, TLS everywhere"
printf '%-48s %12.0f\n' "qpq enqueue, fsync (ops/s)" "$q_fsync"
printf '%-48s %12.0f\n' "qpq enqueue, buffered (ops/s)" "$q_buf"
printf '%-48s %12.0f\n' "qpq fetch limit 100, fsync (items/s)" "$q_fetch"
printf '%-48s %12.0f\n' "qpq fetch limit 100, buffered (items/s)" "$q_fetch_buf"
printf '%-48s %12.0f\n' "qpq enqueue p99 latency, fsync (us)" "$(median "$WORK/qpq_fsync_p99")"
printf '%-48s %12.0f\n' "bare QUIC echo, enqueue-sized (ops/s)" "$echo_ops"
printf '%-48s %12.0f\n' "redis RPUSH, appendfsync always (ops/s)" "$r_always"
printf '%-48s %12.0f\n' "redis RPUSH, default persistence (ops/s)" "$r_default"
printf '%-48s %12.0f\n' "redis LPOP mylist 100, default (items/s)" "$r_lpop"
echo
printf 'R1 durable enqueue / redis RPUSH always        %6s  (target >= 1.0, milestone 0.5)\n' "$(ratio "$q_fsync" "$r_always")"
printf 'R2 buffered enqueue / redis RPUSH default      %6s  (target >= 0.6)\n' "$(ratio "$q_buf" "$r_default")"
printf 'R3 fetch items/s / redis LPOP 100 items/s      %6s  (target >= 0.5; fsync server; buffered: %s)\n' \
    "$(ratio "$q_fetch" "$r_lpop")" "$(ratio "$q_fetch_buf" "$r_lpop")"
printf 'R4 durable enqueue / bare-QUIC baseline        %6s  (target >= 0.6)\n' "$(ratio "$q_fsync" "$echo_ops")"
printf 'R5 messages per fsync (durable enqueue)        %6.1f  (target >= 10)\n' "$per_fsync"
