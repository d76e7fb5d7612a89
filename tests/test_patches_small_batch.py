"""patches.small_batch: which GPUs and modes take our NVFP4 kernels, and that vLLM's Marlin layers route decode
batches to them and prompts to Marlin. The kernels themselves are checked in tests/test_nvfp4_kernels.py (CPU,
Triton's interpreter) and tests/test_gpu_kernels.py (GPU, against Marlin and in the engine)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from patches import small_batch

MARLIN = {"linear_backend": "marlin", "moe_backend": "marlin"}


@pytest.mark.parametrize(
    ("mode", "capability", "kernels", "expected"),
    [
        ("auto", (9, 0), MARLIN, True),  # H100/H200: measured faster
        ("auto", (12, 0), MARLIN, False),  # RTX 50xx: not measured, Marlin stays
        ("auto", None, MARLIN, False),
        ("on", (12, 1), MARLIN, True),
        ("on", (9, 0), {"linear_backend": None, "moe_backend": "cutlass"}, False),  # no Marlin layer to replace
        ("off", (9, 0), MARLIN, False),
    ],
)
def test_auto_takes_the_kernels_only_where_a_gpu_test_proved_them(mode, capability, kernels, expected):
    assert small_batch.wanted(mode, capability, kernels) is expected


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="auto, on, off"):
        small_batch.wanted("fast", (9, 0), MARLIN)


@pytest.fixture
def vllm_classes(monkeypatch):
    """vLLM's Marlin layer classes, restored after the test (install wraps them in place)."""
    from vllm.model_executor.kernels.linear.nvfp4.marlin import MarlinNvFp4LinearKernel
    from vllm.model_executor.layers.quantization.modelopt import ModelOptNvFp4FusedMoE

    monkeypatch.setattr(MarlinNvFp4LinearKernel, "apply_weights", MarlinNvFp4LinearKernel.apply_weights)
    monkeypatch.setattr(ModelOptNvFp4FusedMoE, "apply", ModelOptNvFp4FusedMoE.apply)
    small_batch.calls.clear()
    return MarlinNvFp4LinearKernel, ModelOptNvFp4FusedMoE


def test_install_wraps_vllms_marlin_layers_once(vllm_classes):
    linear_cls, moe_cls = vllm_classes
    assert (
        small_batch.install(MARLIN) == "NVFP4 small-batch kernels for batches of up to 8 tokens (Marlin above): "
        "dense and MoE layers"
    )
    wrapped = (linear_cls.apply_weights, moe_cls.apply)
    assert small_batch.install(MARLIN).endswith("dense and MoE layers")
    assert (linear_cls.apply_weights, moe_cls.apply) == wrapped  # not wrapped twice
    assert small_batch.install({"linear_backend": None, "moe_backend": None}) is None


def test_dense_layers_send_decode_batches_to_the_gemv_and_prompts_to_marlin(vllm_classes, monkeypatch):
    from vllm.model_executor.layers.quantization.utils import marlin_utils_fp4

    import nvfp4.kernels.gemv

    # Stand-ins for the two GPU kernels: which one a batch reaches is what is tested here.
    monkeypatch.setattr(nvfp4.kernels.gemv, "marlin_nvfp4_gemv", lambda x, *a: torch.full((x.shape[0], a[-2]), 1.0))
    monkeypatch.setattr(
        marlin_utils_fp4,
        "apply_fp4_marlin_linear",
        lambda input, size_n, **kw: torch.full((input.shape[0], size_n), 2.0),
    )
    linear_cls, _ = vllm_classes
    small_batch.install(MARLIN)
    layer = SimpleNamespace(
        weight=torch.zeros(1), weight_scale=torch.zeros(1), weight_global_scale=torch.zeros(1),
        workspace=torch.zeros(1), output_size_per_partition=24, input_size_per_partition=32,
    )  # fmt: skip
    kernel = object.__new__(linear_cls)
    decode = kernel.apply_weights(layer, torch.zeros(small_batch.MAX_TOKENS, 32))
    prompt = kernel.apply_weights(layer, torch.zeros(small_batch.MAX_TOKENS + 1, 32))
    assert decode.shape == (small_batch.MAX_TOKENS, 24) and bool((decode == 1).all())
    assert prompt.shape == (small_batch.MAX_TOKENS + 1, 24) and bool((prompt == 2).all())
    assert small_batch.calls == {"linear:small": 1, "linear:marlin": 1}


def test_a_gpus_measured_threshold_sends_larger_decode_batches_to_marlin(vllm_classes, monkeypatch, tmp_path):
    from vllm.model_executor.layers.quantization.utils import marlin_utils_fp4

    from nvfp4.kernels import tuning

    tuned = tmp_path / "gpu.json"
    tuned.write_text('{"max_tokens": 2, "gemv": {}, "moe": {}}')
    monkeypatch.setenv("NVFP4_TUNED", str(tuned))
    tuning.reload()
    try:
        monkeypatch.setattr(
            marlin_utils_fp4,
            "apply_fp4_marlin_linear",
            lambda input, size_n, **kw: torch.full((input.shape[0], size_n), 2.0),
        )
        linear_cls, _ = vllm_classes
        assert "up to 2 tokens" in small_batch.install(MARLIN)
        layer = SimpleNamespace(
            weight=torch.zeros(1), weight_scale=torch.zeros(1), weight_global_scale=torch.zeros(1),
            workspace=torch.zeros(1), output_size_per_partition=24, input_size_per_partition=32,
        )  # fmt: skip
        assert bool((object.__new__(linear_cls).apply_weights(layer, torch.zeros(3, 32)) == 2).all())
        assert small_batch.calls == {"linear:marlin": 1}
        assert "up to 8 tokens" in small_batch.install(MARLIN, max_tokens=8)  # a caller may ask for all of them
    finally:
        monkeypatch.delenv("NVFP4_TUNED")
        tuning.reload()
        small_batch.install(MARLIN)


def test_the_linear_op_traces_with_its_fake_implementation():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 5, 32, dtype=torch.bfloat16)
        out = torch.ops.gemma4_nvfp4.linear(x, torch.empty(2), torch.empty(2), torch.empty(()), torch.empty(1), 48, 32)
    assert out.shape == (3, 5, 48) and out.dtype == torch.bfloat16


def test_moe_layers_send_decode_batches_to_our_experts_and_the_rest_to_marlin(vllm_classes, monkeypatch):
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.oracle.nvfp4 import NvFp4MoeBackend

    import nvfp4.kernels.moe

    _, moe_cls = vllm_classes
    monkeypatch.setattr(moe_cls, "apply", lambda self, layer, x, *rest: torch.full_like(x, 2.0))  # "Marlin"
    small_batch.install(MARLIN)
    monkeypatch.setattr(nvfp4.kernels.moe, "marlin_nvfp4_moe", lambda x, *rest: torch.full_like(x, 1.0))
    method = SimpleNamespace(nvfp4_backend=NvFp4MoeBackend.MARLIN)
    layer = SimpleNamespace(
        activation=MoEActivation.GELU_TANH, expert_map=None, apply_router_weight_on_input=False,
        w13_weight=None, w13_weight_scale=None, w13_weight_scale_2=None,
        w2_weight=None, w2_weight_scale=None, w2_weight_scale_2=None,
    )  # fmt: skip
    ids, weights = torch.zeros(1, 8, dtype=torch.int32), torch.ones(1, 8)

    def run(tokens: int, **changes) -> float:
        x = torch.zeros(tokens, 16)
        return float(
            moe_cls.apply(method, SimpleNamespace(**{**vars(layer), **changes}), x, weights, ids, None, None)[0, 0]
        )

    assert run(1) == 1.0 and run(small_batch.MAX_TOKENS) == 1.0
    assert run(small_batch.MAX_TOKENS + 1) == 2.0  # a prompt
    assert run(1, activation=MoEActivation.SILU) == 2.0  # not what the kernels compute
    assert run(1, expert_map=torch.arange(8)) == 2.0  # experts split over GPUs
    assert small_batch.calls == {"moe:small": 2, "moe:marlin": 3}
