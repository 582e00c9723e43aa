#!/usr/bin/env bash
# Measures qpq-gui in a real window (Xvfb, Mesa's llvmpipe through glow),
# release build, against a real qpq-server on loopback:
#   - time from process start to the first frame,
#   - time from pressing Unlock to the first frame of the main screen, with
#     MESSAGES messages waiting on the server,
#   - RSS once all MESSAGES have arrived (one conversation),
#   - CPU while idle (IDLE seconds, nothing happening),
#   - each frame's CPU time while scrolling the conversation (mouse wheel
#     and Page Up/Down for SCROLL seconds), from QPQ_GUI_STATS.
# Carol (qpq CLI) makes a group with Alice and queues the messages through
# `qpq daemon`; Alice is a CLI-made state the app opens.
#
# Usage: benches/gui.sh     (needs Xvfb and xdotool: apt-get install xvfb xdotool)
# Knobs: MESSAGES=10000 IDLE=20 SCROLL=10 CARGO_TARGET_DIR KEEP=1 (keep the
# temporary directory and processes, for debugging)
set -euo pipefail
cd "$(dirname "$0")/.."

MESSAGES=${MESSAGES:-10000}
IDLE=${IDLE:-20}
SCROLL=${SCROLL:-10}
TARGET=${CARGO_TARGET_DIR:-target}
BIN=$TARGET/release

log() { echo "== $*" >&2; }

for tool in Xvfb xdotool; do
    command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install xvfb xdotool)" >&2; exit 1; }
done
log "building release binaries"
cargo build --release -q -p quicproquo-server -p quicproquo-client -p quicproquo-gui --bins

WORK=$(mktemp -d)
PIDS=()
cleanup() {
    [ -n "${KEEP:-}" ] && echo "kept $WORK" >&2 && return
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# The server, on a free port.
: >"$WORK/server.toml"
QPQ_CONFIG=$WORK/server.toml QPQ_LISTEN=127.0.0.1:0 QPQ_DATA_DIR=$WORK/data QPQ_LOG=warn \
    "$BIN/qpq-server" >"$WORK/server.out" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
    grep -q "fingerprint" "$WORK/server.out" 2>/dev/null && grep -q "listening on" "$WORK/server.out" && break
    sleep 0.1
done
ADDR=$(sed -n 's/^qpq-server listening on \([^ ]*\).*/\1/p' "$WORK/server.out")
FP=$(sed -n 's/^certificate SHA-256 fingerprint: *//p' "$WORK/server.out")
export QPQ_SERVER=$ADDR QPQ_SERVER_FINGERPRINT=$FP QPQ_PASSWORD=bench-password
log "server at $ADDR"

qpq() { "$BIN/qpq" --state "$WORK/$1.bin" "${@:2}"; }
for who in alice carol; do
    qpq "$who" init >/dev/null
    qpq "$who" register >/dev/null
done
ALICE=$(qpq alice whoami | grep -oE '[0-9a-f]{64}' | head -1)
qpq carol group create bench >/dev/null
qpq carol group add bench "$ALICE" >/dev/null

log "Carol queues $MESSAGES messages"
# Every send answered, then every message stored on the server, then
# shutdown.
python3 - "$BIN/qpq" "$WORK/carol.bin" "$MESSAGES" "$WORK/daemon.err" <<'PY'
import json, subprocess, sys, threading
qpq, state, n, err = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
d = subprocess.Popen([qpq, "--state", state, "daemon", "--no-socket"],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(err, "w"),
                     text=True)
counts = {"sent": 0, "delivered": 0, "error": None}
done = threading.Event()
def read():
    # The daemon closes a connection that leaves its answers unread for
    # 10 s: read them while writing.
    for line in d.stdout:
        m = json.loads(line)
        if m.get("type") == "result":
            counts["sent"] += 1
        elif m.get("type") == "error":
            counts["error"] = m
            break
        elif m.get("type") == "delivered":
            counts["delivered"] += 1
        if counts["sent"] == n and counts["delivered"] == n:
            break
    done.set()
reader = threading.Thread(target=read, daemon=True)
reader.start()
try:
    for i in range(1, n + 1):
        text = f"message {i}: the quick brown fox jumps over the lazy dog"
        d.stdin.write(json.dumps({"id": i, "method": "send",
                                  "params": {"group": "bench", "text": text}}) + "\n")
    d.stdin.flush()
except BrokenPipeError:
    sys.exit(f"the daemon stopped (exit {d.wait()}): {open(err).read()}")
if not done.wait(timeout=600) or counts["error"]:
    sys.exit(f"sending failed: {counts}")
d.stdin.write('{"method":"shutdown"}\n')
d.stdin.close()
d.wait(timeout=60)
print(f"{counts['sent']} sent, {counts['delivered']} stored on the server", file=sys.stderr)
PY

# Alice's window.
printf '{"server":"%s","fingerprint":"%s"}\n' "$ADDR" "$FP" >"$WORK/alice.server.json"
DISPLAY_NUM=$((90 + RANDOM % 100))
Xvfb ":$DISPLAY_NUM" -screen 0 1280x800x24 >/dev/null 2>&1 &
PIDS+=($!)
export DISPLAY=":$DISPLAY_NUM" XDG_RUNTIME_DIR=$WORK/xdg LIBGL_ALWAYS_SOFTWARE=1
mkdir -m 700 "$WORK/xdg"
sleep 1
QPQ_GUI_STATS=$WORK/stats.txt "$BIN/qpq-gui" --state "$WORK/alice.bin" >"$WORK/gui.out" 2>&1 &
GUI=$!
PIDS+=($GUI)
WIN=""
for _ in $(seq 100); do
    WIN=$(xdotool search --pid "$GUI" 2>/dev/null | head -1 || true)
    [ -n "$WIN" ] && break
    sleep 0.1
done
[ -n "$WIN" ] || { echo "no window" >&2; cat "$WORK/gui.out" >&2; exit 1; }
sleep 1
xdotool windowfocus --sync "$WIN"
# The password field has the keyboard focus when the window opens.
xdotool type --delay 20 "$QPQ_PASSWORD"
xdotool key Return

log "waiting for $MESSAGES messages in the conversation"
deadline=$((SECONDS + ${WAIT:-300}))
while :; do
    lines=$(awk '$1=="frame"{n=$4} END{print n+0}' "$WORK/stats.txt")
    [ "$lines" -ge "$MESSAGES" ] && break
    [ $SECONDS -lt $deadline ] || { echo "only $lines lines after ${WAIT:-300} s" >&2; exit 1; }
    sleep 1
done
sleep 3

rss_kb() { awk '/^VmRSS/{print $2}' "/proc/$GUI/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$GUI/stat"; }
RSS=$(rss_kb)

log "idle for $IDLE s"
t0=$(cpu_ticks)
sleep "$IDLE"
t1=$(cpu_ticks)
HZ=$(getconf CLK_TCK)
IDLE_CPU=$(awk -v a="$t0" -v b="$t1" -v hz="$HZ" -v s="$IDLE" 'BEGIN{printf "%.2f", (b-a)/hz/s*100}')
IDLE_FRAMES_START=$(awk '$1=="frame"{t=$2} END{print t}' "$WORK/stats.txt")

log "scrolling for $SCROLL s"
xdotool mousemove --window "$WIN" 500 300
scroll_start=$(awk '$1=="frame"{t=$2} END{print t}' "$WORK/stats.txt")
end=$((SECONDS + SCROLL))
while [ $SECONDS -lt $end ]; do
    xdotool click --repeat 10 --delay 15 4
    xdotool click --repeat 10 --delay 15 5
    xdotool click --repeat 20 --delay 15 4
done
sleep 0.5
RSS_AFTER=$(rss_kb)
kill "$GUI"
wait "$GUI" 2>/dev/null || true

python3 - "$WORK/stats.txt" "$scroll_start" "$IDLE_FRAMES_START" <<PY
import sys
path, scroll_from, idle_from = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
first = unlock = main_at = all_at = None
scroll, idle_frames = [], 0
for line in open(path):
    f = line.split()
    if f[0] == "first_frame":
        first = float(f[1])
    elif f[0] == "unlocked":
        unlock = float(f[1])
    elif f[0] == "frame":
        t, cpu = float(f[1]), float(f[2])
        if unlock is not None and main_at is None:
            main_at = t
        if all_at is None and int(f[3]) >= $MESSAGES:
            all_at = t
        if t > scroll_from and cpu > 0:
            scroll.append(cpu)
        elif idle_from < t <= scroll_from:
            idle_frames += 1
scroll.sort()
q = lambda p: scroll[min(len(scroll) - 1, int(len(scroll) * p))]
print(f"first frame after start:   {first:.0f} ms")
print(f"Unlock to main screen:     {unlock:.0f} ms ($MESSAGES messages waiting on the server)")
print(f"all messages shown:        {(all_at - main_at) / 1000:.1f} s after the main screen")
print(f"RSS, all messages in:      {$RSS / 1024:.1f} MiB (after scrolling: {$RSS_AFTER / 1024:.1f} MiB)")
print(f"CPU while idle:            $IDLE_CPU % of a core over $IDLE s ({idle_frames} frames drawn)")
print(f"frame CPU while scrolling: p50 {q(0.5):.2f} ms, p95 {q(0.95):.2f} ms, max {scroll[-1]:.2f} ms over {len(scroll)} frames")
PY
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
