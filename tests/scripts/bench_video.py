#!/usr/bin/env python3
"""Video file -> first token, split into decode / preprocess / encode / prefill, for
vidllm-native and for transformers on the same bench-size model and the same frames, in
one run. The model has random weights in the hub format (nothing is downloaded):
Video-LLaVA with a CLIP ViT-B/16 (224 px) tower and a SmolLM2-135M-shaped LLaMA decoder.

    pip install torch transformers==4.57.1 av pillow
    python3 tests/scripts/bench_video.py VIDEO.mp4 --bin target/release/vidllm-native \
        [--frames 8] [--devices cpu,gpu] [--quant q4_1,f32] [--reps 3] [--threads 2]
"""
import argparse, json, os, statistics, subprocess, tempfile, time

import av
import numpy as np
import torch
from transformers import (CLIPVisionConfig, LlamaConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration,
                          VideoLlavaImageProcessor)

PROMPT = "USER: <video>\nWhat is happening in this video? ASSISTANT:"


def make_model(path):
    torch.manual_seed(0)
    cfg = VideoLlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                       num_attention_heads=12, image_size=224, patch_size=16),
        text_config=LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                num_key_value_heads=3, vocab_size=49152, rms_norm_eps=1e-5, rope_theta=100000.0,
                                max_position_embeddings=8192),
        image_token_index=49150, video_token_index=49151)
    model = VideoLlavaForConditionalGeneration(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    VideoLlavaImageProcessor().save_pretrained(path)
    # A byte-level tokenizer whose two last ids are the placeholders.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({f"<t{i}>": i for i in range(len(alphabet), 49150)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<image>", "<video>"])
    from transformers import PreTrainedTokenizerFast
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)
    return model


def hf_frames(path, n):
    """transformers' documented recipe: PyAV, indices np.arange(0, total, total / n)."""
    c = av.open(path)
    total = c.streams.video[0].frames
    idx = set(np.arange(0, total, total / n).astype(int).tolist())
    frames = []
    for i, f in enumerate(c.decode(video=0)):
        if i > max(idx):
            break
        if i in idx:
            frames.append(f.to_ndarray(format="rgb24"))
    return np.stack(frames)


def hf_time_to_first_token(model, proc, video, n, ids):
    t0 = time.perf_counter()
    frames = hf_frames(video, n)
    t1 = time.perf_counter()
    pixels = proc(images=None, videos=[list(frames)], return_tensors="pt")["pixel_values_videos"]
    t2 = time.perf_counter()
    with torch.no_grad():
        feats = model.model.get_video_features(pixels)[0].reshape(-1, 576)
        t3 = time.perf_counter()
        emb = model.model.get_input_embeddings()(ids)
        emb[ids == model.config.video_token_index] = feats
        logits = model(inputs_embeds=emb).logits[0, -1]
        int(logits.argmax())
    t4 = time.perf_counter()
    return {"decode_ms": (t1 - t0) * 1e3, "preprocess_ms": (t2 - t1) * 1e3, "encode_ms": (t3 - t2) * 1e3,
            "prefill_ms": (t4 - t3) * 1e3}


def vidllm_time_to_first_token(binary, model_dir, video, n, device, quant):
    out = subprocess.run([binary, "ask", "--model", model_dir, "--video", video, "--prompt",
                          "What is happening in this video?", "--frames", str(n), "--device", device, "--quant", quant,
                          "--max-tokens", "1", "--json"], check=True, capture_output=True, text=True).stdout
    t = json.loads(out)["timings"]
    return {k: t[k] for k in ("decode_ms", "preprocess_ms", "encode_ms", "prefill_ms")} | {"load_s": t["load_s"]}


def median(runs):
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("video")
    ap.add_argument("--bin", default="target/release/vidllm-native")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--devices", default="cpu")
    ap.add_argument("--quant", default="q4_1,f32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as d:
        model = make_model(d)
        proc = VideoLlavaImageProcessor()
        n_tok = a.frames * 197
        ids = torch.tensor([[1] + [49151] * n_tok + list(range(300, 320))])
        hf_time_to_first_token(model, proc, a.video, a.frames, ids)  # warm-up
        ref = median([hf_time_to_first_token(model, proc, a.video, a.frames, ids) for _ in range(a.reps)])
        rows = [("transformers (torch CPU, f32)", ref)]
        for dev in a.devices.split(","):
            for q in a.quant.split(","):
                vidllm_time_to_first_token(a.bin, d, a.video, a.frames, dev, q)  # warm-up
                rows.append((f"vidllm {dev} {q}", median([vidllm_time_to_first_token(a.bin, d, a.video, a.frames, dev, q)
                                                           for _ in range(a.reps)])))
    stages = ["decode_ms", "preprocess_ms", "encode_ms", "prefill_ms"]
    print(f"{a.frames} frames of {os.path.basename(a.video)}, {n_tok} visual tokens; median of {a.reps}; "
          f"ratio = transformers time / vidllm time (> 1: vidllm faster)")
    print("| runtime | " + " | ".join(stages) + " | first token ms | ratio |")
    print("|---" * (len(stages) + 3) + "|")
    ref_total = sum(ref[s] for s in stages)
    for name, r in rows:
        total = sum(r[s] for s in stages)
        print(f"| {name} | " + " | ".join(f"{r[s]:.0f}" for s in stages) + f" | {total:.0f} | {ref_total / total:.2f} |")


if __name__ == "__main__":
    main()
