"""The small-batch NVFP4 kernels on a GPU: in vLLM on the tiny NVFP4 checkpoint, against Marlin and BF16.

    python -m pytest -m gpu tests/test_gpu_kernels.py -s    # prints the numbers

Prompt logprobs are teacher-forced, so they compare the kernels token by token. vLLM computes them while it
prefills; with prompt chunks of at most patches.small_batch.MAX_TOKENS tokens (max_num_batched_tokens) every
chunk is a batch the small-batch kernels take, so the whole prompt runs through them. The engine runs in this
process (VLLM_ENABLE_V1_MULTIPROCESSING=0) without CUDA graphs, so patches.small_batch.calls sees every call.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nvfp4.quantize import quantize_checkpoint
from patches import small_batch
from tests.test_gpu_nvfp4 import compare, run, write_dequantized

pytestmark = pytest.mark.gpu

TOL = 0.02  # mean |prompt logprob difference| allowed against BF16 of the same weights (the bound)
SAME_KERNEL_TOL = 0.005  # ours against Marlin on the same NVFP4 weights: both fp32-accumulated, bf16 out
MARLIN = {"linear_backend": "marlin", "moe_backend": "marlin"}
# Every prompt chunk a small batch (vLLM wants max_num_seqs <= max_num_batched_tokens).
CHUNKED = {"max_num_batched_tokens": small_batch.MAX_TOKENS, "max_num_seqs": 4}


@pytest.fixture
def nvfp4(tiny_model_dir: Path, tmp_path_factory) -> Path:
    return quantize_checkpoint(
        tiny_model_dir, tmp_path_factory.mktemp("kernels") / "nvfp4", calib_samples=4, device="cpu"
    )


@pytest.fixture
def installed(monkeypatch):
    """The kernels installed for the test, vLLM's classes restored after it."""
    from vllm.model_executor.kernels.linear.nvfp4.marlin import MarlinNvFp4LinearKernel
    from vllm.model_executor.layers.quantization.modelopt import ModelOptNvFp4FusedMoE

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setattr(MarlinNvFp4LinearKernel, "apply_weights", MarlinNvFp4LinearKernel.apply_weights)
    monkeypatch.setattr(ModelOptNvFp4FusedMoE, "apply", ModelOptNvFp4FusedMoE.apply)

    def install() -> None:
        # Every batch the kernels are written for, whatever this GPU's measured end-to-end threshold.
        assert small_batch.install(MARLIN, max_tokens=small_batch.MAX_TOKENS).endswith("dense and MoE layers")
        small_batch.calls.clear()

    return install


def nvfp4_run(model: Path, **engine) -> list[dict]:
    return run(model, quantization="modelopt", **MARLIN, **engine)


def test_the_kernels_match_bf16_and_marlin_on_the_tiny_checkpoint(nvfp4, installed, tmp_path):
    install = installed
    reference = run(write_dequantized(nvfp4, tmp_path / "bf16"), **CHUNKED)
    marlin = nvfp4_run(nvfp4, **CHUNKED)
    install()
    ours = nvfp4_run(nvfp4, **CHUNKED)
    print("paths taken:", dict(small_batch.calls))
    assert small_batch.calls["linear:small"] > 0 and small_batch.calls["moe:small"] > 0
    assert small_batch.calls["linear:marlin"] == small_batch.calls["moe:marlin"] == 0  # every chunk was small
    assert compare("small-batch kernels vs BF16 of the decoded weights", ours, reference) <= TOL
    # Greedy tokens are printed, not asserted: the random model's top logits tie within rounding (test_gpu_nvfp4).
    assert compare("small-batch kernels vs Marlin, same NVFP4 weights", ours, marlin) <= SAME_KERNEL_TOL


def test_the_engine_takes_the_kernels_at_batch_1_and_marlin_for_a_prompt(nvfp4, installed):
    installed()
    nvfp4_run(nvfp4)  # whole prompts (dozens of tokens) prefill at once, then one token a step
    print("paths taken:", dict(small_batch.calls))
    assert small_batch.calls["linear:marlin"] > 0 and small_batch.calls["moe:marlin"] > 0  # the prompts
    assert small_batch.calls["linear:small"] > 0 and small_batch.calls["moe:small"] > 0  # decoding
