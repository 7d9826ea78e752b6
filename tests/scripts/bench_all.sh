#!/usr/bin/env bash
# Every speed comparison of issue 11 in one run, as one table of ratios (> 1: vidllm is
# faster), plus the browser package's size.
#
# - CPU: `vidllm-native bench` next to llama.cpp's own `llama-bench` on the same GGUF
#   files and thread count (pp512 and tg128), the two interleaved file by file so that a
#   neighbour's load falls on both. llama-bench is built once from the llama.cpp that
#   llama-cpp-python==0.3.36 vendors (the source fetch_smollm2_quants.sh already unpacked),
#   for this machine (GGML_NATIVE: AVX-512 VNNI where the processor has it), into
#   $VIDLLM_CACHE/llama-bench.
# - Video time to first token against transformers: tests/scripts/bench_video.py, when
#   torch and transformers are importable (skipped, and said so, otherwise): Video-LLaVA
#   at 8 frames, and SmolVLM2-500M-shaped at 8 and 32 (when torchvision is importable too),
#   each also with Q8_0 towers and 8-bit activations (`q4_1+q8_0:int8`).
# - `vidllm-native serve`'s continuous batching: tests/scripts/bench_serve.py, total
#   tokens a second at --parallel 1, 4 and 8 on the first file.
# - The wasm packages: gzipped sizes of web/pkg*/vidllm_web_bg.wasm, when built.
# - wgpu against llama.cpp's Vulkan backend on the same adapter (lavapipe here), when
#   LLAMA_BENCH_VULKAN names a llama-bench built with it (how: tests/scripts/gpu_pack.sh;
#   llama-cpp-python 0.3.8's llama.cpp builds against Debian 12's Vulkan headers): pp512
#   and tg128 of each file, `bench --device gpu` next to `llama-bench -ngl 99`,
#   interleaved, VULKAN_ROUNDS rounds (2; about two minutes a round on lavapipe;
#   VULKAN_PP and VULKAN_TG shorten them).
#
# - Decode at depth: tg128 after DEPTH tokens already in the context (llama-bench's -d;
#   --depth 0 leaves the row out), where attention over the KV cache weighs: a video
#   prompt is a thousand tokens or more.
#
#   tests/scripts/bench_all.sh [--threads N] [--reps N] [--depth N] [FILE.gguf ...]
# Default files: the wheel's Q4_1 and llama.cpp's Q4_K_M and Q8_0 of it.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
CACHE="${VIDLLM_CACHE:-$HOME/.cache/vidllm}"
THREADS=2
REPS=3
DEPTH=1024
FILES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) THREADS="$2"; shift 2 ;;
    --reps) REPS="$2"; shift 2 ;;
    --depth) DEPTH="$2"; shift 2 ;;
    *) FILES+=("$1"); shift ;;
  esac
done
BIN="${VIDLLM_NATIVE_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/vidllm-native}"
[ -x "$BIN" ] || { echo "bench_all: build vidllm-native first (cargo build --release --workspace --bins)" >&2; exit 1; }
if [ ${#FILES[@]} = 0 ]; then
  QUANTS="$(bash "$ROOT/tests/scripts/fetch_smollm2_quants.sh")"
  FILES=("$(bash "$ROOT/tests/scripts/fetch_smollm2.sh")" "$QUANTS/SmolLM2-135M-Instruct.Q4_K_M.gguf" "$QUANTS/SmolLM2-135M-Instruct.Q8_0.gguf")
fi

# llama-bench, native to this machine.
LLAMA="$CACHE/llama.cpp-0.3.36"
LB="$CACHE/llama-bench"
if [ ! -x "$LB/bin/llama-bench" ]; then
  [ -d "$LLAMA" ] || bash "$ROOT/tests/scripts/fetch_smollm2_quants.sh" >/dev/null
  PATH="$CACHE/quant-venv/bin:$PATH" cmake -S "$LLAMA" -B "$LB" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF >&2
  PATH="$CACHE/quant-venv/bin:$PATH" cmake --build "$LB" --target llama-bench >&2
fi
export LD_LIBRARY_PATH="$LB/bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# tok/s of llama-bench's one test line (pp or tg) for a file.
llama_rate() { # file test(pp|tg|tgd)
  local args=(-p 512 -n 0)
  [ "$2" = tg ] && args=(-p 0 -n 128)
  [ "$2" = tgd ] && args=(-p 0 -n 128 -d "$DEPTH")
  # A llama-bench that dies (a -march=native build on a VM whose CPUID promises more than
  # it runs) is reported as nan, not the end of the table.
  { "$LB/bin/llama-bench" -m "$1" -t "$THREADS" -r "$REPS" "${args[@]}" -o json 2>/dev/null || true; } |
    python3 -c 'import json,sys
try: print(json.load(sys.stdin)[0]["avg_ts"])
except Exception: print("nan")'
}
vidllm_rates() { # file -> "pp tg"
  RAYON_NUM_THREADS="$THREADS" "$BIN" bench --model "$1" --device cpu --prompt-tokens 512 --gen-tokens 128 --reps "$REPS" --json |
    python3 -c 'import json,sys; v=json.load(sys.stdin); print(v["prefill_tok_s"], v["decode_tok_s"])'
}
vidllm_pp_int8() { # file -> pp with 8-bit activations (llama.cpp's arithmetic)
  RAYON_NUM_THREADS="$THREADS" "$BIN" bench --model "$1" --device cpu --activations int8 --prompt-tokens 512 --gen-tokens 16 --reps "$REPS" --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["prefill_tok_s"])'
}
vidllm_depth_rate() { # file -> tg at depth
  RAYON_NUM_THREADS="$THREADS" "$BIN" bench --model "$1" --device cpu --depth "$DEPTH" --prompt-tokens 16 --gen-tokens 128 --reps "$REPS" --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["decode_tok_s"])'
}

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, $THREADS threads, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| file | test | vidllm tok/s | llama.cpp tok/s | ratio |"
echo "|---|---|---|---|---|"
for f in "${FILES[@]}"; do
  read -r vpp vtg < <(vidllm_rates "$f")
  lpp=$(llama_rate "$f" pp)
  vpp8=$(vidllm_pp_int8 "$f")
  ltg=$(llama_rate "$f" tg)
  vtd=nan ltd=nan
  if [ "$DEPTH" -gt 0 ]; then
    vtd=$(vidllm_depth_rate "$f")
    ltd=$(llama_rate "$f" tgd)
  fi
  python3 - "$(basename "$f")" "$DEPTH" "$vpp" "$lpp" "$vtg" "$ltg" "$vtd" "$ltd" "$vpp8" <<'PY'
import sys
name, depth = sys.argv[1], int(sys.argv[2])
vpp, lpp, vtg, ltg, vtd, ltd, vpp8 = map(float, sys.argv[3:])
print(f"| {name} | pp512 | {vpp:.1f} | {lpp:.1f} | {vpp / lpp:.2f}x |")
print(f"| {name} | pp512, --activations int8 | {vpp8:.1f} | {lpp:.1f} | {vpp8 / lpp:.2f}x |")
print(f"| {name} | tg128 | {vtg:.1f} | {ltg:.1f} | {vtg / ltg:.2f}x |")
if depth > 0:
    print(f"| {name} | tg128 @ d{depth} | {vtd:.1f} | {ltd:.1f} | {vtd / ltd:.2f}x |")
PY
done

echo
if python3 -c 'import torch, transformers' 2>/dev/null; then
  CLIPS="$(bash "$ROOT/tests/scripts/fetch_clips.sh")"
  python3 "$ROOT/tests/scripts/bench_video.py" "$CLIPS/bigbuckbunny.mp4" --bin "$BIN" --devices cpu --threads "$THREADS" --reps "$REPS"
  echo
  # transformers' SmolVLM processor reads videos through torchvision, which not every
  # mirror has for the torch it has.
  if python3 -c 'import torchvision' 2>/dev/null; then
    python3 "$ROOT/tests/scripts/bench_video.py" "$CLIPS/bigbuckbunny.mp4" --bin "$BIN" --arch smolvlm --frames 8,32 --quant q4_1,q4_1+q8_0:int8 \
      --devices cpu --threads "$THREADS" --reps "$REPS"
  else
    echo "SmolVLM2 time to first token: skipped (torchvision is not importable here)"
  fi
else
  echo "video time to first token: skipped (torch and transformers are not importable here)"
fi

echo
if [ -n "${LLAMA_BENCH_VULKAN:-}" ]; then
  VPP="${VULKAN_PP:-512}" VTG="${VULKAN_TG:-128}"
  echo "| device | file | test | vidllm tok/s | llama.cpp Vulkan tok/s | ratio |"
  echo "|---|---|---|---|---|---|"
  for f in "${FILES[@]}"; do
  for round in $(seq "${VULKAN_ROUNDS:-2}"); do
    v=$("$BIN" bench --model "$f" --device gpu --prompt-tokens "$VPP" --gen-tokens "$VTG" --reps 1 --json |
      python3 -c 'import json,sys; v=json.load(sys.stdin); print(v["prefill_tok_s"], v["decode_tok_s"], v["device"].replace("|", "/"))')
    l=$({ "$LLAMA_BENCH_VULKAN" -m "$f" -ngl 99 -p "$VPP" -n "$VTG" -r 1 -o json 2>/dev/null || true; } |
      python3 -c 'import json,sys
try: r=json.load(sys.stdin); print(r[0]["avg_ts"], r[1]["avg_ts"])
except Exception: print("nan nan")')
    python3 - "$(basename "$f")" "$VPP" "$VTG" $v $l <<'PY'
import sys
name, pp, tg = sys.argv[1:4]
vpp, vtg = float(sys.argv[4]), float(sys.argv[5])
device = " ".join(sys.argv[6:-2])
lpp, ltg = map(float, sys.argv[-2:])
print(f"| {device} | {name} | pp{pp} | {vpp:.2f} | {lpp:.2f} | {vpp / lpp:.2f}x |")
print(f"| {device} | {name} | tg{tg} | {vtg:.2f} | {ltg:.2f} | {vtg / ltg:.2f}x |")
PY
  done
  done
else
  echo "wgpu against llama.cpp's Vulkan backend: skipped (set LLAMA_BENCH_VULKAN to a llama-bench built with it)"
fi

echo
# The server's continuous batching: total tokens a second at --parallel 1, 4 and 8.
python3 "$ROOT/tests/scripts/bench_serve.py" --bin "$BIN" --model "${FILES[0]}" --parallel 1,4,8

echo
# The browser's three packages (web/build.sh); a model fetches one.
for p in pkg pkg-cpu pkg-threads; do
  WASM="$ROOT/web/$p/vidllm_web_bg.wasm"
  if [ -f "$WASM" ]; then
    gzip -9 -c "$WASM" | wc -c | awk -v p=$p '{printf "wasm package %s: %.1f MiB gzipped (target <= 2.5)\n", p, $1 / 1048576}'
  else
    echo "wasm package $p: not built (web/build.sh)"
  fi
done
