"""vLLM's AsyncLLM in this process behind the Engine protocol: the default engine on NVIDIA GPUs.

engine.vllm_launch builds the engine (the same launch the bench and the profiler use); this module turns
chat requests into vLLM prompts and vLLM's outputs into Deltas with their metrics.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

import patches.experts
from engine import timeline
from engine.base import (
    Delta,
    EngineError,
    EngineStats,
    EngineStatus,
    GenerationRequest,
    Metrics,
    SamplingOptions,
    Stage,
)
from engine.experts import PROMPT_TOKENS, ExpertCounts
from engine.gpu import visible_gpu
from engine.metrics import decode_rate
from engine.prompt import render_chat, take_media
from engine.reasoning import ReasoningSplitter
from engine.settings import EngineSettings
from engine.vllm_launch import launch

log = logging.getLogger(__name__)

COUNTED_KEPT = 64  # prompts rendered for a context check and kept for their request (a few are in flight)


def sampling_params(options: SamplingOptions, routed_prompt_start: int | None = None):
    """vLLM's SamplingParams; `routed_prompt_start` (--expert-view): the prompt tokens whose routing vLLM leaves
    out of what it returns."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    experts = {} if routed_prompt_start is None else {"routed_experts_prompt_start": routed_prompt_start}
    return SamplingParams(
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=max(options.top_k, 0),
        max_tokens=options.max_tokens,
        repetition_penalty=options.repetition_penalty,
        presence_penalty=options.presence_penalty,
        seed=options.seed,
        ignore_eos=options.ignore_eos,
        output_kind=RequestOutputKind.DELTA,
        # Gemma 4 marks its thinking with special tokens; keep them so the splitter can see them.
        skip_special_tokens=False,
        **experts,
    )


def expert_shape(model_config: Any) -> tuple[int, int, int] | None:
    """(layers, experts, top_k) of a model whose routing vLLM records (enable_return_routed_experts); else None."""
    if not getattr(model_config, "enable_return_routed_experts", False):
        return None
    text = model_config.hf_text_config
    experts = getattr(text, "num_experts", None)
    top_k = getattr(text, "top_k_experts", None) or getattr(text, "num_experts_per_tok", None)
    if not experts or not top_k:
        return None
    return text.num_hidden_layers, experts, top_k


def routed_prompt_start(prompt: dict[str, Any]) -> int:
    """The prompt tokens to leave out of the expert view: all but the last PROMPT_TOKENS of a text prompt. vLLM
    asserts that this is less than the prompt's length, which for a prompt with images or videos is known only after
    its processor has expanded them: such a prompt is counted whole."""
    ids = prompt.get("prompt_token_ids")
    return 0 if ids is None else max(len(ids) - PROMPT_TOKENS, 0)


def request_metrics(stats: Any, prompt_tokens: int) -> Metrics:
    """vLLM's own per-request stats (RequestStateStats) as the app's Metrics.

    TTFT is the frontend's wall clock (arrival -> first token out); the decode rate uses the engine
    core's timestamps of the first and latest token.
    """
    return Metrics(
        ttft_s=stats.first_token_latency or None,
        prompt_tokens=prompt_tokens,
        output_tokens=stats.num_generation_tokens,
        decode_tok_s=decode_rate(
            stats.num_generation_tokens, stats.first_token_ts or None, stats.last_token_ts or None
        ),
        elapsed_s=time.time() - stats.arrival_time,
    )


class _SchedulerStatsTap:
    """A vLLM stat logger that keeps the latest scheduler stats for the sidebar."""

    def __init__(self):
        self.latest = None

    def factory(self, vllm_config, engine_index: int = 0):
        from vllm.v1.metrics.loggers import StatLoggerBase

        tap = self

        class Tap(StatLoggerBase):
            def __init__(self, vllm_config, engine_index=0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
                if scheduler_stats is not None:
                    tap.latest = scheduler_stats

            def log_engine_initialized(self):
                pass

        return Tap(vllm_config, engine_index)


class VllmEngine:
    name = "vllm"

    def __init__(self, settings: EngineSettings):
        self.settings = settings
        self.model = settings.model
        self.notes: list[str] = []  # choices made for the user and repairs done: shown in the UI
        self.max_model_len: int | None = None
        self._status = EngineStatus(Stage.RESOLVING, f"resolving {settings.model}")
        self._llm = None
        self._tap = _SchedulerStatsTap()
        self._multimodal = False  # the checkpoint has the processor files image and video prompts need
        self._expert_shape: tuple[int, int, int] | None = None  # --expert-view on a model with experts
        # Prompts rendered for the context check, by request id, for generate() to send as they are.
        self._counted: dict[str, dict[str, Any]] = {}
        self._counted_lock = threading.Lock()

    def status(self) -> EngineStatus:
        if self._llm is not None and self._llm.errored:  # the engine core process died under a running app
            return EngineStatus(Stage.FAILED, "the vLLM engine process died (see the server log); restart it")
        return self._status

    @property
    def async_llm(self) -> Any:
        """The running AsyncLLM, None before it started and after shutdown; a restart makes a new one.
        engine.openai_server serves vLLM's /v1 routes over it."""
        return self._llm

    def _report(self, status: EngineStatus) -> None:
        self._status = status
        log.info("engine: %s %s", status.stage.value, status.detail)

    async def start(self) -> None:
        try:
            launched = await launch(
                self.settings, report=self._report, notes=self.notes, stat_loggers=[self._tap.factory]
            )
        except Exception as e:
            reason = str(e) if isinstance(e, EngineError) else f"{type(e).__name__}: {e}"
            self._report(EngineStatus(Stage.FAILED, reason))
            raise EngineError(reason) from e
        self._llm = launched.llm
        self.max_model_len = self._llm.model_config.max_model_len
        self._multimodal = launched.checkpoint.has_vision
        self._expert_shape = expert_shape(self._llm.model_config)
        # The sidebar shows the detail: the choices made for this GPU and any repairs belong there.
        detail = " · ".join([launched.gpu.name, f"context {self.max_model_len:,} tokens", *self.notes])
        self._report(EngineStatus(Stage.READY, detail))

    def _engine(self):
        if self._llm is None:
            raise EngineError(f"the engine is not ready: {self._status.stage.value} {self._status.detail}")
        return self._llm

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        llm = self._engine()
        prompt = self.engine_prompt(request)
        shape = self._expert_shape
        skip = None if shape is None else routed_prompt_start(prompt)
        stream = llm.generate(
            prompt,
            sampling_params(request.sampling, routed_prompt_start=skip),
            request.request_id,
            tokenization_kwargs={"add_special_tokens": False},  # the template already wrote <bos>
        )
        splitter = ReasoningSplitter(prompt["prompt"])
        prompt_tokens = 0
        experts: ExpertCounts | None = None
        seen = 0  # routing chunks counted
        try:
            async for out in stream:
                timeline.mark("first token")  # of the first reply since the engine started
                completion = out.outputs[0]
                prompt_tokens = prompt_tokens or len(out.prompt_token_ids or ())
                reasoning, text = splitter.feed(completion.text)
                if completion.finish_reason:
                    tail_reasoning, tail_text = splitter.flush()
                    reasoning, text = reasoning + tail_reasoning, text + tail_text
                metrics = request_metrics(out.metrics, prompt_tokens)
                if shape is not None:
                    if experts is None:
                        experts = ExpertCounts.empty(*shape, prompt_size=len(out.prompt_token_ids or ()) - skip)
                    chunks, seen = patches.experts.new_routing(completion, seen)
                    if chunks:
                        experts = experts.add(chunks[0] if len(chunks) == 1 else np.concatenate(chunks))
                yield Delta(text, reasoning, completion.finish_reason, metrics, experts)
        finally:
            await stream.aclose()  # a consumer that stops early aborts the request inside vLLM

    def engine_prompt(self, request: GenerationRequest) -> dict[str, Any]:
        """The chat rendered by the model's template, plus the images and videos it refers to. A text-only
        chat goes as token ids: tokenized once, here, for both the context check and vLLM."""
        with self._counted_lock:
            counted = self._counted.pop(request.request_id, None)
        if counted is not None:
            return counted
        messages, media = split_media(request.messages)
        if media and not self._multimodal:
            raise EngineError("This checkpoint has no image/video processor (processor_config.json): send text only.")
        tokenizer = self._engine().get_tokenizer()
        text = render_chat(tokenizer, messages, enable_thinking=request.enable_thinking)
        prompt: dict[str, Any] = {"prompt": text}
        if media:  # vLLM's processor expands each placeholder into the item's soft tokens
            prompt["multi_modal_data"] = media
        else:
            prompt["prompt_token_ids"] = tokenizer.encode(text, add_special_tokens=False)
        if request.image_soft_tokens:
            prompt["mm_processor_kwargs"] = {"max_soft_tokens": request.image_soft_tokens}
        return prompt

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """The prompt's text tokens, for the UI's context check (images and videos add theirs in vLLM,
        which then refuses an overlong prompt itself)."""
        prompt = self.engine_prompt(request)
        with self._counted_lock:
            self._counted[request.request_id] = prompt
            while len(self._counted) > COUNTED_KEPT:  # requests refused after the check never collect theirs
                self._counted.pop(next(iter(self._counted)))
        ids = prompt.get("prompt_token_ids")
        if ids is None:
            ids = self._engine().get_tokenizer().encode(prompt["prompt"], add_special_tokens=False)
        return len(ids)

    async def abort(self, request_id: str) -> None:
        await self._engine().abort(request_id)

    def stats(self) -> EngineStats:
        latest = self._tap.latest
        used, total = _gpu_memory_gib()
        return EngineStats(
            kv_cache_usage=None if latest is None else latest.kv_cache_usage,
            running=None if latest is None else latest.num_running_reqs,
            waiting=None if latest is None else latest.num_waiting_reqs,
            gpu_memory_used_gib=used,
            gpu_memory_total_gib=total,
        )

    async def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None


def split_media(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, list]]:
    """Replace image/video parts by template placeholders; collect the data vLLM's processor takes."""
    rendered, images, videos = take_media(messages)
    media: dict[str, list] = {}
    if images:
        media["image"] = images
    if videos:
        media["video"] = [clip.vllm_video_item() for clip in videos]
    return rendered, media


def _gpu_memory_gib() -> tuple[float | None, float | None]:
    try:
        import pynvml

        info = pynvml.nvmlDeviceGetMemoryInfo(visible_gpu())
        return info.used / 2**30, info.total / 2**30
    except Exception:  # no NVML (CPU machine, container without the driver library): nothing to show
        return None, None
