"""GET /status against the Engine doubles, served in-process: the engine loading, ready (with the last reply's
numbers and the start-up timeline), failed and restarting; and behind the page's login when there is one."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from gradio_client import Client

from chat import ui
from chat.status import EngineView
from engine import timeline
from engine.base import Stage
from engine.settings import EngineSettings
from tests.app_process import free_port
from tests.fakes import FakeEngine, FlakyEngine, PacedEngine

H200 = "NVIDIA H200"


@contextmanager
def serve(engine, auth: list[tuple[str, str]] | None = None) -> Iterator[tuple[str, EngineView]]:
    """The app over `engine` as app.py serves it, its view naming a GPU: (url, view)."""
    view = EngineView(engine, gpu_name=lambda: H200)
    demo = ui.build_ui(engine, EngineSettings(), view=view)
    demo.queue()
    demo.launch(server_port=free_port(), prevent_thread_lock=True, quiet=True, auth=auth, **ui.launch_options(view))
    try:
        yield demo.local_url, view
    finally:
        demo.close()


def get_status(url: str) -> dict:
    response = httpx.get(f"{url}status")
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    return response.json()


@pytest.fixture
def startup(monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """A start-up timeline of this test's own."""
    monkeypatch.setattr(timeline, "_origin", time.time() - 10.0)
    monkeypatch.setattr(timeline, "_marks", {})
    timeline.mark("imports")
    return timeline.marks()


def test_status_while_the_engine_loads(startup):
    with serve(FakeEngine(Stage.LOADING, "shard 3/7", 0.42)) as (url, _):
        status = get_status(url)
    assert status == {
        "stage": "loading weights",
        "detail": "shard 3/7",
        "progress": 0.42,
        "ready": False,
        "failed": False,
        "restarting": False,
        "model": "fake/gemma",
        "backend": "fake",
        "gpu": H200,
        "max_model_len": None,
        "notes": [],
        "stats": {
            "kv_cache_usage": 0.25,
            "running": 1,
            "waiting": 0,
            "gpu_memory_used_gib": 70.0,
            "gpu_memory_total_gib": 80.0,
        },
        "last_reply": None,
        "startup": startup,
    }
    assert 9.5 < status["startup"]["imports"] < 60


def test_status_when_ready_holds_the_last_reply_and_the_timeline(startup):
    with serve(FakeEngine()) as (url, _):
        assert get_status(url)["last_reply"] is None
        client = Client(url, verbose=False)
        messages, ttft, tok_s, tokens = client.predict({"text": "Hi", "files": []}, max_tokens=3, api_name="/chat")
        client.close()
        timeline.mark("first token")
        status = get_status(url)
    assert (status["stage"], status["ready"], status["failed"]) == ("ready", True, False)
    assert status["last_reply"] == {
        "ttft_s": ttft,
        "decode_tok_s": tok_s,
        "output_tokens": tokens,
        "prompt_tokens": 7,
        "elapsed_s": pytest.approx(0.09),
        "finish_reason": "length",
    }
    assert list(status["startup"]) == ["imports", "first token"]


def test_status_when_the_engine_failed_and_while_it_restarts():
    engine = FlakyEngine()
    with serve(engine) as (url, view):
        failed = get_status(url)
        view.restart()
        restarting = get_status(url)
        deadline = time.monotonic() + 10
        while get_status(url)["restarting"] and time.monotonic() < deadline:
            time.sleep(0.02)
        again = get_status(url)
    assert (failed["stage"], failed["failed"], failed["ready"]) == ("failed", True, False)
    assert failed["detail"] == "CUDA error: an illegal memory access" and not failed["restarting"]
    assert restarting["restarting"]
    assert again["failed"] and not again["restarting"] and engine.starts == 1  # its first start fails


def test_an_engine_without_a_local_gpu_names_none():
    with serve(PacedEngine(load_s=60)) as (url, _):  # it reports no GPU memory: a server elsewhere, or a CPU
        status = get_status(url)
    assert status["gpu"] is None and status["stats"] == dict.fromkeys(status["stats"])
    assert (status["stage"], status["progress"]) == ("loading weights", None)


def test_status_needs_the_login_when_the_page_does():
    with serve(FakeEngine(), auth=[("ann", "pw")]) as (url, _), httpx.Client(base_url=url) as http:
        refused = http.get("status")
        assert http.post("login", data={"username": "ann", "password": "wrong"}).status_code == 400
        assert http.get("status").status_code == 401
        assert http.post("login", data={"username": "ann", "password": "pw"}).status_code == 200
        allowed = http.get("status")
    assert refused.status_code == 401 and refused.json()["detail"]["error"] == "Not authenticated"
    assert "fake/gemma" not in refused.text
    assert allowed.status_code == 200 and allowed.json()["model"] == "fake/gemma"
