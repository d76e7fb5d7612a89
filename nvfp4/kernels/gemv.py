"""`marlin_nvfp4_gemv`: out[M, N] = x[M, K] @ W.T for M <= 8 tokens, W NVFP4 in vLLM's Marlin layout (bf16 x).

Design (see `marlin_layout` for the layout). A program owns SUPER 64-column super-tiles and WARPS_K warps, each
warp its own k-tiles ("rows"): per row and super-tile, lane (4*i_hi + row % 4) loads the 64 contiguous bytes of
words (i_hi, i_lo = 0..3, j = 0..3) (4 x 16-byte loads) and the 8 scale bytes of (row, i_hi) (one 8-byte load).
The decoded bf16 weights are the A operand of `tl.dot` (mma m16n8k16: the <= 8 tokens are the n8 side), and they
never move: the dot's N' and K' axes are orders of the (row, word, nibble) bits chosen so that Triton's A-operand
layout (kWidth 8) is what each lane loaded (lanes: i_hi -> n bits 0-2, row % 4 -> k bits 3-4; registers: the rest;
warps: k-tiles, a batched dot summed over warps at the end). x is loaded in the same K' order and the output
columns are unpermuted at the store. Compiled for sm_90 the loop has no layout conversion and ~3.2-3.5
instructions per weight: 13 integer ops + 4 bf16x2 multiplies decode an 8-nibble word, the rest is addressing,
masks, scales and the mma; 4.8 TB/s on 132 SMs needs ~33 weights per SM-cycle against 128 issue slots.

Decode: a word's nibbles e and e+4 (the low and high half) are one bf16x2 register of the mma fragment.
(q & 0x000F000F) * (2^12 + 2^6) & 0x81C081C0 puts sign at bit 15 and E2M1's 3 magnitude bits at 6..8 of each
half: bf16 bits of E2M1 * 2^-126 (code 1 is a bf16 subnormal, which bf16 arithmetic keeps, as Marlin relies on).
Times the block scale as bf16 S * 2^112 it is E2M1 * S * 2^-14, exact (<= 6 significant bits, in [2^-13, 21]);
the fp32 sums are scaled by gs_marlin * 2^-112 at the end.

Parallelism: the shapes here have 44-160 super-tiles, and 132 SMs want >= 4 warps each (one warp cannot issue
fast enough to stream its share), so K is split over warps and over `split_k` programs per column block. Split
partial sums go to a fp32 workspace; the last program of a column block (an acq_rel counter) adds them in split
order, writes bf16 and re-arms the counter: one kernel per GEMV, deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from .marlin_layout import SUPER_N, TILE_K

# Triton's interpreter (TRITON_INTERPRET=1 when the kernels are decorated) has no bf16 arithmetic and no inline
# asm: kernels decorated under it multiply and accumulate in fp32 (the same exact products) and decode in Triton.
INTERPRETED = triton.knobs.runtime.interpret

MAX_M = 8
SCALE_TO_TRUE = tl.constexpr(2.0**-112)  # true weight = decoded (E2M1 * S * 2^-14) * gs_marlin * 2^-112


@dataclass(frozen=True)
class GemvConfig:
    super_tiles: int = 1  # 64-column super-tiles per program (every warp holds all of them)
    warps_k: int = 4  # warps per program, each on its own k-tiles
    rows: int = 4  # k-tiles each warp decodes per step (multiple of 4: lanes span 4 rows)
    split_k: int = 1  # programs per column block along K
    num_stages: int = 2  # Triton's software pipelining depth of the loads
    decode_asm: bool = not INTERPRETED  # decode + scale in one PTX block per word (GPU only)

    @property
    def num_warps(self) -> int:
        return self.warps_k


SMS = 132  # H100 / H200 SXM
TARGET_PROGRAMS = 2 * SMS  # with 4 warps each: 8 warps per SM, enough loads in flight to cover HBM latency

# Measured choices, (N_pad, K_pad, block_m) -> config, as python -m bench.kernels prints them; the rest use
# `heuristic_config`.
DEFAULT_CONFIGS: dict[tuple[int, int, int], GemvConfig] = {}


def heuristic_config(n_pad: int, k_pad: int) -> GemvConfig:
    """~TARGET_PROGRAMS programs, each >= 2 steps of 16 k-tiles, by splitting K.

    Two super-tiles per program (x loaded once for both, ~7% fewer instructions per weight) only where columns
    are plentiful: qkv (128-160 super-tiles) -> 64-80 column blocks x split 3-4; the 44-66 super-tile shapes
    (o_proj, MLP) keep one and split K 4-6 ways.
    """
    n_tiles, k_tiles = n_pad // SUPER_N, k_pad // TILE_K
    base = GemvConfig(super_tiles=2 if n_tiles >= 128 else 1)
    n_blocks = triton.cdiv(n_tiles, base.super_tiles)
    max_split = max(1, k_tiles // (2 * base.warps_k * base.rows))
    return replace(base, split_k=min(max_split, max(1, round(TARGET_PROGRAMS / n_blocks))))


@dataclass
class Workspace:
    """Split-K partial sums (fp32, no init needed) and per-column-block arrival counters (zero, left at zero).

    Kernels sharing one workspace must run one after another (one stream); allocate it outside graph capture.
    """

    partials: torch.Tensor
    counters: torch.Tensor

    @staticmethod
    def allocate(device: torch.device | str, partial_floats: int = 1 << 21, counters: int = 1 << 14) -> Workspace:
        return Workspace(
            torch.empty(partial_floats, dtype=torch.float32, device=device),
            torch.zeros(counters, dtype=torch.int32, device=device),
        )


_workspaces: dict[torch.device, Workspace] = {}


def default_workspace(device: torch.device) -> Workspace:
    if device not in _workspaces:
        _workspaces[device] = Workspace.allocate(device)
    return _workspaces[device]


def block_m(m: int) -> int:
    if not 1 <= m <= MAX_M:
        raise ValueError(f"these kernels take 1..{MAX_M} tokens, got {m}")
    return triton.next_power_of_2(m)


@triton.jit
def _scale_words(b):
    """bf16 bits of S * 2^112, duplicated in both halves of an int32, for Marlin scale bytes b (int32).

    A byte is 0 (vLLM stored S < 2 as 0) or >= 128 (S >= 2 sets the top exponent bit): its exponent field e5 in
    16..30 becomes 224 + e5 = 0xF0 | (e5 - 16), i.e. (b << 4) + 0x7000, and (b >> 7) keeps 0 at 0 without a select.
    """
    return b * 0x100010 + (b >> 7) * 0x70007000


@triton.jit
def _nibble_pairs(q):
    """For a word of 8 E2M1 codes: the bf16x2 bits (E2M1 * 2^-126) of the nibble pairs (e, e+4), e = 0..3."""
    q8 = q >> 8
    u0 = ((q & 0x000F000F) * 0x1040) & 0x81C081C0
    u1 = ((q & 0x00F000F0) * 0x104) & 0x81C081C0
    u2 = ((q8 & 0x000F000F) * 0x1040) & 0x81C081C0
    u3 = ((q8 & 0x00F000F0) * 0x104) & 0x81C081C0
    return u0, u1, u2, u3


@triton.jit
def _halves(p, FP32: tl.constexpr):
    """The two bf16 of int32 bf16x2 words as a trailing dim of 2 (low half first); as exact fp32 when FP32."""
    if FP32:  # by bit placement: the interpreter's bf16 -> fp32 cast flushes subnormals
        lo = (p << 16).to(tl.float32, bitcast=True)
        hi = (p & -65536).to(tl.float32, bitcast=True)
    else:
        lo = p.to(tl.int16).to(tl.bfloat16, bitcast=True)
        hi = (p >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return tl.join(lo, hi)


@triton.jit
def _pairs(p0, p1, p2, p3):
    """Pair words of nibbles e = 2 * block + r_hi stacked as trailing dims [..., block, r_hi] (join adds the last)."""
    return tl.join(tl.join(p0, p2), tl.join(p1, p3))


@triton.jit
def _dequant(q, s0, s1, DECODE_ASM: tl.constexpr, FP32: tl.constexpr):
    """Weights E2M1 * S * 2^-14 of words q (uint32 [..., j]) with the scale words s0 / s1 of blocks 0 / 1.

    Returns [..., j, block, r_hi, r_lo] (bf16, or fp32 when FP32): nibble 4*r_lo + 2*block + r_hi of each word.
    """
    if DECODE_ASM:
        # Same integer ops as _nibble_pairs, then one bf16x2 multiply per pair (Triton alone emits scalar bf16
        # multiplies that ptxas pairs with two extra half-swaps each).
        p0, p1, p2, p3 = tl.inline_asm_elementwise(
            """{
            .reg .b32 n, t, q8;
            and.b32 n, $4, 0x000F000F; mul.lo.u32 t, n, 0x1040; and.b32 t, t, 0x81C081C0; mul.rn.bf16x2 $0, t, $5;
            and.b32 n, $4, 0x00F000F0; mul.lo.u32 t, n, 0x104; and.b32 t, t, 0x81C081C0; mul.rn.bf16x2 $1, t, $5;
            shr.b32 q8, $4, 8;
            and.b32 n, q8, 0x000F000F; mul.lo.u32 t, n, 0x1040; and.b32 t, t, 0x81C081C0; mul.rn.bf16x2 $2, t, $6;
            and.b32 n, q8, 0x00F000F0; mul.lo.u32 t, n, 0x104; and.b32 t, t, 0x81C081C0; mul.rn.bf16x2 $3, t, $6;
            }""",
            "=r,=r,=r,=r,r,r,r",
            [q, tl.broadcast_to(s0, q.shape), tl.broadcast_to(s1, q.shape)],
            dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
            is_pure=True,
            pack=1,
        )
        return _halves(_pairs(p0, p1, p2, p3), False)
    else:
        u0, u1, u2, u3 = _nibble_pairs(q)
        v = _halves(_pairs(u0, u1, u2, u3).to(tl.int32, bitcast=True), FP32)
        s = tl.split(_halves(tl.join(s0, s1).to(tl.int32, bitcast=True), FP32))[0]  # [..., j, block]
        return v * tl.expand_dims(s, (-2, -1))


@triton.jit
def _accumulate(
    x_rows,  # [BLOCK_M] pointers to the x rows (their k = 0)
    x_mask,  # [BLOCK_M] rows to load
    size_k,
    w_ptr,  # int32 words [K_pad/16, 2 * n_pad]
    s_ptr,  # scale bytes [K_pad/16, n_pad]
    n_pad,
    tile0,
    tile_step,  # super-tile s of this program is tile0 + s * tile_step
    k_begin,
    k_end,  # k-tiles [k_begin, k_end)
    BLOCK_M: tl.constexpr,
    SUPER: tl.constexpr,
    WARPS_K: tl.constexpr,
    ROWS: tl.constexpr,
    DECODE_ASM: tl.constexpr,
    FP32: tl.constexpr,
):
    """fp32 [SUPER * 64, BLOCK_M] partial products (out transposed) over k-tiles [k_begin, k_end), columns in n' order.

    n' = ((j * SUPER + s) * 2 + block) * 8 + i_hi for column 64 * tile(s) + 16 j + 8 block + i_hi (`_columns`).
    Super-tiles past n_pad read as zeros.
    """
    RH: tl.constexpr = ROWS // 4
    STEP: tl.constexpr = WARPS_K * ROWS
    # Flat column offsets built with // and % (not reshapes) so Triton sees 16-byte contiguous runs to vectorize.
    wc = tl.arange(0, SUPER * 128)
    wtile = tile0 + (wc // 128) * tile_step
    wcol, wcol_mask = wtile * 128 + wc % 128, wtile < n_pad // 64
    sc = tl.arange(0, SUPER * 64)
    stile = tile0 + (sc // 64) * tile_step
    scol, scol_mask = stile * 64 + sc % 64, stile < n_pad // 64
    r = tl.arange(0, STEP)
    kk = tl.arange(0, ROWS * 16)
    warp_k0 = tl.arange(0, WARPS_K) * (ROWS * 16)
    acc = tl.zeros((WARPS_K, SUPER * 64, BLOCK_M), tl.float32)
    for k0 in range(k_begin, k_end, STEP):
        rows = k0 + r
        row_mask = rows < k_end
        q = tl.load(
            w_ptr + rows[:, None] * (2 * n_pad) + wcol[None, :], mask=row_mask[:, None] & wcol_mask[None, :], other=0
        )
        sb = tl.load(
            s_ptr + rows[:, None] * n_pad + scol[None, :], mask=row_mask[:, None] & scol_mask[None, :], other=0
        )
        k = k0 * 16 + warp_k0[:, None] + kk[None, :]  # [WARPS_K, ROWS * 16]
        k_mask = (k < size_k) & (k < k_end * 16)
        x = tl.load(x_rows[None, :, None] + k[:, None, :], mask=x_mask[None, :, None] & k_mask[:, None, :], other=0.0)

        # Row b*ROWS + 4*rh + rlo; rlo = 2*R1 + R0. Dot K order: (rh, i1, rlo, i0, r_hi, r_lo), i_lo = 2*i1 + i0.
        x = x.reshape(WARPS_K, BLOCK_M, RH, 2, 2, 2, 2, 2, 2)  # b, m, rh, R1, R0, r_hi, i1, i0, r_lo
        x = x.permute(0, 2, 6, 3, 4, 7, 5, 8, 1).reshape(WARPS_K, ROWS * 16, BLOCK_M)
        q = q.to(tl.uint32, bitcast=True).reshape(WARPS_K, RH, 4, SUPER, 8, 2, 2, 4)  # b, rh, rlo, s, i_hi, i1, i0, j
        sb = sb.to(tl.int32).reshape(WARPS_K, RH, 4, SUPER, 8, 2, 2, 2)  # ..., i_hi, j_hi, block, j_lo
        sb = _scale_words(sb.permute(0, 1, 2, 3, 4, 5, 7, 6).reshape(WARPS_K, RH, 4, SUPER, 8, 4, 2))
        s0, s1 = tl.split(sb)
        s0 = s0.reshape(WARPS_K, RH, 4, SUPER, 8, 1, 1, 4)
        s1 = s1.reshape(WARPS_K, RH, 4, SUPER, 8, 1, 1, 4)
        v = _dequant(q, s0.to(tl.uint32, bitcast=True), s1.to(tl.uint32, bitcast=True), DECODE_ASM, FP32)
        # v: b, rh, rlo, s, i_hi, i1, i0, j, block, r_hi, r_lo -> [b, N', K'] with N' = (j, s, block, i_hi)
        v = v.permute(0, 7, 3, 8, 4, 1, 5, 2, 6, 9, 10).reshape(WARPS_K, SUPER * 64, ROWS * 16)
        if FP32:
            acc = tl.dot(v, x.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(v, x, acc)
    return tl.sum(acc, axis=0)


@triton.jit
def _columns(tile0, tile_step, SUPER: tl.constexpr):
    """Column of every n' (see `_accumulate`)."""
    n_prime = tl.arange(0, SUPER * 64)
    i_hi = n_prime % 8
    block = (n_prime // 8) % 2
    s = (n_prime // 16) % SUPER
    j = n_prime // (16 * SUPER)
    return (tile0 + s * tile_step) * 64 + j * 16 + block * 8 + i_hi


@triton.jit
def _to_bf16(x, FP32: tl.constexpr):
    """Round to bf16, nearest even; the interpreter's cast truncates, so under it the fp32 bits are rounded first."""
    if FP32:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        x = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)  # NaN stays NaN
    return x.to(tl.bfloat16)


@triton.jit
def _arrive(count_ptr):
    """Count this program in and return how many came before; all its threads' stores are released first."""
    tl.debug_barrier()
    return tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")


@triton.jit
def _sum_splits(part_ptr, offs, slice_stride, splits, mask):
    """Sum of the partial slices at part_ptr + s * slice_stride + offs, s < splits, in order (deterministic).

    .cg reads L2, where the other programs' stores are, never a stale L1 line."""
    total = tl.load(part_ptr + offs, mask=mask, cache_modifier=".cg")
    for s in range(1, splits):
        total += tl.load(part_ptr + s * slice_stride + offs, mask=mask, cache_modifier=".cg")
    return total


@triton.jit(do_not_specialize=["tiles_per_split"])  # its divisibility changes no code: one compile
def _gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    gs_ptr,
    out_ptr,
    part_ptr,
    count_ptr,
    M,
    size_n,
    size_k,
    n_pad,
    k_tiles,
    split_k,
    tiles_per_split,
    stride_xm,
    stride_om,
    BLOCK_M: tl.constexpr,
    SUPER: tl.constexpr,
    WARPS_K: tl.constexpr,
    ROWS: tl.constexpr,
    DECODE_ASM: tl.constexpr,
    FP32: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.arange(0, BLOCK_M)
    k_begin = pid_k * tiles_per_split
    k_end = tl.minimum(k_begin + tiles_per_split, k_tiles)
    acc = _accumulate(
        x_ptr + m * stride_xm, m < M, size_k, w_ptr, s_ptr, n_pad, pid_n * SUPER, 1, k_begin, k_end,
        BLOCK_M, SUPER, WARPS_K, ROWS, DECODE_ASM, FP32,
    )  # fmt: skip
    n = _columns(pid_n * SUPER, 1, SUPER)
    out_ptrs = out_ptr + m[None, :] * stride_om + n[:, None]
    out_mask = (m[None, :] < M) & (n[:, None] < size_n)
    gs = tl.load(gs_ptr) * SCALE_TO_TRUE
    if split_k == 1:
        tl.store(out_ptrs, _to_bf16(acc * gs, FP32), mask=out_mask)
    else:
        tile_part = part_ptr + pid_n * split_k * (BLOCK_M * SUPER * 64)
        offs = tl.arange(0, SUPER * 64)[:, None] * BLOCK_M + m[None, :]
        tl.store(tile_part + pid_k * (BLOCK_M * SUPER * 64) + offs, acc)
        if _arrive(count_ptr + pid_n) == split_k - 1:
            total = _sum_splits(tile_part, offs, BLOCK_M * SUPER * 64, split_k, None)
            tl.store(out_ptrs, _to_bf16(total * gs, FP32), mask=out_mask)
            tl.atomic_xchg(count_ptr + pid_n, 0)


def gemv_config(n_pad: int, k_pad: int, bm: int) -> GemvConfig:
    return DEFAULT_CONFIGS.get((n_pad, k_pad, bm)) or heuristic_config(n_pad, k_pad)


def marlin_nvfp4_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor,
    size_n: int,
    size_k: int,
    config: GemvConfig | None = None,
    workspace: Workspace | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """bf16 [M, size_n] = x (bf16 [M, size_k], M <= 8) @ W.T, W in vLLM's Marlin NVFP4 layout, fp32 accumulation.

    qweight int32 [K_pad/16, 2 N_pad], scales bytes [K_pad/16, N_pad] (any 1-byte dtype), global_scale fp32 with
    one element (vLLM's processed weight_global_scale); padded sizes come from the tensors.
    """
    m = x.shape[0]
    bm = block_m(m)
    x = x if x.stride(1) == 1 else x.contiguous()  # the kernel walks k with unit stride
    k_tiles, n_pad = qweight.shape[0], qweight.shape[1] // 2
    if x.shape[1] != size_k or size_k > k_tiles * TILE_K or size_n > n_pad or scales.shape != (k_tiles, n_pad):
        raise ValueError(f"shapes do not fit: x {tuple(x.shape)}, qweight {tuple(qweight.shape)}, "
                         f"scales {tuple(scales.shape)}, size_n {size_n}, size_k {size_k}")  # fmt: skip
    config = config or gemv_config(n_pad, k_tiles * TILE_K, bm)
    if config.rows % 4 or config.decode_asm and INTERPRETED:
        raise ValueError(f"invalid config {config}")
    n_blocks = triton.cdiv(n_pad // SUPER_N, config.super_tiles)
    split = config.split_k
    tiles_per_split = triton.cdiv(k_tiles, split)
    if out is None:
        out = torch.empty(m, size_n, dtype=torch.bfloat16, device=x.device)
    elif out.shape != (m, size_n) or out.stride(1) != 1:
        raise ValueError(f"out must be [M, size_n] with unit column stride, got {tuple(out.shape)}")
    workspace = workspace or default_workspace(x.device)
    if split > 1 and (workspace.partials.numel() < n_blocks * split * bm * config.super_tiles * SUPER_N
                      or workspace.counters.numel() < n_blocks):  # fmt: skip
        raise ValueError("workspace too small for this config")
    _gemv_kernel[(n_blocks, split)](
        x, qweight, scales.view(torch.uint8), global_scale, out, workspace.partials, workspace.counters,
        m, size_n, size_k, n_pad, k_tiles, split, tiles_per_split, x.stride(0), out.stride(0),
        BLOCK_M=bm, SUPER=config.super_tiles, WARPS_K=config.warps_k, ROWS=config.rows,
        DECODE_ASM=config.decode_asm, FP32=INTERPRETED,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out
