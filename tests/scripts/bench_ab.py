#!/usr/bin/env python3
"""Two builds or settings of `vidllm-native bench` against each other, interleaved in ABBA
order, on a host whose speed drifts (a shared VM's neighbours move a memory-bound decode by
10-20% from one minute to the next): each round runs A, B, B, A, so a drift within the round
falls on both, and the result is the median of the pairs' ratios B / A and how many pairs B
won, next to each side's median and range. A benchmark, not a test.

    python3 tests/scripts/bench_ab.py --model FILE.gguf --a BIN [--b BIN2] \
        [--a-env VAR=VALUE ...] [--b-env VAR=VALUE ...] [--rounds 8] [--threads 2] \
        [--metric decode|prefill] [-- extra bench arguments]

For example, the weights' huge pages on and off in one binary:

    python3 tests/scripts/bench_ab.py --model SmolLM2-135M-Instruct.Q8_0.gguf \
        --a target/release/vidllm-native --a-env VIDLLM_HUGE_PAGES=0

Each run is `bench --device cpu --prompt-tokens 16 --gen-tokens 128 --reps 1 --json` unless
the extra arguments say otherwise (`--metric prefill` with `--prompt-tokens 512`, say; a
software GPU with `--device gpu` and the driver in both sides' environment, e.g.
`--a-env VK_ICD_FILENAMES=/usr/share/vulkan/icd.d/lvp_icd.x86_64.json` and the same `--b-env`).
"""
import argparse, json, os, statistics, subprocess, sys


def env_of(pairs, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep:
            sys.exit(f"bench_ab: {p!r} is not VAR=VALUE")
        env[key] = value
    return env


def rate(binary, env, model, extra, metric):
    args = [binary, "bench", "--model", model, "--json"]
    defaults = {"--device": "cpu", "--prompt-tokens": "16", "--gen-tokens": "128", "--reps": "1"}
    for flag, value in defaults.items():
        if flag not in extra:
            args += [flag, value]
    out = subprocess.run(args + extra, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"bench_ab: {' '.join(args + extra)} failed:\n{out.stderr.strip()}")
    return json.loads(out.stdout)[f"{metric}_tok_s"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--a", required=True, help="vidllm-native binary A")
    ap.add_argument("--b", help="binary B (default: A's, with --b-env)")
    ap.add_argument("--a-env", nargs="*", default=[], metavar="VAR=VALUE")
    ap.add_argument("--b-env", nargs="*", default=[], metavar="VAR=VALUE")
    ap.add_argument("--rounds", type=int, default=8, help="ABBA rounds (two pairs each)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--metric", choices=["decode", "prefill"], default="decode")
    ap.add_argument("extra", nargs="*", help="after --: more `bench` arguments for both")
    a = ap.parse_args()
    b_bin = a.b or a.a
    if b_bin == a.a and a.a_env == a.b_env:
        sys.exit("bench_ab: A and B are the same binary with the same settings")
    sides = {"A": (a.a, env_of(a.a_env, a.threads)), "B": (b_bin, env_of(a.b_env, a.threads))}
    run = lambda side: rate(sides[side][0], sides[side][1], a.model, a.extra, a.metric)
    pairs = []
    for r in range(a.rounds):
        a1, b1, b2, a2 = run("A"), run("B"), run("B"), run("A")
        pairs += [(a1, b1), (a2, b2)]
        print(f"round {r + 1}: A {a1:.1f} {a2:.1f}  B {b1:.1f} {b2:.1f} tok/s", file=sys.stderr)
    av = [p[0] for p in pairs]
    bv = [p[1] for p in pairs]
    ratios = [y / x for x, y in pairs]
    label = lambda side: f"{sides[side][0]} {' '.join(a.a_env if side == 'A' else a.b_env)}".strip()
    print(f"{os.path.basename(a.model)}, {a.metric} tok/s, {a.threads} threads, {len(pairs)} pairs (ABBA):")
    print(f"  A ({label('A')}): median {statistics.median(av):.1f} ({min(av):.1f}-{max(av):.1f})")
    print(f"  B ({label('B')}): median {statistics.median(bv):.1f} ({min(bv):.1f}-{max(bv):.1f})")
    wins = sum(y > x for x, y in pairs)
    print(f"  B / A: median of the pairs {statistics.median(ratios):.3f}, B faster in {wins} of {len(pairs)}")


if __name__ == "__main__":
    main()
