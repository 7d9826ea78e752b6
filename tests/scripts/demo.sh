#!/usr/bin/env bash
# The main job on a default input: fetch SmolLM2-135M-Instruct (Q4_1 GGUF), build
# vidllm-native, and stream an answer on the GPU device (lavapipe without a GPU), then the CPU.
#   bash tests/scripts/demo.sh ["your question"]
set -euo pipefail
cd "$(dirname "$0")/../.."
bash tests/scripts/setup.sh
MODEL=$(bash tests/scripts/fetch_smollm2.sh)
PROMPT="${1:-What are three fun facts about rabbits?}"
cargo build --release -p vidllm-native
BIN="${CARGO_TARGET_DIR:-target}/release/vidllm-native"
for dev in gpu cpu; do
  echo "== vidllm-native chat --device $dev" >&2
  "$BIN" chat --model "$MODEL" --prompt "$PROMPT" --max-tokens 96 --device "$dev"
done
