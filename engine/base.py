"""The one interface every backend speaks: load status, streamed deltas with metrics, abort, stats.

The UI and the benchmark only ever see these types; nothing here imports a backend.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from engine.experts import ExpertCounts


class Stage(str, enum.Enum):
    RESOLVING = "resolving model"
    DOWNLOADING = "downloading"
    LOADING = "loading weights"
    COMPILING = "compiling"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class EngineStatus:
    stage: Stage
    detail: str = ""  # what is happening now, or why it failed
    progress: float | None = None  # 0..1 within the stage; None when unknown

    @property
    def ready(self) -> bool:
        return self.stage is Stage.READY

    @property
    def failed(self) -> bool:
        return self.stage is Stage.FAILED


@dataclass
class SamplingOptions:
    """Gemma 4's recommended defaults (temperature 1, top_p 0.95, top_k 64)."""

    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 64
    max_tokens: int = 2048
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks: generate exactly max_tokens (vLLM backend)


@dataclass
class GenerationRequest:
    """One chat turn to complete.

    `messages` are OpenAI-style chat messages: {"role": "system"|"user"|"assistant", "content": str | list}
    where a list holds content parts ({"type": "text", "text": ...}, {"type": "image", "image": PIL.Image},
    {"type": "video", "video": media.VideoClip}).
    """

    messages: list[dict[str, Any]]
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    enable_thinking: bool = False
    image_soft_tokens: int | None = None  # Gemma 4's per-image token budget (70..1120); None: the model's own
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class Metrics:
    ttft_s: float | None = None  # request submitted -> first token out
    prompt_tokens: int = 0
    output_tokens: int = 0
    decode_tok_s: float | None = None  # output tokens after the first / time since the first
    elapsed_s: float = 0.0


@dataclass(frozen=True)
class Delta:
    """What arrived since the previous delta of the same request."""

    text: str = ""
    reasoning: str = ""
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    metrics: Metrics = field(default_factory=Metrics)
    # --expert-view: the reply's routing counts so far (engine.experts), each delta its own snapshot; None when off
    # and on the openai backend (an OpenAI server sends no routing).
    experts: ExpertCounts | None = None


@dataclass(frozen=True)
class EngineStats:
    kv_cache_usage: float | None = None  # 0..1
    running: int | None = None
    waiting: int | None = None
    gpu_memory_used_gib: float | None = None
    gpu_memory_total_gib: float | None = None


class EngineError(RuntimeError):
    """A failure the user should read as is (bad model path, offline hub, unusable backend)."""


@runtime_checkable
class Engine(Protocol):
    """Every backend. Those that know their context also have `max_model_len: int | None` (known once started)
    and `count_prompt_tokens(request) -> int`; chat.limits reads both with getattr to refuse overlong prompts.
    Those that make choices for the user keep them in `notes: list[str]` (chat.status shows both at /status)."""

    name: str  # "vllm", "openai", "transformers"
    model: str  # what the user asked for (hub id, path or served model name)

    def status(self) -> EngineStatus: ...

    async def start(self) -> None:
        """Load the model; status() reports the stages meanwhile. Raises EngineError on failure."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream the reply. Closing the iterator early aborts the request in the engine."""

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    async def shutdown(self) -> None: ...
