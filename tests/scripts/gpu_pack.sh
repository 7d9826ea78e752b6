#!/usr/bin/env bash
# Packs what tests/scripts/gpu_check.sh needs on a lent GPU machine (no Rust toolchain, no
# network there). The device tool carries at most 64 MiB with the working tree (38 MB of
# it the fixtures), so the test binaries travel in three archives, one per call:
#   .dev   the common parts, and s1.tar.xz: vidllm-native, kernels, kv_cache, step_graph,
#          qwen_parity, video_llava_parity;
#   .dev2  s2a.tar.xz: pllava, llava_next_video, idefics3, merv, preprocess parity;
#   .dev3  s2b.tar.xz: smolvlm_parity, token_budget, framefusion, kept_positions,
#          checkpoint_layouts, ggml_blocks;
#   .gl    Debian's Vulkan loader and the GL dispatch libraries NVIDIA's Vulkan driver
#          (libGLX_nvidia) loads.
# All are ignored through .git/info/exclude. Then, through the device tool:
#   run(carry [.dev, .gl]):  TEST_ARGS='--skip packed_caches_follow_llama_cpp' \
#                            bash tests/scripts/gpu_check.sh .dev $OUT tests,bench,depth s1.tar.xz
#   run(carry [.dev2, .gl]): bash tests/scripts/gpu_check.sh .dev2 $OUT tests s2a.tar.xz
#   run(carry [.dev3, .gl]): bash tests/scripts/gpu_check.sh .dev3 $OUT tests s2b.tar.xz
# (kv_cache's llama.cpp comparison needs the 94 MB SmolLM2 file, which cannot travel.)
#
#   cargo build --release --workspace --bins --tests
#   LLAMA_BENCH=path/to/llama-bench bash tests/scripts/gpu_pack.sh
#
# LLAMA_BENCH: llama.cpp's llama-bench built statically with its Vulkan backend, e.g. from
# llama-cpp-python 0.3.8's sdist (vendor/llama.cpp; Debian's glslc, libvulkan-dev and
# spirv-headers installed):
#   cmake -B build -DGGML_VULKAN=ON -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON \
#       -DGGML_F16C=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release
#   cmake --build build --target llama-bench
set -euo pipefail
PACK=.dev
target=${CARGO_TARGET_DIR:-target}/release
cache=${VIDLLM_CACHE:-$HOME/.cache/vidllm}
python=${PYTHON:-python3}
for d in .dev .dev2 .dev3 .gl; do
    grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >>.git/info/exclude
done
mkdir -p "$PACK/lib" .dev2 .dev3 .gl
(cd .gl && apt-get download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The test binaries, newest build of each, stripped; the binaries of an archive share
# most of their code, which a large xz dictionary finds.
newest() { ls -t "$target/deps/$1"-* | grep -v '\.d$' | head -1; }
pack() { # ARCHIVE TEST...
    local name=$1 base
    base=$(basename "$1")
    local dir=$work/${base%%.*}
    shift
    mkdir -p "$dir"
    for t in "$@"; do strip -o "$dir/$t" "$(newest "$t")"; done
    tar -C "$work" -cf - "$(basename "$dir")" | xz -T1 -9 --lzma2=preset=9,dict=384MiB >"$name"
}
mkdir -p "$work/s1"
strip -o "$work/s1/vidllm-native" "$target/vidllm-native"
pack "$PACK/s1.tar.xz" kernels kv_cache step_graph qwen_parity
pack .dev2/s2a.tar.xz video_llava_parity pllava_parity llava_next_video_parity idefics3_parity merv_parity preprocess_parity
pack .dev3/s2b.tar.xz smolvlm_parity token_budget framefusion kept_positions checkpoint_layouts ggml_blocks

# Stand-ins for the ffmpeg libraries vidllm-native links: every symbol it imports, with
# the libraries' symbol versions, each aborting with its name if called.
for lib in $(readelf -d "$target/vidllm-native" | grep -oE 'lib(av|sw)[a-z]+\.so\.[0-9]+'); do
    stem=${lib%%.so*}
    version=$(objdump -T "$target/vidllm-native" | grep -oE "\(${stem^^}_[0-9]+\)" | head -1 | tr -d '()')
    syms=$(objdump -T "$target/vidllm-native" | awk -v v="($version)" 'NF >= 2 && $(NF-1) == v { print $NF }' | sort -u)
    { echo '#include <stdio.h>'; echo '#include <stdlib.h>'
      for s in $syms; do echo "void $s(void) { fputs(\"$s: no ffmpeg on this machine\\n\", stderr); abort(); }"; done; } >"$work/$lib.c"
    { echo "$version {"; echo " global:"; for s in $syms; do echo "  $s;"; done; echo " local: *;"; echo "};"; } >"$work/$lib.map"
    gcc -shared -fPIC -o "$PACK/lib/$lib" "$work/$lib.c" -Wl,-soname,"$lib" -Wl,--version-script="$work/$lib.map"
done
cp -L "$(gcc -print-file-name=libgomp.so.1)" "$PACK/lib/"

xz -9 -c "${LLAMA_BENCH:?set LLAMA_BENCH to a Vulkan llama-bench}" >"$PACK/llama-bench.xz"
# gguf-py, and the SmolLM2 tokenizer as a GGUF with no tensors.
rm -rf "$PACK/gguf" && cp -r "$($python -c 'import gguf, os; print(os.path.dirname(gguf.__file__))')" "$PACK/gguf"
find "$PACK/gguf" -name __pycache__ -prune -exec rm -rf {} +
$python - "$cache/SmolLM2-135M-Instruct.Q4_1.gguf" "$work/vocab.gguf" <<'EOF'
import sys, gguf
src, w = gguf.GGUFReader(sys.argv[1]), gguf.GGUFWriter(sys.argv[2], "llama")
for name, field in src.fields.items():
    if name.startswith("tokenizer."):
        vtype = field.types[0]
        w.add_key_value(name, field.contents(), vtype, sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
EOF
xz -9 -c "$work/vocab.gguf" >"$PACK/smollm2-vocab.gguf.xz"
du -sh "$PACK"/* .dev2 .dev3 .gl
