"""Our small-batch NVFP4 kernels (nvfp4.kernels) against vLLM's Marlin on Gemma 4 26B-A4B's shapes, one GPU.

    python -m bench.kernels --out DIR [--quick] [--write-configs] [--budget S]

No engine starts. For every dense shape and the MoE at M = 1, 2, 4, 8 tokens: random weights quantized by
nvfp4.codec, laid out by vLLM's own prepare_fp4_layer_for_marlin / prepare_nvfp4_moe_layer_for_marlin (the
GPU repack, gptq_marlin_repack), which nvfp4.kernels.marlin_layout must reproduce bit for bit (checked first);
then both kernels against the torch reference (relative Frobenius error), and their times. A time is the median
over blocks of CUDA-graph replays, each graph calling the kernel on rotating weight copies that together exceed
3x the L2 (MoE: all 128 experts, fresh random top-8 per call), so weights come from HBM as in decoding; the
graph's launch gaps are part of it, as in vLLM's decode graphs. Bytes are the packed weights + scales a call
reads (MoE: the union of the experts its tokens picked).

Tuning, bounded to `--budget` seconds for the whole run (default 170): every candidate config of a (shape, M)
(the knob families x split-K x L2 prefetch, `dense_candidates` / `moe_*_candidates`, predicted-best first) is
compiled up front in parallel worker processes (nvfp4.kernels.precompile), timed once with few replays, and the
best few (plus the config this GPU's tuned file gave at the start) again with full replays; the best of those is
the row's "ours". Each row also checks the chosen config on a NaN-poisoned workspace and output, and that the
split-K counters are back at zero.

The PDL check (`chain`): a CUDA graph of the decode step's 30 layers in which every one of our calls is preceded
by a small elementwise kernel that writes its input (as a norm or activation does in the model), once with our
kernels launched as programmatic dependents and once without, against the same chain with Marlin and with the
elementwise kernels alone; the programmatic-launch attribute must survive graph capture for PDL to gain there.
With --write-configs the best config per (shape, block_m) goes to nvfp4/kernels/tuned/<gpu>.json (merged into
what is there; `pdl` set where the chain measured it faster), which gemv_config / moe_config read; a copy goes
to DIR. DIR gets kernels.json and kernels.md; the markdown table is printed last.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from bench import bandwidth
from bench.checkpoints import TEXT_CONFIG
from nvfp4 import codec
from nvfp4.kernels import gemv, marlin_layout, moe, precompile, tuning
from nvfp4.kernels.reference import gemv_reference, moe_reference

HIDDEN = TEXT_CONFIG["hidden_size"]
# Gemma 4 26B-A4B's NVFP4 linears (N out, K in), as vLLM builds them.
DENSE = {
    "qkv sliding": (8192, HIDDEN),
    "qkv full": (10240, HIDDEN),
    "o_proj sliding": (HIDDEN, 4096),
    "o_proj full": (HIDDEN, 8192),
    "mlp gate_up": (2 * TEXT_CONFIG["intermediate_size"], HIDDEN),
    "mlp down": (HIDDEN, TEXT_CONFIG["intermediate_size"]),
}
EXPERTS, TOPK, INTER = TEXT_CONFIG["num_experts"], TEXT_CONFIG["top_k_experts"], TEXT_CONFIG["moe_intermediate_size"]
LAYER = {
    "sliding_attention": ["qkv sliding", "o_proj sliding", "mlp gate_up", "mlp down", "moe"],
    "full_attention": ["qkv full", "o_proj full", "mlp gate_up", "mlp down", "moe"],
}
TOKENS = (1, 2, 4, 8)
CHAIN_TOKENS = (1, 4)
ACCEPT = 1e-2  # relative error a kernel's output may have (bf16 rounding alone: ~1.6e-3)
BLOCKS, REPLAYS = 5, 10  # a full timing
QUICK_BLOCKS, QUICK_REPLAYS = 3, 1  # a candidate's first timing
TOP = 3  # candidates re-timed in full
BUDGET_S = 170.0
RESERVE_S = 25.0  # of the budget, kept for the chain, the files and the last rows
PDL_GAIN = 0.01  # the chain must be this much faster with PDL for --write-configs to turn it on


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help="M = 1 and 4 only, fewer candidates")
    p.add_argument("--write-configs", action="store_true", help="write the best configs to nvfp4/kernels/tuned/")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole run (the sweep adapts)")
    return p.parse_args(argv)


class Clock:
    """The run's budget; `allot` shares what is left for sweeping among the items still to sweep, by weight."""

    def __init__(self, budget: float, weight: float = 1.0):
        self.started, self.budget, self.weight_left = time.time(), budget, weight

    def elapsed(self) -> float:
        return time.time() - self.started

    def sweep_left(self) -> float:
        return self.budget - RESERVE_S - self.elapsed()

    def allot(self, weight: float) -> float:
        seconds = self.sweep_left() * weight / max(weight, self.weight_left)
        self.weight_left -= weight
        return max(1.0, seconds)


def graph_us(
    calls: list[Callable[[], Any]], blocks: int = BLOCKS, replays: int = REPLAYS, per_call: bool = True
) -> float:
    """Median µs per call (per replay unless `per_call`) of a CUDA graph that makes `calls` in order."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and allocate outside the capture
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(blocks):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / (replays * (len(calls) if per_call else 1)))
    del graph
    return statistics.median(times)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def random_quantized(n: int, k: int, device: torch.device):
    return codec.quantize(torch.randn(n, k, device=device) * k**-0.5)


def vllm_dense(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor) -> SimpleNamespace:
    from vllm.model_executor.layers.quantization.utils.marlin_utils_fp4 import prepare_fp4_layer_for_marlin

    n, k = packed.shape[0], packed.shape[1] * 2
    layer = SimpleNamespace(
        weight=packed, weight_scale=block_scale, weight_global_scale=global_scale,
        output_size_per_partition=n, input_size_per_partition=k, params_dtype=torch.bfloat16,
    )  # fmt: skip
    prepare_fp4_layer_for_marlin(layer)
    return layer


def same_layout(ours: marlin_layout.MarlinNvfp4, weight, scales, global_scale) -> bool:
    return (
        torch.equal(ours.qweight, weight)
        and torch.equal(ours.scales.view(torch.uint8), scales.view(torch.uint8))
        and torch.equal(ours.global_scale, global_scale)
    )


# ------------------------------------------------------------------------------------------- problems


@dataclass
class Dense:
    name: str
    n: int
    k: int
    gs: torch.Tensor
    marlin_workspace: torch.Tensor
    weights: list[tuple[torch.Tensor, torch.Tensor]]  # rotating copies (qweight, scales), beyond 3x the L2
    bytes: int
    layout_ok: bool

    @property
    def padded(self) -> tuple[int, int]:
        q = self.weights[0][0]
        return q.shape[1] // 2, q.shape[0] * 16

    def ours(self, config, x, wq, ws, workspace=None, out=None):
        return gemv.marlin_nvfp4_gemv(x, wq, ws, self.gs, self.n, self.k, config, workspace, out)

    def marlin(self, x, wq, ws):
        from vllm.model_executor.layers.quantization.utils.marlin_utils_fp4 import apply_fp4_marlin_linear

        return apply_fp4_marlin_linear(x, wq, ws, self.gs, self.marlin_workspace, self.n, self.k)


def make_dense(name: str, n: int, k: int, device) -> Dense:
    packed, block_scale, global_scale = random_quantized(n, k, device)
    layer = vllm_dense(packed, block_scale, global_scale)
    q, s, gs = layer.weight.data, layer.weight_scale.data, layer.weight_global_scale.data
    layout_ok = same_layout(marlin_layout.dense_to_marlin(packed, block_scale, global_scale), q, s, gs)
    weight_bytes = q.numel() * 4 + s.numel()
    copies = max(3, math.ceil(3 * torch.cuda.get_device_properties(device).L2_cache_size / weight_bytes))
    weights = [(q, s)] + [(q.clone(), s.clone()) for _ in range(copies - 1)]
    return Dense(name, n, k, gs, layer.workspace, weights, weight_bytes, layout_ok)


def vllm_moe(w13, w2) -> tuple[torch.Tensor, ...]:
    from vllm.model_executor.layers.quantization.utils.marlin_utils_fp4 import prepare_nvfp4_moe_layer_for_marlin

    layer = SimpleNamespace(
        num_experts=EXPERTS, hidden_size=HIDDEN, intermediate_size_per_partition=INTER, params_dtype=torch.bfloat16
    )
    return prepare_nvfp4_moe_layer_for_marlin(layer, *w13, *w2, is_act_and_mul=True)


@dataclass
class Moe:
    weights: tuple[torch.Tensor, ...]  # w13, w13_scale, w13_gs, w2, w2_scale, w2_gs (vLLM's)
    marlin_workspace: torch.Tensor
    expert_bytes: int
    layout_ok: bool

    @property
    def i_pad(self) -> int:
        return self.weights[0].shape[2] // 4

    def ours(self, config, x, topk_weights, topk_ids, workspace=None, intermediate=None, out=None):
        return moe.marlin_nvfp4_moe(x, *self.weights, topk_weights, topk_ids, config, workspace, intermediate, out)

    def marlin(self, x, topk_weights, topk_ids):
        from vllm.model_executor.layers.fused_moe.activation import MoEActivation
        from vllm.model_executor.layers.fused_moe.experts.marlin_moe import fused_marlin_moe
        from vllm.scalar_type import scalar_types

        w = self.weights
        return fused_marlin_moe(
            x, w[0], w[3], None, None, w[1], w[4], topk_weights, topk_ids,
            quant_type_id=scalar_types.float4_e2m1f.id, global_num_experts=EXPERTS,
            activation=MoEActivation.GELU_TANH, global_scale1=w[2], global_scale2=w[5],
            workspace=self.marlin_workspace,
        )  # fmt: skip


def make_moe(device) -> Moe:
    from vllm.model_executor.layers.quantization.utils.marlin_utils import marlin_make_workspace_new

    def stacked(n: int, k: int):
        return tuple(
            torch.stack(t) for t in zip(*(random_quantized(n, k, device) for _ in range(EXPERTS)), strict=True)
        )

    w13, w2 = stacked(2 * INTER, HIDDEN), stacked(HIDDEN, INTER)
    weights = vllm_moe(w13, w2)
    ours_13, ours_2 = marlin_layout.moe_to_marlin(w13, w2)
    layout_ok = same_layout(ours_13, *weights[:3]) and same_layout(ours_2, *weights[3:])
    expert_bytes = (weights[0][0].numel() + weights[3][0].numel()) * 4 + weights[1][0].numel() + weights[4][0].numel()
    return Moe(weights, marlin_make_workspace_new(device, 4), expert_bytes, layout_ok)


def random_routing(m: int, device, gen: torch.Generator | None = None):
    ids = torch.stack([torch.randperm(EXPERTS, device=device)[:TOPK] for _ in range(m)]).to(torch.int32)
    return torch.rand(m, TOPK, device=device), ids


# ----------------------------------------------------------------------------------------- candidates

# Knob families (each one compile per block_m); split-K and prefetch are runtime arguments (no compile).
DENSE_FAMILIES = [
    dict(warps_k=4, rows=4, super_tiles=1, num_stages=4),
    dict(warps_k=4, rows=4, super_tiles=1, num_stages=3),  # v1's measured best (with prefetch 0)
    dict(warps_k=8, rows=4, super_tiles=1, num_stages=4),
    dict(warps_k=16, rows=4, super_tiles=1, num_stages=3),  # no split: 4 warps per scheduler, shared-memory sum
    dict(warps_k=4, rows=8, super_tiles=1, num_stages=3),
    dict(warps_k=4, rows=4, super_tiles=1, num_stages=6),
    dict(warps_k=4, rows=4, super_tiles=2, num_stages=4),
]
WARPS_PER_SM = (8, 16, 24)  # split-K targets: this many warps of the program's kind per SM
RESIDENT_WARPS = 24  # ~80 registers per thread: ~24 warps fit an SM


def dense_candidates(n_pad: int, k_pad: int, sms: int, quick: bool = False) -> list[gemv.GemvConfig]:
    """Every family x split-K for ~8, 16, 24 warps per SM (as far as K has steps) x prefetch (whole slice, none),
    predicted-best first; distinct in what runs (the same splits after `split_plan` count once)."""
    families = DENSE_FAMILIES[:3] if quick else DENSE_FAMILIES
    prefetches = (gemv.ALL,) if quick else (gemv.ALL, 0)
    seen, out = set(), []
    for prefetch in prefetches:
        for family in families:
            base = gemv.GemvConfig(**family, prefetch=prefetch)
            blocks = math.ceil(n_pad // 64 / base.super_tiles)
            k_tiles = k_pad // 16
            for warps in WARPS_PER_SM:
                programs = min(warps, RESIDENT_WARPS) * sms // base.warps_k
                split = max(1, round(programs / blocks))
                _, splits = gemv.split_plan(k_tiles, base.step, split)
                key = (tuple(family.items()), splits, prefetch)
                if key not in seen:
                    seen.add(key)
                    out.append(replace(base, split_k=splits))
    return out


MOE_GATE_UP = [
    dict(gate_up_warps_k=4, gate_up_rows=4, gate_up_stages=4),
    dict(gate_up_warps_k=4, gate_up_rows=4, gate_up_stages=3),
    dict(gate_up_warps_k=8, gate_up_rows=4, gate_up_stages=4),
    dict(gate_up_warps_k=4, gate_up_rows=8, gate_up_stages=3),
]
MOE_DOWN = [
    dict(down_super_tiles=1, down_warps_k=4, down_rows=4, down_stages=4),
    dict(down_super_tiles=1, down_warps_k=4, down_rows=4, down_stages=2),
    dict(down_super_tiles=2, down_warps_k=4, down_rows=4, down_stages=4),
    dict(down_super_tiles=1, down_warps_k=2, down_rows=8, down_stages=4),
]


def moe_prefetches(m: int) -> tuple[int, ...]:
    return (gemv.ALL, 0) if m <= 2 else (32, 0)  # whole slices only while the experts fit in L2 (26.8 MB at M=1)


def moe_gate_up_candidates(m: int, sms: int, start: moe.MoeConfig, quick: bool = False) -> list[moe.MoeConfig]:
    """gate_up families x split (1, and ~1, 2, 4 programs of 4 warps per SM) x prefetch, down as in `start`."""
    experts = min(m * TOPK, EXPERTS)  # about: distinct experts of m tokens
    blocks = experts * (INTER // 64)
    families = MOE_GATE_UP[:2] if quick else MOE_GATE_UP
    seen, out = set(), []
    for prefetch in moe_prefetches(m)[: 1 if quick else 2]:
        for family in families:
            step = family["gate_up_warps_k"] * family["gate_up_rows"]
            for per_sm in (0, 1, 2, 4):
                split = 1 if per_sm == 0 else max(1, round(per_sm * sms * 4 / family["gate_up_warps_k"] / blocks))
                _, splits = gemv.split_plan(HIDDEN // 16, step, split)
                key = (tuple(family.items()), splits, prefetch)
                if key not in seen:
                    seen.add(key)
                    out.append(replace(start, **family, gate_up_split_k=splits, gate_up_prefetch=prefetch))
    return out


def moe_down_candidates(m: int, gate_up: moe.MoeConfig, quick: bool = False) -> list[moe.MoeConfig]:
    families = MOE_DOWN[:2] if quick else MOE_DOWN
    prefetches = moe_prefetches(m)[: 1 if quick else 2]
    return [replace(gate_up, **family, down_prefetch=p) for p in prefetches for family in families]


# ------------------------------------------------------------------------------------------- measuring


def evaluate(config, run: Callable, ref: torch.Tensor, inputs: list, blocks: int, replays: int) -> dict:
    """Error and time of `run(config, *input)`; a config that fails or errs is recorded, not fatal."""
    entry: dict[str, Any] = {"config": asdict(config)}
    try:
        entry["error"] = relative_error(run(config, *inputs[0]), ref)
        if entry["error"] < ACCEPT:
            entry["us"] = graph_us([partial(run, config, *i) for i in inputs], blocks, replays)
    except Exception as e:  # e.g. a knob combination Triton cannot build
        entry["failed"] = repr(e)[:300]
    return entry


def tune(start, candidates: list, run: Callable, ref, inputs, seconds: float) -> tuple[dict, dict, list[dict]]:
    """(best, start's, all entries): quick times of the candidates in order while `seconds` last, then full times
    of the best TOP and of `start` (the config this GPU's file gave). Best is the fastest full time."""
    t0 = time.time()
    configs = [start] + [c for c in candidates if c != start]
    quick = []
    for i, config in enumerate(configs):
        if i > 0 and time.time() - t0 > seconds:
            break
        quick.append(evaluate(config, run, ref, inputs, QUICK_BLOCKS, QUICK_REPLAYS) | {"stage": "quick"})
    timed = sorted((e for e in quick if "us" in e), key=lambda e: e["us"])
    finalists = [e["config"] for e in timed[:TOP]]
    if asdict(start) not in finalists:
        finalists.append(asdict(start))
    full = [
        evaluate(type(start)(**c), run, ref, inputs, BLOCKS, REPLAYS) | {"stage": "full", "quick_us": q}
        for c in finalists
        for q in [next((e.get("us") for e in quick if e["config"] == c), None)]
    ]
    start_entry = next(e for e in full if e["config"] == asdict(start))
    best = min((e for e in full if "us" in e), key=lambda e: e["us"], default=start_entry)
    return best, start_entry, quick + full


def poison_check_dense(problem: Dense, config: gemv.GemvConfig, x: torch.Tensor, ref: torch.Tensor) -> dict:
    """The config on a NaN-filled workspace and output: finite, accurate, counters back at zero, repeatable."""
    workspace = gemv.Workspace.allocate(x.device)
    workspace.partials.fill_(float("nan"))
    out = torch.full((x.shape[0], problem.n), float("nan"), dtype=torch.bfloat16, device=x.device)
    wq, ws = problem.weights[0]
    problem.ours(config, x, wq, ws, workspace, out)
    again = problem.ours(config, x, wq, ws, workspace)
    return {
        "finite": bool(out.isfinite().all()),
        "error": relative_error(out, ref),
        "counters_at_zero": not workspace.counters.any().item(),
        "repeatable": torch.equal(out, again),
    }


def poison_check_moe(problem: Moe, config: moe.MoeConfig, x, topk_weights, topk_ids, ref) -> dict:
    workspace = gemv.Workspace.allocate(x.device)
    workspace.partials.fill_(float("nan"))
    m = x.shape[0]
    nan = float("nan")
    out = torch.full((m, HIDDEN), nan, dtype=torch.bfloat16, device=x.device)
    intermediate = torch.full((m, TOPK, problem.i_pad), nan, dtype=torch.bfloat16, device=x.device)
    problem.ours(config, x, topk_weights, topk_ids, workspace, intermediate, out)
    again = problem.ours(config, x, topk_weights, topk_ids, workspace)
    return {
        "finite": bool(out.isfinite().all()),
        "error": relative_error(out, ref),
        "counters_at_zero": not workspace.counters.any().item(),
        "repeatable": torch.equal(out, again),
    }


def poison_ok(check: dict) -> bool:
    return check["finite"] and check["error"] < ACCEPT and check["counters_at_zero"] and check["repeatable"]


@dataclass
class Plan:
    """What to run per (shape, M): the file's config and the candidates, known before anything is timed."""

    dense: dict[tuple[str, int], tuple[gemv.GemvConfig, list[gemv.GemvConfig]]] = field(default_factory=dict)
    moe: dict[int, tuple[moe.MoeConfig, list[moe.MoeConfig]]] = field(default_factory=dict)

    def jobs(self, quick: bool) -> list[tuple]:
        """Compile jobs: every dense config, and every MoE gate_up and down variant (a down candidate's gate_up is
        not known before stage 1, but down's kernel compiles the same with any gate_up)."""
        jobs = []
        for (shape, m), (start, candidates) in self.dense.items():
            jobs += [precompile.gemv_job(*DENSE[shape], m, c) for c in [start, *candidates]]
        for m, (start, candidates) in self.moe.items():
            configs = [start, *candidates, *moe_down_candidates(m, start, quick)]
            jobs += [precompile.moe_job(HIDDEN, INTER_PAD, TOPK, m, c) for c in configs]
        return precompile.distinct(jobs)


INTER_PAD = math.ceil(INTER / 64) * 64


def make_plan(problems: dict[str, Dense], tokens: tuple[int, ...], sms: int, quick: bool) -> Plan:
    plan = Plan()
    for shape, problem in problems.items():
        n_pad, k_pad = problem.padded
        for m in tokens:
            start = gemv.gemv_config(n_pad, k_pad, gemv.block_m(m))
            plan.dense[shape, m] = (start, dense_candidates(n_pad, k_pad, sms, quick))
    for m in tokens:
        start = moe.moe_config(m, TOPK, INTER_PAD // 64, HIDDEN // 16)
        plan.moe[m] = (start, moe_gate_up_candidates(m, sms, start, quick))
    return plan


DENSE_WEIGHT, MOE_WEIGHT = 1.0, 3.0  # of the sweep's time per (shape, M): MoE has two kernels and two stages


def bench_dense(problem: Dense, plan: Plan, tokens, clock: Clock):
    rows, swept = [], []
    for m in tokens:
        x = torch.randn(m, problem.k, device="cuda").to(torch.bfloat16)
        wq0, ws0 = problem.weights[0]
        ref = gemv_reference(x, wq0, ws0, problem.gs, problem.n, problem.k)
        inputs = [(x, wq, ws) for wq, ws in problem.weights]
        start, candidates = plan.dense[problem.name, m]
        seconds = clock.allot(DENSE_WEIGHT)
        best, start_entry, entries = tune(start, candidates, problem.ours, ref, inputs, seconds)
        swept += [{"shape": problem.name, "m": m, **e} for e in entries]
        chosen = gemv.GemvConfig(**best["config"])
        rows.append({
            "shape": problem.name, "n": problem.n, "k": problem.k, "m": m, "bytes": problem.bytes,
            "layout_equal_vllm": problem.layout_ok,
            "ours_config": best["config"], "ours_error": best.get("error"), "ours_us": best.get("us"),
            "start_config": start_entry["config"], "start_us": start_entry.get("us"),
            "marlin_error": relative_error(problem.marlin(*inputs[0]), ref),
            "marlin_us": graph_us([partial(problem.marlin, *i) for i in inputs]),
            "poison": poison_check_dense(problem, chosen, x, ref),
        })  # fmt: skip
    return rows, swept


def bench_moe(problem: Moe, plan: Plan, tokens, clock: Clock, quick: bool):
    rows, swept = [], []
    for m in tokens:
        x = torch.randn(m, HIDDEN, device="cuda").to(torch.bfloat16)
        inputs = [(x, *random_routing(m, "cuda")) for _ in range(16)]  # each call its own random top-8 per token
        used = statistics.mean(ids.unique().numel() for _, _, ids in inputs)
        ref = moe_reference(x, *problem.weights, *inputs[0][1:])
        start, candidates = plan.moe[m]
        seconds = clock.allot(MOE_WEIGHT)
        gate_up, _, entries = tune(start, candidates, problem.ours, ref, inputs, seconds * 0.65)
        down_candidates = moe_down_candidates(m, moe.MoeConfig(**gate_up["config"]), quick)
        best, start_entry, more = tune(start, down_candidates, problem.ours, ref, inputs, seconds * 0.35)
        if gate_up.get("us", math.inf) < best.get("us", math.inf):
            best = gate_up
        swept += [{"shape": "moe", "m": m, **e} for e in entries + more]
        chosen = moe.MoeConfig(**best["config"])
        rows.append({
            "shape": "moe", "n": HIDDEN, "k": INTER, "m": m, "bytes": used * problem.expert_bytes,
            "layout_equal_vllm": problem.layout_ok,
            "ours_config": best["config"], "ours_error": best.get("error"), "ours_us": best.get("us"),
            "start_config": start_entry["config"], "start_us": start_entry.get("us"),
            "marlin_error": relative_error(problem.marlin(*inputs[0]), ref),
            "marlin_us": graph_us([partial(problem.marlin, *i) for i in inputs]),
            "poison": poison_check_moe(problem, chosen, *inputs[0], ref),
        })  # fmt: skip
    return rows, swept


# ------------------------------------------------------------------------------------------ the chain


def chain(problems: dict[str, Dense], moe_problem: Moe, best: dict[tuple[str, int], Any], m: int) -> dict[str, Any]:
    """Per-step µs of 30 layers of [elementwise kernel writing x -> our kernel reading x] per dense shape and MoE,
    as CUDA graphs: the elementwise kernels alone, with ours (PDL off, on) and with Marlin after each."""
    device = "cuda"
    steps: list[tuple[str, torch.Tensor, torch.Tensor, tuple]] = []  # (shape, src, x, operands)
    for layer, kind in enumerate(TEXT_CONFIG["layer_types"]):
        for shape in LAYER[kind]:
            k = HIDDEN if shape == "moe" else DENSE[shape][1]
            src = torch.randn(m, k, device=device).to(torch.bfloat16)
            x = torch.empty_like(src)
            if shape == "moe":
                operands = random_routing(m, device)
            else:
                copies = problems[shape].weights
                operands = copies[layer % len(copies)]
            steps.append((shape, src, x, operands))

    def calls(variant: str) -> list[Callable[[], Any]]:
        out = []
        for shape, src, x, operands in steps:
            out.append(partial(torch.mul, src, 1.0, out=x))  # the input's producer, as a norm would be
            if variant == "baseline":
                continue
            problem = moe_problem if shape == "moe" else problems[shape]
            if variant == "marlin":
                out.append(partial(problem.marlin, x, *operands))
            else:
                config = replace(best[shape, m], pdl=variant == "ours_pdl")
                out.append(partial(problem.ours, config, x, *operands))
        return out

    result: dict[str, Any] = {"m": m}
    for variant in ("baseline", "ours", "ours_pdl", "marlin"):
        try:
            result[f"{variant}_us"] = graph_us(calls(variant), blocks=5, replays=3, per_call=False)
        except Exception as e:
            result[f"{variant}_failed"] = repr(e)[:300]
    base = result.get("baseline_us")
    for variant in ("ours", "ours_pdl", "marlin"):
        if base is not None and f"{variant}_us" in result:
            result[f"{variant}_net_us"] = result[f"{variant}_us"] - base
    if "ours_us" in result and "ours_pdl_us" in result:
        result["pdl_gain"] = 1 - result["ours_pdl_us"] / result["ours_us"]
    return result


# -------------------------------------------------------------------------------------------- results


def step_estimate(rows: list[dict], m: int, key: str = "ours_us") -> dict[str, Any]:
    """Sum over the 30 layers (layer_types: 5 sliding then 1 full, five times) of the dense + MoE times."""
    by_shape = {r["shape"]: r for r in rows if r["m"] == m}
    total = {key: 0.0, "marlin_us": 0.0}
    for kind in TEXT_CONFIG["layer_types"]:
        for shape in LAYER[kind]:
            if shape not in by_shape or by_shape[shape].get(key) is None:
                return {}
            for k in total:
                total[k] += by_shape[shape][k]
    return {"m": m, "ours_us": total[key], "marlin_us": total["marlin_us"], "speedup": total["marlin_us"] / total[key]}


def tuned_entries(rows: list[dict], pdl: bool | None) -> dict[str, dict[str, dict]]:
    """The rows' chosen configs as tuned-file entries ({"gemv": {...}, "moe": {...}}), `pdl` set if decided."""
    out: dict[str, dict[str, dict]] = {"gemv": {}, "moe": {}}
    for r in rows:
        config = dict(r["ours_config"])
        if pdl is not None:
            config["pdl"] = pdl
        bm = gemv.block_m(r["m"])
        if r["shape"] == "moe":
            out["moe"][f"{HIDDEN},{INTER_PAD},{TOPK},{bm}"] = config
        else:
            n_pad, k_pad = marlin_layout.padded_nk(*DENSE[r["shape"]])
            out["gemv"][f"{n_pad},{k_pad},{bm}"] = config
    return out


def write_configs(path: Path, entries: dict[str, dict[str, dict]], meta: dict[str, Any]) -> dict[str, Any]:
    """Merge `entries` into the tuned file at `path` (entries measured now replace old ones) and write it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    for section in ("gemv", "moe"):
        data[section] = {**data.get(section, {}), **entries[section]}
    data.update(meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return data


def markdown(results: dict[str, Any]) -> str:
    peak = results["peak_tb_s"]
    lines = [
        f"NVFP4 kernels vs Marlin, {results['gpu']} (peak {peak} TB/s), vLLM {results['vllm']}, "
        f"Triton {results['triton']}; layouts equal to vLLM's: {results['layouts_equal_vllm']}; NaN-poisoned "
        f"workspace, counters and repeatability: {'ok' if results['poison_ok'] else 'FAILED'}",
        "",
        "| shape | M | MB | ours µs | GB/s | % peak | start µs | Marlin µs | GB/s | % peak | speedup | err ours | "
        "err Marlin |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        ours, marlin = r["ours_us"], r["marlin_us"]
        if ours is None:
            lines.append(f"| {r['shape']} | {r['m']} | {r['bytes'] / 1e6:.1f} | failed | | | | {marlin:.1f} |||||")
            continue
        gb_ours, gb_marlin = r["bytes"] / ours / 1e3, r["bytes"] / marlin / 1e3
        start = "" if r.get("start_us") is None else f"{r['start_us']:.1f}"
        lines.append(
            f"| {r['shape']} | {r['m']} | {r['bytes'] / 1e6:.1f} | {ours:.1f} | {gb_ours:.0f} | "
            f"{100 * gb_ours / (peak * 1e3):.0f} | {start} | {marlin:.1f} | {gb_marlin:.0f} | "
            f"{100 * gb_marlin / (peak * 1e3):.0f} | {marlin / ours:.2f} | {r['ours_error']:.1e} | "
            f"{r['marlin_error']:.1e} |"
        )
    lines += ["", "Per decode step, 30 layers (dense + MoE, no attention / router / lm_head), sums of the rows:", ""]
    start_steps = {e["m"]: e for e in results["step_estimate_start"]}
    for est in results["step_estimate"]:
        start = start_steps.get(est["m"])
        was = f" (start configs {start['ours_us']:.0f} µs)" if start else ""
        lines.append(
            f"- M={est['m']}: ours {est['ours_us']:.0f} µs{was}, Marlin {est['marlin_us']:.0f} µs, "
            f"{est['speedup']:.2f}x"
        )
    if results["chain"]:
        lines += [
            "",
            "Chain: a CUDA graph of the 30 layers, each of our calls after an elementwise kernel writing its input "
            "(µs per step; net = minus the elementwise kernels alone):",
            "",
            "| M | elementwise alone | ours | ours net | ours + PDL | net | PDL gain | Marlin | net |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        fmt = lambda v: "" if v is None else f"{v:.0f}"  # noqa: E731
        for c in results["chain"]:
            gain = c.get("pdl_gain")
            lines.append(
                f"| {c['m']} | {fmt(c.get('baseline_us'))} | {fmt(c.get('ours_us'))} | {fmt(c.get('ours_net_us'))} | "
                f"{fmt(c.get('ours_pdl_us'))} | {fmt(c.get('ours_pdl_net_us'))} | "
                f"{'' if gain is None else f'{100 * gain:.1f} %'} | {fmt(c.get('marlin_us'))} | "
                f"{fmt(c.get('marlin_net_us'))} |"
            )
    lines += ["", "| shape | M | chosen config |", "|---|---:|---|"]
    lines += [f"| {r['shape']} | {r['m']} | {r['ours_config']} |" for r in results["rows"]]
    if results.get("tuned_file"):
        lines += ["", f"Written to {results['tuned_file']} (pdl: {results['pdl']})."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    ns.out.mkdir(parents=True, exist_ok=True)
    import triton
    import vllm

    tokens = (1, 4) if ns.quick else TOKENS
    clock = Clock(ns.budget, len(tokens) * (len(DENSE) * DENSE_WEIGHT + MOE_WEIGHT))
    device = torch.device("cuda")
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device)
    sms = gemv.sm_count()
    log = lambda msg: print(f"[kernels] {msg} ({clock.elapsed():.0f} s)", flush=True)  # noqa: E731

    problems = {shape: make_dense(shape, n, k, device) for shape, (n, k) in DENSE.items()}
    moe_problem = make_moe(device)
    for shape, p in problems.items():
        log(f"{shape}: layout equal to vLLM's: {p.layout_ok}, {len(p.weights)} weight copies")
    log(f"moe: layout equal to vLLM's: {moe_problem.layout_ok}")

    plan = make_plan(problems, tokens, sms, ns.quick)
    jobs = plan.jobs(ns.quick)
    compiled = precompile.precompile(jobs, timeout=max(30.0, clock.sweep_left() * 0.4))
    c = compiled
    log(f"precompiled {c['compiled']} of {c['jobs']} kernels in {c['seconds']:.0f} s, {c['workers']} processes "
        f"({len(c['failed'])} failed, {c['not_done']} not done)")  # fmt: skip

    rows, swept = [], []
    for shape, problem in problems.items():
        r, s = bench_dense(problem, plan, tokens, clock)
        rows += r
        swept += s
        log(f"{shape}: " + ", ".join(f"M={x['m']} {x['ours_us']:.1f} µs (start {x['start_us']:.1f}, Marlin "
                                     f"{x['marlin_us']:.1f})" for x in r))  # fmt: skip
    r, s = bench_moe(moe_problem, plan, tokens, clock, ns.quick)
    rows += r
    swept += s
    log("moe: " + ", ".join(f"M={x['m']} {x['ours_us']:.1f} µs (start {x['start_us']:.1f}, Marlin "
                            f"{x['marlin_us']:.1f})" for x in r))  # fmt: skip

    best = {(r["shape"], r["m"]): (moe.MoeConfig if r["shape"] == "moe" else gemv.GemvConfig)(**r["ours_config"])
            for r in rows}  # fmt: skip
    chain_results = []
    pdl_jobs = [
        precompile.moe_job(HIDDEN, INTER_PAD, TOPK, m, replace(c, pdl=True))
        if shape == "moe"
        else precompile.gemv_job(*DENSE[shape], m, replace(c, pdl=True))
        for (shape, m), c in best.items()
        if m in CHAIN_TOKENS and m in tokens
    ]
    precompile.precompile(precompile.distinct(pdl_jobs), timeout=60.0)
    for m in CHAIN_TOKENS:
        if m in tokens:
            chain_results.append(chain(problems, moe_problem, best, m))
            log(f"chain M={m}: {chain_results[-1]}")
    gains = [c["pdl_gain"] for c in chain_results if "pdl_gain" in c]
    pdl = bool(gains) and min(gains) > PDL_GAIN

    results = {
        "gpu": name,
        "sms": sms,
        "peak_tb_s": bandwidth.peak_bandwidth_tb_s(name) or 4.8,
        "vllm": vllm.__version__,
        "triton": triton.__version__,
        "torch": torch.__version__,
        "layouts_equal_vllm": all(r["layout_equal_vllm"] for r in rows),
        "poison_ok": all(poison_ok(r["poison"]) for r in rows),
        "rows": rows,
        "step_estimate": [e for e in (step_estimate(rows, m) for m in TOKENS) if e],
        "step_estimate_start": [e for e in (step_estimate(rows, m, "start_us") for m in TOKENS) if e],
        "chain": chain_results,
        "pdl": pdl,
        "precompile": compiled,
        "sweep": swept,
        "failed_configs": [e for e in swept if "us" not in e],
        "tuned_entries": tuned_entries(rows, pdl),
    }
    if ns.write_configs and results["layouts_equal_vllm"] and results["poison_ok"]:
        path = tuning.path_for(name)
        meta = {
            "gpu": name, "source": "python -m bench.kernels --write-configs", "triton": triton.__version__,
            "vllm": vllm.__version__, "written": time.strftime("%Y-%m-%d %H:%M:%S"), "pdl_chain": chain_results,
        }  # fmt: skip
        data = write_configs(path, results["tuned_entries"], meta)
        (ns.out / path.name).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        results["tuned_file"] = str(path)
        tuning.reload()
    results["seconds"] = clock.elapsed()
    (ns.out / "kernels.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (ns.out / "kernels.md").write_text(table + "\n")
    log(f"{len(results['failed_configs'])} swept configs failed or exceeded {ACCEPT} error (kernels.json "
        f"'failed_configs'); tuned file: {results.get('tuned_file', 'not written')}")  # fmt: skip
    print(table)
    return 0 if results["layouts_equal_vllm"] and results["poison_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
