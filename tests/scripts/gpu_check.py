#!/usr/bin/env python3
"""The Python halves of tests/scripts/gpu_check.sh, on the lent GPU machine.

    gpu_check.py bandwidth           device-to-device copy bandwidth (torch), saved for `table`
    gpu_check.py table MODEL.gguf... vidllm and llama.cpp side by side, and against the roofline
    gpu_check.py hostcpu BIN MODEL   host CPU time against wall time per decoded token
    gpu_check.py tg < bench.json     one line from `vidllm-native bench --json`
"""
import json
import resource
import subprocess
import sys
import time

BANDWIDTH = "/tmp/dev/bandwidth"


def bandwidth():
    """Bytes read plus bytes written per second by a 1 GiB device-to-device copy: the
    roofline's denominator."""
    import torch

    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(20):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    bw = 2 * n * 20 / (start.elapsed_time(end) / 1e3)
    print(f"bandwidth_bytes_s {bw:.4e}")
    open(BANDWIDTH, "w").write(str(bw))


def table(models):
    """One row per model: tok/s of both runtimes, their ratios, and decode as a share of
    the roofline (weights read per token / bandwidth)."""
    import gguf

    bw = float(open(BANDWIDTH).read())
    print("| model | weights read per token | roofline tok/s | vidllm pp512 | llama.cpp pp512 | pp ratio "
          "| vidllm tg128 (steps not recorded) | vidllm tg128 | llama.cpp tg128 | tg ratio | vidllm % roofline "
          "| llama.cpp % roofline |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m in models:
        # Every matrix is read once per token, except the embedding table (one row).
        per_token = sum(int(t.n_bytes) for t in gguf.GGUFReader(m).tensors if t.name != "token_embd.weight")
        roof = bw / per_token
        name = m.split("/")[-1].removesuffix(".gguf")
        try:
            v = json.load(open(m + ".vidllm.json"))
            ref = {("pp" if x["n_prompt"] else "tg"): x["avg_ts"] for x in json.load(open(m + ".llama.json"))}
        except (OSError, ValueError, KeyError) as e:
            print(f"| {name} | missing: {e} |")
            continue
        pp, tg = v["prefill_tok_s"], v["decode_tok_s"]
        try:
            plain = f"{json.load(open(m + '.vidllm-plain.json'))['decode_tok_s']:.0f}"
        except (OSError, ValueError, KeyError):
            plain = "-"
        print(f"| {name} | {per_token / 1e6:.0f} MB | {roof:.0f} | {pp:.0f} | {ref['pp']:.0f} | {pp / ref['pp']:.2f}x "
              f"| {plain} | {tg:.0f} | {ref['tg']:.0f} | {tg / ref['tg']:.2f}x | {100 * tg / roof:.1f}% "
              f"| {100 * ref['tg'] / roof:.1f}% |")


def hostcpu(binary, model):
    """Two decode lengths, each in its own process, differenced so loading drops out. CPU
    time near the wall time: the host is busy the whole step (recording, submitting or
    waiting on dispatches)."""

    def run(n):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        subprocess.run([binary, "bench", "--model", model, "--device", "gpu", "--prompt-tokens", "1",
                        "--gen-tokens", str(n), "--reps", "1", "--json"], check=True, capture_output=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return time.perf_counter() - t, cpu

    (w1, c1), (w2, c2) = run(64), run(576)
    print(f"hostcpu {model.split('/')[-1]}: per decoded token {1e3 * (w2 - w1) / 512:.2f} ms wall, "
          f"{1e3 * (c2 - c1) / 512:.2f} ms host CPU (all threads)")


def tg():
    d = json.load(sys.stdin)
    print(f"tg{d['gen_tokens']} {d['decode_tok_s']:.1f} tok/s (sd {d['decode_sd']:.1f})")


if __name__ == "__main__":
    what, args = sys.argv[1], sys.argv[2:]
    {"bandwidth": bandwidth, "table": table, "hostcpu": hostcpu, "tg": tg}[what](*([args] if what == "table" else args))
