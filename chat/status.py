"""What the page and scripts know of the engine, in one place: `EngineView` turns an Engine into a snapshot (its
load stage, what it runs on, its live numbers, the start-up timeline) for the sidebar and the /status route,
and restarts it. Only the Engine protocol is read.

    GET /status  ->  {"stage": "ready", "ready": true, "model": ..., "backend": "vllm", "gpu": "NVIDIA H200",
                      "stats": {"kv_cache_usage": 0.02, ...}, "last_reply": {"ttft_s": 0.12, ...},
                      "startup": {"imports": 3.1, ..., "ready": 57.9}, ...}

The route is behind the page's login when there is one: it names the model and the GPU.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request
from fastapi.routing import APIRoute
from gradio.route_utils import API_PREFIX

from chat.conversation import ReplyStats
from engine import lifecycle, timeline
from engine.base import Engine, EngineStats, EngineStatus
from engine.gpu import visible_gpu_name

STATUS_PATH = "/status"


def describe(status: EngineStatus) -> str:
    """The stage in words, e.g. "loading weights 42%: shard 3/7"."""
    progress = "" if status.progress is None else f" {status.progress:.0%}"
    return f"{status.stage.value}{progress}" + (f": {status.detail}" if status.detail else "")


@dataclass(frozen=True)
class EngineSnapshot:
    stage: str  # engine.base.Stage's words: "downloading", "loading weights", ..., "ready", "failed"
    detail: str  # what is happening now, or why it failed
    progress: float | None  # 0..1 within the stage; None when unknown
    ready: bool
    failed: bool
    restarting: bool  # a restart (the sidebar's button) is under way
    model: str
    backend: str  # the engine's name: "vllm", "openai", "transformers"
    gpu: str | None  # the local GPU the engine runs on; None on a CPU or for a server elsewhere
    max_model_len: int | None  # the context, for engines that know it (once started)
    notes: list[str]  # choices made for the user and repairs done, for engines that keep them
    stats: EngineStats  # KV cache, running / waiting requests, GPU memory
    last_reply: ReplyStats | None  # the app's last finished reply, whoever asked for it
    startup: dict[str, float]  # engine.timeline's marks: seconds from the process start to each stage

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class EngineView:
    """The engine as the page sees it. `gpu_name`: the visible GPU's name (NVML's, by default)."""

    def __init__(self, engine: Engine, gpu_name: Callable[[], str | None] = visible_gpu_name):
        self._engine = engine
        self._gpu_name = gpu_name
        self._last_reply: ReplyStats | None = None

    def snapshot(self) -> EngineSnapshot:
        status, stats = self._engine.status(), self._engine.stats()
        notes = getattr(self._engine, "notes", None)
        return EngineSnapshot(
            stage=status.stage.value,
            detail=status.detail,
            progress=status.progress,
            ready=status.ready,
            failed=status.failed,
            restarting=lifecycle.restarting(),
            model=self._engine.model,
            backend=self._engine.name,
            # An engine that reports GPU memory runs on this machine's GPU (vLLM and transformers read it there).
            gpu=self._gpu_name() if stats.gpu_memory_total_gib is not None else None,
            max_model_len=getattr(self._engine, "max_model_len", None),
            notes=list(notes) if isinstance(notes, list) else [],
            stats=stats,
            last_reply=self._last_reply,
            startup=timeline.marks(),
        )

    def record(self, reply: ReplyStats) -> None:
        """A finished reply's numbers (the chat function's), for /status."""
        self._last_reply = reply

    def restart(self) -> None:
        """Shut the engine down and start it again, off the server's thread (once at a time)."""
        lifecycle.restart_in_background(self._engine)


def status_route(view: EngineView) -> APIRoute:
    """GET /status: the view's snapshot as JSON, behind the same login as the page."""

    async def status(request: Request) -> dict[str, Any]:
        await _check_login(request)
        return view.snapshot().to_json()

    return APIRoute(STATUS_PATH, status, methods=["GET"], include_in_schema=False)


async def _check_login(request: Request) -> None:
    """Raise 401 as Gradio's own API routes do when the app has a login and the request has none: Gradio's
    routes for who is logged in and whether that is enough decide, so the page and /status agree."""
    endpoints = {getattr(r, "path", None): getattr(r, "endpoint", None) for r in request.app.routes}
    who, check = endpoints.get(f"{API_PREFIX}/user"), endpoints.get(f"{API_PREFIX}/login_check")
    if who is None or check is None:  # not served by Gradio, or a Gradio that moved them: refuse
        raise HTTPException(status_code=403, detail="cannot tell who is logged in")
    user = who(request)
    check(await user if inspect.isawaitable(user) else user)
