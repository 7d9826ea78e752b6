#!/usr/bin/env python3
"""Answer a manifest of video questions with vidllm on a Ray cluster (Ray Data).

    python examples/ray_batch.py --model MODEL --manifest jobs.jsonl --output results/ \
        [--workers 2] [--device cpu] [--batch-size 4] [--address auto]

The manifest has the job lines of `vidllm-native batch`, one JSON object a line:

    {"id": "a1", "video": "clips/a.mp4", "prompt": "What happens?", "max_tokens": 64}

with the same optional fields (system, images, max_tokens, temperature, top_p, seed,
stop, frames, fps, max_frames, sampling, max_visual_tokens); relative media paths are
read from the manifest's folder. Ray reads the manifest as a table, so each field keeps
one type throughout (ids all strings, or all numbers). The pipeline is

    ray.data.read_json(manifest) -> map_batches(Answerer, one vidllm.Model per worker)
                                 -> write_json(output)

Each worker is an actor that loads the model once and answers its batches of rows; a
result row has the fields of the result line `vidllm-native batch` writes for the job
(`id`, `text`, `finish_reason`, `usage`, `timings`), or `id` and `error` for a job that
could not run (each row has all six, null where they do not apply).

On one machine the script starts a local Ray instance. On a multi-node cluster, start
Ray on every node (`ray start --head` on one, `ray start --address HEAD:6379` on the
others), install the `vidllm` wheel on each, put the model, the manifest and the media on
a path every node reads (a shared file system), and run the script on the head node with
`--address auto`: Ray places the `--workers` actors across the nodes' CPUs (or GPUs, with
`--gpus-per-worker`) and each writes its share of the output files.
"""

import argparse
import json
import os

import ray

# A job line's fields other than `id` and `prompt` (what vidllm.Model.ask takes).
OPTIONS = ["system", "images", "max_tokens", "temperature", "top_p", "seed", "stop",
           "frames", "fps", "max_frames", "sampling", "max_visual_tokens"]


class Answerer:
    """A Ray actor: one vidllm.Model, loaded once, answering batches of job rows."""

    def __init__(self, model, base, device="cpu", default_max_tokens=256, **load):
        import vidllm  # imported in the worker process, where the wheel is installed

        self.model = vidllm.Model.load(model, device=device, **load)
        self.base = base
        self.default_max_tokens = default_max_tokens

    def answer(self, row):
        media = lambda p: p if os.path.isabs(p) else os.path.join(self.base, p)
        opts = {k: row[k] for k in OPTIONS if row.get(k) is not None}
        opts.setdefault("max_tokens", self.default_max_tokens)
        if "images" in opts:
            opts["images"] = [media(p) for p in opts["images"]]
        video = row.get("video")
        out = {"id": row["id"], "text": None, "finish_reason": None, "usage": None, "timings": None, "error": None}
        try:
            out.update(self.model.ask(media(video) if video else None, row["prompt"], **opts).result())
        except (ValueError, RuntimeError) as e:
            out["error"] = str(e)
        return out

    def __call__(self, batch):
        import pyarrow as pa

        # Arrow rows as Python values: a field a job leaves out is None, integers stay
        # integers (pandas or numpy batches would make them floats, and NaN of a null).
        results = [self.answer(row) for row in batch.to_pylist()]
        # Every row has every column (None where it does not apply: `error` for an answer,
        # the answer's fields for an error), so that the blocks share one schema.
        return pa.Table.from_pylist(results)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="GGUF file or Hugging Face folder")
    ap.add_argument("--mmproj", help="llama.cpp's vision file, beside a text GGUF")
    ap.add_argument("--quant", help="a folder's decoder storage: q4_0 | q4_1 | q8_0 | f16 | f32")
    ap.add_argument("--manifest", required=True, help="JSONL jobs (vidllm-native batch's format)")
    ap.add_argument("--output", required=True, help="folder for the JSON result files")
    ap.add_argument("--workers", type=int, default=2, help="actors, each holding one model")
    # Ray Data also needs CPUs for reading the manifest and writing results: on a machine
    # whose every CPU a worker holds, nothing reads and the run waits (give workers a
    # fraction, as the 2-core test does with 0.5).
    ap.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs Ray reserves for each worker")
    ap.add_argument("--gpus-per-worker", type=float, default=0)
    ap.add_argument("--device", default="cpu", help="auto | gpu | cpu")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=256, help="max_tokens of a job that gives none")
    ap.add_argument("--address", help="a running cluster (auto, or HEAD:6379); default: start a local one")
    a = ap.parse_args()

    ray.init(address=a.address, include_dashboard=False, log_to_driver=True)
    manifest = os.path.abspath(a.manifest)
    load = {k: v for k, v in [("mmproj", a.mmproj), ("quant", a.quant)] if v}
    jobs = ray.data.read_json(manifest)
    results = jobs.map_batches(
        Answerer,
        fn_constructor_kwargs={"model": os.path.abspath(a.model), "base": os.path.dirname(manifest),
                               "device": a.device, "default_max_tokens": a.max_tokens, **load},
        compute=ray.data.ActorPoolStrategy(size=a.workers),
        num_cpus=a.cpus_per_worker,
        num_gpus=a.gpus_per_worker,
        batch_size=a.batch_size,
        batch_format="pyarrow",
    )
    results.write_json(a.output)
    print(f"results written to {a.output}")


if __name__ == "__main__":
    main()
