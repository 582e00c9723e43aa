#!/usr/bin/env bash
# Durable enqueue and fetch with 1, 2 and 3 qpq-server nodes sharing one
# PostgreSQL database, next to one node on its embedded fjall database:
# the same load generator (qpq-bench, connections spread over the nodes),
# the same run, alternating the setups ROUNDS times. Every node of a
# deployment serves the same certificate (tls_cert/tls_key), as nodes behind
# one name would. A throwaway PostgreSQL cluster (.ci/postgres.sh) holds
# the data; every setup gets a fresh database.
#
# Usage: benches/postgres-nodes.sh
# Knobs (environment): ROUNDS=2 DURATION=5 CONNS=50 PAYLOAD=1024 PREFILL=2000
#   NODES="1 2 3" CARGO_TARGET_DIR
# Prints, per setup, the medians: enqueue ops/s (durable: fsync, and
# synchronous_commit on), fetch items/s (limit 100), the requests answered
# `unavailable` because the database rolled them back (a conflict between
# nodes), and the load average before and after.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-5}
CONNS=${CONNS:-50}
PAYLOAD=${PAYLOAD:-1024}
PREFILL=${PREFILL:-2000}
NODES=${NODES:-"1 2 3"}
TARGET=${CARGO_TARGET_DIR:-target}
BASE_PORT=7601

log() { echo "== $*" >&2; }

log "building release binaries"
cargo build --release -q -p quicproquo-server -p quicproquo-benches --bins
SERVER="$TARGET/release/qpq-server"
BENCH="$TARGET/release/qpq-bench"

WORK=$(mktemp -d -t qpq-pgnodes.XXXXXX)
PIDS=()
eval "$(bash .ci/postgres.sh start)"
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    bash .ci/postgres.sh stop "$QPQ_TEST_POSTGRES_DIR"
    rm -rf "$WORK"
}
trap cleanup EXIT
ADMIN=$QPQ_TEST_POSTGRES_URL
BASE_URL=${ADMIN%/*}

fingerprint_of() {
    local file=$1 pid=$2
    for _ in $(seq 1 200); do
        if grep -q 'fingerprint:' "$file" 2>/dev/null; then
            grep 'fingerprint:' "$file" | awk '{print $NF}'
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || { cat "$file" "${file%out}err" >&2; return 1; }
        sleep 0.05
    done
    return 1
}

json() { python3 -c "import json,sys; d=json.load(sys.stdin); print(d$1)"; }

# One setup: "fjall" or "pgN" (N nodes).
run_setup() {
    local setup=$1 round=$2 dir="$WORK/$1-$2" nodes=1 storage=() db=""
    mkdir -p "$dir"
    if [[ $setup == pg* ]]; then
        nodes=${setup#pg}
        db="qpq_bench_${nodes}_${round}"
        psql -q "$ADMIN" -c "CREATE DATABASE $db" >/dev/null
        storage=(QPQ_STORAGE=postgres "QPQ_POSTGRES_URL=$BASE_URL/$db")
    fi
    local servers="" fp="" started=()
    for n in $(seq 1 "$nodes"); do
        local d="$dir/node$n" port=$((BASE_PORT + n - 1)) tls=()
        mkdir -p "$d"
        if [[ $n -gt 1 ]]; then
            tls=("QPQ_TLS_CERT=$dir/node1/server-cert.pem" "QPQ_TLS_KEY=$dir/node1/server-key.pem")
        fi
        env QPQ_DATA_DIR="$d" QPQ_LISTEN="127.0.0.1:$port" QPQ_DURABILITY=fsync \
            QPQ_CONFIG=/dev/null QPQ_LOG=warn QPQ_CONNECTIONS_PER_IP_MAX=1000 \
            "${storage[@]}" "${tls[@]}" "$SERVER" >"$d/out" 2>"$d/err" &
        local pid=$!
        PIDS+=("$pid")
        started+=("$pid")
        fp=$(fingerprint_of "$d/out" "$pid")
        servers+="${servers:+,}127.0.0.1:$port"
    done
    local common=(--server "$servers" --server-fingerprint "$fp" --connections "$CONNS"
        --in-flight 1 --payload "$PAYLOAD" --json)
    "$BENCH" "${common[@]}" --workload enqueue --duration "$DURATION" >"$dir/enqueue.json"
    "$BENCH" "${common[@]}" --workload fetch --prefill "$PREFILL" --fetch-limit 100 \
        --duration "$DURATION" --warmup 0 >"$dir/fetch.json"
    for pid in "${started[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    json "['ops_per_s']" <"$dir/enqueue.json" >>"$WORK/${setup}_enqueue"
    json "['errors']" <"$dir/enqueue.json" >>"$WORK/${setup}_enqueue_errors"
    json "['items_per_s']" <"$dir/fetch.json" >>"$WORK/${setup}_fetch"
    json "['errors']" <"$dir/fetch.json" >>"$WORK/${setup}_fetch_errors"
}

median() {
    sort -g "$1" | awk '{a[NR]=$1} END {if (NR == 0) print "nan"; else if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'
}

setups=(fjall)
for n in $NODES; do setups+=("pg$n"); done
log "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq 1 "$ROUNDS"); do
    for setup in "${setups[@]}"; do
        log "round $round/$ROUNDS: $setup"
        run_setup "$setup" "$round"
    done
done
log "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

echo
echo "medians of $ROUNDS rounds; $CONNS connections x 1 in flight spread over the nodes, $PAYLOAD B, fsync / synchronous_commit on, loopback"
printf '%-34s %14s %14s %16s %14s\n' setup "enqueue ops/s" "rolled back" "fetch items/s" "rolled back"
for setup in "${setups[@]}"; do
    case $setup in
        fjall) name="1 node, fjall" ;;
        pg1) name="1 node, PostgreSQL" ;;
        *) name="${setup#pg} nodes, one PostgreSQL" ;;
    esac
    printf '%-34s %14.0f %14.0f %16.0f %14.0f\n' "$name" "$(median "$WORK/${setup}_enqueue")" \
        "$(median "$WORK/${setup}_enqueue_errors")" "$(median "$WORK/${setup}_fetch")" \
        "$(median "$WORK/${setup}_fetch_errors")"
done
