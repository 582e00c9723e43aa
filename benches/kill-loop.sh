#!/usr/bin/env bash
# The long kill loop: io-shell/server/tests/kill_loop against the release
# qpq-server, killed with SIGKILL KILLS times under load and restarted on
# the same data directory, then audited (TESTING.md, "The kill loop").
# Prints the run's summary: seed, kills, requests answered, requests cut
# off, messages and KeyPackages checked, and every violation found.
#
# Usage: benches/kill-loop.sh            (from the repository root or anywhere)
# Knobs (environment): KILLS=100, SEED (replays a run's choices; printed by
#   every run), CARGO_TARGET_DIR (where the binaries are built)
#
# The test starts and stops its servers itself, by pid; their data lives in
# a temporary directory the test removes.
set -euo pipefail
cd "$(dirname "$0")/.."

KILLS=${KILLS:-100}
TARGET=${CARGO_TARGET_DIR:-target}

log() { echo "== $*" >&2; }

log "building the release qpq-server"
cargo build --release -q -p quicproquo-server
SERVER="$(cd "$TARGET/release" && pwd)/qpq-server"

log "building the kill loop"
cargo test -q -p quicproquo-server --test kill_loop --no-run

OUT=$(mktemp -t qpq-kill-loop.XXXXXX)
trap 'rm -f "$OUT"' EXIT
log "running $KILLS kills against $SERVER"
export QPQ_KILL_LOOP_KILLS=$KILLS QPQ_KILL_LOOP_SERVER=$SERVER
if [ -n "${SEED:-}" ]; then export QPQ_KILL_LOOP_SEED=$SEED; fi
status=0
cargo test -q -p quicproquo-server --test kill_loop -- --nocapture \
    every_acknowledged_write_survives_repeated_sigkills >"$OUT" 2>&1 || status=$?

log "summary"
grep -E '^kill loop|^  - |^  \.\.\. and' "$OUT" || true
if [ "$status" -ne 0 ]; then
    log "the kill loop failed (exit $status); its whole output:"
    cat "$OUT"
fi
exit "$status"
