#!/usr/bin/env python3
"""Video file -> first token, split into decode / preprocess / encode / prefill, for
vidllm-native and for transformers on the same bench-size model and the same frames, in
one run. The models have random weights in the hub format (nothing is downloaded):
- `--arch video_llava`: Video-LLaVA with a CLIP ViT-B/16 (224 px) tower and a
  SmolLM2-135M-shaped LLaMA decoder, 197 tokens a frame;
- `--arch smolvlm`: SmolVLM2-500M-shaped, a SigLIP-B/16 tower at 512 px, pixel shuffle by
  4 (64 tokens a frame) and a SmolLM2-360M-shaped decoder; frames sampled by SmolVLM2's
  policy (8 a second, at most `--frames`), resized, squared, encoded, as each runtime does.

    pip install torch torchvision transformers==4.57.1 av pillow num2words
    python3 tests/scripts/bench_video.py VIDEO.mp4 --bin target/release/vidllm-native \
        [--arch video_llava|smolvlm] [--frames 8[,32]] [--devices cpu,gpu] [--quant q4_1,q4_1+q8_0,f32] [--reps 3] [--threads 2]

`--quant` lists vidllm's configurations: the decoder's `--quant`, after a `+` the
towers' `--vision-quant` (f32 when left out), and after a `:` the CPU's `--activations`
(int16 when left out), as in `q4_1+q8_0:int8`.
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
    byte_tokenizer(path, 49152, ["<image>", "<video>"])
    return model


SMOL_FPS = 8  # frames a second SmolVLM2's policy takes here, so that a short clip yields --frames
SMOL_SPECIALS = ["<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>"]


def byte_tokenizer(path, n_vocab, specials):
    """A byte-level tokenizer of `n_vocab` ids, the last ones `specials`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({f"<t{i}>": i for i in range(len(alphabet), n_vocab - len(specials))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    eos = "<end_of_utterance>" if "<end_of_utterance>" in specials else None
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos)
    fast.save_pretrained(path)
    return fast


def make_smolvlm(path, max_frames):
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessor, SmolVLMProcessor, \
        SmolVLMVideoProcessor
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE
    torch.manual_seed(0)
    tok = byte_tokenizer(path, 49280, SMOL_SPECIALS)
    cfg = SmolVLMConfig(
        vision_config=SmolVLMVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, image_size=512, patch_size=16),
        text_config=LlamaConfig(architectures=["VLlama3ForCausalLM"], hidden_size=960, intermediate_size=2560,
                                num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5, vocab_size=49280,
                                rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192),
        scale_factor=4, image_token_id=tok.convert_tokens_to_ids("<image>"))
    model = SmolVLMForConditionalGeneration(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    mean_std = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    # do_sample_frames: as the hub's folders have it (the class default is off, and the
    # processor then encodes every frame it is given).
    videos = SmolVLMVideoProcessor(video_sampling={"fps": SMOL_FPS, "max_frames": max_frames,
                                                   "video_size": {"longest_edge": 2048}},
                                   size={"longest_edge": 2048}, max_image_size={"longest_edge": 512},
                                   do_sample_frames=True, fps=SMOL_FPS, num_frames=max_frames, **mean_std)
    images = SmolVLMImageProcessor(size={"longest_edge": 2048}, max_image_size={"longest_edge": 512}, **mean_std)
    proc = SmolVLMProcessor(image_processor=images, tokenizer=tok, video_processor=videos, image_seq_len=64,
                            chat_template=DEFAULT_CHAT_TEMPLATE)
    proc.save_pretrained(path)
    return model, proc


def smolvlm_time_to_first_token(model, proc, video, n):
    """transformers' SmolVLM2 path: PyAV frames with their metadata, the processor's
    sampling and two resizes, the tower and connector, then the prefill."""
    from transformers.video_utils import VideoMetadata
    t0 = time.perf_counter()
    c = av.open(video)
    s = c.streams.video[0]
    fps = float(s.average_rate)
    frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    meta = VideoMetadata(total_num_frames=len(frames), fps=fps, duration=len(frames) / fps,
                         frames_indices=list(range(len(frames))))
    t1 = time.perf_counter()
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What is happening in this video?"}]}]
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
    inputs = proc(text=[prompt], videos=[[frames]], video_metadata=[meta], num_frames=n, fps=SMOL_FPS,
                  do_sample_frames=True, return_tensors="pt")
    if inputs["pixel_values"].shape[1] != n:
        raise SystemExit(f"transformers sampled {inputs['pixel_values'].shape[1]} frames, not {n}")
    t2 = time.perf_counter()
    with torch.no_grad():
        m = model.model
        feats = m.get_image_features(inputs["pixel_values"], inputs.get("pixel_attention_mask"))
        t3 = time.perf_counter()
        ids = inputs["input_ids"]
        emb = m.inputs_merger(ids, m.get_input_embeddings()(ids), feats)
        int(model(inputs_embeds=emb).logits[0, -1].argmax())
    t4 = time.perf_counter()
    return {"decode_ms": (t1 - t0) * 1e3, "preprocess_ms": (t2 - t1) * 1e3, "encode_ms": (t3 - t2) * 1e3,
            "prefill_ms": (t4 - t3) * 1e3, "frames": feats.shape[0], "tokens": ids.shape[1]}


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
    quant, _, acts = quant.partition(":")
    decoder, _, tower = quant.partition("+")
    out = subprocess.run([binary, "ask", "--model", model_dir, "--video", video, "--prompt",
                          "What is happening in this video?", "--frames", str(n), "--device", device, "--quant", decoder,
                          "--vision-quant", tower or "f32", "--activations", acts or "int16", "--max-tokens", "1", "--json"],
                         check=True, capture_output=True, text=True).stdout
    v = json.loads(out)
    t = v["timings"]
    return {k: t[k] for k in ("decode_ms", "preprocess_ms", "encode_ms", "prefill_ms")} | {
        "load_s": t["load_s"], "frames": len(v["frames"]), "tokens": len(v["prompt_tokens"])}


def median(runs):
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("video")
    ap.add_argument("--bin", default="target/release/vidllm-native")
    ap.add_argument("--arch", default="video_llava", choices=["video_llava", "smolvlm"])
    ap.add_argument("--frames", default="8", help="frame counts, comma-separated")
    ap.add_argument("--devices", default="cpu")
    ap.add_argument("--quant", default="q4_1,q4_1+q8_0,q4_1+q8_0:int8,f32",
                    help="decoder quant[+tower quant][:activations], comma-separated")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    counts = [int(n) for n in a.frames.split(",")]
    stages = ["decode_ms", "preprocess_ms", "encode_ms", "prefill_ms"]
    print(f"{a.arch}, {os.path.basename(a.video)}; median of {a.reps}; ratio = transformers time / vidllm time "
          f"(> 1: vidllm faster)")
    print("| frames | visual tokens | runtime | " + " | ".join(stages) + " | first token ms | ratio |")
    print("|---" * (len(stages) + 5) + "|")
    with tempfile.TemporaryDirectory() as d:
        if a.arch == "smolvlm":
            model, proc = make_smolvlm(d, max(counts))
            hf = lambda n: smolvlm_time_to_first_token(model, proc, a.video, n)
        else:
            model = make_model(d)
            proc = VideoLlavaImageProcessor()
        for n in counts:
            if a.arch == "video_llava":
                ids = torch.tensor([[1] + [49151] * (n * 197) + list(range(300, 320))])
                hf = lambda n, ids=ids: hf_time_to_first_token(model, proc, a.video, n, ids)
            hf(n)  # warm-up
            ref = median([hf(n) for _ in range(a.reps)])
            rows = [("transformers (torch CPU, f32)", ref)]
            for dev in a.devices.split(","):
                for q in a.quant.split(","):
                    vidllm_time_to_first_token(a.bin, d, a.video, n, dev, q)  # warm-up
                    rows.append((f"vidllm {dev} {q}", median([vidllm_time_to_first_token(a.bin, d, a.video, n, dev, q)
                                                               for _ in range(a.reps)])))
            ref_total = sum(ref[s] for s in stages)
            visual = n * (64 if a.arch == "smolvlm" else 197)
            for name, r in rows:
                total = sum(r[s] for s in stages)
                frames = int(r.get("frames", n))
                print(f"| {frames} | {visual} | {name} | " + " | ".join(f"{r[s]:.0f}" for s in stages)
                      + f" | {total:.0f} | {ref_total / total:.2f} |", flush=True)


if __name__ == "__main__":
    main()
