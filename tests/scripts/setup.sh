#!/usr/bin/env bash
# System packages vidllm needs on Debian: a Vulkan loader and Mesa's drivers (lavapipe,
# the software Vulkan used where there is no GPU), the ffmpeg libraries (video decoding;
# clang for their bindings) and the ffmpeg CLI (the tests' reference decoder), and Python
# for fetching the model and clips (and a C++ compiler for llama.cpp's quantizer, which
# makes the K-quant test files), and Chromium for the browser tests.
set -euo pipefail
need=()
for p in mesa-vulkan-drivers libvulkan1 python3-pip python3-venv g++ ffmpeg libavcodec-dev libavformat-dev libavutil-dev \
         libswscale-dev libavfilter-dev libavdevice-dev libswresample-dev pkg-config clang libclang-dev chromium; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
# Node.js and npm drive the browser tests; the machines come with them, Debian's if not.
command -v npm >/dev/null || need+=(nodejs npm)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "setup: cargo (Rust 1.95+) is required: https://rustup.rs" >&2; exit 1; }
