"""Properties of the NVFP4 codec on random shapes and values, and agreement with vLLM's own reference code."""

from __future__ import annotations

import random

import pytest
import torch

from nvfp4 import codec
from nvfp4.codec import E2M1_VALUES, FP8_MAX, GROUP, SCALE_MIN, dequantize, quantize


def error_bound(w: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """Per-element bound on |dequantize(quantize(w)) - w|.

    With t = block_amax / (6 g) and f its float8 rounding (relative error <= 2^-4, or <= 2^-10 absolute in the
    subnormal range, and f >= 2^-9 after the clamp): a value inside the E2M1 range is off by at most one
    E2M1 half step, <= f g <= (17/16) block_amax / 6 + 2^-9 g; a value past it saturates at 6 f g, off by
    at most block_amax - 6 f g <= block_amax / 16 + 3 * 2^-9 g.
    """
    block_amax = w.reshape(w.shape[0], -1, GROUP).abs().amax(-1, keepdim=True)
    bound = (17 / 16) * block_amax / 6 + 3 * SCALE_MIN * global_scale
    return bound.expand(-1, -1, GROUP).reshape(w.shape)


def random_weight(rng: random.Random) -> torch.Tensor:
    out, blocks = rng.randint(1, 40), rng.randint(1, 12)
    magnitude = 10.0 ** rng.uniform(-25, 25)
    kind = rng.choice(["normal", "lognormal", "sparse", "specials"])
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    w = torch.randn(out, blocks * GROUP, generator=g)
    if kind == "lognormal":
        w = w.sign() * torch.exp(3 * torch.randn(w.shape, generator=g))
    elif kind == "sparse":
        w[torch.rand(w.shape, generator=g) < 0.8] = 0.0
    elif kind == "specials":  # zero blocks, negative zeros, values far below and far above the rest
        flat = w.view(-1)
        idx = torch.randperm(flat.numel(), generator=g)
        n = max(1, flat.numel() // 8)
        flat[idx[:n]] = -0.0
        flat[idx[n : 2 * n]] *= 1e-30
        flat[idx[2 * n : 2 * n + 1]] *= 1e6
        w[:, :GROUP] = 0.0
    return w * magnitude


@pytest.mark.parametrize("seed", range(60))
def test_random_round_trip(seed: int):
    w = random_weight(random.Random(seed))
    packed, block_scale, global_scale = quantize(w)

    assert packed.dtype == torch.uint8 and packed.shape == (w.shape[0], w.shape[1] // 2)
    assert block_scale.dtype == torch.float8_e4m3fn and block_scale.shape == (w.shape[0], w.shape[1] // GROUP)
    assert global_scale.dtype == torch.float32 and global_scale.dim() == 0
    assert global_scale == w.abs().max().float() / (6 * 448)
    bs = block_scale.float()
    assert ((bs >= SCALE_MIN) & (bs <= FP8_MAX)).all()
    zero_blocks = w.reshape(w.shape[0], -1, GROUP).abs().amax(-1) == 0
    assert (bs[zero_blocks] == 1.0).all()

    dq = dequantize(packed, block_scale, global_scale)
    assert dq.dtype == torch.float32 and dq.shape == w.shape and torch.isfinite(dq).all()
    assert ((dq - w).abs() <= error_bound(w, global_scale)).all()
    assert (dq[w == 0] == 0).all()
    assert not (torch.sign(dq) * torch.sign(w) < 0).any()  # never flips a sign

    code = torch.stack((packed & 0xF, packed >> 4), -1).reshape(w.shape)
    assert torch.equal((code >> 3).bool(), w < 0)  # sign bit for every negative input; -0.0 is not negative

    # Re-encoding dequantized values with the same global scale gives the same values back wherever the block
    # scale is a normal float8 (bits may differ: -0 comes back as +0). Below 2^-6 float8 is too coarse for that.
    again = dequantize(*quantize(dq, codec.amax_from_scale(global_scale)))
    normal = (bs >= 2**-6).repeat_interleave(GROUP, dim=1)
    assert torch.equal(again[normal], dq[normal])


def test_gaussian_error():
    """The typical error, for the record: about 9.5% relative (Frobenius) on Gaussian weights."""
    w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(0))
    dq = dequantize(*quantize(w))
    rel = float((dq - w).norm() / w.norm())
    print(f"NVFP4 relative error on N(0,1) weights: {rel:.4f}")
    assert 0.08 < rel < 0.11


def test_rounding_ties_to_even_and_saturation():
    # One block whose amax is 6 with global amax 6*448: block scale 1 and global scale 1/448... scaled to 1.
    x = torch.tensor([[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 0.2, 0.3, 4.9, 5.1, -0.25, -0.0, -1e-9, 6.0]])
    packed, block_scale, global_scale = quantize(x * 448, global_amax=6 * 448)
    assert float(block_scale.float()) == 448.0 and float(global_scale) == 1.0
    code = torch.stack((packed & 0xF, packed >> 4), -1).reshape(-1).tolist()
    #        0.25 0.75 1.25 1.75 2.5  3.5  5.0  6.0  0.2  0.3  4.9  5.1  -.25 -0   -tiny 6.0
    assert code == [0, 2, 2, 4, 4, 6, 6, 7, 0, 1, 6, 7, 8, 0, 8, 7]
    # Values beyond the global amax saturate at 6 (block scale clamps at 448).
    p, bs, g = quantize(torch.full((1, 16), 1e6), global_amax=1.0)
    assert torch.equal(dequantize(p, bs, g), torch.full((1, 16), 6 * 448 / 2688))


def test_grid_values_are_exact():
    grid = torch.cat([E2M1_VALUES, -E2M1_VALUES]).reshape(1, 16) * 0.375
    assert torch.equal(dequantize(*quantize(grid)), grid)


def test_doubling_the_global_scale_halves_block_scales_exactly():
    """What the GPU test plants: an up projection with twice the gate's global scale and the same values."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    p, bs, g = quantize(w)
    p2, bs2, g2 = quantize(dequantize(p, bs, g), global_amax=2 * codec.amax_from_scale(g))
    assert torch.equal(dequantize(p2, bs2, g2), dequantize(p, bs, g))


def test_all_zero_and_invalid_inputs():
    p, bs, g = quantize(torch.zeros(3, 32))
    assert float(g) == 0 and (bs.float() == 1).all() and torch.equal(dequantize(p, bs, g), torch.zeros(3, 32))
    with pytest.raises(ValueError):
        quantize(torch.zeros(4, 24))
    with pytest.raises(ValueError):
        quantize(torch.tensor([[float("nan")] * 16]))
    with pytest.raises(ValueError):
        dequantize(p, bs[:, :1], g)


def test_matches_vllm_reference():
    """vLLM's own NVFP4 reference (emulation kernels) encodes and decodes the same bits."""
    emulation = pytest.importorskip("vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils")
    w = torch.randn(96, 512, generator=torch.Generator().manual_seed(2)) * 0.02
    packed, block_scale, global_scale = quantize(w)
    # vLLM's global scale is the reciprocal convention (448*6/amax) and its decoder reads ours directly.
    ref_values, ref_scale = emulation.ref_nvfp4_quant(w, 1 / global_scale, GROUP)
    assert torch.equal(ref_scale, block_scale.float())
    assert torch.equal(emulation.break_fp4_bytes(packed, torch.float32), ref_values)
    decoded = emulation.dequantize_to_dtype(packed, block_scale, global_scale, torch.float32, swizzle=False)
    assert torch.equal(decoded, dequantize(packed, block_scale, global_scale))
