#!/usr/bin/env python3
"""vidllm-native bench next to llama.cpp (llama-cpp-python) on the same GGUF files, in one run.

Both measure as llama-bench does: pp = one pass over N synthetic prompt tokens,
tg = M single-token passes from an empty context; the median of --reps runs after a
warm-up. Prints one table, one row per file and device, with vidllm / llama.cpp ratios
(> 1: vidllm is faster) against llama.cpp on the same file in the same run.

    pip install llama-cpp-python==0.3.36 gguf
    python3 tests/scripts/bench_vs_llamacpp.py MODEL.gguf [MORE.gguf ...] --bin target/release/vidllm-native \
        [--devices cpu,gpu] [--prompt-tokens 512] [--gen-tokens 128] [--reps 3] [--threads 2]
"""
import argparse, collections, json, os, statistics, subprocess, time

import llama_cpp


def llama_cpp_rates(model, n_pp, n_tg, reps, threads, gpu_layers):
    llm = llama_cpp.Llama(model_path=model, n_ctx=max(n_pp, n_tg) + 8, n_batch=n_pp, n_threads=threads,
                          n_gpu_layers=gpu_layers, verbose=False)
    vocab = llm.n_vocab()
    prompt = [(i * 7919 + 13) % vocab for i in range(n_pp)]

    def pp():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        return n_pp / (time.perf_counter() - t0)

    def tg():
        llm.reset()
        tok = 1
        t0 = time.perf_counter()
        for _ in range(n_tg):
            llm.eval([tok])
            tok = int(llm.scores[llm.n_tokens - 1].argmax())
        return n_tg / (time.perf_counter() - t0)

    pp(), tg()  # warm-up
    return statistics.median(pp() for _ in range(reps)), statistics.median(tg() for _ in range(reps))


def vidllm_rates(binary, model, device, n_pp, n_tg, reps):
    out = subprocess.run([binary, "bench", "--model", model, "--device", device, "--prompt-tokens", str(n_pp),
                          "--gen-tokens", str(n_tg), "--reps", str(reps), "--json"],
                         check=True, capture_output=True, text=True).stdout
    v = json.loads(out)
    return v["prefill_tok_s"], v["decode_tok_s"], v["device"]


def type_mix(model):
    """The file's matrix types as gguf-py reads them, most frequent first (`Q4_K x90, ...`)."""
    try:
        import gguf
    except ImportError:
        return "?"
    counts = collections.Counter(t.tensor_type.name for t in gguf.GGUFReader(model).tensors if len(t.shape) == 2)
    return ", ".join(f"{name} x{n}" for name, n in counts.most_common())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--bin", default="target/release/vidllm-native")
    ap.add_argument("--devices", default="cpu,gpu")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-gpu-layers", type=int, default=0,
                    help="-1 with a Vulkan build of llama-cpp-python, to compare GPU to GPU")
    a = ap.parse_args()
    ref_name = "llama.cpp " + ("gpu" if a.llama_gpu_layers else f"cpu x{a.threads}")
    print(f"pp{a.prompt_tokens} / tg{a.gen_tokens}, median of {a.reps}; ratios are vidllm / {ref_name} on the same file")
    print()
    print(f"| file | matrix types | runtime | pp tok/s | tg tok/s | pp ratio | tg ratio |")
    print("|---|---|---|---|---|---|---|")
    for model in a.models:
        name, mix = os.path.basename(model), type_mix(model)
        ref_pp, ref_tg = llama_cpp_rates(model, a.prompt_tokens, a.gen_tokens, a.reps, a.threads, a.llama_gpu_layers)
        print(f"| {name} | {mix} | {ref_name} | {ref_pp:.1f} | {ref_tg:.1f} | 1.00 | 1.00 |", flush=True)
        for dev in a.devices.split(","):
            pp, tg, dev_name = vidllm_rates(a.bin, model, dev, a.prompt_tokens, a.gen_tokens, a.reps)
            print(f"| {name} | {mix} | vidllm {dev_name} | {pp:.1f} | {tg:.1f} | {pp / ref_pp:.3f} | {tg / ref_tg:.3f} |", flush=True)


if __name__ == "__main__":
    main()
