"""Every engine setting, declared once: its type, default, help and the backends that read it.

app.py's engine flags, the bench's engine options and the command line of the bench's app arm are all
generated from these fields (`add_flags`, `from_flags`, `to_argv`); the bench hands settings to its workers
as one JSON object (`to_json`, `from_json`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MODEL = "bg-digitalservices/Gemma-4-26B-A4B-it-NVFP4"
BACKENDS = ("auto", "vllm", "openai", "transformers")
EVERY_BACKEND = ("vllm", "openai", "transformers")
GEMMA4_VIDEO_FRAMES = 32  # what Gemma 4 takes of one video


# ------------------------------------------------------------------------------------------- parsers


def positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(value: str) -> int | float:
        try:
            number = kind(value)
        except ValueError:
            number = 0
        if not 0 < number < math.inf:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
        return number

    return parse


def tokens_or(word: str) -> Callable[[str], int | None]:
    """A positive number of tokens, or `word` for None (the setting's default meaning)."""

    def parse(value: str) -> int | None:
        if value == word:
            return None
        if not value.isdigit() or int(value) == 0:
            raise argparse.ArgumentTypeError(f"expected a number of tokens or {word!r}, got {value!r}")
        return int(value)

    return parse


def text_or_none(value: str) -> str | None:
    return None if value.lower() == "none" else value


def video_frames(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= GEMMA4_VIDEO_FRAMES:
        raise argparse.ArgumentTypeError(f"expected 1 to {GEMMA4_VIDEO_FRAMES} frames, got {value!r}")
    return int(value)


def rates(value: str) -> tuple[float, ...]:
    try:
        parsed = tuple(float(x) for x in value.split(",") if x.strip())
    except ValueError:
        parsed = ()
    if not parsed or not all(0 <= r <= 1 for r in parsed):
        raise argparse.ArgumentTypeError(f"expected rates between 0 and 1 like 0.77,0.55, got {value!r}")
    return parsed


# ------------------------------------------------------------------------------------------- declaration


@dataclass(frozen=True)
class Flag:
    help: str
    backends: tuple[str, ...]
    parse: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None
    none_word: str | None = None  # how the command line says None where None is not the default
    hidden: bool = False  # accepted but left out of --help (benchmark-only settings)


def setting(default: Any, help: str, *, backends: Iterable[str] = EVERY_BACKEND, **flag: Any) -> Any:
    return field(default=default, metadata={"flag": Flag(help, tuple(backends), **flag)})


VLLM = ("vllm",)


@dataclass(frozen=True)
class EngineSettings:
    model: str = setting(DEFAULT_MODEL, "hub id or local directory (the served model name for openai)")
    backend: str = setting("auto", "auto: vLLM on an NVIDIA GPU", choices=BACKENDS)
    base_url: str | None = setting(None, "OpenAI-compatible server, e.g. http://spark:8000/v1", backends=("openai",))
    # The key this app sends to --base-url; the key clients send to this app's own /v1 is app.py's --api-key.
    remote_api_key: str | None = setting(None, "API key for --base-url (sent to that server)", backends=("openai",))
    # vllm backend; defaults follow the model card's `vllm serve` flags
    max_model_len: int | None = setting(
        262144,
        "context length in tokens, lowered to what the KV cache holds; auto: the model's own",
        backends=("vllm", "transformers"),
        parse=tokens_or("auto"),
        none_word="auto",
    )
    kv_cache_dtype: str = setting("fp8", "vLLM KV cache dtype", backends=VLLM)
    gpu_memory_utilization: float = setting(0.85, "share of GPU memory vLLM may use", backends=VLLM, parse=float)
    max_num_seqs: int = setting(4, "replies generated at once (also the UI's concurrency limit)", parse=int)
    tensor_parallel_size: int = setting(1, "GPUs to split the model over", backends=VLLM, parse=int)
    quantization: str | None = setting(
        None, "vLLM quantization; None: read from the checkpoint (modelopt for NVFP4)", backends=VLLM
    )
    moe_backend: str | None = setting(
        None, "MoE kernel; None: marlin without FP4 tensor cores, else vLLM's choice", backends=VLLM
    )
    linear_backend: str | None = setting(None, "FP4 linear kernel; None: as for --moe-backend", backends=VLLM)
    attention_backend: str | None = setting(
        None, "vLLM attention backend; None: vLLM's choice (Triton where FlashAttention 4 can't run)", backends=VLLM
    )
    load_format: str = setting(
        "auto", "vLLM weight loading; dummy: random weights of the model's shapes", backends=VLLM
    )
    enforce_eager: bool = setting(False, "no CUDA graphs, no torch.compile (debugging)", backends=VLLM)
    # 2048 (vLLM's prefill chunk here): TTFT of a 512-token prompt 72 -> 29 ms on an H200 (bench/NOTES.md). None:
    # vLLM's default of 2 x max_num_seqs, which leaves every prompt of more than 8 tokens to launch its kernels one
    # by one.
    cuda_graph_max_tokens: int | None = setting(
        2048,
        "batches of up to this many tokens, prompt chunks included, run as CUDA graphs; "
        "none: vLLM's default (2 x --max-num-seqs)",
        backends=VLLM,
        parse=tokens_or("none"),
        none_word="none",
    )
    torch_compile: bool = setting(
        True, "skip torch.compile: a faster first start (decode steps still run as CUDA graphs)", backends=VLLM
    )
    small_batch_kernels: str = setting(
        "auto",
        "our NVFP4 kernels for decode batches of up to 8 tokens instead of Marlin's (Marlin for prompts); "
        "auto: on the GPUs where a GPU test measured them faster (H100/H200)",
        backends=VLLM,
        choices=("auto", "on", "off"),
    )
    # Off by default: on an H200 MTP drafting gained 10 % for one stream and halved four streams' throughput.
    draft_model: str | None = setting(
        None,
        "Gemma 4 assistant for MTP speculative decoding: folder, hub id, auto (the assistant published with the "
        "model; skipped with a note when it can't be had) or none. Helps one stream a little, costs several "
        "streams much (README: measured results)",
        backends=VLLM,
        parse=text_or_none,
        none_word="none",
    )
    num_speculative_tokens: int = setting(
        2, "tokens the MTP drafter proposes a step", backends=VLLM, parse=positive(int)
    )
    # Off by default: when off, vLLM is started exactly as without it (engine.experts, patches/experts.py).
    expert_view: bool = setting(
        False,
        "count which experts each reply is routed to (layer x expert), live while it streams, for the UI's "
        "'Experts at work' (vLLM: its routed-experts capture; README: what it costs)",
        backends=("vllm", "transformers"),
    )
    # Random weights accept no draft: vLLM then accepts drafts at these per-position rates instead of checking them.
    synthetic_acceptance: tuple[float, ...] | None = setting(
        None, "benchmarks on dummy weights: MTP acceptance rates", backends=VLLM, parse=rates, hidden=True
    )
    # multimodal limits, shared by every backend and the UI
    max_images_per_prompt: int = setting(8, "images one prompt may hold", parse=positive(int))
    max_video_frames: int = setting(
        GEMMA4_VIDEO_FRAMES, f"frames the model sees of a video, 1 to {GEMMA4_VIDEO_FRAMES}", parse=video_frames
    )
    max_videos_per_prompt: int = setting(1, "videos one prompt may hold", parse=positive(int))
    video_fps: float = setting(
        1.0,
        "frames taken per second of video; a longer clip gets --max-video-frames spread over it",
        parse=positive(float),
    )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> EngineSettings:
        values = json.loads(text)
        if values.get("synthetic_acceptance") is not None:  # JSON has no tuples
            values["synthetic_acceptance"] = tuple(values["synthetic_acceptance"])
        return cls(**values)


def flags() -> dict[str, Flag]:
    return {f.name: f.metadata["flag"] for f in dataclasses.fields(EngineSettings)}


def option(name: str) -> str:
    """The command-line flag of a field: --max-model-len; --no-torch-compile for a switch that is on by default."""
    default = next(f.default for f in dataclasses.fields(EngineSettings) if f.name == name)
    return ("--no-" if default is True else "--") + name.replace("_", "-")


def add_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    *,
    backends: Iterable[str] = EVERY_BACKEND,
    exclude: Iterable[str] = (),
    defaults: dict[str, Any] | None = None,
) -> None:
    """One flag per setting read by any of `backends`, minus `exclude`; `defaults` replaces some defaults."""
    wanted, skipped, defaults = set(backends), set(exclude), defaults or {}
    for f in dataclasses.fields(EngineSettings):
        flag: Flag = f.metadata["flag"]
        if f.name in skipped or not wanted & set(flag.backends):
            continue
        default = defaults.get(f.name, f.default)
        help_text = argparse.SUPPRESS if flag.hidden else flag.help
        if isinstance(f.default, bool):  # a switch: --name turns it on, --no-name off (its help says what that does)
            parser.add_argument(option(f.name), dest=_dest(f.name), action="store_true", help=help_text)
        else:
            parser.add_argument(
                option(f.name), dest=f.name, type=flag.parse, choices=flag.choices, default=default, help=help_text
            )


def _dest(name: str) -> str:
    return option(name).removeprefix("--").replace("-", "_")


def from_flags(ns: argparse.Namespace, **fixed: Any) -> EngineSettings:
    """The settings of a namespace filled by add_flags; `fixed` sets fields that have no flag there."""
    values = {}
    for f in dataclasses.fields(EngineSettings):
        dest = _dest(f.name)
        if hasattr(ns, dest):
            value = getattr(ns, dest)
            values[f.name] = (not value if f.default else value) if isinstance(f.default, bool) else value
    return EngineSettings(**{**values, **fixed})


def to_argv(settings: EngineSettings, always: Iterable[str] = ()) -> list[str]:
    """The flags that give these settings to a parser made by add_flags: values other than the defaults, plus
    the fields in `always`."""
    defaults, keep, argv = EngineSettings(), set(always), []
    for f in dataclasses.fields(EngineSettings):
        value = getattr(settings, f.name)
        if value == getattr(defaults, f.name) and f.name not in keep:
            continue
        if isinstance(f.default, bool):
            if value != f.default:
                argv.append(option(f.name))
            continue
        if value is None:
            if f.default is None:
                continue
            value = f.metadata["flag"].none_word
        elif isinstance(value, tuple):
            value = ",".join(map(str, value))
        argv += [option(f.name), str(value)]
    return argv
