"""Flags shared by the driver (`python -m bench`) and its workers (`python -m bench.worker`).

The engine flags are generated from engine.settings with app.py's names, so one set of flags turns into the same
EngineSettings for every arm: handed to the workers as JSON, and to the app arm as app.py's command line.
"""

from __future__ import annotations

import argparse
import dataclasses

from bench.workload import Workload, parse_int_list
from engine import settings
from engine.settings import EngineSettings

# vllm: plain vLLM 0.26 with the app's engine arguments and none of its patches (the reference the kernels are
# measured against); raw: the same AsyncLLM with the patches, as the app launches it; engine: VllmEngine through the
# Engine protocol; app: the whole app through its Gradio API.
ARMS = ("vllm", "raw", "engine", "app")
DTYPES = ("nvfp4", "bf16", "mtp")  # mtp: NVFP4 with Gemma 4's assistant drafting (MTP speculative decoding)
# Per-position acceptance of google/gemma-4-26B-A4B-it-assistant drafting 2 tokens for an NVFP4 26B-A4B, measured
# with real weights on a DGX Spark (github.com/eugr/spark-vllm-docker/issues/343). Random weights accept nothing,
# so --dummy mtp runs have vLLM's synthetic rejection sampler accept drafts at these rates.
MTP_ACCEPTANCE = (0.766, 0.545)
BENCH_MAX_MODEL_LEN = 16384  # 8192-token prompts + 1000 out, with room; the same for every arm
# Settings each configuration sets itself (model, backend, weights) or derives (drafting, from --draft-model and
# --mtp-acceptance); every other vLLM setting is a flag with app.py's name.
PER_CONFIGURATION = ("model", "backend", "load_format", "draft_model", "num_speculative_tokens", "synthetic_acceptance")
# Given to the app arm even where they equal the app's defaults: the bench's own defaults differ.
APP_ALWAYS = ("model", "backend", "max_model_len", "gpu_memory_utilization", "max_num_seqs", "kv_cache_dtype")


def int_list(text: str) -> tuple[int, ...]:
    try:
        return parse_int_list(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def name_list(choices: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n for n in text.replace(" ", "").split(",") if n)
        bad = [n for n in names if n not in choices]
        if not names or bad:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (got {text!r})")
        return names

    return parse


def optional_int(text: str) -> int | None:
    if text.lower() in {"all", "none"}:
        return None
    return int(text)


def add_workload_flags(p: argparse.ArgumentParser) -> None:
    d = Workload()
    g = p.add_argument_group("workload (the same for every arm)")
    g.add_argument("--prompt-lens", type=int_list, default=d.prompt_lens, metavar="N,N", help="prompt tokens")
    g.add_argument("--output-lens", type=int_list, default=d.output_lens, metavar="N,N", help="output tokens")
    g.add_argument("--concurrency", type=int_list, default=d.concurrency, metavar="N,N", help="streams sent together")
    g.add_argument(
        "--long-output-prompt-len",
        type=optional_int,
        default=d.long_output_prompt_len,
        metavar="N|all",
        help="outputs longer than the shortest only at this prompt length ('all': every length)",
    )
    g.add_argument(
        "--ttft-samples",
        type=int,
        default=d.ttft_samples,
        help="extra one-stream requests per prompt length for the TTFT percentiles",
    )
    g.add_argument("--ttft-output-len", type=int, default=d.ttft_output_len, help="output tokens of those requests")
    g.add_argument("--repeats", type=int, default=d.repeats, help="times each measured run is repeated")


def workload_from(ns: argparse.Namespace) -> Workload:
    return Workload(
        prompt_lens=tuple(ns.prompt_lens),
        output_lens=tuple(ns.output_lens),
        concurrency=tuple(ns.concurrency),
        long_output_prompt_len=ns.long_output_prompt_len,
        ttft_samples=ns.ttft_samples,
        ttft_output_len=ns.ttft_output_len,
        repeats=ns.repeats,
    )


def workload_args(w: Workload) -> list[str]:
    return [
        "--prompt-lens", ",".join(map(str, w.prompt_lens)),
        "--output-lens", ",".join(map(str, w.output_lens)),
        "--concurrency", ",".join(map(str, w.concurrency)),
        "--long-output-prompt-len", "all" if w.long_output_prompt_len is None else str(w.long_output_prompt_len),
        "--ttft-samples", str(w.ttft_samples),
        "--ttft-output-len", str(w.ttft_output_len),
        "--repeats", str(w.repeats),
    ]  # fmt: skip


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine settings (the same for every arm; app.py's flags)")
    defaults = {"max_model_len": BENCH_MAX_MODEL_LEN, "max_num_seqs": None}  # None: max(4, largest --concurrency)
    settings.add_flags(g, backends=("vllm",), exclude=PER_CONFIGURATION, defaults=defaults)
    g.add_argument("--draft-model", help="mtp configurations: the assistant's folder (--dummy writes one)")
    g.add_argument(
        "--mtp-acceptance",
        type=settings.rates,
        default=MTP_ACCEPTANCE,
        metavar="R,R",
        help="mtp configurations with --dummy: per-position acceptance rates that stand in for real ones; "
        "their count is the number of tokens drafted a step",
    )


def engine_settings(ns: argparse.Namespace, *, model: str, load_format: str, dtype: str) -> EngineSettings:
    """One configuration's settings: the driver's flags, this configuration's model and weights, and drafting
    for mtp configurations only (whatever the app's default)."""
    drafting = {"draft_model": None}  # --draft-model is the bench's, for mtp configurations
    if dtype == "mtp":
        rates = tuple(ns.mtp_acceptance)
        drafting = {
            "draft_model": ns.draft_model,
            "num_speculative_tokens": len(rates),
            "synthetic_acceptance": rates if load_format == "dummy" else None,
        }
    fixed = settings.from_flags(ns, model=model, backend="vllm", load_format=load_format, **drafting)
    return dataclasses.replace(fixed, max_num_seqs=ns.max_num_seqs or max(4, *ns.concurrency))


def app_command(config: EngineSettings, *, python: str, app: str, port: int, extra: list[str] = ()) -> list[str]:
    """app.py with exactly these engine settings (defaults left out, except what the bench always sets)."""
    cmd = [python, app, "--no-browser", "--host", "127.0.0.1", "--port", str(port)]
    return cmd + settings.to_argv(config, always=APP_ALWAYS) + list(extra)


def app_flags_needed(cmd: list[str]) -> list[str]:
    return [a for a in cmd if a.startswith("--")]
