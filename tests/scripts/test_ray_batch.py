#!/usr/bin/env python3
"""examples/ray_batch.py on a local Ray cluster (2 workers) against `vidllm-native batch`.

Twenty jobs over the test clips (videos with frame options, questions without a video,
seeded sampling, stop strings, and a job whose video is missing) are answered twice: by
`vidllm-native batch`, and by the Ray Data recipe with one `vidllm.Model` per worker.
Every job's result must be the same: text, finish reason and token counts, or the error.

    python tests/scripts/test_ray_batch.py   (VIDLLM_NATIVE_BIN and VIDLLM_CLIPS set, the wheel installed)
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ["VIDLLM_NATIVE_BIN"]
CLIPS = Path(os.environ["VIDLLM_CLIPS"])
MODEL = ROOT / "tests/fixtures/tiny_video_llava"


def jobs():
    clips = ["bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4"]
    prompts = ["What happens?", "Describe the scene.", "Who is there?", "Is it day or night?"]
    out = []
    for i in range(16):
        job = {"id": f"v{i}", "video": f"clips/{clips[i % 4]}", "prompt": prompts[i // 4], "max_tokens": 6 + i % 5}
        if i % 3 == 0:
            job["frames"] = 4
        if i % 4 == 1:
            job.update(temperature=0.8, top_p=0.9, seed=i)
        if i % 5 == 2:
            job["stop"] = ["the"]
        out.append(job)
    out.append({"id": "t0", "prompt": "Hello there.", "max_tokens": 8})
    out.append({"id": "t1", "prompt": "Count to five.", "max_tokens": 8, "system": "Answer briefly."})
    out.append({"id": "n7", "video": "clips/bikes.mp4", "prompt": "And then?", "max_frames": 3, "sampling": "linspace", "frames": 3})
    out.append({"id": "bad", "video": "clips/missing.mp4", "prompt": "What happens?"})
    return out


def comparable(r):
    if r.get("error"):
        return {"id": str(r["id"]), "error": r["error"]}
    return {"id": str(r["id"]), "text": r["text"], "finish_reason": r["finish_reason"], "usage": r["usage"],
            "frames": r["timings"]["frames"]}


def main():
    with tempfile.TemporaryDirectory(prefix="vidllm-ray-") as tmp:
        tmp = Path(tmp)
        (tmp / "clips").symlink_to(CLIPS)
        manifest = tmp / "jobs.jsonl"
        manifest.write_text("".join(json.dumps(j) + "\n" for j in jobs()))
        common = ["--model", str(MODEL), "--quant", "f32", "--device", "cpu"]

        t0 = time.time()
        subprocess.run([BIN, "batch", *common, "--input", str(manifest), "--output", str(tmp / "batch.jsonl")], check=True)
        t_batch = time.time() - t0
        batch = {str(r["id"]): comparable(r) for r in map(json.loads, (tmp / "batch.jsonl").read_text().splitlines())}

        t0 = time.time()
        subprocess.run([sys.executable, str(ROOT / "examples/ray_batch.py"), *common, "--manifest", str(manifest),
                        "--output", str(tmp / "ray"), "--workers", "2", "--cpus-per-worker", "0.5",
                        "--batch-size", "4"], check=True)
        t_ray = time.time() - t0
        ray_rows = [json.loads(line) for f in sorted((tmp / "ray").glob("*.json")) for line in f.read_text().splitlines() if line]
        ray = {str(r["id"]): comparable(r) for r in ray_rows}

        assert len(ray_rows) == len(ray) == len(batch) == len(jobs()), (len(ray_rows), len(ray), len(batch))
        differ = [k for k in batch if batch[k] != ray.get(k)]
        for k in differ:
            print(f"{k}: batch {batch[k]}\n{' ' * len(k)}  ray   {ray.get(k)}")
        assert not differ, f"{len(differ)} of {len(batch)} results differ"
        errors = sum("error" in r for r in batch.values())
        print(f"ray_batch: {len(batch)} jobs ({errors} error), every result equal to vidllm-native batch's "
              f"(batch {t_batch:.1f} s, Ray with 2 workers {t_ray:.1f} s including Ray's start)")


if __name__ == "__main__":
    main()
