#!/usr/bin/env bash
# Round trip of one command through `qpq daemon`'s socket, against one `qpq`
# process per command: a durable server on loopback, two users in a group,
# N sends each way (release build). Prints p50/p99/mean per command.
#   benches/daemon-rtt.sh            # N=200
#   N=1000 benches/daemon-rtt.sh
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-200}
cargo build --release -q --bin qpq --bin qpq-server
bin=$PWD/target/release
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

QPQ_LISTEN=127.0.0.1:0 QPQ_DATA_DIR="$work/server" QPQ_CONFIG=/dev/null \
    "$bin/qpq-server" >"$work/server.out" 2>&1 &
until grep -q fingerprint "$work/server.out"; do sleep 0.1; done
export QPQ_SERVER=$(sed -n 's/^qpq-server listening on \([^ ]*\).*/\1/p' "$work/server.out")
export QPQ_SERVER_FINGERPRINT=$(sed -n 's/^certificate SHA-256 fingerprint: //p' "$work/server.out")
export QPQ_PASSWORD=bench-password
for u in alice bob; do
    "$bin/qpq" --state "$work/$u.bin" init >/dev/null
    "$bin/qpq" --state "$work/$u.bin" register --count 2 >/dev/null
done
bob=$("$bin/qpq" --state "$work/bob.bin" --json whoami | python3 -c 'import json,sys; print(json.load(sys.stdin)["identity_key"])')
"$bin/qpq" --state "$work/alice.bin" group create team >/dev/null
"$bin/qpq" --state "$work/alice.bin" group add team "$bob" >/dev/null

echo "one qpq process per command (qpq send), $N times:"
python3 - "$bin/qpq" "$work/alice.bin" "$N" <<'PY'
import subprocess, sys, time, statistics
qpq, state, n = sys.argv[1], sys.argv[2], min(int(sys.argv[3]), 50)
times = []
for i in range(n):
    t = time.perf_counter()
    subprocess.run([qpq, "--state", state, "send", "team", f"process {i}"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    times.append((time.perf_counter() - t) * 1000)
times.sort()
print(f"  {n} runs: p50 {times[len(times)//2]:.1f} ms, p99 {times[int(len(times)*0.99)-1]:.1f} ms, mean {statistics.mean(times):.1f} ms")
PY

"$bin/qpq" --state "$work/alice.bin" daemon </dev/null >"$work/daemon.out" 2>&1 &
until [ -S "$work/alice.bin.sock" ]; do sleep 0.05; done
echo "through the daemon's socket, $N times each:"
python3 - "$work/alice.bin.sock" "$N" <<'PY'
import json, socket, sys, time, statistics
path, n = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_UNIX); s.connect(path)
f = s.makefile("rwb")
def call(i, method, params):
    f.write((json.dumps({"id": i, "method": method, "params": params}) + "\n").encode()); f.flush()
    while True:
        v = json.loads(f.readline())
        if v.get("id") == i:
            assert v["type"] == "result", v
            return v
for method, params in [("group_list", {}), ("send", {"group": "team", "text": "x"})]:
    times = []
    for i in range(n):
        t = time.perf_counter()
        call(i, method, dict(params, text=f"daemon {i}") if method == "send" else params)
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    print(f"  {method}: p50 {times[len(times)//2]:.2f} ms, p99 {times[int(len(times)*0.99)-1]:.2f} ms, mean {statistics.mean(times):.2f} ms")
call(10**9, "shutdown", {})
PY
wait %2 2>/dev/null || true
