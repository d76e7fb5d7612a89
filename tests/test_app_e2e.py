"""The real app in a subprocess (transformers backend, tiny random Gemma 4), driven through its /chat API.

The app serves a copy of the tiny vision model (processor included) without end-of-turn ids: its random
replies then end only at max_tokens or when stopped, so a reply's length is known and a stopped one that
went on would never end.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image
from transformers import AutoProcessor

from media import load_video
from tests.app_process import STARTUP_TIMEOUT_S, AppProcess, endless_copy
from tests.test_media import write_video

ENDLESS = 100_000  # max_tokens of a reply only stop can end in time


def _title(message: dict) -> str | None:
    return (message.get("metadata") or {}).get("title")


def chat(client: Client, text: str, **inputs) -> tuple:
    return client.predict({"text": text, "files": []}, api_name="/chat", **inputs)


@pytest.fixture(scope="module")
def app(tiny_vision_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppProcess]:
    tmp = tmp_path_factory.mktemp("app")
    app = AppProcess(endless_copy(tiny_vision_model_dir, tmp / "tiny"), tmp)
    try:
        _wait_until_ready(app)
        yield app
    finally:
        app.stop()


def _wait_until_ready(app: AppProcess) -> None:
    """Until the server answers and a message gets a real reply instead of the 'still loading' note."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    client = None
    while time.monotonic() < deadline:
        if app.proc.poll() is not None:
            pytest.fail(f"app exited with {app.proc.returncode}:\n{app.log_text()}")
        try:
            client = client or app.client()
        except Exception:  # not serving yet
            time.sleep(1)
            continue
        messages, *_ = chat(client, "ping", max_tokens=1)
        titles = [_title(m) for m in messages]
        assert not any(t and t.startswith("❌") for t in titles), f"engine failed: {messages}\n{app.log_text()}"
        if not any(t and t.startswith("⏳") for t in titles):
            client.close()
            return
        time.sleep(1)
    pytest.fail(f"the app was not ready after {STARTUP_TIMEOUT_S} s:\n{app.log_text()}")


def test_a_reply_streams_with_its_ttft_and_speed(app: AppProcess):
    client = app.client()
    job = client.submit({"text": "Tell me a story.", "files": []}, max_tokens=40, api_name="/chat")
    updates = list(job)
    client.close()
    assert len(updates) >= 3, f"only {len(updates)} updates"
    messages, ttft, tok_s, tokens = updates[-1]
    assert ttft > 0 and tok_s > 0 and tokens == 40
    stats = messages[-1]
    assert _title(stats) == f"TTFT {ttft:.2f} s · {tok_s:.1f} tok/s · 40 tokens"
    assert stats["content"][0]["text"].endswith("hit the token limit")
    # The live numbers grew while the reply streamed.
    streamed_tokens = [u[3] for u in updates[:-1]]
    assert streamed_tokens == sorted(streamed_tokens) and 0 < streamed_tokens[0] < 40


def test_stop_aborts_the_reply_and_frees_the_engine(app: AppProcess):
    client = app.client()
    job = client.submit({"text": "Go on forever.", "files": []}, max_tokens=ENDLESS, api_name="/chat")
    deadline = time.monotonic() + 60
    while not job.outputs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.outputs(), "no streamed update"
    job.cancel()
    while "stopped by the user" not in app.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "stopped by the user" in app.log_text(), app.log_text()[-3000:]
    # The transformers engine runs one reply at a time: had the stopped one gone on, this one would never start.
    after = client.submit({"text": "And now?", "files": []}, max_tokens=3, api_name="/chat")
    messages, ttft, tok_s, tokens = after.result(timeout=60)
    client.close()
    assert tokens == 3 and ttft > 0
    assert _title(messages[-1]).startswith("TTFT")


def prompt_tokens(messages: list[dict]) -> int:
    """From the reply's stats note, e.g. "prompt 31 tokens · 0.52 s in all · hit the token limit"."""
    return int(re.search(r"prompt (\d+) tokens", messages[-1]["content"][0]["text"])[1])


def streamed(app: AppProcess, message: dict, **inputs) -> list[dict]:
    """The reply's messages, in a conversation of its own (a client's calls share their history)."""
    client = app.client()
    updates = list(client.submit(message, api_name="/chat", **inputs))
    client.close()
    assert len(updates) >= 3, f"only {len(updates)} updates"
    messages, ttft, tok_s, tokens = updates[-1]
    assert ttft > 0 and tok_s > 0 and tokens == inputs["max_tokens"]
    return messages


@pytest.mark.parametrize(("detail", "soft_tokens"), [("medium", 266), ("minimal", 63)])
def test_an_image_question_streams_a_reply_with_the_image_expanded_in_the_prompt(app, tmp_path, detail, soft_tokens):
    image = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(image)
    text_only = prompt_tokens(streamed(app, {"text": "What is this?", "files": []}, max_tokens=20))
    question = {"text": "What is this?", "files": [handle_file(str(image))]}
    with_image = prompt_tokens(streamed(app, question, max_tokens=20, image_detail=detail))
    # The template's one <|image|> became <|image>, the image's soft tokens and <image|>.
    assert with_image - text_only == soft_tokens + 2


def test_a_video_question_shows_the_frames_seen_and_streams_a_reply(app, tiny_vision_model_dir, tmp_path):
    video = write_video(tmp_path / "clip.mp4", 40, 10.0, size=(128, 96))  # 4 s
    messages = streamed(app, {"text": "What happens?", "files": [handle_file(str(video))]}, max_tokens=20)
    clip = load_video(video)
    frames = messages[0]
    assert _title(frames) == "🎞️ clip.mp4: the 4 frames the model sees (00:00–00:03)"
    assert Image.open(frames["content"][1]).size == clip.contact_sheet().size
    # What Gemma 4's processor makes of those frames: each stamped mm:ss and expanded into its soft tokens.
    processor = AutoProcessor.from_pretrained(tiny_vision_model_dir)
    content = [{"type": "video"}, {"type": "text", "text": "What happens?"}]
    conversation = [{"role": "user", "content": content}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    expected = processor(
        text=prompt,
        videos=[clip.as_array()],
        video_metadata=[clip.hf_metadata()],
        do_sample_frames=False,
        add_special_tokens=False,
    )["input_ids"][0]
    assert expected.count(processor.video_token_id) == 4 * 63
    assert prompt_tokens(messages) == len(expected)


def test_an_unreadable_attachment_is_answered_in_the_chat(app, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(bytes(range(256)) * 40)
    client = app.client()
    messages, *_ = client.predict({"text": "What happens?", "files": [handle_file(str(broken))]}, api_name="/chat")
    client.close()
    assert _title(messages[0]).startswith("⚠️ broken.mp4 could not be read as a video")


def test_status_reports_the_ready_engine_its_timeline_and_the_last_reply(app: AppProcess):
    client = app.client()
    messages, ttft, tok_s, tokens = client.predict({"text": "Hi", "files": []}, max_tokens=5, api_name="/chat")
    client.close()
    status = httpx.get(f"{app.url}status").json()
    assert (status["stage"], status["ready"], status["failed"]) == ("ready", True, False)
    assert status["backend"] == "transformers" and status["model"].endswith("tiny")
    assert status["gpu"] is None and status["stats"]["gpu_memory_used_gib"] is None  # the CPU
    assert {"imports", "gradio imported", "page served"} <= set(status["startup"])
    assert list(status["startup"].values()) == sorted(status["startup"].values())
    assert status["last_reply"]["output_tokens"] == tokens == 5 and status["last_reply"]["ttft_s"] == ttft
