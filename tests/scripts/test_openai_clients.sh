#!/usr/bin/env bash
# `vidllm-native serve` against the official OpenAI clients: the `openai` package from PyPI
# and the `openai` package from npm, streaming and not, text and a `video_url` part.
# Each client's answers must equal `vidllm-native chat` / `ask` on the same input.
# The clients are installed once into the cache (outside the clone). Prints the transcripts.
#   VIDLLM_NATIVE_BIN: the binary (default: the release build under CARGO_TARGET_DIR).
set -euo pipefail
cd "$(dirname "$0")/../.."
CACHE="${VIDLLM_CACHE:-$HOME/.cache/vidllm}/openai-clients"
PY_VERSION=3.57.0
NPM_VERSION=7.59.0
mkdir -p "$CACHE"
if ! "$CACHE/venv/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$PY_VERSION')" 2>/dev/null; then
  python3 -m venv "$CACHE/venv" >&2
  "$CACHE/venv/bin/pip" install --quiet "openai==$PY_VERSION" >&2
fi
if [ "$(node -p "require('$CACHE/npm/node_modules/openai/package.json').version" 2>/dev/null)" != "$NPM_VERSION" ]; then
  mkdir -p "$CACHE/npm"
  (cd "$CACHE/npm" && npm init -y >/dev/null && npm install --silent --no-audit --no-fund "openai@$NPM_VERSION" >&2)
fi
export OPENAI_NPM_DIR="$CACHE/npm/node_modules"
BIN="${VIDLLM_NATIVE_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/release/vidllm-native}"
[ -x "$BIN" ] || cargo build --release -p vidllm-native >&2
exec "$CACHE/venv/bin/python" tests/scripts/openai_clients.py --bin "$BIN" "$@"
