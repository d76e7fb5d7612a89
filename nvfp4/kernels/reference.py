"""The correctness oracle of the kernels: dequantize from the Marlin layout to fp32, then plain torch math."""

from __future__ import annotations

import torch

from nvfp4.kernels.marlin_layout import dequantize


def gemv_reference(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor, size_n: int, size_k: int
) -> torch.Tensor:
    """fp32 [M, size_n] = x @ W.T with W the true weights of a Marlin linear."""
    return x.float() @ dequantize(qweight, scales, global_scale)[:size_n, :size_k].T


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")


def moe_reference(
    x: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w13_gs: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    w2_gs: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """fp32 [M, K]: sum_t w[m, t] * W2[e] @ bf16(gelu_tanh(gate) * up), the GeGLU output rounded to bf16 as in
    vLLM's Marlin MoE (and `marlin_nvfp4_moe`); weights as the padded Marlin tensors define them."""
    hidden = x.shape[1]
    inter_pad = w13.shape[2] // 4
    out = torch.zeros(x.shape[0], hidden, dtype=torch.float32, device=x.device)
    for e in topk_ids.unique().tolist():
        gate_up = dequantize(w13[e], w13_scale[e], w13_gs[e])[:, :hidden]
        down = dequantize(w2[e], w2_scale[e], w2_gs[e])[:hidden]
        tokens, slots = (topk_ids == e).nonzero(as_tuple=True)
        g, u = (x[tokens].float() @ gate_up.T).split(inter_pad, dim=1)
        h = (gelu_tanh(g) * u).to(torch.bfloat16).float()
        out.index_add_(0, tokens, topk_weights[tokens, slots, None].float() * (h @ down.T))
    return out
