"""The one place a vLLM engine is built: the app's VllmEngine, the bench's arms and the profiler all call `launch`.

    launched = await launch(settings, report=on_status)           # as the app serves it
    launched = await launch(settings, patched=False)               # plain vLLM: the bench's reference arm

The steps, in order: resolve the checkpoint (a folder, or a download with progress), repair it on the way in
(patches.apply), read the GPU through NVML, find the MTP drafter, install the fixes to vLLM's own code for this
model, build the engine arguments, start AsyncLLM. vLLM's engine core runs in a child process it forks from
this one, which is how the patches installed here reach it. `patched=False` skips every patch (load-time
repairs, the warm-up and drafter fixes, the small-batch kernels of patches.small_batch, the expert view's streamed
routing of patches.experts): what an unmodified vLLM 0.26 does with the same engine arguments.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import patches
import patches.experts
import patches.mtp
import patches.small_batch
import patches.warmup
from engine import drafter, model_source, timeline
from engine.base import EngineError, EngineStatus, Stage
from engine.model_source import Checkpoint
from engine.settings import EngineSettings

log = logging.getLogger(__name__)

# The checkpoint's own context length (Gemma 4: 262144). Asking for at least this lets vLLM auto-fit
# (max_model_len=-1): it lowers the context to what the KV cache holds and says so in the log.
AUTO_FIT = -1
FA4_TVM_FFI = "0.1.10"  # FlashAttention 4's cute DSL fails with apache-tvm-ffi 0.1.9

Report = Callable[[EngineStatus], None]


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


@dataclass
class Launched:
    """A started engine and what was decided on the way."""

    llm: Any  # vllm.v1.engine.async_llm.AsyncLLM
    checkpoint: Checkpoint
    gpu: GpuFacts
    args: Any  # the AsyncEngineArgs it was built from
    notes: list[str] = field(default_factory=list)  # choices made for the user and repairs done


async def launch(
    settings: EngineSettings,
    *,
    patched: bool = True,
    report: Report | None = None,
    notes: list[str] | None = None,
    stat_loggers: Sequence[Any] = (),
    overrides: dict[str, Any] | None = None,
) -> Launched:
    """Build and start AsyncLLM for these settings. `report` receives the load stages (download, weights,
    compile, CUDA graphs) as they happen; `notes` (kept by the caller, so a failed start still shows them)
    collects the choices made; `overrides` sets further AsyncEngineArgs fields (the profiler's). Raises
    EngineError with a message for the user when the model or the GPU can't be used."""
    report = report or (lambda status: None)
    notes = [] if notes is None else notes
    weights = settings.load_format != "dummy"  # random weights: nothing to download, check or repair

    def progress(what: str) -> model_source.Progress:
        return lambda fraction, detail: report(EngineStatus(Stage.DOWNLOADING, what + detail, fraction))

    checkpoint = await asyncio.to_thread(model_source.resolve, settings.model, progress(""), weights=weights)
    timeline.mark("checkpoint resolved")
    if patched and weights:
        notes += patches.apply(checkpoint.path)
        timeline.mark("checkpoint checked")
    gpu = gpu_facts()
    if gpu.capability is None:
        raise EngineError("vLLM needs an NVIDIA GPU and none is visible; use --backend openai or transformers.")
    cache, size = compile_cache()
    log.info("vLLM's compile cache: %s (%.1f GB%s)", cache, size / 1e9, "" if size else ": empty, this start compiles")
    draft = await asyncio.to_thread(drafter.resolve, settings, checkpoint, progress("MTP drafter: "), notes)
    if patched:
        install_vllm_fixes(checkpoint, draft, notes)
    args = engine_args(settings, checkpoint, gpu, notes, draft)
    if patched:
        install_kernels(settings, gpu, args, notes)
        install_expert_view(args, notes)
    for name, value in (overrides or {}).items():
        setattr(args, name, value)
    timeline.mark("engine arguments")
    report(EngineStatus(Stage.LOADING, f"starting vLLM on {gpu.name}"))
    watcher = LoadWatcher(report, notes)
    watcher.install()
    try:
        # Built off the event loop: AsyncLLM binds its output handler to the loop of its first request.
        llm = await asyncio.to_thread(_create, args, list(stat_loggers))
    finally:
        watcher.stop()
    timeline.mark("ready")
    return Launched(llm, checkpoint, gpu, args, notes)


def _create(args: Any, stat_loggers: list[Any]) -> Any:
    from vllm.v1.engine.async_llm import AsyncLLM

    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "fork")  # keeps the patches in the engine process
    # vLLM keeps its memory-profiling result beside the compile cache and skips the profiling pass on a later
    # start with the same model, settings and GPU (it profiles again on any mismatch).
    os.environ.setdefault("VLLM_ENABLE_STARTUP_PLAN", "1")
    return AsyncLLM.from_engine_args(args, stat_loggers=stat_loggers or None)


def compile_cache() -> tuple[Path, int]:
    """vLLM's compile cache (torch.compile's graphs, the start-up plan) and its size in bytes: what makes a second
    start fast. VLLM_CACHE_ROOT moves it."""
    import vllm.envs as envs

    root = Path(envs.VLLM_CACHE_ROOT)
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) if root.is_dir() else 0
    return root, size


def install_vllm_fixes(checkpoint: Checkpoint, draft: Path | None, notes: list[str]) -> None:
    """Fixes to vLLM's own code for this model, installed here before vLLM forks its engine process."""
    if fixed := patches.warmup.install(checkpoint.router_shape):
        log.info(fixed)
    if draft is not None and (fixed := patches.mtp.install()):
        notes.append(fixed)


def install_expert_view(args: Any, notes: list[str]) -> None:
    """--expert-view: the routing vLLM records, handed out while a reply streams (patches.experts). Nothing is
    installed when the engine arguments don't ask vLLM to record it."""
    if not getattr(args, "enable_return_routed_experts", False):
        return
    if fixed := patches.experts.install():
        log.info(fixed)
    else:
        notes.append("expert view: this vLLM hands out the routing only when a reply ends")


def install_kernels(settings: EngineSettings, gpu: GpuFacts, args: Any, notes: list[str]) -> None:
    """Our small-batch NVFP4 kernels in place of the Marlin ones vLLM was given, where --small-batch-kernels
    (and, for auto, the GPU) says so."""
    kernels = {
        "linear_backend": getattr(args, "linear_backend", None),
        "moe_backend": getattr(args, "moe_backend", None),
    }
    if patches.small_batch.wanted(settings.small_batch_kernels, gpu.capability, kernels):
        if fixed := patches.small_batch.install(kernels):
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
    # --expert-view: vLLM records each token's routed experts (patches.experts); off, the arguments are as without it.
    experts = {}
    if settings.expert_view:
        if reason := patches.experts.supported():
            notes.append(reason)
        else:
            experts["enable_return_routed_experts"] = True
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
        **experts,
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


class LoadWatcher:
    """Follows vLLM's log (parent and engine-core child): milestones become load stages for the UI and marks on the
    start-up timeline, stamped with the time vLLM logged them."""

    # (pattern, stage, what the UI says, the timeline's name for it)
    MILESTONES = [
        (re.compile(r"Initializing a V1 LLM engine"), Stage.LOADING, "engine process started", "engine core started"),
        (re.compile(r"Starting to load model"), Stage.LOADING, "loading weights", "loading weights"),
        (
            re.compile(r"(?:Model loading|Loading weights) took ([\d.]+ GiB)?"),
            Stage.COMPILING,
            "weights loaded; compiling",
            "weights loaded",
        ),
        (re.compile(r"torch\.compile took ([\d.]+) s"), Stage.COMPILING, "compiled; profiling memory", "compiled"),
        (
            re.compile(r"GPU KV cache size: ([\d,]+) tokens"),
            Stage.COMPILING,
            "KV cache sized; capturing CUDA graphs",
            "KV cache sized",
        ),
        (re.compile(r"Graph capturing finished"), Stage.COMPILING, "CUDA graphs captured; warming up", "CUDA graphs"),
        (re.compile(r"init engine \(profile"), Stage.COMPILING, "engine process ready", "engine core ready"),
    ]
    AUTO_FIT = re.compile(r"Auto-fit max_model_len: reduced from (\d+) to (\d+)")
    FORMAT = "%(created).3f %(message)s"  # the wall time of each record: the timeline's stamps

    def __init__(self, report: Report, notes: list[str]):
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
        config["formatters"]["load_watch"] = {"format": self.FORMAT}
        config["handlers"]["load_watch"] = {
            "class": "logging.FileHandler",
            "filename": str(self.path),
            "level": "INFO",
            "formatter": "load_watch",
        }
        config["loggers"]["vllm"]["handlers"].append("load_watch")
        config_path = Path(self.dir) / "logging.json"
        config_path.write_text(json.dumps(config))
        os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(config_path)  # a spawned child configures itself from this
        handler = logging.FileHandler(self.path)  # a forked child inherits this one
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter(self.FORMAT))
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
        stamp, _, message = line.partition(" ")
        try:
            wall = float(stamp)
        except ValueError:  # a line of a multi-line record
            wall, message = None, line
        if m := self.AUTO_FIT.search(message):
            self.notes.append(f"context lowered from {int(m[1]):,} to {int(m[2]):,} tokens to fit the KV cache")
        for pattern, stage, detail, name in self.MILESTONES:
            if m := pattern.search(message):
                timeline.mark(name, wall)
                extra = next((g for g in m.groups() if g), None)
                self.report(EngineStatus(stage, f"{detail} ({extra})" if extra else detail))
