"""The real app in a subprocess (transformers backend, tiny random Gemma 4), driven through its /chat API.

The app serves a copy of the tiny model without end-of-turn ids: its random replies then end only at
max_tokens or when stopped, so a reply's length is known and a stopped one that went on would never end.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gradio_client import Client

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 300
ENDLESS = 100_000  # max_tokens of a reply only stop can end in time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log

    def client(self) -> Client:
        return Client(self.url, verbose=False)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _title(message: dict) -> str | None:
    return (message.get("metadata") or {}).get("title")


def chat(client: Client, text: str, **inputs) -> tuple:
    return client.predict({"text": text, "files": []}, api_name="/chat", **inputs)


def endless_copy(checkpoint: Path, out: Path) -> Path:
    shutil.copytree(checkpoint, out)
    config_path = out / "generation_config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"eos_token_id": []}))
    return out


@pytest.fixture(scope="module")
def app(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    tmp = tmp_path_factory.mktemp("app")
    model, log, port = endless_copy(tiny_model_dir, tmp / "tiny"), tmp / "app.log", _free_port()
    cmd = [sys.executable, "app.py", "--backend", "transformers", "--model", str(model)]
    cmd += ["--port", str(port), "--no-browser"]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    app = App(proc, f"http://127.0.0.1:{port}/", log)
    try:
        _wait_until_ready(app)
        yield app
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_until_ready(app: App) -> None:
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


def test_a_reply_streams_with_its_ttft_and_speed(app: App):
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


def test_stop_aborts_the_reply_and_frees_the_engine(app: App):
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
