#!/usr/bin/env python3
"""Time to first token under visual-token budgets: `vidllm-native ask` on one video with
budgets of 100%, 50%, 25% and 10% of the unreduced visual tokens, for each method, in one
run, as ratios to the unreduced run (> 1: faster). The model is `bench_video.py`'s
Video-LLaVA-shaped random model (CLIP ViT-B/16 + a SmolLM2-shaped decoder, 197 tokens a
frame), made here; random weights say nothing about answer quality.

FrameFusion reduces inside the decoder, so its visual tokens are the mean over the
decoder's layers of the tokens each attended to.

Beside each time: the KL divergence of the first answer token's distribution under the
budget from the unreduced one's (`ask --first-logits`), in nats. Informational only:
with random weights it measures how much the reduction moves the output, not what an
answer loses.

    pip install torch transformers==4.57.1 av pillow
    python3 tests/scripts/bench_budget.py VIDEO.mp4 --bin target/release/vidllm-native [--frames 8] [--reps 3] [--methods fastvid,framefusion]
"""
import argparse, json, math, os, statistics, subprocess, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_video  # noqa: E402


def ttft(binary, model, video, frames, threads, budget=None, reduce=None):
    logits = tempfile.NamedTemporaryFile(suffix=".f32", delete=False).name
    cmd = [binary, "ask", "--model", model, "--video", video, "--prompt", "What is happening in this video?",
           "--frames", str(frames), "--device", "cpu", "--quant", "q4_1", "--max-tokens", "1", "--json",
           "--first-logits", logits]
    if budget:
        cmd += ["--max-visual-tokens", str(budget), "--reduce", reduce]
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:  # a budget the method cannot meet (maxinfo keeps whole frames)
        return None
    v = json.loads(out.stdout)
    t = v["timings"]
    total = t["decode_ms"] + t["preprocess_ms"] + t["encode_ms"] + t["prefill_ms"]
    with open(logits, "rb") as fh:
        raw = fh.read()
    os.unlink(logits)
    row = [x[0] for x in __import__("struct").iter_unpack("<f", raw)]
    # FrameFusion keeps every token in the prompt and reduces them in the decoder's
    # layers: its count is the mean over the layers.
    layers = (v.get("reduction") or {}).get("layer_tokens")
    tokens = f"{statistics.mean(layers):.0f} (layer mean)" if layers else v["visual_tokens"]
    return total, tokens, t, row


def log_softmax(row):
    m = max(row)
    z = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - z for x in row]


def kl(p_row, q_row):
    """KL(P || Q) in nats, P and Q the softmax of two logits rows."""
    lp, lq = log_softmax(p_row), log_softmax(q_row)
    return sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("video")
    ap.add_argument("--bin", default="target/release/vidllm-native")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default="slowfast,maxinfo,fastvid,framefusion", help="comma-separated")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        bench_video.make_model(d)
        runs = {}
        for _ in range(a.reps):
            # Interleaved, so that machine load touches every configuration alike.
            base = ttft(a.bin, d, a.video, a.frames, a.threads)
            runs.setdefault(("none", 100), []).append(base)
            full = base[1]
            for reduce in a.methods.split(","):
                for pct in [100, 50, 25, 10]:
                    runs.setdefault((reduce, pct), []).append(ttft(a.bin, d, a.video, a.frames, a.threads,
                                                                   max(1, full * pct // 100), reduce))
        base_ms = statistics.median(r[0] for r in runs[("none", 100)])
        print(f"video time to first token under a budget, {os.path.basename(a.video)}, {a.frames} frames, "
              f"{a.threads} threads, median of {a.reps}; ratio = unreduced time / this time")
        base_row = runs[("none", 100)][0][3]
        print("| method | budget | visual tokens | encode ms | prefill ms | first token ms | ratio | KL (nats) |")
        print("|---|---|---|---|---|---|---|---|")
        for (reduce, pct), rs in runs.items():
            if any(r is None for r in rs):
                print(f"| {reduce} | {pct}% | refused: under what the method keeps | | | | | |")
                continue
            ms = statistics.median(r[0] for r in rs)
            enc = statistics.median(r[2]["encode_ms"] for r in rs)
            pre = statistics.median(r[2]["prefill_ms"] for r in rs)
            print(f"| {reduce} | {pct}% | {rs[0][1]} | {enc:.0f} | {pre:.0f} | {ms:.0f} | {base_ms / ms:.2f} | {kl(base_row, rs[0][3]):.4f} |")


if __name__ == "__main__":
    main()
