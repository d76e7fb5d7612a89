"""Flags shared by the driver (`python -m bench`) and its workers (`python -m bench.worker`).

The engine flags carry app.py's names, so one set of settings turns into the same EngineSettings for the
raw and Engine arms and into the same app.py command line for the app arm.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from bench.workload import Workload, parse_int_list
from engine.settings import EngineSettings

ARMS = ("raw", "engine", "app")
DTYPES = ("nvfp4", "bf16", "mtp")  # mtp: NVFP4 with Gemma 4's assistant drafting (MTP speculative decoding)
# Per-position acceptance of google/gemma-4-26B-A4B-it-assistant drafting 2 tokens for an NVFP4 26B-A4B, measured
# with real weights on a DGX Spark (github.com/eugr/spark-vllm-docker/issues/343). Random weights accept nothing,
# so --dummy mtp runs have vLLM's synthetic rejection sampler accept drafts at these rates.
MTP_ACCEPTANCE = (0.766, 0.545)
BENCH_MAX_MODEL_LEN = 16384  # 8192-token prompts + 1000 out, with room; the same for every arm

# EngineSettings field -> app.py flag, for the settings the bench sets; others go as --field-name VALUE.
APP_FLAGS = {
    "model": "--model",
    "backend": "--backend",
    "max_model_len": "--max-model-len",
    "kv_cache_dtype": "--kv-cache-dtype",
    "gpu_memory_utilization": "--gpu-memory-utilization",
    "max_num_seqs": "--max-num-seqs",
    "tensor_parallel_size": "--tensor-parallel-size",
    "quantization": "--quantization",
    "moe_backend": "--moe-backend",
    "linear_backend": "--linear-backend",
    "attention_backend": "--attention-backend",
    "load_format": "--load-format",
    "enforce_eager": "--enforce-eager",
}


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


def rate_list(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        rates = ()
    if not rates or not all(0 <= r <= 1 for r in rates):
        raise argparse.ArgumentTypeError(f"expected rates between 0 and 1 like 0.77,0.55, got {text!r}")
    return rates


def optional_int(text: str) -> int | None:
    if text.lower() in {"all", "none"}:
        return None
    return int(text)


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    names = {f.name for f in dataclasses.fields(EngineSettings)}
    if not sep or key.replace("-", "_") not in names:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE with FIELD one of EngineSettings' fields, got {text!r}")
    return key.replace("-", "_"), value


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
    d = EngineSettings()
    g = p.add_argument_group("engine settings (the same for every arm; app.py's flag names)")
    g.add_argument("--max-model-len", type=int, default=BENCH_MAX_MODEL_LEN, help="context length")
    g.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
    g.add_argument("--max-num-seqs", type=int, default=None, help="default: max(4, largest --concurrency)")
    g.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype)
    g.add_argument("--quantization", default=d.quantization)
    g.add_argument("--attention-backend", default=d.attention_backend)
    g.add_argument("--moe-backend", default=d.moe_backend)
    g.add_argument("--linear-backend", default=d.linear_backend)
    g.add_argument("--enforce-eager", action="store_true", default=d.enforce_eager)
    g.add_argument(
        "--engine-setting",
        type=key_value,
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any other EngineSettings field (repeatable); the app gets it as --field-name VALUE",
    )
    g.add_argument("--draft-model", help="mtp configurations: the assistant's folder (--dummy writes one)")
    g.add_argument(
        "--mtp-acceptance",
        type=rate_list,
        default=MTP_ACCEPTANCE,
        metavar="R,R",
        help="mtp configurations with --dummy: per-position acceptance rates that stand in for real ones; "
        "their count is the number of tokens drafted a step",
    )


def _convert(field: dataclasses.Field, value: str) -> Any:
    if value.lower() in {"none", "null"}:
        return None
    default, kind = field.default, str(field.type)
    if isinstance(default, bool) or kind.startswith("bool"):
        return value.lower() in {"1", "true", "yes", "on"}
    if isinstance(default, int) or (default is None and "int" in kind):
        return int(value)
    if isinstance(default, float) or (default is None and "float" in kind):
        return float(value)
    return value


def engine_settings(ns: argparse.Namespace, *, model: str, load_format: str, dtype: str) -> EngineSettings:
    max_num_seqs = ns.max_num_seqs or max(4, *ns.concurrency)
    settings = EngineSettings(
        model=model,
        backend="vllm",
        max_model_len=ns.max_model_len,
        gpu_memory_utilization=ns.gpu_memory_utilization,
        max_num_seqs=max_num_seqs,
        kv_cache_dtype=ns.kv_cache_dtype,
        quantization=ns.quantization,
        attention_backend=ns.attention_backend,
        moe_backend=ns.moe_backend,
        linear_backend=ns.linear_backend,
        enforce_eager=ns.enforce_eager,
        load_format=load_format,
        draft_model=None,  # only mtp configurations draft, whatever the app's default
    )
    if dtype == "mtp":
        rates = tuple(ns.mtp_acceptance)
        settings = dataclasses.replace(
            settings,
            draft_model=ns.draft_model,
            num_speculative_tokens=len(rates),
            synthetic_acceptance=rates if load_format == "dummy" else None,
        )
    fields = {f.name: f for f in dataclasses.fields(EngineSettings)}
    extra = {k: _convert(fields[k], v) for k, v in ns.engine_setting}
    return dataclasses.replace(settings, **extra)


def engine_args_for_worker(ns: argparse.Namespace) -> list[str]:
    """The driver's engine flags, repeated on a worker's command line."""
    out = ["--max-model-len", str(ns.max_model_len), "--gpu-memory-utilization", str(ns.gpu_memory_utilization)]
    if ns.max_num_seqs:
        out += ["--max-num-seqs", str(ns.max_num_seqs)]
    out += ["--kv-cache-dtype", ns.kv_cache_dtype]
    for flag in ("quantization", "attention_backend", "moe_backend", "linear_backend"):
        value = getattr(ns, flag)
        if value is not None:
            out += ["--" + flag.replace("_", "-"), value]
    if ns.enforce_eager:
        out.append("--enforce-eager")
    for key, value in ns.engine_setting:
        out += ["--engine-setting", f"{key}={value}"]
    if ns.draft_model:
        out += ["--draft-model", str(ns.draft_model)]
    out += ["--mtp-acceptance", ",".join(map(str, ns.mtp_acceptance))]
    return out


def app_command(settings: EngineSettings, *, python: str, app: str, port: int, extra: list[str] = ()) -> list[str]:
    """app.py with exactly these engine settings (defaults left out, except what the bench always sets)."""
    defaults = EngineSettings()
    cmd = [python, app, "--no-browser", "--host", "127.0.0.1", "--port", str(port)]
    always = {"model", "backend", "max_model_len", "gpu_memory_utilization", "max_num_seqs", "kv_cache_dtype"}
    for f in dataclasses.fields(EngineSettings):
        value = getattr(settings, f.name)
        if f.name not in always and value == getattr(defaults, f.name):
            continue
        if value is None and getattr(defaults, f.name) is None:
            continue  # the app's default for this flag is None too
        flag = APP_FLAGS.get(f.name, "--" + f.name.replace("_", "-"))
        if isinstance(value, bool):  # a store_true flag, or --no-<name> for a setting that is on by default
            cmd.append(flag if value else "--no-" + f.name.replace("_", "-"))
            continue
        if value is None:  # the app's words for None
            value = "auto" if f.name == "max_model_len" else "none"
        cmd += [flag, str(value)]
    return cmd + list(extra)


def app_flags_needed(cmd: list[str]) -> list[str]:
    return [a for a in cmd if a.startswith("--")]
