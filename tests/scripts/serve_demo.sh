#!/usr/bin/env bash
# The browser's main job: the demo page with working defaults, in one command.
#   bash tests/scripts/serve_demo.sh        then open http://127.0.0.1:8080/
# Builds the npm package (web/build.sh; a quick no-op when it is up to date), fetches
# SmolLM2-135M-Instruct Q4_1 (the page's default text model; the tiny SmolVLM2 test model,
# its default video model, is in the repository), and serves the repository root with
# COOP/COEP headers (tests/scripts/serve_demo.py). PORT and HOST override the address.
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v cargo >/dev/null || { echo "serve_demo: cargo (Rust 1.95+) is required: https://rustup.rs" >&2; exit 1; }
if ! rustup target list --installed 2>/dev/null | grep -q wasm32-unknown-unknown; then
  rustup target add wasm32-unknown-unknown >&2
fi
bash web/build.sh >&2
gguf="$(bash tests/scripts/fetch_smollm2.sh)"
exec python3 tests/scripts/serve_demo.py --gguf "$gguf" --host "${HOST:-127.0.0.1}" --port "${PORT:-8080}"
