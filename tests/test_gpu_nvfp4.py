"""The tiny NVFP4 checkpoint in vLLM on a GPU (Marlin, weight-only), against vLLM BF16 on its dequantized weights.

    python -m pytest -m gpu tests/test_gpu_nvfp4.py -s    # prints the numbers

Marlin runs NVFP4 weight-only, so vLLM on the NVFP4 checkpoint and vLLM on a BF16 checkpoint of the same
weights decoded by nvfp4.codec compute the same function up to BF16 rounding and kernel accumulation order.
The measure is the mean |difference| of prompt logprobs (teacher-forced, so one early difference cannot
snowball). The random tiny model is touchy: on the CPU, its float32 and bfloat16 forwards of the same
weights differ by 0.011 on average (0.33 at worst), so TOL sits a little above that noise. A planted gate/up
global-scale mismatch in some experts (the up projection stored with k times the gate's global scale and
block scales 1/k: the same values) moves them by 0.12 on average on the CPU; vLLM must show it (> WRONG),
and both `nvfp4.doctor --fix` and `patches.apply` must bring it back within TOL.

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0): the patches then apply where vLLM loads,
whatever touched CUDA here before (a forked engine fails once the parent has initialized the CUDA driver).
"""

from __future__ import annotations

import gc
import json
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import patches
from nvfp4 import codec, doctor
from nvfp4.layout import EXPERT_RE, Checkpoint, copy_side_files, split_key
from nvfp4.quantize import quantize_checkpoint

pytestmark = pytest.mark.gpu

TOL = 0.03  # mean |prompt logprob difference| allowed between runs of the same weights
WRONG = 0.06  # the planted mismatch must move prompt logprobs by more than this on average
PLANTED = {0: 2, 1: 4, 2: 2, 3: 4}  # expert -> factor k by which the up projection's global scale is too large
PROMPTS = [
    "<|turn>user\nWhat is the capital of Australia?<turn|>\n<|turn>model\n",
    "Write a Python function that reverses a linked list, then explain it step by step.",
    "The weather is lovely today, so we walk along the river to the old city and",
]


def run(model: Path, **engine) -> list[dict]:
    """Prompt logprobs and greedy tokens from vLLM for PROMPTS; one engine at a time, shut down before returning."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(model),
        enforce_eager=True,
        max_model_len=512,
        gpu_memory_utilization=0.15,
        attention_backend="TRITON_ATTN",
        language_model_only=True,
        seed=0,
        **engine,
    )
    try:
        params = SamplingParams(temperature=0.0, max_tokens=16, prompt_logprobs=0)
        results = []
        for out in llm.generate(PROMPTS, params):
            ids, gen = out.prompt_token_ids, out.outputs[0]
            results.append(
                {
                    "prompt": [out.prompt_logprobs[i][t].logprob for i, t in enumerate(ids) if i > 0],
                    "tokens": list(gen.token_ids),
                }
            )
        return results
    finally:
        from vllm.distributed import cleanup_dist_env_and_memory

        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()
        torch.cuda.empty_cache()


def nvfp4_run(model: Path) -> list[dict]:
    return run(model, quantization="modelopt", moe_backend="marlin", linear_backend="marlin")


def compare(name: str, got: list[dict], ref: list[dict]) -> float:
    """Mean |prompt logprob difference|; prints it with the p90, the max and the greedy tokens' agreement."""
    diff = torch.tensor(
        [abs(a - b) for g, r in zip(got, ref, strict=True) for a, b in zip(g["prompt"], r["prompt"], strict=True)]
    )
    agree = []
    for g, r in zip(got, ref, strict=True):
        same = next(
            (i for i, (a, b) in enumerate(zip(g["tokens"], r["tokens"], strict=False)) if a != b), len(r["tokens"])
        )
        agree.append(f"{same}/{len(r['tokens'])}")
    print(
        f"{name}: |prompt logprob diff| mean {diff.mean():.4f}, p90 {diff.quantile(0.9):.4f}, max {diff.max():.4f} "
        f"over {len(diff)} tokens; greedy tokens equal for the first {', '.join(agree)}"
    )
    return float(diff.mean())


def write_dequantized(src: Path, out: Path) -> Path:
    """A BF16 Gemma 4 checkpoint of the NVFP4 checkpoint's weights, decoded by the codec (experts fused 3-D again)."""
    ckpt = Checkpoint(src)
    tensors, experts = {}, defaultdict(dict)
    for key in ckpt.tensors:
        module, suffix = split_key(key)
        if f"{module}.weight_scale" not in ckpt.tensors:
            tensors[key] = ckpt.get(key)
        elif suffix == "weight":
            w = codec.dequantize(
                ckpt.get(key), ckpt.get(f"{module}.weight_scale"), ckpt.get(f"{module}.weight_scale_2")
            )
            m = EXPERT_RE.match(module)
            if m:
                experts[m["layer"]][int(m["expert"]), m["proj"]] = w.to(torch.bfloat16)
            else:
                tensors[key] = w.to(torch.bfloat16)
    for layer, parts in experts.items():
        n = 1 + max(e for e, _ in parts)
        tensors[f"{layer}.experts.gate_up_proj"] = torch.stack(
            [torch.cat([parts[e, "gate_proj"], parts[e, "up_proj"]]) for e in range(n)]
        )
        tensors[f"{layer}.experts.down_proj"] = torch.stack([parts[e, "down_proj"] for e in range(n)])
    out.mkdir(parents=True)
    save_file(tensors, out / "model.safetensors")
    config = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    copy_side_files(src, out)
    return out


def plant_mismatch(src: Path, out: Path) -> Path:
    """Experts of PLANTED get up projections with k times the gate's global scale; the values stay the same."""
    shutil.copytree(src, out)
    t = load_file(out / "model.safetensors")
    for layer in sorted({m["layer"] for k in t if (m := EXPERT_RE.match(split_key(k)[0]))}):
        for e, k in PLANTED.items():
            up = f"{layer}.moe.experts.{e}.up_proj"
            stored = (t[f"{up}.weight"], t[f"{up}.weight_scale"], t[f"{up}.weight_scale_2"])
            values = codec.dequantize(*stored)
            planted = codec.quantize(values, k * codec.amax_from_scale(stored[2]))
            assert torch.equal(codec.dequantize(*planted), values), "block scales left the exact float8 range"
            t[f"{up}.weight"], t[f"{up}.weight_scale"], t[f"{up}.weight_scale_2"] = planted
    save_file(t, out / "model.safetensors")
    return out


def test_nvfp4_matches_bf16_of_its_weights_and_repairs_a_scale_mismatch(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch
):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    nvfp4 = quantize_checkpoint(tiny_model_dir, tmp_path / "nvfp4", calib_samples=4, device="cpu")
    assert doctor.diagnose(nvfp4).ok
    assert patches.apply(nvfp4) == []
    reference = run(write_dequantized(nvfp4, tmp_path / "bf16"))

    assert compare("NVFP4 (Marlin) vs BF16 of its decoded weights", nvfp4_run(nvfp4), reference) <= TOL

    planted = plant_mismatch(nvfp4, tmp_path / "planted")
    report = doctor.diagnose(planted)
    assert {f.kind for f in report.findings} == {"scale_mismatch"} and len(report.findings) == 2 * len(PLANTED)
    assert compare("planted gate/up mismatch, as is", nvfp4_run(planted), reference) > WRONG

    assert doctor.main([str(planted), "--fix", str(tmp_path / "fixed")]) == 0
    assert compare("planted, after nvfp4.doctor --fix", nvfp4_run(tmp_path / "fixed"), reference) <= TOL

    lines = patches.apply(planted)
    print("patches.apply:", *lines, sep="\n  ")
    try:
        assert compare("planted, with patches.apply", nvfp4_run(planted), reference) <= TOL
    finally:
        patches.apply(nvfp4)  # drops the repairs: later loads in this process see their own checkpoints
