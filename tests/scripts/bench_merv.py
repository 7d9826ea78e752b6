#!/usr/bin/env python3
"""MERV's encoders run concurrently or one after another, on one device or spread over two
(`--devices cpu,gpu`: the encoders alternate between the CPU and the wgpu adapter): time to
fused features.

Scales the tiny fixture (tests/fixtures/tiny_merv) up to mid-size random encoders (widths
and depths below; the decoder stays tiny, it is not what is timed), then runs
`vidllm-native ask --json` on a real clip with the encoders concurrent
(`VIDLLM_MERV_CONCURRENT=1`) and one after another (the default), on the CPU alone and
spread over the CPU and the GPU adapter where one exists, interleaved, and prints the
encode times as ratios to one device, one after another.

    python3 tests/scripts/bench_merv.py [--reps 3] [--out DIR]
Needs numpy and safetensors (any Python with them), VIDLLM_NATIVE_BIN and VIDLLM_CLIPS.
"""
import argparse, json, os, re, shutil, statistics, subprocess, sys, time

import numpy as np
from safetensors.numpy import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# name -> (width, feed-forward, layers, heads)
SIZES = {"languagebind": (512, 2048, 8, 8), "dinov2": (512, 2048, 8, 8), "vivit": (384, 1536, 6, 6), "siglip": (384, 1536, 6, 6)}


def scale(src, out):
    os.makedirs(out, exist_ok=True)
    cfg = json.load(open(os.path.join(src, "config.json")))
    w = load_file(os.path.join(src, "model.safetensors"))
    rng = np.random.default_rng(0)
    new = {k: v for k, v in w.items() if not k.startswith(("encoders.", "projectors."))}
    for e in cfg["encoders"]:
        n, c = e["name"], e["config"]
        d0 = c["hidden_size"]
        f0 = c.get("intermediate_size", int(d0 * c.get("mlp_ratio", 4)))
        d, f, layers, heads = SIZES[n]
        dims = {d0: d, f0: f}
        c.update(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads)
        if "intermediate_size" in c:
            c["intermediate_size"] = f
        prefix = f"encoders.{n}."
        for k, v in w.items():
            if not k.startswith(prefix):
                continue
            m = re.search(r"\.layers?\.(\d+)\.", k)
            if m and m.group(1) != "0":
                continue
            # Widths sit in the first and last axes; a conv's kernel axes stay (ViViT's 16 is
            # both its width and its tubelet side).
            last = 0 if v.ndim >= 4 else v.ndim - 1
            shape = tuple(dims.get(s, s) if i in (0, last) else s for i, s in enumerate(v.shape))
            names = [k] if not m else [k.replace(f".{m.group(0)[1:]}", f".{m.group(0)[1:].replace('.0.', f'.{i}.')}") for i in range(layers)]
            for name in names:
                fill = 1.0 if name.endswith(("lambda1",)) else None
                if name.endswith(("norm1.weight", "norm2.weight", "layernorm.weight", "layer_norm1.weight", "layer_norm2.weight",
                                  "pre_layrnorm.weight", "post_layernorm.weight", "layernorm_before.weight", "layernorm_after.weight")):
                    fill = 1.0
                new[name] = (np.full(shape, fill, np.float32) if fill is not None
                             else (rng.standard_normal(shape) * 0.02).astype(np.float32))
        pw = w[f"projectors.{n}.weight"]
        new[f"projectors.{n}.weight"] = (rng.standard_normal((pw.shape[0], d)) * 0.02).astype(np.float32)
        new[f"projectors.{n}.bias"] = w[f"projectors.{n}.bias"]
    save_file(new, os.path.join(out, "model.safetensors"))
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=1)
    for f in os.listdir(src):
        if f.startswith(("tokenizer", "special")):
            shutil.copy(os.path.join(src, f), out)


def encode_ms(model, clip, sequential, devices=None):
    env = dict(os.environ, VIDLLM_MERV_CONCURRENT="0" if sequential else "1")
    cmd = [os.environ["VIDLLM_NATIVE_BIN"], "ask", "--model", model, "--video", clip, "--prompt", "What is happening?",
           "--max-tokens", "1", "--device", "cpu", "--json"] + (["--devices", devices] if devices else [])
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out)["timings"]["encode_ms"]


def has_gpu():
    probe = subprocess.run([os.environ["VIDLLM_NATIVE_BIN"], "ask", "--model", "-", "--devices", "gpu:0"], capture_output=True, text=True)
    return "no adapter" not in probe.stderr


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.environ.get("VIDLLM_CACHE", os.path.expanduser("~/.cache/vidllm")), "merv-bench"))
    a = ap.parse_args()
    scale(os.path.join(ROOT, "tests/fixtures/tiny_merv"), a.out)
    clip = os.path.join(os.environ["VIDLLM_CLIPS"], "bikes.mp4")
    configs = [("cpu", True, None), ("cpu", False, None)]
    if has_gpu():
        configs += [("cpu,gpu", True, "cpu,gpu"), ("cpu,gpu", False, "cpu,gpu")]
    runs = {c: [] for c in configs}
    for _ in range(a.reps):
        for c in configs:
            runs[c].append(encode_ms(a.out, clip, c[1], c[2]))
    base = statistics.median(runs[configs[0]])
    print(f"encoders {SIZES}; {os.cpu_count()} CPUs; 32 frames of bikes.mp4; median of {a.reps}; "
          f"ratio = CPU alone, one after another / this")
    print("| encoders on | run | encode ms (preprocess, 4 encoders, pool, project, fuse) | ratio | runs |")
    print("|---|---|---|---|---|")
    for c in configs:
        m = statistics.median(runs[c])
        print(f"| {c[0]} | {'one after another' if c[1] else 'concurrent'} | {m:.0f} | {base / m:.2f} | {[round(x) for x in runs[c]]} |")


if __name__ == "__main__":
    main()
