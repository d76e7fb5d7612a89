"""The NVFP4 Marlin-layout kernels on CPU: the layout against vLLM's own reference code, dequantization against
the codec, and the Triton kernels against the torch reference.

Triton's interpreter must be on (TRITON_INTERPRET=1) before triton itself is imported, and it cannot share a
process with compiled Triton code, so the kernel checks run in one child process that imports this file with the
interpreter on (`run_scenarios`); each test asserts on its scenario's result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

from nvfp4 import codec
from nvfp4.kernels import marlin_layout as ml
from nvfp4.kernels.reference import moe_reference

ROOT = Path(__file__).resolve().parent.parent
# bf16 output rounded to nearest is off by ~1.6e-3 (relative Frobenius) from the fp32 reference; a misplaced
# nibble or scale costs O(1). The margin covers fp32 accumulation order and GeGLU outputs rounding the other way.
TOLERANCE = 4e-3


@pytest.fixture(scope="module")
def vllm_marlin():
    """vLLM's CPU reference code for the Marlin layout (marlin_utils_test holds its numpy repack)."""
    test_utils = pytest.importorskip("vllm.model_executor.layers.quantization.utils.marlin_utils_test")
    from vllm.model_executor.layers.quantization.utils import marlin_utils, marlin_utils_fp4

    return test_utils, marlin_utils, marlin_utils_fp4


def quantized(n: int, k: int, gen: torch.Generator, scale: float = 1.0):
    return codec.quantize(torch.randn(n, k, generator=gen) * scale)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def test_word_layout_is_vllms_weight_perm_for_every_nibble(vllm_marlin):
    test_utils, _, _ = vllm_marlin
    perm = test_utils.get_weight_perm(4)  # position 8 * word + nibble <- element of the 16 x 64 tile
    n, k = ml.word_elements()
    # marlin_permute_weights orders a 16 x 64 tile as four 16 x 16 blocks: 256 * (n // 16) + 16 * k + n % 16.
    assert torch.equal(perm.view(128, 8), 256 * (n // 16) + 16 * k + n % 16)


def test_repack_weight_equals_vllm_marlin_weights_and_unpack_inverts_it(vllm_marlin):
    test_utils, _, _ = vllm_marlin
    gen = torch.Generator().manual_seed(1)
    n, k = 192, 128
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    codes = ml.codes(packed)
    expected = test_utils.marlin_weights(codes.T.contiguous().int(), k, n, 4, test_utils.get_weight_perm(4))
    qweight = ml.repack_weight(packed)
    assert qweight.dtype == torch.int32 and torch.equal(qweight, expected)
    assert torch.equal(ml.unpack_weight(qweight), codes)


@pytest.mark.parametrize("shrink", [1.0, 1 / 64], ids=["full-range scales", "small scales, sf 64"])
def test_scales_are_processed_like_vllm_and_decode_to_s_sf_2pow7(vllm_marlin, shrink: float):
    _, marlin_utils, marlin_fp4 = vllm_marlin
    gen = torch.Generator().manual_seed(2)
    n, k = 128, 256
    _, block_scale, _ = quantized(n, k, gen)
    block_scale = (block_scale.float() * shrink).to(torch.float8_e4m3fn)
    block_scale[0, :3] = torch.tensor([2.0**-9, 2.0**-8, 0.0])  # below Marlin's floor: stored as 0
    permuted = marlin_utils.marlin_permute_scales(block_scale.T.contiguous().to(torch.bfloat16), k, n, 16)
    expected, sf = marlin_fp4.nvfp4_marlin_process_scales(permuted, a_dtype=torch.bfloat16)

    assert ml.scale_factor(block_scale) == sf == (1.0 if shrink == 1 else 64.0)
    processed = ml.process_scales(block_scale, sf)
    assert processed.dtype == torch.float8_e4m3fn
    assert torch.equal(processed.view(torch.uint8), expected.view(torch.uint8))
    s = block_scale.float().T * sf * 2**7
    assert torch.equal(ml.decode_scales(processed), torch.where(s < 2, 0.0, s))
    gs = torch.tensor(0.0123)
    assert torch.equal(
        ml.process_global_scale(gs, sf), marlin_fp4.nvfp4_marlin_process_global_scale(gs, torch.bfloat16) / sf
    )


@pytest.mark.parametrize("n,k", [(128, 256), (100, 208)], ids=["tiled", "padded to 128 x 256"])
def test_dequantize_from_marlin_is_the_codecs_exact_value(n: int, k: int):
    gen = torch.Generator().manual_seed(3)
    packed, block_scale, gs = quantized(n, k, gen)
    linear = ml.dense_to_marlin(packed, block_scale, gs)
    assert linear.qweight.shape == (256 // 16, 2 * 128) and (linear.size_n, linear.size_k) == (n, k)

    weights = ml.dequantize(linear.qweight, linear.scales, linear.global_scale)
    codes = ml.codes(packed).long()
    value = codec.E2M1_VALUES.double()[codes & 7] * torch.where(codes >= 8, -1.0, 1.0)
    exact = value * block_scale.double().repeat_interleave(16, dim=1) * gs.double()
    assert torch.equal(weights[:n, :k], exact.float())
    assert not weights[n:].any() and not weights[:, k:].any()
    torch.testing.assert_close(weights[:n, :k], codec.dequantize(packed, block_scale, gs), rtol=2**-23, atol=0)


def test_moe_to_marlin_pads_each_shard_and_shares_one_scale_factor():
    gen = torch.Generator().manual_seed(4)
    experts, hidden, inter = 3, 256, 96  # inter pads to 128 per gate / up shard

    def small_scales(e: int):  # a global scale 2^(3+e) too large: block scales top out at 448 / 2^(3+e)
        w = torch.randn(2 * inter, hidden, generator=gen)
        return codec.quantize(w, global_amax=w.abs().max() * 2 ** (3 + e))

    w13 = [small_scales(e) for e in range(experts)]
    w2 = [quantized(hidden, inter, gen) for _ in range(experts)]
    gate_up, down = ml.moe_to_marlin(*(tuple(torch.stack(t) for t in zip(*w, strict=True)) for w in (w13, w2)))
    assert gate_up.qweight.shape == (experts, hidden // 16, 2 * 2 * 128) and down.qweight.shape == (experts, 8, 512)

    for e in range(experts):
        assert gate_up.global_scale[e] == w13[e][2] * 2.0**119 / 8  # sf of the expert with the largest scales
        weights = ml.dequantize(gate_up.qweight[e], gate_up.scales[e], gate_up.global_scale[e])
        expected = codec.dequantize(*w13[e])
        for shard in range(2):
            rows = weights[128 * shard : 128 * (shard + 1)]
            torch.testing.assert_close(rows[:inter], expected[inter * shard : inter * (shard + 1)], rtol=2**-23, atol=0)
            assert not rows[inter:].any()
        weights = ml.dequantize(down.qweight[e], down.scales[e], down.global_scale[e])
        torch.testing.assert_close(weights[:, :inter], codec.dequantize(*w2[e]), rtol=2**-23, atol=0)
        assert not weights[:, inter:].any()


# Kernel scenarios, run under the interpreter (see the module docstring). Each returns what its test asserts.

# The GPU-only knobs (prefetch, pdl, num_stages) change no value: under the interpreter they only have to build.
GEMV_CONFIGS = {
    "one program per block": dict(super_tiles=1, warps_k=1, rows=4, split_k=1, prefetch=0),
    "split-k, 2 super-tiles": dict(super_tiles=2, warps_k=2, rows=8, split_k=3, pdl=True),  # 32 k-tiles: 2 splits
}
# (m, config, n, k): the masked paths. 24 k-tiles in steps of 16: the last step half empty; 3 super-tiles in
# blocks of 2: the last block half empty; K padded (208 of 256): x masked; 6 splits of 24 k-tiles in steps of 4.
GEMV_MASKED = {
    "gemv k-tiles not a whole number of steps": (2, dict(warps_k=2, rows=8, split_k=2), 256, 384),
    "gemv super-tiles not a whole number of blocks": (3, dict(super_tiles=2, warps_k=1, split_k=2), 192, 256),
    "gemv padded 100 x 208": (3, GEMV_CONFIGS["split-k, 2 super-tiles"], 100, 208),
    "gemv 6 splits of 4 k-tiles": (8, dict(warps_k=1, split_k=6, pdl=True, prefetch=3), 128, 384),
}
MOE_CONFIGS = {
    "plain": dict(gate_up_split_k=1),
    "split gate_up, 2 down super-tiles": dict(gate_up_split_k=2, gate_up_warps_k=2, down_super_tiles=2, down_rows=8),
    # gate_up: 16 k-tiles in steps of 32 (masked); split 3 of steps of 4 -> 8 k-tiles, 2 splits; PDL, prefetch
    "masked gate_up, pdl": dict(gate_up_rows=8, pdl=True, down_warps_k=1, down_prefetch=5),
    "gate_up split 3": dict(gate_up_split_k=3, gate_up_warps_k=1, gate_up_prefetch=0, down_warps_k=2),
}
NAN = float("nan")


def poisoned_workspace():
    from nvfp4.kernels import gemv

    workspace = gemv.Workspace.allocate("cpu")
    workspace.partials.fill_(NAN)  # a partial sum read before it is written shows up as NaN
    return workspace


def outcome(out: torch.Tensor, ref: torch.Tensor, workspace) -> dict:
    return {
        "finite": bool(out.isfinite().all()),
        "error": relative_error(out, ref),
        "counters at zero": not workspace.counters.any(),
    }


def gemv_scenario(m: int, config: str | dict, n: int = 256, k: int = 512) -> dict:
    from nvfp4.kernels import gemv

    gen = torch.Generator().manual_seed(10 + m)
    linear = ml.dense_to_marlin(*quantized(n, k, gen))
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    out = torch.full((m, n), NAN, dtype=torch.bfloat16)
    workspace = poisoned_workspace()
    knobs = GEMV_CONFIGS[config] if isinstance(config, str) else config
    args = (x, linear.qweight, linear.scales, linear.global_scale, n, k, gemv.GemvConfig(**knobs))
    gemv.marlin_nvfp4_gemv(*args, workspace, out)
    ref = x.float() @ ml.dequantize(linear.qweight, linear.scales, linear.global_scale)[:n, :k].T
    result = outcome(out, ref, workspace)
    result["repeatable"] = torch.equal(gemv.marlin_nvfp4_gemv(*args, workspace), out)
    return result


def random_moe(gen: torch.Generator, experts: int, hidden: int, inter: int):
    def stack(n: int, k: int):
        return tuple(torch.stack(t) for t in zip(*(quantized(n, k, gen) for _ in range(experts)), strict=True))

    gate_up, down = ml.moe_to_marlin(stack(2 * inter, hidden), stack(hidden, inter))
    return (gate_up.qweight, gate_up.scales, gate_up.global_scale, down.qweight, down.scales, down.global_scale)


def moe_scenario(m: int, config: str, experts: int = 4, hidden: int = 256, inter: int = 128, topk: int = 2,
                 ids_dtype: torch.dtype = torch.int32) -> dict:  # fmt: skip
    from nvfp4.kernels import moe

    gen = torch.Generator().manual_seed(30 + m)
    weights = random_moe(gen, experts, hidden, inter)
    topk_ids = torch.stack([torch.randperm(experts, generator=gen)[:topk] for _ in range(m)]).to(ids_dtype)
    topk_weights = torch.rand(m, topk, generator=gen)
    x = torch.randn(m, hidden, generator=gen).to(torch.bfloat16)
    out = torch.full((m, hidden), NAN, dtype=torch.bfloat16)
    intermediate = torch.full((m, topk, weights[0].shape[2] // 4), NAN, dtype=torch.bfloat16)
    workspace = poisoned_workspace()
    config = moe.MoeConfig(**MOE_CONFIGS[config])
    moe.marlin_nvfp4_moe(x, *weights, topk_weights, topk_ids, config, workspace, intermediate, out)
    return outcome(out, moe_reference(x, *weights, topk_weights, topk_ids), workspace)


SCENARIOS = {
    **{f"gemv m={m}, {c}": (gemv_scenario, (m, c)) for m in (1, 2, 3, 8) for c in GEMV_CONFIGS},
    **{name: (gemv_scenario, args) for name, args in GEMV_MASKED.items()},
    **{f"moe m={m}, {c}": (moe_scenario, (m, c)) for m in (1, 3, 8) for c in MOE_CONFIGS},
    # 3 experts of 96 intermediate (padded to 128 per gate / up shard), int64 ids
    "moe padded, int64 ids": (moe_scenario, (2, "plain", 3, 128, 96, 2, torch.int64)),
}


def run_scenarios() -> dict[str, dict]:
    """Every scenario's result (or its traceback); run by the interpreter child."""
    results = {}
    for name, (fn, args) in SCENARIOS.items():
        try:
            results[name] = fn(*args)
        except Exception:
            results[name] = {"raised": traceback.format_exc()}
    return results


@pytest.fixture(scope="module")
def interpreted() -> dict[str, dict]:
    code = "import json, tests.test_nvfp4_kernels as t; print(json.dumps(t.run_scenarios()))"
    child = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-4000:]
    return json.loads(child.stdout.splitlines()[-1])


def scenario(results: dict[str, dict], name: str) -> dict:
    result = results[name]
    assert "raised" not in result, result.get("raised")
    return result


@pytest.mark.parametrize("m", [1, 2, 3, 8])
@pytest.mark.parametrize("config", list(GEMV_CONFIGS))
def test_gemv_matches_reference_for_m_1_to_8(interpreted, m: int, config: str):
    result = scenario(interpreted, f"gemv m={m}, {config}")
    assert result["finite"] and result["error"] < TOLERANCE
    assert result["counters at zero"]  # left armed for the next call


@pytest.mark.parametrize("name", list(GEMV_MASKED))
def test_gemv_masks_partial_steps_blocks_and_padded_inputs(interpreted, name: str):
    result = scenario(interpreted, name)
    assert result["finite"] and result["error"] < TOLERANCE and result["counters at zero"]


def test_gemv_split_k_sums_in_a_fixed_order(interpreted):
    assert scenario(interpreted, "gemv m=8, split-k, 2 super-tiles")["repeatable"]


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("config", list(MOE_CONFIGS))
def test_moe_matches_reference_for_m_1_to_8(interpreted, m: int, config: str):
    """4 experts, top-2: tokens share experts (an expert's first assignment computes all of its tokens)."""
    result = scenario(interpreted, f"moe m={m}, {config}")
    assert result["finite"] and result["error"] < TOLERANCE and result["counters at zero"]


def test_moe_takes_int64_ids_and_a_padded_intermediate(interpreted):
    result = scenario(interpreted, "moe padded, int64 ids")
    assert result["finite"] and result["error"] < TOLERANCE


# Configs: how K is split, and the tuned files.


@pytest.mark.parametrize("k_tiles", [1, 16, 44, 132, 176, 512])
@pytest.mark.parametrize("step", [4, 16, 32, 64])
@pytest.mark.parametrize("split_k", [1, 2, 3, 5, 6, 12, 64])
def test_split_plan_gives_whole_steps_and_no_empty_split(k_tiles: int, step: int, split_k: int):
    from nvfp4.kernels.gemv import split_plan

    per, splits = split_plan(k_tiles, step, split_k)
    assert per % step == 0 and 1 <= splits <= split_k
    assert (splits - 1) * per < k_tiles <= splits * per  # every k-tile in exactly one split, the last not empty


def test_tuned_lookup_takes_the_exact_entry_else_the_nearest_block_m(tmp_path, monkeypatch):
    from nvfp4.kernels import gemv, moe, tuning

    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({
        "gemv": {
            "8192,2816,1": {"split_k": 3, "num_stages": 5, "a knob from elsewhere": 1},
            "8192,2816,8": {"split_k": 1, "pdl": True},
            "2816,2112,1": {"rows": "many"},  # does not build: skipped
            "4224,2816,2": {"rows": 6},  # builds, but no kernel takes it: refused by gemv_config's caller
        },
        "moe": {"2816,704,8,1": {"gate_up_split_k": 5}},
    }))  # fmt: skip
    monkeypatch.setenv("NVFP4_TUNED", str(path))
    tuning.reload()
    try:
        assert gemv.gemv_config(8192, 2816, 1) == gemv.GemvConfig(split_k=3, num_stages=5)
        assert gemv.gemv_config(8192, 2816, 8).pdl and gemv.gemv_config(8192, 2816, 4).pdl  # 4 is nearer 8
        assert gemv.gemv_config(8192, 2816, 2).split_k == 3  # 2 is nearer 1
        assert gemv.gemv_config(2816, 2112, 1) == gemv.heuristic_config(2816, 2112, 1)
        assert moe.moe_config(1, 8, 11).gate_up_split_k == 5
        assert moe.moe_config(1, 8, 12) == moe.heuristic_config(1, 8, 12)  # another shape
        with pytest.raises(ValueError, match="invalid config"):
            gemv.check_config(gemv.gemv_config(4224, 2816, 2))
        monkeypatch.setenv("NVFP4_TUNED", "off")
        tuning.reload()
        assert gemv.gemv_config(8192, 2816, 1) == gemv.heuristic_config(8192, 2816, 1)
    finally:
        monkeypatch.delenv("NVFP4_TUNED")
        tuning.reload()


def test_every_tuned_file_and_heuristic_gives_valid_configs():
    from nvfp4.kernels import gemv, moe, tuning

    files = sorted(tuning.TUNED_DIR.glob("*.json"))
    assert tuning.path_for("NVIDIA H200") in files
    for path in files:
        data = json.loads(path.read_text())
        for key, entry in data["gemv"].items():
            config = tuning.from_dict(gemv.GemvConfig, entry)
            assert config is not None and len(key.split(",")) == 3, (path.name, key)
            gemv.check_config(config)
        for key, entry in data["moe"].items():
            config = tuning.from_dict(moe.MoeConfig, entry)
            assert config is not None and len(key.split(",")) == 4, (path.name, key)
            moe.check_config(config)
    for n, k in [(8192, 2816), (10240, 2816), (2816, 4096), (2816, 8192), (4224, 2816), (2816, 2112), (128, 256)]:
        for bm in (1, 2, 4, 8):
            gemv.check_config(gemv.heuristic_config(*ml.padded_nk(n, k), bm))
    for m in range(1, 9):
        moe.check_config(moe.heuristic_config(m, 8, 11))


# bench.kernels without a GPU: what it would sweep, and what it writes.


def fake_dense_problems():
    from bench import kernels as bk

    problems = {}
    for shape, (n, k) in bk.DENSE.items():
        n_pad, k_pad = ml.padded_nk(n, k)
        q = torch.empty(k_pad // 16, 2 * n_pad, dtype=torch.int32, device="meta")
        problems[shape] = bk.Dense(shape, n, k, None, None, [(q, None)], n_pad * k_pad * 9 // 16, True)
    return problems


@pytest.mark.parametrize("quick", [False, True])
def test_bench_sweeps_valid_configs_and_compiles_a_bounded_number_of_kernels(quick: bool):
    from bench import kernels as bk
    from nvfp4.kernels import gemv, moe

    tokens = (1, 4) if quick else bk.TOKENS
    plan = bk.make_plan(fake_dense_problems(), tokens, 132, quick)
    for start, candidates in plan.dense.values():
        assert 1 <= len(candidates) <= 45 and len(set(candidates)) == len(candidates)
        for config in [start, *candidates]:
            gemv.check_config(config)
    for m, (start, candidates) in plan.moe.items():
        for config in [start, *candidates, *bk.moe_down_candidates(m, start, quick)]:
            moe.check_config(config)
    jobs = plan.jobs(quick)
    assert len(jobs) <= (25 if quick else 100)  # distinct compiles: what the worker processes build up front


def test_bench_writes_tuned_entries_merged_into_the_file_and_a_table(tmp_path):
    from bench import kernels as bk
    from nvfp4.kernels import gemv, moe, tuning

    rows = []
    for m in (1, 4):
        for shape in [*bk.DENSE, "moe"]:
            config = asdict_config(moe.MoeConfig() if shape == "moe" else gemv.GemvConfig(split_k=m))
            rows.append({
                "shape": shape, "m": m, "bytes": 1e7, "ours_us": 5.0, "start_us": 6.0, "marlin_us": 10.0,
                "ours_error": 1.7e-3, "marlin_error": 1.7e-3, "ours_config": config, "layout_equal_vllm": True,
            })  # fmt: skip
    steps = {m: bk.step_estimate(rows, m) for m in (1, 4)}
    assert steps[1]["ours_us"] == 30 * 5 * 5.0 and steps[1]["speedup"] == 2.0
    assert bk.step_estimate(rows, 2) == {}  # a shape missing: no estimate
    assert bk.step_estimate(rows, 1, "start_us")["ours_us"] == 30 * 5 * 6.0

    path = tmp_path / "tuned" / "gpu.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"gemv": {"1,2,1": {"split_k": 7}, "8192,2816,1": {"split_k": 9}}, "moe": {}}))
    data = bk.write_configs(path, bk.tuned_entries(rows, pdl=True), {"gpu": "test"})
    assert data["gemv"]["1,2,1"] == {"split_k": 7}  # kept: not measured now
    assert data["gemv"]["8192,2816,1"]["split_k"] == 1 and data["gemv"]["8192,2816,4"]["split_k"] == 4
    assert data["gemv"]["2816,2112,4"]["pdl"] and data["moe"]["2816,704,8,4"]["pdl"]
    assert json.loads(path.read_text()) == data
    for key, entry in data["gemv"].items():
        if key != "1,2,1":
            gemv.check_config(tuning.from_dict(gemv.GemvConfig, entry))

    results = {
        "gpu": "GPU", "peak_tb_s": 4.8, "vllm": "0", "triton": "0", "layouts_equal_vllm": True, "poison_ok": True,
        "rows": rows, "step_estimate": list(steps.values()), "step_estimate_start": [],
        "chain": [{"m": 1, "baseline_us": 600.0, "ours_us": 1800.0, "ours_pdl_us": 1700.0, "ours_net_us": 1200.0,
                   "ours_pdl_net_us": 1100.0, "pdl_gain": 0.055, "marlin_us": 2900.0, "marlin_net_us": 2300.0}],
        "tuned_file": str(path), "pdl": True,
    }  # fmt: skip
    table = bk.markdown(results)
    assert "| qkv sliding | 1 |" in table and "- M=1: ours 750 µs, Marlin 1500 µs, 2.00x" in table
    assert "| 1 | 600 | 1800 | 1200 | 1700 | 1100 | 5.5 % | 2900 | 2300 |" in table


def asdict_config(config) -> dict:
    from dataclasses import asdict

    return asdict(config)
