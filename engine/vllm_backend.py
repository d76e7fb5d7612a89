"""vLLM's AsyncLLM in this process: the default engine on NVIDIA GPUs.

The engine core runs in a child process that vLLM forks; load-time patches applied here are inherited
through that fork. The child's log lines are mirrored into a file that `LoadWatcher` reads to report
the load stages (weights, compile, CUDA graphs) while the UI is already up.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import patches
import patches.mtp
import patches.warmup
from engine import drafter, model_source
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
from engine.gpu import visible_gpu
from engine.metrics import decode_rate
from engine.model_source import Checkpoint
from engine.prompt import render_chat, take_media
from engine.reasoning import ReasoningSplitter
from engine.settings import EngineSettings

log = logging.getLogger(__name__)

# The checkpoint's own context length (Gemma 4: 262144). Asking for at least this lets vLLM auto-fit
# (max_model_len=-1): it lowers the context to what the KV cache holds and says so in the log.
AUTO_FIT = -1
FA4_TVM_FFI = "0.1.10"  # FlashAttention 4's cute DSL fails with apache-tvm-ffi 0.1.9
COUNTED_KEPT = 64  # prompts rendered for a context check and kept for their request (a few are in flight)


@dataclass(frozen=True)
class GpuFacts:
    capability: tuple[int, int] | None  # (major, minor); None when no CUDA device is visible
    name: str = ""

    @property
    def fp4_tensor_cores(self) -> bool:
        # SM 10.x (B200/GB200) runs NVFP4 natively. Hopper has no FP4 tensor cores, and on SM 12.x
        # (RTX 50xx, DGX Spark) the model card found Marlin needed for correct MoE results.
        return self.capability is not None and self.capability[0] == 10


def gpu_facts() -> GpuFacts:
    """Read the GPU through NVML: initializing CUDA here would stop vLLM from forking its engine."""
    from vllm.platforms import current_platform

    capability = current_platform.get_device_capability()
    if capability is None:
        return GpuFacts(None)
    return GpuFacts((capability.major, capability.minor), current_platform.get_device_name())


def install_vllm_fixes(checkpoint: Checkpoint, draft: Path | None, notes: list[str]) -> None:
    """Fixes to vLLM's own code for this model, installed here before vLLM forks its engine process."""
    if fixed := patches.warmup.install(checkpoint.router_shape):
        log.info(fixed)
    if draft is not None and (fixed := patches.mtp.install()):
        notes.append(fixed)


def flash_attention_4_usable() -> bool:
    if importlib.util.find_spec("cutlass") is None:
        return False
    try:
        return importlib.metadata.version("apache-tvm-ffi") == FA4_TVM_FFI
    except importlib.metadata.PackageNotFoundError:
        return False


def engine_args(
    settings: EngineSettings, checkpoint: Checkpoint, gpu: GpuFacts, notes: list[str], draft: Path | None = None
):
    """The AsyncEngineArgs for this checkpoint on this GPU (`draft`: an MTP drafter's folder); every choice made
    for the user lands in notes."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    kernel = {}
    if checkpoint.nvfp4:
        quantization = settings.quantization or "modelopt"
        env_linear = patches.linear_backend_from_env()
        fallback = None if gpu.fp4_tensor_cores else "marlin"
        kernel["moe_backend"] = settings.moe_backend or fallback
        kernel["linear_backend"] = settings.linear_backend or env_linear or fallback
        if fallback and not (settings.moe_backend and settings.linear_backend):
            notes.append(
                f"{gpu.name or 'this GPU'} has no native FP4 path for this model: Marlin kernels (weight-only FP4)"
            )
    else:
        quantization = settings.quantization
        kernel["moe_backend"], kernel["linear_backend"] = settings.moe_backend, settings.linear_backend
    attention = settings.attention_backend
    if attention is None and draft is not None:
        # vLLM's Gemma 4 drafter reads the target's KV cache and keeps the target's backend only when one is set.
        attention = "TRITON_ATTN"
        notes.append("MTP drafting: Triton attention (the drafter shares the model's KV cache)")
    elif attention is None and not flash_attention_4_usable():
        attention = "TRITON_ATTN"
        notes.append(
            f"FlashAttention 4 needs nvidia-cutlass-dsl and apache-tvm-ffi=={FA4_TVM_FFI}: using Triton attention"
        )
    wanted_len = settings.max_model_len
    max_model_len = AUTO_FIT if wanted_len is None or wanted_len >= checkpoint.context_length else wanted_len
    # num_frames: vLLM plans memory for 32 frames per video unless told the app sends fewer.
    video = {"count": settings.max_videos_per_prompt, "num_frames": settings.max_video_frames}
    # Without processor files the checkpoint can only read text: skip the vision tower altogether.
    multimodal = (
        {"limit_mm_per_prompt": {"image": settings.max_images_per_prompt, "video": video}}
        if checkpoint.has_vision
        else {"language_model_only": True}
    )
    return AsyncEngineArgs(
        model=str(checkpoint.path),
        quantization=quantization,
        kv_cache_dtype=settings.kv_cache_dtype,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        max_model_len=max_model_len,
        max_num_seqs=settings.max_num_seqs,
        tensor_parallel_size=settings.tensor_parallel_size,
        attention_backend=attention,
        load_format=settings.load_format,
        enforce_eager=settings.enforce_eager,
        compilation_config=compilation_config(settings),
        speculative_config=None if draft is None else drafter.speculative_config(draft, settings),
        **multimodal,
        **{k: v for k, v in kernel.items() if v is not None},
    )


def compilation_config(settings: EngineSettings) -> dict[str, Any]:
    """vLLM's compilation settings for these engine settings; an empty dict leaves vLLM's own."""
    config: dict[str, Any] = {}
    if not settings.torch_compile:
        # Without torch.compile vLLM can't split the model into piecewise graphs; decode still runs as whole graphs.
        config.update(mode="NONE", cudagraph_mode="FULL_DECODE_ONLY")
    if settings.cuda_graph_max_tokens:
        config["cudagraph_capture_sizes"] = cuda_graph_sizes(settings.cuda_graph_max_tokens)
    return config


def cuda_graph_sizes(max_tokens: int) -> list[int]:
    """Powers of two to 256 (decode batches, short prompts), then every 256 tokens: a prompt chunk is padded to
    the next size up, which wastes at most 256 tokens of compute above 256."""
    sizes = [n for n in (1, 2, 4, 8, 16, 32, 64, 128) if n < max_tokens]
    return sizes + [*range(256, max_tokens, 256), max_tokens]


def sampling_params(options: SamplingOptions):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

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
    )


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


class LoadWatcher:
    """Follows vLLM's log (parent and engine-core child) and turns milestones into load stages."""

    MILESTONES = [
        (re.compile(r"Starting to load model"), Stage.LOADING, "loading weights"),
        (
            re.compile(r"(?:Model loading|Loading weights) took ([\d.]+ GiB)?"),
            Stage.COMPILING,
            "weights loaded; compiling",
        ),
        (re.compile(r"torch\.compile took ([\d.]+) s"), Stage.COMPILING, "compiled; profiling memory"),
        (re.compile(r"GPU KV cache size: ([\d,]+) tokens"), Stage.COMPILING, "KV cache sized; capturing CUDA graphs"),
        (re.compile(r"Graph capturing finished"), Stage.COMPILING, "CUDA graphs captured; warming up"),
    ]
    AUTO_FIT = re.compile(r"Auto-fit max_model_len: reduced from (\d+) to (\d+)")

    def __init__(self, report, notes: list[str]):
        self.report = report
        self.notes = notes
        self.dir = tempfile.mkdtemp(prefix="vllm-load-")
        self.path = Path(self.dir) / "vllm.log"
        self.path.touch()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="vllm-load-watcher", daemon=True)

    def install(self) -> None:
        """Mirror vLLM's logs into our file, here and in the engine processes vLLM starts."""
        from vllm.logger import DEFAULT_LOGGING_CONFIG

        config = copy.deepcopy(DEFAULT_LOGGING_CONFIG)
        config["handlers"]["load_watch"] = {"class": "logging.FileHandler", "filename": str(self.path), "level": "INFO"}
        config["loggers"]["vllm"]["handlers"].append("load_watch")
        config_path = Path(self.dir) / "logging.json"
        config_path.write_text(json.dumps(config))
        os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(config_path)  # a spawned child configures itself from this
        handler = logging.FileHandler(self.path)  # a forked child inherits this one
        handler.setLevel(logging.INFO)
        logging.getLogger("vllm").addHandler(handler)
        self._handler = handler
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        logging.getLogger("vllm").removeHandler(self._handler)
        self._handler.close()
        os.environ.pop("VLLM_LOGGING_CONFIG_PATH", None)

    def _follow(self) -> None:
        with open(self.path) as f:
            while not self._stop.is_set():
                line = f.readline()
                if not line:
                    self._stop.wait(0.2)
                    continue
                self.feed(line)

    def feed(self, line: str) -> None:
        if m := self.AUTO_FIT.search(line):
            self.notes.append(f"context lowered from {int(m[1]):,} to {int(m[2]):,} tokens to fit the KV cache")
        for pattern, stage, detail in self.MILESTONES:
            if m := pattern.search(line):
                extra = next((g for g in m.groups() if g), None)
                self.report(EngineStatus(stage, f"{detail} ({extra})" if extra else detail))


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
        # Prompts rendered for the context check, by request id, for generate() to send as they are.
        self._counted: dict[str, dict[str, Any]] = {}
        self._counted_lock = threading.Lock()

    def status(self) -> EngineStatus:
        if self._llm is not None and self._llm.errored:  # the engine core process died under a running app
            return EngineStatus(Stage.FAILED, "the vLLM engine process died (see the server log); restart it")
        return self._status

    def _report(self, status: EngineStatus) -> None:
        self._status = status
        log.info("engine: %s %s", status.stage.value, status.detail)

    async def start(self) -> None:
        try:
            checkpoint = await asyncio.to_thread(
                model_source.resolve,
                self.settings.model,
                self._download_progress(""),
                weights=self.settings.load_format != "dummy",
            )
            if self.settings.load_format != "dummy":  # random weights: nothing to check or repair
                self.notes += patches.apply(checkpoint.path)
            gpu = gpu_facts()
            if gpu.capability is None:
                raise EngineError("vLLM needs an NVIDIA GPU and none is visible; use --backend openai or transformers.")
            draft = await asyncio.to_thread(
                drafter.resolve, self.settings, checkpoint, self._download_progress("MTP drafter: "), self.notes
            )
            install_vllm_fixes(checkpoint, draft, self.notes)
            args = engine_args(self.settings, checkpoint, gpu, self.notes, draft)
            self._report(EngineStatus(Stage.LOADING, f"starting vLLM on {gpu.name}"))
            watcher = LoadWatcher(self._report, self.notes)
            watcher.install()
            try:
                # Built off the event loop: AsyncLLM binds its output handler to the loop of its first request.
                self._llm = await asyncio.to_thread(self._create, args)
            finally:
                watcher.stop()
        except Exception as e:
            reason = str(e) if isinstance(e, EngineError) else f"{type(e).__name__}: {e}"
            self._report(EngineStatus(Stage.FAILED, reason))
            raise EngineError(reason) from e
        self.max_model_len = self._llm.model_config.max_model_len
        self._multimodal = checkpoint.has_vision
        # The sidebar shows the detail: the choices made for this GPU and any repairs belong there.
        detail = " · ".join([gpu.name, f"context {self.max_model_len:,} tokens", *self.notes])
        self._report(EngineStatus(Stage.READY, detail))

    def _download_progress(self, what: str) -> model_source.Progress:
        return lambda fraction, detail: self._report(EngineStatus(Stage.DOWNLOADING, what + detail, fraction))

    def _create(self, args):
        from vllm.v1.engine.async_llm import AsyncLLM

        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "fork")  # keeps patches in the engine process
        return AsyncLLM.from_engine_args(args, stat_loggers=[self._tap.factory])

    def _engine(self):
        if self._llm is None:
            raise EngineError(f"the engine is not ready: {self._status.stage.value} {self._status.detail}")
        return self._llm

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        llm = self._engine()
        prompt = self.engine_prompt(request)
        stream = llm.generate(
            prompt,
            sampling_params(request.sampling),
            request.request_id,
            tokenization_kwargs={"add_special_tokens": False},  # the template already wrote <bos>
        )
        splitter = ReasoningSplitter(prompt["prompt"])
        prompt_tokens = 0
        try:
            async for out in stream:
                completion = out.outputs[0]
                prompt_tokens = prompt_tokens or len(out.prompt_token_ids or ())
                reasoning, text = splitter.feed(completion.text)
                if completion.finish_reason:
                    tail_reasoning, tail_text = splitter.flush()
                    reasoning, text = reasoning + tail_reasoning, text + tail_text
                metrics = request_metrics(out.metrics, prompt_tokens)
                yield Delta(text, reasoning, completion.finish_reason, metrics)
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
