#!/usr/bin/env python3
"""Convert a MERV run (princetonvisualai/merv: Chung, Zhu et al. 2024, "Unifying Specialized
Visual Encoders for Video Language Models") into vidllm's MERV folder format.

    python3 tools/merv_convert.py RUN_DIR \
        --languagebind DIR --dinov2 DIR --vivit DIR --siglip DIR --llm DIR --out OUT_DIR

Inputs
  RUN_DIR            a MERV run folder: `config.json` (MERV's run config, the model part under
                     "model") and `checkpoints/latest-checkpoint.pt`, the torch pickle MERV's
                     training strategies write: {"model": {"projectors", "llm_backbone",
                     "feature_fusion"}, ...}. It is read with torch.load(weights_only=True) only
                     (no arbitrary code); a pickle that needs more than tensors and plain
                     containers is refused.
  --languagebind     Hugging Face folder of LanguageBind/LanguageBind_Video_merge (config.json
                     with a "vision_config", weights as safetensors or pytorch_model.bin)
  --dinov2           facebook/dinov2-with-registers-large (transformers Dinov2WithRegisters)
  --vivit            google/vivit-b-16x2-kinetics400 (+ its preprocessor_config.json)
  --siglip           google/siglip-base-patch16-224 (SiglipModel or SiglipVisionModel folder)
  --llm              the LLM the run was built on (meta-llama/Llama-2-7b-hf): config.json and
                     tokenizer.json (+ tokenizer_config.json, special_tokens_map.json)
  Encoder weights are not in MERV's checkpoint (MERV keeps them frozen and loads the public
  releases), so they come from these folders. MERV itself loads DINOv2 and SigLIP through timm
  (`vit_large_patch14_reg4_dinov2.lvd142m`, `vit_base_patch16_siglip_224`); the Hugging Face
  releases hold the same tensors under transformers names.

Output (OUT_DIR)
  config.json        {"model_type": "merv", "num_frames": 32, "pool": [T, 8, 8], "encoders": [...],
                     "fusion": {"embed_dim": E}, "text_config": {...}, "prompt": "In: {msg}\\nOut:"}
  model.safetensors  float32, keys:
    encoders.languagebind.vision_model.*      <- LanguageBind `vision_model.*` (text tower,
                                                 projections, logit_scale and the position_ids
                                                 buffer dropped)
    encoders.dinov2.{embeddings,encoder,layernorm}.*  <- Dinov2WithRegistersModel keys (a
                                                 `dinov2_with_registers.` wrapper prefix stripped;
                                                 the 37x37 position table is kept as published;
                                                 the runtime resamples it to "position_grid")
    encoders.vivit.{embeddings,encoder,layernorm}.*   <- VivitModel keys (`vivit.` prefix of the
                                                 VivitForVideoClassification release stripped;
                                                 classifier.* and pooler.* dropped)
    encoders.siglip.vision_model.*            <- SiglipVisionModel keys (text tower, logit_*,
                                                 and the unused MAP head vision_model.head.* dropped)
    projectors.<name>.{weight,bias}           <- checkpoint["model"]["projectors"]
                                                 ["<i>.projector.projector.{weight,bias}"]
                                                 (AveragePooling3DProjector -> LinearProjector ->
                                                 nn.Linear(d_e, D)); i is the encoder's position in
                                                 the run's video_backbone_ids
    fusion.query                              <- feature_fusion["Q"]                 (1, E)
    fusion.q_proj.weight / fusion.k_proj.weight <- feature_fusion["attention.q_proj_weight"] /
                                                 ["attention.k_proj_weight"]        (E, E) / (E, D)
                                                 (or rows [0:E] / [E:2E] of in_proj_weight)
    fusion.q_proj.bias / fusion.k_proj.bias   <- feature_fusion["attention.in_proj_bias"][0:E] / [E:2E]
                                                 (v_proj_weight, in_proj_bias[2E:], out_proj.* are
                                                 never used by MERV's forward and are not written)
    language_model.model.* / language_model.lm_head.weight
                                              <- llm_backbone["llm.model.*"] / ["llm.lm_head.weight"]
                                                 (rotary inv_freq buffers dropped). Rows are kept
                                                 as MERV padded them (LLaMA-2: 32000 + <PAD> ->
                                                 32064); text_config.vocab_size is set to the rows.
  tokenizer.json, tokenizer_config.json, special_tokens_map.json (and tokenizer.model) copied
  from --llm. MERV adds a "<PAD>" token at id 32000; it never appears in a prompt.

Only what MERV's released models use is accepted: video_backbone_ids
[languagebind-video-noclass, dinov2-video-all-tokens, vivit-google-b-all-no-cls-16frames,
siglip-vit-b16-224px-all-no-cls], num_frames [16, 16, 32, 16], arch_specifier ending in
"3davg+linear" (MERV-Full "3davg+linear", MERV-Base "no-align+3davg+linear"), feature_fusion
"cross_attention_avg_lq", an llm_backbone_id ending in "-pure" (prompt "In: {msg}\\nOut:").
Anything else exits with status 2 and a message.

Needs: torch, safetensors (no transformers).
"""
import argparse, json, math, os, shutil, struct, sys

try:
    import torch
except ImportError:  # pragma: no cover
    print("merv_convert: needs torch (pip install torch safetensors)", file=sys.stderr)
    sys.exit(2)

ENCODERS = ["languagebind", "dinov2", "vivit", "siglip"]
BACKBONE_IDS = ["languagebind-video-noclass", "dinov2-video-all-tokens",
                "vivit-google-b-all-no-cls-16frames", "siglip-vit-b16-224px-all-no-cls"]
NUM_FRAMES = [16, 16, 32, 16]
IMAGE_SIZE = 224                       # MERV's default_image_size for every encoder
OPENAI_MEAN, OPENAI_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
HALF = [0.5, 0.5, 0.5]

# Class defaults of each encoder's config (filled in where a saved config leaves a key out).
LANGUAGEBIND_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                             num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu",
                             layer_norm_eps=1e-5, add_time_attn=False, num_frames=1)
DINOV2_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, hidden_act="gelu",
                       layer_norm_eps=1e-6, image_size=224, patch_size=16, num_channels=3, qkv_bias=True,
                       layerscale_value=1.0, use_swiglu_ffn=False, num_register_tokens=4)
VIVIT_DEFAULTS = dict(image_size=224, num_frames=32, tubelet_size=[2, 16, 16], num_channels=3, hidden_size=768,
                      num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, hidden_act="gelu_fast",
                      layer_norm_eps=1e-6, qkv_bias=True)
SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                       layer_norm_eps=1e-6)


class Refuse(Exception):
    pass


def need(cond, msg):
    if not cond:
        raise Refuse(msg)


def read_json(path, what):
    need(os.path.isfile(path), f"{what}: missing {path}")
    with open(path) as f:
        return json.load(f)


def load_weights(folder, what):
    """All tensors of a Hugging Face folder: model.safetensors, a sharded safetensors index, or
    pytorch_model.bin (torch.load with weights_only=True)."""
    need(os.path.isdir(folder), f"{what}: {folder} is not a folder")
    from safetensors.torch import load_file
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    binf = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        out = {}
        for shard in sorted(set(read_json(index, what)["weight_map"].values())):
            out.update(load_file(os.path.join(folder, shard)))
        return out
    if os.path.isfile(binf):
        try:
            return torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise Refuse(f"{what}: {binf} cannot be read with weights_only=True ({e})")
    raise Refuse(f"{what}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin in {folder}")


def filled(cfg, defaults):
    out = dict(defaults)
    out.update({k: v for k, v in cfg.items() if not k.startswith("_")})
    return out


def preprocess(kind, mean, std):
    """How MERV prepares each frame at inference (see the report in the generator's docstring)."""
    if kind == "languagebind":
        return {"resize": "shortest_edge", "size": IMAGE_SIZE, "crop": IMAGE_SIZE, "interpolation": "bilinear",
                "antialias": False, "rescale": 1 / 255, "mean": mean, "std": std,
                "backend": "torch_float",
                "order": ["rescale", "normalize", "resize", "center_crop"],
                "resize_rounding": "short side -> size; long side floor(long / short * size)",
                "crop_rounding": "offset = python round((in - crop) / 2), ties to even",
                "hflip_p": 0.5,
                "hflip_note": "MERV's transform ends in RandomHorizontalFlipVideo(p=0.5), applied at inference "
                              "too (it does not look at eval mode); a deterministic runtime does not flip"}
    interp = "bilinear" if kind == "vivit" else "bicubic"
    return {"resize": "squash", "size": IMAGE_SIZE, "crop": IMAGE_SIZE, "interpolation": interp,
            "antialias": True, "rescale": 1 / 255, "mean": mean, "std": std, "backend": "pil_uint8",
            "order": ["resize", "center_crop", "rescale", "normalize"]}


def convert_languagebind(folder):
    cfg = read_json(os.path.join(folder, "config.json"), "--languagebind")
    vcfg = cfg.get("vision_config", cfg)
    vcfg = filled(vcfg, LANGUAGEBIND_DEFAULTS)
    need(vcfg.get("add_time_attn"), "--languagebind: vision_config.add_time_attn is not true (not a video tower?)")
    sd = load_weights(folder, "--languagebind")
    need(not any("lora_" in k for k in sd), "--languagebind: LoRA tensors found; use the merged release "
         "(LanguageBind/LanguageBind_Video_merge), as MERV does")
    out = {k: v for k, v in sd.items() if k.startswith("vision_model.") and not k.endswith("position_ids")}
    need(out, "--languagebind: no vision_model.* tensors")
    need("vision_model.encoder.layers.0.temporal_attn.q_proj.weight" in out,
         "--languagebind: no temporal_attn tensors in vision_model.encoder.layers.0")
    keep = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
            "image_size", "patch_size", "hidden_act", "layer_norm_eps", "add_time_attn", "num_frames",
            "attention_dropout", "projection_dim", "force_patch_dropout"]
    conf = {k: vcfg[k] for k in keep if k in vcfg}
    need(conf["image_size"] == IMAGE_SIZE, f"--languagebind: image_size {conf['image_size']} != {IMAGE_SIZE}")
    return conf, out, {"feature_layer": -2, "frames": 16, "drop_prefix": 1,
                       "model_type": "languagebind_video",
                       "preprocess": preprocess("languagebind", OPENAI_MEAN, OPENAI_STD)}


def convert_dinov2(folder):
    cfg = filled(read_json(os.path.join(folder, "config.json"), "--dinov2"), DINOV2_DEFAULTS)
    need(not cfg.get("use_swiglu_ffn"), "--dinov2: use_swiglu_ffn is true (ViT-g); MERV uses ViT-L/14")
    need(cfg.get("num_register_tokens", 0) == 4, "--dinov2: expected 4 register tokens")
    sd = load_weights(folder, "--dinov2")
    out = {}
    for k, v in sd.items():
        for p in ("dinov2_with_registers.", "dinov2."):
            if k.startswith(p):
                k = k[len(p):]
        if k.startswith(("embeddings.", "encoder.", "layernorm.")):
            out[k] = v
    need("embeddings.position_embeddings" in out, "--dinov2: no embeddings.position_embeddings")
    grid = cfg["image_size"] // cfg["patch_size"]
    need(out["embeddings.position_embeddings"].shape[1] == 1 + grid * grid,
         "--dinov2: position table does not match image_size / patch_size")
    g = IMAGE_SIZE // cfg["patch_size"]
    keep = ["hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio", "hidden_act", "layer_norm_eps",
            "image_size", "patch_size", "num_channels", "qkv_bias", "layerscale_value", "use_swiglu_ffn",
            "num_register_tokens"]
    conf = {k: cfg[k] for k in keep}
    return conf, out, {"feature_layer": -2, "frames": 16, "drop_prefix": 1 + conf["num_register_tokens"],
                       "model_type": "dinov2_with_registers", "position_grid": [g, g],
                       "position_resample": {"from": [grid, grid], "to": [g, g], "mode": "bicubic",
                                             "antialias": True, "align_corners": False,
                                             "how": "timm resample_abs_pos_embed at load: class row kept, "
                                                    "patch rows F.interpolate(size=to, bicubic, antialias)"},
                       "preprocess": preprocess("dinov2", IMAGENET_MEAN, IMAGENET_STD)}


def convert_vivit(folder):
    cfg = filled(read_json(os.path.join(folder, "config.json"), "--vivit"), VIVIT_DEFAULTS)
    # MERV: VivitModel.from_pretrained(..., image_size=224, num_frames=32)
    cfg["image_size"], cfg["num_frames"] = IMAGE_SIZE, 32
    tub = list(cfg["tubelet_size"])
    need(cfg["num_frames"] // tub[0] == 16, "--vivit: 32 frames / tubelet time must be 16 steps")
    sd = load_weights(folder, "--vivit")
    out = {}
    for k, v in sd.items():
        if k.startswith("vivit."):
            k = k[len("vivit."):]
        if k.startswith(("embeddings.", "encoder.", "layernorm.")):
            out[k] = v
    n = (IMAGE_SIZE // tub[1]) * (IMAGE_SIZE // tub[2]) * 16
    need(out.get("embeddings.position_embeddings") is not None
         and out["embeddings.position_embeddings"].shape[1] == n + 1,
         f"--vivit: embeddings.position_embeddings must have {n + 1} rows")
    pp = os.path.join(folder, "preprocessor_config.json")
    mean, std = HALF, HALF          # VivitImageProcessor defaults (IMAGENET_STANDARD_*)
    if os.path.isfile(pp):
        p = read_json(pp, "--vivit")
        mean, std = p.get("image_mean", mean), p.get("image_std", std)
    keep = ["image_size", "num_frames", "tubelet_size", "num_channels", "hidden_size", "num_hidden_layers",
            "num_attention_heads", "intermediate_size", "hidden_act", "layer_norm_eps", "qkv_bias"]
    conf = {k: cfg[k] for k in keep}
    return conf, out, {"feature_layer": "last", "frames": 32, "drop_prefix": 1, "model_type": "vivit",
                       "preprocess": preprocess("vivit", list(mean), list(std))}


def convert_siglip(folder):
    cfg = read_json(os.path.join(folder, "config.json"), "--siglip")
    cfg = filled(cfg.get("vision_config", cfg), SIGLIP_DEFAULTS)
    sd = load_weights(folder, "--siglip")
    out = {k: v for k, v in sd.items() if k.startswith("vision_model.") and not k.startswith("vision_model.head.")
           and not k.endswith("position_ids")}
    need(out, "--siglip: no vision_model.* tensors")
    need(cfg["image_size"] == IMAGE_SIZE, f"--siglip: image_size {cfg['image_size']} != {IMAGE_SIZE} "
         "(MERV uses vit_base_patch16_siglip_224)")
    keep = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
            "image_size", "patch_size", "hidden_act", "layer_norm_eps"]
    conf = {k: cfg[k] for k in keep}
    hf_act = conf["hidden_act"]
    conf["hidden_act"] = "gelu"
    return conf, out, {"feature_layer": -2, "frames": 16, "drop_prefix": 0, "model_type": "siglip_vision_model",
                       "config_overrides": {"hidden_act": f"gelu (exact erf): MERV runs SigLIP through timm's "
                                            f"vit_base_patch16_siglip_224, whose MLP uses nn.GELU; the "
                                            f"Hugging Face config says {hf_act}"},
                       "preprocess": preprocess("siglip", HALF, HALF)}


def f32(t):
    return t.detach().to(torch.float32).contiguous()


def save_streaming(tensors, path, metadata):
    """A safetensors file written one tensor at a time (a 7B model in f32 is ~27 GB; the peak
    memory stays at the inputs plus one tensor)."""
    header, off = {"__metadata__": metadata}, 0
    for k, t in tensors.items():
        n = t.numel() * 4
        header[k] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for k, t in tensors.items():
            f.write(f32(t).numpy().tobytes())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="MERV run folder (config.json + checkpoints/latest-checkpoint.pt)")
    for e in ENCODERS:
        ap.add_argument(f"--{e}", required=True, help=f"{e} Hugging Face folder")
    ap.add_argument("--llm", required=True, help="LLM folder (config.json + tokenizer files)")
    ap.add_argument("--out", required=True, help="output folder")
    a = ap.parse_args(argv)

    run_cfg = read_json(os.path.join(a.run, "config.json"), "run")
    m = run_cfg.get("model", run_cfg)
    need(list(m.get("video_backbone_ids", [])) == BACKBONE_IDS,
         f"run: video_backbone_ids {m.get('video_backbone_ids')} != {BACKBONE_IDS}")
    nf = m.get("num_frames")
    nf = [nf] * 4 if isinstance(nf, int) else list(nf or [])
    need(nf == NUM_FRAMES, f"run: num_frames {nf} != {NUM_FRAMES}")
    arch = m.get("arch_specifier", "")
    need(arch.split("+")[-2:] == ["3davg", "linear"] and "frame" not in arch,
         f"run: arch_specifier {arch!r} is not '[no-align+]3davg+linear'")
    need(m.get("feature_fusion") == "cross_attention_avg_lq",
         f"run: feature_fusion {m.get('feature_fusion')!r} != 'cross_attention_avg_lq'")
    ptl = int(m.get("projector_token_length", 64))
    side = int(round(math.sqrt(ptl)))
    need(side * side == ptl, "run: projector_token_length is not a square")
    need(int(m.get("visual_feature_length", 16 * ptl)) == 16 * ptl,
         "run: visual_feature_length != 16 * projector_token_length")
    llm_id = m.get("llm_backbone_id", "")
    need(llm_id.endswith("-pure") and llm_id.startswith("llama2"),
         f"run: llm_backbone_id {llm_id!r}: only LLaMA-2 '-pure' runs (prompt 'In: {{msg}}\\nOut:') are supported")

    ckpt_path = os.path.join(a.run, "checkpoints", "latest-checkpoint.pt")
    need(os.path.isfile(ckpt_path), f"run: missing {ckpt_path}")
    try:
        try:
            ck = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise Refuse(f"run: {ckpt_path} cannot be read with weights_only=True ({e})")
    need(isinstance(ck, dict) and "model" in ck, "run: checkpoint has no 'model'")
    model = ck["model"]
    for part in ("projectors", "llm_backbone", "feature_fusion"):
        need(part in model and len(model[part]) > 0, f"run: checkpoint['model'] has no '{part}'")

    tensors = {}
    encoders = []
    convs = {"languagebind": convert_languagebind, "dinov2": convert_dinov2, "vivit": convert_vivit,
             "siglip": convert_siglip}
    dims = {}
    for name in ENCODERS:
        conf, sd, extra = convs[name](getattr(a, name))
        dims[name] = conf["hidden_size"]
        for k, v in sd.items():
            tensors[f"encoders.{name}.{k}"] = v
        enc = {"name": name, "model_type": extra.pop("model_type"), "config": conf}
        enc.update(extra)
        encoders.append(enc)

    proj = model["projectors"]
    need(not any("layernorm" in k for k in proj), "run: projectors have a pre-projection LayerNorm (unsupported)")
    D = None
    for i, name in enumerate(ENCODERS):
        w, b = proj.get(f"{i}.projector.projector.weight"), proj.get(f"{i}.projector.projector.bias")
        need(w is not None and b is not None, f"run: projectors has no {i}.projector.projector.{{weight,bias}}")
        need(w.shape[1] == dims[name], f"run: projector {i} takes {w.shape[1]} features, {name} gives {dims[name]}")
        need(D is None or w.shape[0] == D, "run: projectors disagree on the LLM width")
        D = w.shape[0]
        tensors[f"projectors.{name}.weight"], tensors[f"projectors.{name}.bias"] = w, b

    ff = model["feature_fusion"]
    need("pe" not in ff, "run: feature_fusion has a positional embedding 'pe' (unsupported)")
    need("Q" in ff and "attention.in_proj_bias" in ff, "run: feature_fusion lacks Q / attention.in_proj_bias")
    q = ff["Q"]
    E = q.shape[-1]
    if "attention.q_proj_weight" in ff:
        wq, wk = ff["attention.q_proj_weight"], ff["attention.k_proj_weight"]
    else:
        need("attention.in_proj_weight" in ff, "run: feature_fusion has neither q_proj_weight nor in_proj_weight")
        wq, wk = ff["attention.in_proj_weight"][:E], ff["attention.in_proj_weight"][E:2 * E]
    need(tuple(wq.shape) == (E, E) and tuple(wk.shape) == (E, D),
         f"run: fusion shapes q {tuple(wq.shape)} k {tuple(wk.shape)} (E={E}, D={D})")
    bias = ff["attention.in_proj_bias"]
    tensors["fusion.query"] = q.reshape(1, E)
    tensors["fusion.q_proj.weight"], tensors["fusion.q_proj.bias"] = wq, bias[:E]
    tensors["fusion.k_proj.weight"], tensors["fusion.k_proj.bias"] = wk, bias[E:2 * E]

    llm = model["llm_backbone"]
    for k, v in llm.items():
        if k.endswith("rotary_emb.inv_freq"):
            continue
        need(k.startswith("llm."), f"run: llm_backbone key {k!r} does not start with 'llm.'")
        tensors["language_model." + k[len("llm."):]] = v
    emb = tensors.get("language_model.model.embed_tokens.weight")
    need(emb is not None, "run: llm_backbone has no llm.model.embed_tokens.weight")
    need(emb.shape[1] == D, f"run: LLM width {emb.shape[1]} != projector output {D}")
    if "language_model.lm_head.weight" not in tensors:
        tensors["language_model.lm_head.weight"] = emb     # tied (not the case for LLaMA-2)
    rows = emb.shape[0]
    need(tensors["language_model.lm_head.weight"].shape[0] == rows, "run: lm_head rows != embed_tokens rows")

    text = read_json(os.path.join(a.llm, "config.json"), "--llm")
    need(text.get("model_type", "llama") == "llama", f"--llm: model_type {text.get('model_type')!r} is not llama")
    need(text.get("hidden_size") == D, f"--llm: hidden_size {text.get('hidden_size')} != checkpoint width {D}")
    text = {k: v for k, v in text.items() if not k.startswith("_")}
    text["vocab_size"], text["model_type"] = int(rows), "llama"
    need(os.path.isfile(os.path.join(a.llm, "tokenizer.json")), f"--llm: missing {a.llm}/tokenizer.json")

    os.makedirs(a.out, exist_ok=True)
    cfg = {"model_type": "merv", "num_frames": 32, "pool": [16, side, side], "encoders": encoders,
           "fusion": {"embed_dim": int(E)}, "text_config": text, "prompt": "In: {msg}\nOut:",
           "merv": {"model_id": m.get("model_id"), "arch_specifier": arch, "feature_fusion": m["feature_fusion"],
                    "video_backbone_ids": BACKBONE_IDS, "num_frames": NUM_FRAMES, "llm_backbone_id": llm_id}}
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    for fn in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        src = os.path.join(a.llm, fn)
        if os.path.isfile(src):
            shutil.copy(src, os.path.join(a.out, fn))
    save_streaming(tensors, os.path.join(a.out, "model.safetensors"),
                   {"format": "pt", "converter": "tools/merv_convert.py"})
    print(f"merv_convert: wrote {a.out} ({len(tensors)} tensors, E={E}, D={D}, vocab rows {rows})", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except Refuse as e:
        print(f"merv_convert: {e}", file=sys.stderr)
        sys.exit(2)
