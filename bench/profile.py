"""Where a one-stream decode step's time goes: vLLM's torch profiler over a stretch of decode steps.

    python -m bench.profile --dummy --out DIR [--steps 64] [any engine flag of app.py: --enforce-eager, ...]

The engine is the one the app serves (engine.vllm_launch.launch, patches included) on the full-size 26B-A4B
config with dummy weights. Prints the time a step takes, how much of it the GPU was busy (the union
of kernel intervals), the kernels and graph launches a step makes and the kernels that take the most time.
A GPU busy nearly all the step is bound by its kernels; a GPU idle between kernels waits on the CPU.
The chrome trace (open it in ui.perfetto.dev) and vLLM's kernel table stay in DIR/trace.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import dummy
from engine import settings
from engine.vllm_launch import launch

PROMPT_TOKENS = 512
PROFILE_DEFAULTS = {"max_model_len": 16384}  # the bench's context: a 512-token prompt needs no more


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    p.add_argument("--dummy", action="store_true", help="full-size 26B-A4B NVFP4 config with random weights")
    p.add_argument("--model", help="NVFP4 checkpoint folder (without --dummy)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=64, help="decode steps profiled")
    # Any engine setting, under app.py's flag (--enforce-eager: no CUDA graphs, to see what graphs save).
    settings.add_flags(p, backends=("vllm",), exclude=("model", "backend", "load_format"), defaults=PROFILE_DEFAULTS)
    ns = p.parse_args(argv)
    if bool(ns.dummy) == bool(ns.model):
        p.error("give --dummy or --model DIR")
    return ns


async def profile(ns: argparse.Namespace) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.config import ProfilerConfig

    trace_dir = (ns.out / "trace").resolve()
    folder = dummy.prepare(ns.out / "checkpoints", nvfp4=True) if ns.dummy else Path(ns.model)
    config = settings.from_flags(ns, model=str(folder), load_format="dummy" if ns.dummy else "auto")
    profiler = ProfilerConfig(profiler="torch", torch_profiler_dir=str(trace_dir), torch_profiler_with_stack=False)
    launched = await launch(config, overrides={"profiler_config": profiler})
    llm, notes = launched.llm, launched.notes
    try:
        prompt = {"prompt_token_ids": [1000 + i for i in range(PROMPT_TOKENS)]}

        async def decode(request_id: str, tokens: int) -> list[float]:
            params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
            return [time.perf_counter() async for _ in llm.generate(prompt, params, request_id)]

        await decode("warm-up", 32)
        unprofiled = await decode("unprofiled", ns.steps)
        await llm.start_profile()
        profiled = await decode("profiled", ns.steps)
        await llm.stop_profile()
    finally:
        llm.shutdown()
    traces = sorted(trace_dir.rglob("*.json.gz"), key=lambda p: p.stat().st_size)
    return {
        "notes": notes,
        "step_ms": _step_ms(unprofiled),
        "step_ms_profiled": _step_ms(profiled),
        **(summarize(traces[-1], ns.steps) if traces else {"trace": None}),
    }


def _step_ms(stamps: list[float]) -> float | None:
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1000 if len(stamps) > 1 else None


def summarize(trace: Path, steps: int) -> dict[str, Any]:
    """GPU busy time and kernel counts of the engine core's trace (the largest: it holds the GPU work)."""
    events = json.loads(gzip.open(trace).read())["traceEvents"]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    if not kernels:
        return {"trace": str(trace), "kernels": 0}
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels)
    busy, end = 0.0, spans[0][0]
    for start, stop in spans:
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    window = spans[-1][1] - spans[0][0]
    total = Counter()
    for e in kernels:
        total[e["name"][:90]] += e["dur"]
    launches = Counter(e["name"] for e in events if e.get("cat") == "cuda_runtime")
    return {
        "trace": str(trace),
        "gpu_window_ms": window / 1000,
        "gpu_busy_ms": busy / 1000,
        "gpu_busy_fraction": busy / window if window else None,
        "kernels_per_step": len(kernels) / steps,
        "graph_launches_per_step": launches.get("cudaGraphLaunch", 0) / steps,
        "kernel_launches_per_step": launches.get("cudaLaunchKernel", 0) / steps,
        "top_kernels_us_per_step": [(name, round(us / steps, 1)) for name, us in total.most_common(12)],
    }


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    ns.out.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(profile(ns))
    (ns.out / "profile.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
