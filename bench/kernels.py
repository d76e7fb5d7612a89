"""Our small-batch NVFP4 kernels (nvfp4.kernels) against vLLM's Marlin on Gemma 4 26B-A4B's shapes, one GPU.

    python -m bench.kernels --out DIR [--quick]

No engine starts. For every dense shape and the MoE at M = 1, 2, 4, 8 tokens: random weights quantized by
nvfp4.codec, laid out by vLLM's own prepare_fp4_layer_for_marlin / prepare_nvfp4_moe_layer_for_marlin (the
GPU repack, gptq_marlin_repack), which nvfp4.kernels.marlin_layout must reproduce bit for bit (checked first);
then both kernels against the torch reference (relative Frobenius error), and their times. A time is the median
over 5 blocks of CUDA-graph replays, each graph calling the kernel on rotating weight copies that together
exceed 3x the L2 (MoE: all 128 experts, fresh random top-8 per call), so weights come from HBM as in decoding;
the graph's launch gaps are part of it, as in vLLM's decode graphs. Bytes are the packed weights + scales a call
reads (MoE: the union of the experts its tokens picked). A bounded sweep of the tuning knobs prints the best
config per shape. DIR gets kernels.json and kernels.md; the markdown table is printed last.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from bench import bandwidth
from bench.checkpoints import TEXT_CONFIG
from nvfp4 import codec
from nvfp4.kernels import gemv, marlin_layout, moe
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
ACCEPT = 1e-2  # relative error a kernel's output may have (bf16 rounding alone: ~1.6e-3)
BLOCKS, REPLAYS = 5, 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help="M = 1 and 4 only, a smaller sweep (M = 1)")
    return p.parse_args(argv)


def graph_us(calls: list[Callable[[], Any]]) -> float:
    """Median µs per call of a CUDA graph that makes `calls` in order, replayed REPLAYS times per block."""
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
    for _ in range(BLOCKS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(REPLAYS):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / (REPLAYS * len(calls)))
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


def sweep_configs(n_pad: int, k_pad: int, quick: bool) -> list[gemv.GemvConfig]:
    """Knob variants (one Triton compile each per M bucket) x split-K giving ~1, 2 and 4 programs per SM."""
    variants = [
        dict(super_tiles=1),
        dict(super_tiles=2),
        dict(super_tiles=1, warps_k=8),
        dict(super_tiles=2, warps_k=8),
        dict(super_tiles=1, rows=8),
        dict(super_tiles=1, num_stages=3),
        dict(super_tiles=2, num_stages=3),
        dict(super_tiles=1, num_stages=1),
        dict(super_tiles=1, decode_asm=False),
    ]
    if quick:
        variants = variants[:4]
    configs = []
    for v in variants:
        base = gemv.GemvConfig(**v)
        blocks = math.ceil(n_pad // 64 / base.super_tiles)
        most = max(1, k_pad // 16 // (base.warps_k * base.rows))
        splits = {min(most, max(1, round(p * gemv.SMS / blocks))) for p in (1, 2, 4)}
        configs += [replace(base, split_k=s) for s in sorted(splits)]
    return configs


def sweep(name: str, m: int, configs: list, run: Callable, ref: torch.Tensor, inputs: list) -> list[dict]:
    """Error and time of `run(config, *input)` per config; a config that fails or errs is recorded, not fatal."""
    entries = []
    for config in configs:
        entry = {"shape": name, "m": m, "config": asdict(config)}
        try:
            entry["error"] = relative_error(run(config, *inputs[0]), ref)
            if entry["error"] < ACCEPT:
                entry["us"] = graph_us([partial(run, config, *i) for i in inputs])
        except Exception as e:  # e.g. a knob combination Triton cannot build
            entry["failed"] = repr(e)[:300]
        entries.append(entry)
    return entries


def bench_dense(name: str, n: int, k: int, tokens: tuple[int, ...], sweep_m: tuple[int, ...], quick: bool, device):
    from vllm.model_executor.layers.quantization.utils.marlin_utils_fp4 import apply_fp4_marlin_linear

    packed, block_scale, global_scale = random_quantized(n, k, device)
    layer = vllm_dense(packed, block_scale, global_scale)
    q, s, gs, workspace = layer.weight.data, layer.weight_scale.data, layer.weight_global_scale.data, layer.workspace
    layout_ok = same_layout(marlin_layout.dense_to_marlin(packed, block_scale, global_scale), q, s, gs)
    weight_bytes = q.numel() * 4 + s.numel()
    n_pad, k_pad = q.shape[1] // 2, q.shape[0] * 16
    copies = max(3, math.ceil(3 * torch.cuda.get_device_properties(device).L2_cache_size / weight_bytes))
    weights = [(q, s)] + [(q.clone(), s.clone()) for _ in range(copies - 1)]

    def ours(config, x, wq, ws):
        return gemv.marlin_nvfp4_gemv(x, wq, ws, gs, n, k, config)

    def marlin(x, wq, ws):
        return apply_fp4_marlin_linear(x, wq, ws, gs, workspace, n, k)

    rows, swept = [], []
    for m in sorted(set(tokens) | set(sweep_m)):
        x = torch.randn(m, k, device=device).to(torch.bfloat16)
        ref = gemv_reference(x, q, s, gs, n, k)
        inputs = [(x, wq, ws) for wq, ws in weights]
        if m in tokens:
            rows.append({
                "shape": name, "n": n, "k": k, "m": m, "bytes": weight_bytes, "layout_equal_vllm": layout_ok,
                "ours_config": asdict(gemv.gemv_config(n_pad, k_pad, gemv.block_m(m))),
                "ours_error": relative_error(ours(None, *inputs[0]), ref),
                "marlin_error": relative_error(marlin(*inputs[0]), ref),
                "ours_us": graph_us([partial(ours, None, *i) for i in inputs]),
                "marlin_us": graph_us([partial(marlin, *i) for i in inputs]),
            })  # fmt: skip
        if m in sweep_m:
            swept += sweep(name, m, sweep_configs(n_pad, k_pad, quick), ours, ref, inputs)
    return rows, swept


def vllm_moe(w13, w2) -> tuple[torch.Tensor, ...]:
    from vllm.model_executor.layers.quantization.utils.marlin_utils_fp4 import prepare_nvfp4_moe_layer_for_marlin

    layer = SimpleNamespace(
        num_experts=EXPERTS, hidden_size=HIDDEN, intermediate_size_per_partition=INTER, params_dtype=torch.bfloat16
    )
    return prepare_nvfp4_moe_layer_for_marlin(layer, *w13, *w2, is_act_and_mul=True)


def moe_sweep_configs(quick: bool) -> list[moe.MoeConfig]:
    gate_up = [dict(gate_up_split_k=s, gate_up_warps_k=w) for s in (1, 2) for w in (4, 8)]
    gate_up += [dict(gate_up_split_k=1, gate_up_stages=3), dict(gate_up_split_k=2, gate_up_stages=3)]
    down = [dict(down_super_tiles=s, down_warps_k=w) for s in (1, 2) for w in (4, 8)]
    if quick:
        gate_up, down = gate_up[:2], down[:2]
    return [moe.MoeConfig(**g, **d) for g in gate_up for d in down]


def bench_moe(tokens: tuple[int, ...], sweep_m: tuple[int, ...], quick: bool, device):
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.experts.marlin_moe import fused_marlin_moe
    from vllm.model_executor.layers.quantization.utils.marlin_utils import marlin_make_workspace_new
    from vllm.scalar_type import scalar_types

    def stacked(n: int, k: int):
        return tuple(
            torch.stack(t) for t in zip(*(random_quantized(n, k, device) for _ in range(EXPERTS)), strict=True)
        )

    w13, w2 = stacked(2 * INTER, HIDDEN), stacked(HIDDEN, INTER)
    weights = vllm_moe(w13, w2)  # w13, w13_scale, w13_gs, w2, w2_scale, w2_gs
    ours_13, ours_2 = marlin_layout.moe_to_marlin(w13, w2)
    layout_ok = same_layout(ours_13, *weights[:3]) and same_layout(ours_2, *weights[3:])
    expert_bytes = (weights[0][0].numel() + weights[3][0].numel()) * 4 + weights[1][0].numel() + weights[4][0].numel()
    workspace = marlin_make_workspace_new(device, 4)

    def ours(config, x, topk_weights, topk_ids):
        return moe.marlin_nvfp4_moe(x, *weights, topk_weights, topk_ids, config)

    def marlin(x, topk_weights, topk_ids):
        return fused_marlin_moe(
            x, weights[0], weights[3], None, None, weights[1], weights[4], topk_weights, topk_ids,
            quant_type_id=scalar_types.float4_e2m1f.id, global_num_experts=EXPERTS,
            activation=MoEActivation.GELU_TANH, global_scale1=weights[2], global_scale2=weights[5],
            workspace=workspace,
        )  # fmt: skip

    rows, swept = [], []
    for m in sorted(set(tokens) | set(sweep_m)):
        x = torch.randn(m, HIDDEN, device=device).to(torch.bfloat16)
        inputs = []  # 16 calls per graph, each with its own random top-8 per token
        for _ in range(16):
            ids = torch.stack([torch.randperm(EXPERTS, device=device)[:TOPK] for _ in range(m)]).to(torch.int32)
            inputs.append((x, torch.rand(m, TOPK, device=device), ids))
        used = statistics.mean(ids.unique().numel() for _, _, ids in inputs)
        ref = moe_reference(x, *weights, *inputs[0][1:])
        if m in tokens:
            rows.append({
                "shape": "moe", "n": HIDDEN, "k": INTER, "m": m, "bytes": used * expert_bytes,
                "layout_equal_vllm": layout_ok, "ours_config": asdict(moe.moe_config(m, TOPK, INTER // 64)),
                "ours_error": relative_error(ours(None, *inputs[0]), ref),
                "marlin_error": relative_error(marlin(*inputs[0]), ref),
                "ours_us": graph_us([partial(ours, None, *i) for i in inputs]),
                "marlin_us": graph_us([partial(marlin, *i) for i in inputs]),
            })  # fmt: skip
        if m in sweep_m:
            swept += sweep("moe", m, moe_sweep_configs(quick), ours, ref, inputs)
    return rows, swept


def step_estimate(rows: list[dict], m: int) -> dict[str, Any]:
    """Sum over the 30 layers (layer_types: 5 sliding then 1 full, five times) of the dense + MoE times."""
    by_shape = {r["shape"]: r for r in rows if r["m"] == m}
    total = {"ours_us": 0.0, "marlin_us": 0.0}
    for kind in TEXT_CONFIG["layer_types"]:
        for shape in LAYER[kind]:
            if shape not in by_shape:
                return {}
            for key in total:
                total[key] += by_shape[shape][key]
    return {"m": m, **total, "speedup": total["marlin_us"] / total["ours_us"]}


def best_configs(swept: list[dict]) -> dict[str, dict]:
    best: dict[str, dict] = {}
    for entry in swept:
        key = f"{entry['shape']} m={entry['m']}"
        if "us" in entry and (key not in best or entry["us"] < best[key]["us"]):
            best[key] = entry
    return best


def config_table(best: dict[str, dict]) -> list[str]:
    """The best configs as entries of gemv.DEFAULT_CONFIGS / moe.DEFAULT_CONFIGS, to paste."""
    lines = []
    for entry in best.values():
        bm = gemv.block_m(entry["m"])
        if entry["shape"] == "moe":
            lines.append(f"moe {bm}: MoeConfig(**{entry['config']}),")
        else:
            n, k = DENSE[entry["shape"]]
            n_pad, k_pad = marlin_layout.padded_nk(n, k)
            lines.append(f"gemv ({n_pad}, {k_pad}, {bm}): GemvConfig(**{entry['config']}),  # {entry['shape']}")
    return lines


def markdown(results: dict[str, Any]) -> str:
    peak = results["peak_tb_s"]
    lines = [
        f"NVFP4 kernels vs Marlin, {results['gpu']} (peak {peak} TB/s), vLLM {results['vllm']}, "
        f"Triton {results['triton']}; layouts equal to vLLM's: {results['layouts_equal_vllm']}",
        "",
        "| shape | M | MB | ours µs | GB/s | % peak | Marlin µs | GB/s | % peak | speedup | err ours | err Marlin |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        gb_ours, gb_marlin = r["bytes"] / r["ours_us"] / 1e3, r["bytes"] / r["marlin_us"] / 1e3
        lines.append(
            f"| {r['shape']} | {r['m']} | {r['bytes'] / 1e6:.1f} | {r['ours_us']:.1f} | {gb_ours:.0f} | "
            f"{100 * gb_ours / (peak * 1e3):.0f} | {r['marlin_us']:.1f} | {gb_marlin:.0f} | "
            f"{100 * gb_marlin / (peak * 1e3):.0f} | {r['marlin_us'] / r['ours_us']:.2f} | "
            f"{r['ours_error']:.1e} | {r['marlin_error']:.1e} |"
        )
    lines += ["", "Per decode step, 30 layers (dense + MoE, no attention / router / lm_head):", ""]
    for est in results["step_estimate"]:
        lines.append(
            f"- M={est['m']}: ours {est['ours_us']:.0f} µs, Marlin {est['marlin_us']:.0f} µs, {est['speedup']:.2f}x"
        )
    if results["best_configs"]:
        lines += ["", "| best swept config | µs | default µs | config |", "|---|---:|---:|---|"]
        defaults = {f"{r['shape']} m={r['m']}": r["ours_us"] for r in results["rows"]}
        for key, entry in results["best_configs"].items():
            default = defaults.get(key)
            lines.append(
                f"| {key} | {entry['us']:.1f} | {'' if default is None else f'{default:.1f}'} | {entry['config']} |"
            )
        lines += ["", "```", *config_table(results["best_configs"]), "```"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    ns.out.mkdir(parents=True, exist_ok=True)
    import triton
    import vllm

    started = time.time()
    device = torch.device("cuda")
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device)
    tokens = (1, 4) if ns.quick else TOKENS
    sweep_m = (1,) if ns.quick else (1, 8)
    rows, swept = [], []
    for shape, (n, k) in DENSE.items():
        r, s = bench_dense(shape, n, k, tokens, sweep_m, ns.quick, device)
        print(f"[kernels] {shape}: layout equal to vLLM's: {r[0]['layout_equal_vllm']}; "
              f"error ours {max(x['ours_error'] for x in r):.1e}, Marlin {max(x['marlin_error'] for x in r):.1e} "
              f"({time.time() - started:.0f} s)", flush=True)  # fmt: skip
        rows += r
        swept += s
    r, s = bench_moe(tokens, sweep_m, ns.quick, device)
    print(f"[kernels] moe: layout equal to vLLM's: {r[0]['layout_equal_vllm']}; error ours "
          f"{max(x['ours_error'] for x in r):.1e}, Marlin {max(x['marlin_error'] for x in r):.1e}")  # fmt: skip
    rows += r
    swept += s
    results = {
        "gpu": name,
        "peak_tb_s": bandwidth.peak_bandwidth_tb_s(name) or 4.8,
        "vllm": vllm.__version__,
        "triton": triton.__version__,
        "torch": torch.__version__,
        "layouts_equal_vllm": all(r["layout_equal_vllm"] for r in rows),
        "rows": rows,
        "step_estimate": [e for e in (step_estimate(rows, m) for m in (1, 4)) if e],
        "sweep": swept,
        "best_configs": best_configs(swept),
        "failed_configs": [e for e in swept if "us" not in e],
        "seconds": time.time() - started,
    }
    (ns.out / "kernels.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (ns.out / "kernels.md").write_text(table + "\n")
    print(f"[kernels] {len(results['failed_configs'])} swept configs failed or exceeded {ACCEPT} error "
          f"(kernels.json 'failed_configs'); {results['seconds']:.0f} s")  # fmt: skip
    print(table)
    return 0 if results["layouts_equal_vllm"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
