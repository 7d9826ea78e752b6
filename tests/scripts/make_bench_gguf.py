#!/usr/bin/env python3
"""A LLaMA-architecture GGUF with random weights, for speed benchmarks only.

No real 1B-class weights can be downloaded here, and decode speed does not depend on
what the weights are: only on the shapes and the storage types. This writes a file in
the layout llama.cpp's quantizer gives (block structs with valid f16 scales, llama.cpp's
type choice per tensor for Q4_0 and Q4_K_M), with the tokenizer copied from a real GGUF
so that both llama.cpp and vidllm load it unchanged. Its answers are noise.

    python3 tests/scripts/make_bench_gguf.py --vocab-from SmolLM2-135M-Instruct.Q4_1.gguf \
        --shape tinyllama-1.1b --type q4_0 --out bench-1.1b-q4_0.gguf

Needs numpy and gguf-py (`pip install gguf`, or llama.cpp's `gguf-py` on PYTHONPATH).
"""
import argparse

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T, GGUFValueType

# Hyperparameters of the models whose shapes the benches use (from their config.json).
SHAPES = {
    # TinyLlama-1.1B: 22 layers of 2048, grouped-query attention with 4 KV heads.
    "tinyllama-1.1b": dict(n_embd=2048, n_layer=22, n_head=32, n_head_kv=4, n_ff=5632, ctx=2048, theta=10000.0),
    # SmolLM2-135M.
    "smollm2-135m": dict(n_embd=576, n_layer=30, n_head=9, n_head_kv=3, n_ff=1536, ctx=8192, theta=100000.0),
}

# Bytes per block, elements per block, and where the block's f16 scales sit (offset, value).
# Scales are set so weights stay small (|w| < ~0.5) and no f16 is inf or NaN.
LAYOUT = {
    T.Q4_0: (18, 32, [(0, 2e-3)]),
    T.Q5_0: (22, 32, [(0, 1e-3)]),
    T.Q8_0: (34, 32, [(0, 1e-4)]),
    T.Q4_K: (144, 256, [(0, 5e-5), (2, 5e-5)]),
    T.Q6_K: (210, 256, [(208, 5e-5)]),
}


# llama.cpp's quantizer falls back to these where rows are not whole 256-value blocks.
FALLBACK = {T.Q4_K: T.Q5_0, T.Q6_K: T.Q8_0}


def random_blocks(rng, qtype, rows, cols):
    size, per, scales = LAYOUT[qtype]
    data = np.frombuffer(rng.bytes(rows * cols // per * size), dtype=np.uint8).copy().reshape(-1, size)
    for off, value in scales:
        data[:, off : off + 2] = np.array([value], dtype=np.float16).view(np.uint8)
    return data.reshape(rows, cols // per * size)


def q4_k_m_more_bits(i, n):
    """llama.cpp's `use_more_bits`: which layers' attn_v / ffn_down Q4_K_M keeps in Q6_K."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab-from", required=True, help="a GGUF whose tokenizer.* keys are copied")
    ap.add_argument("--shape", choices=SHAPES, default="tinyllama-1.1b")
    ap.add_argument("--type", choices=["q4_0", "q4_k_m"], default="q4_0")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    s = SHAPES[a.shape]
    rng = np.random.default_rng(a.seed)

    src = gguf.GGUFReader(a.vocab_from)
    tokens = src.fields["tokenizer.ggml.tokens"]
    n_vocab = len(tokens.data)

    w = gguf.GGUFWriter(a.out, "llama")
    w.add_name(f"random {a.shape} {a.type} (benchmark only)")
    w.add_context_length(s["ctx"])
    w.add_embedding_length(s["n_embd"])
    w.add_feed_forward_length(s["n_ff"])
    w.add_block_count(s["n_layer"])
    w.add_head_count(s["n_head"])
    w.add_head_count_kv(s["n_head_kv"])
    w.add_rope_freq_base(s["theta"])
    w.add_rope_dimension_count(s["n_embd"] // s["n_head"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0 if a.type == "q4_0" else gguf.LlamaFileType.MOSTLY_Q4_K_M)
    for name, field in src.fields.items():
        if name.startswith("tokenizer."):
            vtype = field.types[0]
            sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
            w.add_key_value(name, field.contents(), vtype, sub_type=sub)

    e, f, n = s["n_embd"], s["n_ff"], s["n_layer"]
    kv = e // s["n_head"] * s["n_head_kv"]
    base = T.Q4_0 if a.type == "q4_0" else T.Q4_K

    def matrix(name, rows, cols, qtype=base):
        if cols % LAYOUT[qtype][1]:
            qtype = FALLBACK[qtype]
        w.add_tensor(name, random_blocks(rng, qtype, rows, cols), raw_dtype=qtype)

    # llama.cpp keeps the output matrix in Q6_K for both file types.
    matrix("token_embd.weight", n_vocab, e)
    w.add_tensor("output_norm.weight", np.ones(e, dtype=np.float32))
    matrix("output.weight", n_vocab, e, T.Q6_K)
    for i in range(n):
        more = a.type == "q4_k_m" and q4_k_m_more_bits(i, n)
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(e, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(e, dtype=np.float32))
        matrix(f"blk.{i}.attn_q.weight", e, e)
        matrix(f"blk.{i}.attn_k.weight", kv, e)
        matrix(f"blk.{i}.attn_v.weight", kv, e, T.Q6_K if more else base)
        matrix(f"blk.{i}.attn_output.weight", e, e)
        matrix(f"blk.{i}.ffn_gate.weight", f, e)
        matrix(f"blk.{i}.ffn_up.weight", f, e)
        matrix(f"blk.{i}.ffn_down.weight", e, f, T.Q6_K if more else base)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
