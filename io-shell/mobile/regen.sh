#!/usr/bin/env bash
# Regenerates the committed Kotlin and Swift bindings (bindings/) from the
# library this tree builds, with the workspace's `uniffi-bindgen`. The test
# `the_committed_kotlin_and_swift_bindings_are_fresh` (run by
# `cargo test --workspace`, so by CI) fails when they are stale; this is
# that test, told to write instead of compare.
set -euo pipefail
cd "$(dirname "$0")/../.."
QPQ_UPDATE_BINDINGS=1 cargo test -p quicproquo-mobile --test bindings \
    the_committed_kotlin_and_swift_bindings_are_fresh
