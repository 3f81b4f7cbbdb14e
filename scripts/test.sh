#!/usr/bin/env bash
# The test command (README, .ci/run): builds and runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-$(nproc)}"
export CANDLE_NUM_THREADS="${CANDLE_NUM_THREADS:-$(nproc)}"
cargo test --workspace --locked
