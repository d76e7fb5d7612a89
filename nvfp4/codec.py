"""The NVFP4 weight format as ModelOpt writes it and vLLM reads it; the one place the format lives.

A weight `w` [out, in] becomes
- `packed` uint8 [out, in/2]: E2M1 codes, element 2j in the low nibble and 2j+1 in the high one;
  bit 3 is the sign, bits 0-2 index E2M1_VALUES;
- `block_scale` float8_e4m3fn [out, in/16]: one scale per 16 consecutive inputs (ModelOpt: `weight_scale`);
- `global_scale` float32 scalar = amax / (6 * 448) (ModelOpt: `weight_scale_2`),
so that w ≈ E2M1_VALUES[code] * block_scale * global_scale. Activations use the same global form:
`input_scale` = activation amax / (6 * 448). vLLM multiplies these scales in as stored (W4A4 kernels take
the reciprocal of `input_scale` themselves), see vllm/model_executor/layers/quantization/modelopt.py.
"""

from __future__ import annotations

import torch

GROUP = 16  # inputs per block scale
FP4_MAX = 6.0  # largest E2M1 magnitude
FP8_MAX = 448.0  # largest float8_e4m3fn value
SCALE_MIN = 2.0**-9  # smallest float8_e4m3fn subnormal: a block scale never rounds to 0
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
# Code boundaries: a magnitude's code is the number of boundaries below it. They are the midpoints between
# neighbouring values; a tie goes to the even code, so the midpoints above an odd code (0.75, 1.75, 3.5) move
# one ulp down and a magnitude equal to them rounds up (0.25 -> 0, 0.75 -> 1.0, 2.5 -> 2.0, 5.0 -> 4.0).
_BOUNDARIES = (E2M1_VALUES[:-1] + E2M1_VALUES[1:]) / 2
_BOUNDARIES[1::2] = torch.nextafter(_BOUNDARIES[1::2], torch.tensor(0.0))


def scale_from_amax(amax: float | torch.Tensor) -> torch.Tensor:
    """The per-tensor scale stored for an absolute maximum: `weight_scale_2` for weights, `input_scale` for inputs."""
    return (torch.as_tensor(amax, dtype=torch.float32) / (FP4_MAX * FP8_MAX)).reshape(())


def amax_from_scale(scale: float | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(scale, dtype=torch.float32).reshape(()) * (FP4_MAX * FP8_MAX)


def quantize(
    w: torch.Tensor, global_amax: float | torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4-encode a 2-D weight; `global_amax` (default: w's own) lets fused shards share one global scale."""
    if w.ndim != 2 or w.shape[1] % GROUP:
        raise ValueError(f"expected a 2-D weight with a multiple of {GROUP} inputs, got shape {tuple(w.shape)}")
    w = w.float()
    w_amax = w.abs().max()
    if not torch.isfinite(w_amax):  # max propagates nan and inf
        raise ValueError("weight has inf or nan values")
    amax = w_amax if global_amax is None else torch.as_tensor(global_amax, dtype=torch.float32)
    global_scale = scale_from_amax(amax)

    blocks = w.reshape(w.shape[0], -1, GROUP)
    block_amax = blocks.abs().amax(dim=-1)
    block_scale = block_amax / (FP4_MAX * global_scale)
    block_scale = torch.where(block_amax == 0, 1.0, block_scale)
    block_scale = block_scale.clamp(SCALE_MIN, FP8_MAX).to(torch.float8_e4m3fn)

    denom = block_scale.float().unsqueeze(-1) * global_scale
    # denom is 0 only with a zero global scale, i.e. an all-zero weight (or global_amax=0): encode zeros.
    magnitude = torch.where(denom > 0, blocks.abs() / denom, 0.0)
    code = torch.bucketize(magnitude, _BOUNDARIES.to(w.device)).to(torch.uint8)
    code |= (blocks < 0).to(torch.uint8) << 3  # ModelOpt's rule: sign kept even when the value rounds to 0
    code = code.reshape(w.shape)
    packed = code[:, 0::2] | (code[:, 1::2] << 4)
    return packed, block_scale, global_scale


def dequantize(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """float32 [out, in] from the three stored tensors (the inverse of `quantize` up to its rounding)."""
    if packed.dtype != torch.uint8 or packed.ndim != 2:
        raise ValueError(f"packed must be 2-D uint8, got {packed.dtype} {tuple(packed.shape)}")
    out, half = packed.shape
    if block_scale.shape != (out, half * 2 // GROUP):
        raise ValueError(f"block_scale shape {tuple(block_scale.shape)} does not fit packed {tuple(packed.shape)}")
    code = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(out, half * 2)
    magnitude = E2M1_VALUES.to(packed.device)[(code & 0x07).long()]
    value = torch.where((code & 0x08).bool(), -magnitude, magnitude)
    scale = block_scale.float() * torch.as_tensor(global_scale, dtype=torch.float32).reshape(())
    return (value.reshape(out, -1, GROUP) * scale.unsqueeze(-1)).reshape(out, half * 2)
