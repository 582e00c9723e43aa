#!/usr/bin/env bash
# Regenerates io-shell/proto/src/generated/node_capnp.rs from
# io-shell/proto/schema/node.capnp with the pinned toolchain: the `capnp`
# compiler 0.9.2 (Debian package `capnproto`) and the `capnpc` crate =0.27.0.
#
#   bash io-shell/proto/regen.sh          # rewrite the committed file
#   bash io-shell/proto/regen.sh --check  # fail if the committed file is stale
#
# Honors CARGO_TARGET_DIR. Needs `capnp` on PATH; builds need neither.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
committed="$here/src/generated/node_capnp.rs"

regen() {
    cargo run --quiet --locked --manifest-path "$here/regen/Cargo.toml" -- "$1"
}

case "${1:-}" in
    "")
        regen "$here/src/generated"
        ;;
    --check)
        tmp="$(mktemp -d)"
        trap 'rm -rf "$tmp"' EXIT
        regen "$tmp"
        if diff -u "$committed" "$tmp/node_capnp.rs"; then
            echo "regen.sh: $committed is up to date"
        else
            echo "regen.sh: $committed is stale; run: bash io-shell/proto/regen.sh" >&2
            exit 1
        fi
        ;;
    *)
        echo "usage: $0 [--check]" >&2
        exit 2
        ;;
esac
