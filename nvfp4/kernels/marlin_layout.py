"""vLLM's Marlin layout of NVFP4 weights (W4A16, bf16 activations), built from codec tensors and decoded back.

vLLM 0.26 (prepare_fp4_layer_for_marlin, prepare_nvfp4_moe_layer_for_marlin) turns ModelOpt's tensors into:

- weights, int32 [K/16, 2N]: row r holds k in [16r, 16r+16); each 64-column "super-tile" s of a row is 128
  consecutive words. Word w = 16*i_hi + 4*i_lo + j (i_hi < 8, i_lo < 4, j < 4) holds in nibble e = 4*r_lo + 2*b + r_hi
  (bits 4e..4e+3, b < 2, r_lo < 2, r_hi < 2) the E2M1 code of column 64s + 16j + 8b + i_hi and input 16r + 8*r_hi +
  2*i_lo + r_lo. It is a pure bit permutation, so (n, k) of every nibble follows from bits of (word, nibble): one
  word is one lane's share of an m16n8k16 tensor-core fragment (lane 4*i_hi + i_lo), Marlin's reason for it.
- block scales, [K/16, N] bytes (dtype float8_e4m3fn, but not E4M3): row r, and within each 64 columns, byte
  8*i_hi + 4*(j//2) + 2*b + j%2 holds column 16j + 8b + i_hi (marlin_permute_scales, then a [0,2,1,3] swap in
  fours). The byte is the high byte of (fp16(s * sf * 2^7) bits << 1): 5 exponent + 3 mantissa bits, so the fp16
  with bits (byte << 7) is S = s * sf * 2^7 exactly; S < 2 was stored as 0. sf is a power of two (>= 1) that lifts
  the largest scale near 448 (one sf for all experts of a MoE layer).
- global scale, fp32: gs_marlin = gs * 2^119 / sf (2^(126-7): Marlin decodes E2M1 as value * 2^-126 in bf16).

So the true weight is E2M1[code] * S * gs_marlin * 2^-126. Everything here is plain torch and runs on CPU or GPU;
`tests/test_nvfp4_kernels.py` checks it against vLLM's own reference code bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from nvfp4 import codec

TILE_K = 16  # inputs per Marlin row = per block scale
SUPER_N = 64  # columns of one super-tile
SUPER_WORDS = 128  # int32 words a super-tile occupies in a row: 16 * 64 nibbles / 8
BF16_EXPONENT_BIAS = 126  # vLLM's exponent_bias for bf16 activations: 2^7 - 2^1
SCALE_SHIFT = 7  # Marlin stores block scales as s * 2^7


@cache
def word_elements() -> tuple[torch.Tensor, torch.Tensor]:
    """(n, k) inside a super-tile row of every nibble: two int64 [128 words, 8 nibbles] tensors."""
    w = torch.arange(SUPER_WORDS).view(-1, 1)
    e = torch.arange(8).view(1, -1)
    i_hi, i_lo, j = w // 16, (w // 4) % 4, w % 4
    r_lo, b, r_hi = e // 4, (e // 2) % 2, e % 2
    return 16 * j + 8 * b + i_hi, 8 * r_hi + 2 * i_lo + r_lo


@cache
def scale_columns() -> torch.Tensor:
    """Column (inside its 64) of every byte position of a Marlin scale row: int64 [64]."""
    p = torch.arange(SUPER_N)
    i_hi, j_hi, b, j_lo = p // 8, (p // 4) % 2, (p // 2) % 2, p % 2
    return 16 * (2 * j_hi + j_lo) + 8 * b + i_hi


def padded_nk(size_n: int, size_k: int) -> tuple[int, int]:
    """vLLM's marlin_padded_nk for group 16: the smaller of (n%64, k%128) and (n%128, k%64) paddings."""
    up = lambda x, m: -(-x // m) * m  # noqa: E731
    candidates = ((up(size_n, 64), up(size_k, 128)), (up(size_n, 128), up(size_k, 64)))
    return min(candidates, key=lambda nk: (nk[0] * nk[1], nk[0] + nk[1]))


def _pad(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, cols - t.shape[-1], 0, rows - t.shape[-2]))


def codes(packed: torch.Tensor) -> torch.Tensor:
    """E2M1 codes uint8 [N, K] of codec-packed [N, K/2] (element 2j in the low nibble)."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def repack_weight(packed: torch.Tensor) -> torch.Tensor:
    """int32 [K/16, 2N] Marlin words of packed uint8 [N, K/2] (N % 64 == 0, K % 16 == 0), as gptq_marlin_repack."""
    c = codes(packed)
    n, k = c.shape
    n_of, k_of = (t.to(c.device) for t in word_elements())
    tiles = c.view(n // SUPER_N, SUPER_N, k // TILE_K, TILE_K).permute(2, 0, 1, 3)  # [row, s, n_local, k_local]
    nibbles = tiles[:, :, n_of, k_of].to(torch.int64)  # [row, s, 128, 8]
    words = (nibbles << (4 * torch.arange(8, device=c.device))).sum(-1)
    return words.to(torch.int32).reshape(k // TILE_K, 2 * n)  # int64 -> int32 keeps the low 32 bits


def unpack_weight(qweight: torch.Tensor) -> torch.Tensor:
    """E2M1 codes uint8 [N, K] from Marlin words int32 [K/16, 2N] (the inverse of `repack_weight`)."""
    rows, cols = qweight.shape
    n, k = cols // 2, rows * TILE_K
    words = qweight.view(rows, n // SUPER_N, SUPER_WORDS, 1).to(torch.int64) & 0xFFFFFFFF
    nibbles = ((words >> (4 * torch.arange(8, device=qweight.device))) & 0xF).to(torch.uint8)
    n_of, k_of = (t.to(qweight.device) for t in word_elements())
    tiles = torch.empty(rows, n // SUPER_N, SUPER_N, TILE_K, dtype=torch.uint8, device=qweight.device)
    tiles[:, :, n_of, k_of] = nibbles
    return tiles.permute(1, 2, 0, 3).reshape(n, k)


def scale_factor(block_scale: torch.Tensor) -> float:
    """vLLM's power-of-two sf (>= 1) lifting the largest nonzero scale near 448; one for all experts given."""
    s = block_scale.to(torch.bfloat16).to(torch.half).float() * 2**SCALE_SHIFT  # the dtypes vLLM goes through
    nonzero = s[s > 0]
    if nonzero.numel() and nonzero.max() < 448 * 2**SCALE_SHIFT:
        return (448 * 2**SCALE_SHIFT / nonzero.max()).log2().floor().exp2().item()
    return 1.0


def process_scales(block_scale: torch.Tensor, sf: float) -> torch.Tensor:
    """Marlin scale bytes [K/16, N] (dtype float8_e4m3fn as vLLM keeps them) of codec scales fp8 [N, K/16]."""
    s = block_scale.T.contiguous().to(torch.bfloat16).to(torch.half)
    if sf > 1.0:
        s = (s.float() * sf).to(torch.half)
    s = s * 2**SCALE_SHIFT
    s[s < 2] = 0
    high_bytes = (s.view(torch.int16) << 1).view(torch.uint8)[:, 1::2]
    rows, n = high_bytes.shape
    marlin = torch.empty_like(high_bytes)
    cols = (torch.arange(n, device=s.device) // SUPER_N * SUPER_N).view(-1, SUPER_N)
    marlin.view(rows, -1, SUPER_N)[:] = high_bytes[:, cols + scale_columns().to(s.device)]
    return marlin.view(torch.float8_e4m3fn)


def decode_scales(scales: torch.Tensor) -> torch.Tensor:
    """S = s * sf * 2^7 as fp32 [K/16, N] in natural column order, from Marlin scale bytes."""
    rows, n = scales.shape
    s = (scales.view(torch.uint8).to(torch.int16) << 7).view(torch.half).float()
    natural = torch.empty_like(s)
    cols = (torch.arange(n, device=s.device) // SUPER_N * SUPER_N).view(-1, SUPER_N)
    natural[:, cols + scale_columns().to(s.device)] = s.view(rows, -1, SUPER_N)
    return natural


def process_global_scale(global_scale: torch.Tensor, sf: float) -> torch.Tensor:
    return global_scale.to(torch.float32) * 2.0 ** (BF16_EXPONENT_BIAS - SCALE_SHIFT) / sf


@dataclass(frozen=True)
class MarlinNvfp4:
    """One linear (or a stack of experts, leading dim E) in vLLM's Marlin layout; size_* are the logical sizes."""

    qweight: torch.Tensor  # int32 [(E,) K_pad/16, 2 N_pad]
    scales: torch.Tensor  # float8_e4m3fn-typed bytes [(E,) K_pad/16, N_pad]
    global_scale: torch.Tensor  # fp32 [] or [E]
    size_n: int
    size_k: int


def dense_to_marlin(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor) -> MarlinNvfp4:
    """A codec-quantized linear [N, K] in the layout vLLM's prepare_fp4_layer_for_marlin gives it (padding included)."""
    size_n, size_k = packed.shape[0], packed.shape[1] * 2
    pad_n, pad_k = padded_nk(size_n, size_k)
    scales = _pad(block_scale.view(torch.uint8), pad_n, pad_k // TILE_K).view(torch.float8_e4m3fn)
    sf = scale_factor(scales)
    return MarlinNvfp4(
        repack_weight(_pad(packed, pad_n, pad_k // 2)),
        process_scales(scales, sf),
        process_global_scale(global_scale, sf),
        size_n,
        size_k,
    )


def _experts(packed: torch.Tensor, block_scale: torch.Tensor, shards: int, pad_rows: int, pad_k: int):
    """Zero-pad stacked experts [E, shards * rows, K/2 or K/16] to `pad_rows` rows per shard and `pad_k` inputs."""
    e, n, _ = packed.shape

    def pad(t: torch.Tensor, cols: int) -> torch.Tensor:
        t = t.reshape(e, shards, n // shards, t.shape[-1])
        return _pad(t, pad_rows, cols).reshape(e, shards * pad_rows, cols)

    return pad(packed, pad_k // 2), pad(block_scale.view(torch.uint8), pad_k // TILE_K)


def _stack(weights: torch.Tensor, scales_u8: torch.Tensor, global_scale: torch.Tensor, size_n: int, size_k: int):
    sf = scale_factor(scales_u8.view(torch.float8_e4m3fn))  # one sf for every expert of the layer
    return MarlinNvfp4(
        torch.stack([repack_weight(w) for w in weights]),
        torch.stack([process_scales(s.view(torch.float8_e4m3fn), sf) for s in scales_u8]),
        process_global_scale(global_scale, sf),
        size_n,
        size_k,
    )


def moe_to_marlin(
    w13: tuple[torch.Tensor, torch.Tensor, torch.Tensor], w2: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> tuple[MarlinNvfp4, MarlinNvfp4]:
    """Stacked experts as prepare_nvfp4_moe_layer_for_marlin lays them out; each is (packed, block_scale, gs [E]).

    w13 is [E, 2I, K/2] (gate rows, then up rows) and w2 [E, K, I/2]. vLLM pads I per gate/up shard and w2's
    inputs alike (to 64, or 128 when K % 128 != 0); size_n / size_k keep the unpadded sizes.
    """
    hidden, inter = w13[0].shape[2] * 2, w13[0].shape[1] // 2
    pad_i = -(-inter // 64) * 64 if hidden % 128 == 0 else -(-inter // 128) * 128
    gate_up = _stack(*_experts(w13[0], w13[1], 2, pad_i, hidden), w13[2], 2 * inter, hidden)
    down = _stack(*_experts(w2[0], w2[1], 1, hidden, pad_i), w2[2], hidden, inter)
    return gate_up, down


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """True weights fp32 [N_pad, K_pad] of one Marlin linear: E2M1 * S * gs_marlin * 2^-126.

    Computed in float64, where it is exact, and rounded once: equal to E2M1 * s * gs of the codec tensors.
    """
    value = codec.E2M1_VALUES.to(qweight.device, torch.float64)
    c = unpack_weight(qweight).long()
    w = torch.where(c >= 8, -value[c & 7], value[c & 7])
    s = decode_scales(scales).double().T.repeat_interleave(TILE_K, dim=1)
    gs = global_scale.double().reshape(()) * 2.0**-BF16_EXPONENT_BIAS
    return (w * s * gs).float()
