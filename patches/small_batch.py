"""Our NVFP4 kernels for decode batches (nvfp4.kernels) in place of Marlin's, where they are faster.

At one to a few tokens a step, vLLM 0.26's Marlin kernels read NVFP4 weights at a fraction of the GPU's
bandwidth (bench/NOTES.md: ~16 % dense, ~22 % MoE on an H200). nvfp4.kernels reads the very tensors Marlin
holds, in Marlin's layout, so no weight is copied or repacked: `install` routes a batch of at most `limit`
tokens to them and every larger one (prompts) to Marlin as before. `limit` is this GPU's measured threshold
(`measured_limit`), at most the `MAX_TOKENS` the kernels are written for.

- Dense layers: `MarlinNvFp4LinearKernel.apply_weights` calls the torch custom op `gemma4_nvfp4::linear`,
  whose fake implementation lets torch.compile trace it and whose real one picks the kernel by the batch's
  token count each time it runs (when CUDA graphs are captured, once per captured size).
- MoE: `ModelOptNvFp4FusedMoE.apply` runs inside vLLM's opaque `moe_forward` op, with real tensors: it takes
  our fused gate-up + GeGLU and down kernels for small batches, vLLM's modular Marlin kernel otherwise.

`calls` counts which path each call took, in the process that ran it (tests run the engine in-process).
"""

from __future__ import annotations

import logging
from collections import Counter

import torch

log = logging.getLogger("patches")

MAX_TOKENS = 8  # the kernels are written for decode batches; prompts go to Marlin (nvfp4/kernels)
MODES = ("auto", "on", "off")
# GPUs where a GPU test measured the kernels faster than Marlin for this model: `auto` turns them on there only.
PROVEN = {(9, 0)}  # H100, H200
NOTE = "NVFP4 small-batch kernels for batches of up to {limit} tokens (Marlin above)"
limit = MAX_TOKENS  # batches of at most this many tokens take our kernels; set by `install`


def measured_limit(gpu: str | None) -> int:
    """The tuned file's `max_tokens` for this GPU (nvfp4/kernels/tuned): the largest batch at which the served
    engine measured our kernels faster than Marlin end to end, which can be below where they win in isolation
    (on an H200 M = 4 wins by 1.10x alone and loses 5 % in the engine: bench/NOTES.md); MAX_TOKENS without one."""
    from nvfp4.kernels import tuning

    value = tuning.load(gpu).get("max_tokens")  # by the name NVML gave: CUDA must stay uninitialized before fork
    return min(value, MAX_TOKENS) if isinstance(value, int) and value >= 1 else MAX_TOKENS


calls: Counter[str] = Counter()


def wanted(mode: str, capability: tuple[int, int] | None, kernels: dict[str, str | None]) -> bool:
    """Whether to install for this --small-batch-kernels mode, GPU and vLLM's kernel choice (moe/linear)."""
    if mode not in MODES:
        raise ValueError(f"--small-batch-kernels must be one of {', '.join(MODES)}, got {mode!r}")
    marlin = "marlin" in kernels.values()  # the kernels read Marlin's layout: nothing to replace otherwise
    return marlin and (mode == "on" or (mode == "auto" and capability in PROVEN))


def install(kernels: dict[str, str | None], max_tokens: int | None = None, gpu: str | None = None) -> str | None:
    """Route batches of up to `max_tokens` (default: `measured_limit` of the GPU named `gpu`) of the Marlin layers
    named in `kernels` ("linear_backend", "moe_backend" -> "marlin") to our kernels; a line saying so, or None
    where this vLLM has no such layers."""
    global limit
    limit = min(max_tokens or measured_limit(gpu), MAX_TOKENS)
    done = []
    if kernels.get("linear_backend") == "marlin" and _install_linear():
        done.append("dense")
    if kernels.get("moe_backend") == "marlin" and _install_moe():
        done.append("MoE")
    return f"{NOTE.format(limit=limit)}: {' and '.join(done)} layers" if done else None


# ---------------------------------------------------------------------------------------------- dense


@torch.library.custom_op("gemma4_nvfp4::linear", mutates_args=())
def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_global_scale: torch.Tensor,
    workspace: torch.Tensor,
    size_n: int,
    size_k: int,
) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] <= limit:
        from nvfp4.kernels.gemv import marlin_nvfp4_gemv

        calls["linear:small"] += 1
        out = marlin_nvfp4_gemv(flat, weight, weight_scale, weight_global_scale, size_n, size_k)
    else:
        from vllm.model_executor.layers.quantization.utils.marlin_utils_fp4 import apply_fp4_marlin_linear

        calls["linear:marlin"] += 1
        out = apply_fp4_marlin_linear(
            input=flat,
            weight=weight,
            weight_scale=weight_scale,
            weight_global_scale=weight_global_scale,
            workspace=workspace,
            size_n=size_n,
            size_k=size_k,
        )
    return out.reshape(*x.shape[:-1], size_n)


@linear.register_fake
def _(x, weight, weight_scale, weight_global_scale, workspace, size_n, size_k):
    return x.new_empty(*x.shape[:-1], size_n)


def _install_linear() -> bool:
    try:
        from vllm.model_executor.kernels.linear.nvfp4.marlin import MarlinNvFp4LinearKernel
    except ImportError:
        return False
    if getattr(MarlinNvFp4LinearKernel.apply_weights, "small_batch", False):
        return True
    original = MarlinNvFp4LinearKernel.apply_weights

    def apply_weights(self, layer, x, bias=None):
        if bias is not None:  # Gemma 4 has none; the kernels add none
            return original(self, layer, x, bias)
        return torch.ops.gemma4_nvfp4.linear(
            x,
            layer.weight,
            layer.weight_scale,
            layer.weight_global_scale,
            layer.workspace,
            layer.output_size_per_partition,
            layer.input_size_per_partition,
        )

    apply_weights.small_batch = True
    MarlinNvFp4LinearKernel.apply_weights = apply_weights
    return True


# ------------------------------------------------------------------------------------------------ MoE


def _install_moe() -> bool:
    try:
        from vllm.model_executor.layers.fused_moe.activation import MoEActivation
        from vllm.model_executor.layers.fused_moe.oracle.nvfp4 import NvFp4MoeBackend
        from vllm.model_executor.layers.quantization.modelopt import ModelOptNvFp4FusedMoE
    except ImportError:
        return False
    if getattr(ModelOptNvFp4FusedMoE.apply, "small_batch", False):
        return True
    original = ModelOptNvFp4FusedMoE.apply

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
        ours = (
            x.shape[0] <= limit
            and self.nvfp4_backend == NvFp4MoeBackend.MARLIN
            and layer.activation == MoEActivation.GELU_TANH  # Gemma 4's GeGLU: what the kernels compute
            and layer.expert_map is None  # every expert on this GPU
            and not layer.apply_router_weight_on_input
            and shared_experts is None
        )
        if not ours:
            calls["moe:marlin"] += 1
            return original(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input)
        from nvfp4.kernels.moe import marlin_nvfp4_moe

        calls["moe:small"] += 1
        return marlin_nvfp4_moe(
            x,
            layer.w13_weight,
            layer.w13_weight_scale,
            layer.w13_weight_scale_2,
            layer.w2_weight,
            layer.w2_weight_scale,
            layer.w2_weight_scale_2,
            topk_weights,
            topk_ids,
        )

    apply.small_batch = True
    ModelOptNvFp4FusedMoE.apply = apply
    return True
