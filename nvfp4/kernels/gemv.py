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
masks, scales and the mma; 4.8 TB/s on 132 SMs needs ~33 weights per SM-cycle against 128 issue slots, so at
full bandwidth these kernels are as much issue-bound as memory-bound, and every SM needs several warps.

Decode: a word's nibbles e and e+4 (the low and high half) are one bf16x2 register of the mma fragment.
(q & 0x000F000F) * (2^12 + 2^6) & 0x81C081C0 puts sign at bit 15 and E2M1's 3 magnitude bits at 6..8 of each
half: bf16 bits of E2M1 * 2^-126 (code 1 is a bf16 subnormal, which bf16 arithmetic keeps, as Marlin relies on).
Times the block scale as bf16 S * 2^112 it is E2M1 * S * 2^-14, exact (<= 6 significant bits, in [2^-13, 21]);
the fp32 sums are scaled by gs_marlin * 2^-112 at the end.

Latency (v1 on an H200 was latency-bound: one program per SM walking 11 dependent steps). The knobs that keep
bytes in flight, all in `GemvConfig`:
- `num_stages`: Triton's software pipelining (cp.async into shared memory), stages-1 steps ahead;
- `prefetch`: at its start a program asks L2 for the first `prefetch` k-tiles of its slice (all of it by
  default): one `prefetch.global.L2` per thread and 32-byte sector, no registers, no waiting, so a whole matrix
  (3-16 MB, far below the 50 MB L2) is requested in the kernel's first microsecond and the pipelined loads that
  follow hit L2;
- `pdl`: Programmatic Dependent Launch. The kernel is launched with the programmatic-serialization attribute,
  so it may start while the kernel before it finishes; it issues its weight prefetches (weights never depend on
  the previous kernel), then `griddepcontrol.wait` before it reads x or writes anything. These kernels never
  trigger their dependents early (the kernel after them in vLLM is not ours and is launched normally), so a
  measured gain is only the overlap of our start with the previous kernel's end.
- `split_k` x `warps_k`: programs per column block along K (a fp32 workspace, the last program adds the slices)
  and warps per program along K (summed in shared memory); `rows`: k-tiles per warp and step.
Shapes that divide evenly (every step full, whole super-tile blocks) compile without masks (`EVEN_K`, `EVEN_N`);
x rows past M are clamped to row M-1 (computed, never stored) rather than masked.

Split partial sums go to a fp32 workspace; the last program of a column block (an acq_rel counter) adds them in
split order, writes bf16 and re-arms the counter: one kernel per GEMV, deterministic. Each split is a whole number
of steps (`split_plan`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

import torch
import triton
import triton.language as tl

from . import tuning
from .marlin_layout import SUPER_N, TILE_K

# Triton's interpreter (TRITON_INTERPRET=1 when the kernels are decorated) has no bf16 arithmetic and no inline
# asm: kernels decorated under it multiply and accumulate in fp32 (the same exact products) and decode in Triton;
# the L2 prefetches and griddepcontrol instructions are left out (hints and ordering only: no value depends on them).
INTERPRETED = triton.knobs.runtime.interpret

MAX_M = 8
SCALE_TO_TRUE = tl.constexpr(2.0**-112)  # true weight = decoded (E2M1 * S * 2^-14) * gs_marlin * 2^-112
ALL = 1 << 20  # `prefetch` value meaning the whole slice


@dataclass(frozen=True)
class GemvConfig:
    super_tiles: int = 1  # 64-column super-tiles per program (every warp holds all of them)
    warps_k: int = 4  # warps per program, each on its own k-tiles
    rows: int = 4  # k-tiles each warp decodes per step (multiple of 4: lanes span 4 rows)
    split_k: int = 1  # programs per column block along K (fewer where K has fewer steps, see split_plan)
    num_stages: int = 4  # Triton's software pipelining depth of the loads
    prefetch: int = ALL  # k-tiles of its slice a program prefetches into L2 at its start (0: none)
    pdl: bool = False  # launch with Programmatic Dependent Launch (griddepcontrol.wait before reading x)
    decode_asm: bool = not INTERPRETED  # decode + scale in one PTX block per word (GPU only)

    @property
    def num_warps(self) -> int:
        return self.warps_k

    @property
    def step(self) -> int:
        """k-tiles per loop step."""
        return self.warps_k * self.rows


SMS = 132  # H100 / H200 SXM; `sm_count` asks the device
TARGET_PROGRAMS_PER_SM = 3  # with 4 warps each: 3 warps per scheduler to hide the decode's latencies

# Measured choices, (N_pad, K_pad, block_m) -> config, for GPUs without a tuned file (`tuning`); the rest use
# `heuristic_config`.
DEFAULT_CONFIGS: dict[tuple[int, int, int], GemvConfig] = {}


@cache
def sm_count(device_index: int | None = None) -> int:
    try:
        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(device_index or 0).multi_processor_count
    except Exception:
        pass
    return SMS


def split_plan(k_tiles: int, step: int, split_k: int) -> tuple[int, int]:
    """(k-tiles per split, splits): `split_k` asked, each split a whole number of steps, none empty."""
    per = triton.cdiv(triton.cdiv(k_tiles, max(1, split_k)), step) * step
    return per, triton.cdiv(k_tiles, per)


def heuristic_config(n_pad: int, k_pad: int, bm: int = 1, sms: int | None = None) -> GemvConfig:
    """~TARGET_PROGRAMS_PER_SM programs of 4 warps per SM by splitting K, each split >= 2 steps, the whole
    matrix prefetched into L2 (3-16 MB here), 4 pipeline stages."""
    sms = sms or sm_count()
    base = GemvConfig()
    n_blocks = triton.cdiv(n_pad // SUPER_N, base.super_tiles)
    steps = triton.cdiv(k_pad // TILE_K, base.step)
    split = min(max(1, steps // 2), max(1, round(TARGET_PROGRAMS_PER_SM * sms / n_blocks)))
    return replace(base, split_k=split)


def gemv_config(n_pad: int, k_pad: int, bm: int) -> GemvConfig:
    """This GPU's tuned config (`tuning`), else DEFAULT_CONFIGS, else `heuristic_config`."""
    return (
        tuning.lookup("gemv", (n_pad, k_pad, bm), GemvConfig)
        or DEFAULT_CONFIGS.get((n_pad, k_pad, bm))
        or heuristic_config(n_pad, k_pad, bm)
    )


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


def launch_options(num_warps: int, num_stages: int, pdl: bool) -> dict:
    options = dict(num_warps=num_warps, num_stages=num_stages)
    if pdl and not INTERPRETED:
        options["launch_pdl"] = True
    return options


def launch(kernel, grid, args: tuple, kwargs: dict, warmup: bool):
    """Launch, or with `warmup` only compile (Triton's warmup: no GPU work, the compiled kernel is cached)."""
    if warmup:
        return kernel.warmup(*args, grid=grid, **kwargs)
    return kernel[grid](*args, **kwargs)


@triton.jit
def _gdc_wait(FP32: tl.constexpr):
    """griddepcontrol.wait: until the kernels this one depends on have finished and their writes are visible
    (a no-op when the kernel was not launched as a programmatic dependent)."""
    if not FP32:
        tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _gdc_launch_dependents(FP32: tl.constexpr):
    """griddepcontrol.launch_dependents: the kernel after this one (launched with PDL) may start now; it still
    waits for this one's completion in its own griddepcontrol.wait before reading what this one writes."""
    if not FP32:
        tl.inline_asm_elementwise(
            "griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1
        )


@triton.jit
def _prefetch_lines(ptrs, mask):
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
        "=r,l,r",
        [ptrs, mask.to(tl.int32)],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _prefetch_l2(w_ptr, s_ptr, n_pad, tile0, tile_step, row_begin, row_end, SUPER: tl.constexpr,
                 THREADS: tl.constexpr):  # fmt: skip
    """Ask L2 for the words and scales of k-tile rows [row_begin, row_end) of the program's super-tiles: one
    32-byte sector per thread and round (512 bytes of words and 64 of scales per row and super-tile)."""
    QCOLS: tl.constexpr = SUPER * 16
    QROWS: tl.constexpr = THREADS // QCOLS
    qc = tl.arange(0, QCOLS)
    q_off = (tile0 + (qc // 16) * tile_step) * 512 + (qc % 16) * 32  # bytes into a row
    w_bytes = w_ptr.to(tl.pointer_type(tl.int8))
    for r0 in range(row_begin, row_end, QROWS):
        rows = r0 + tl.arange(0, QROWS)
        _prefetch_lines(w_bytes + rows[:, None] * (8 * n_pad) + q_off[None, :], (rows < row_end)[:, None])
    SCOLS: tl.constexpr = SUPER * 2
    SROWS: tl.constexpr = THREADS // SCOLS
    sc = tl.arange(0, SCOLS)
    s_off = (tile0 + (sc // 2) * tile_step) * 64 + (sc % 2) * 32
    s_bytes = s_ptr.to(tl.pointer_type(tl.int8))
    for r0 in range(row_begin, row_end, SROWS):
        rows = r0 + tl.arange(0, SROWS)
        _prefetch_lines(s_bytes + rows[:, None] * n_pad + s_off[None, :], (rows < row_end)[:, None])


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
    x_rows,  # [BLOCK_M] pointers to the x rows (their k = 0); rows past M point at real rows (never stored)
    size_k,
    w_ptr,  # int32 words [K_pad/16, 2 * n_pad]
    s_ptr,  # scale bytes [K_pad/16, n_pad]
    n_pad,
    tile0,
    tile_step,  # super-tile s of this program is tile0 + s * tile_step
    k_begin,
    k_end,  # k-tiles [k_begin, k_end), k_begin a multiple of the step
    prefetch,  # k-tiles from k_begin to prefetch into L2 first
    BLOCK_M: tl.constexpr,
    SUPER: tl.constexpr,
    WARPS_K: tl.constexpr,
    ROWS: tl.constexpr,
    EVEN_K: tl.constexpr,  # every step full and size_k == 16 * k-tiles: no k masks
    EVEN_N: tl.constexpr,  # every super-tile of the program exists: no column masks
    PDL: tl.constexpr,  # griddepcontrol.wait after the prefetches, before the first load of x
    DECODE_ASM: tl.constexpr,
    FP32: tl.constexpr,
):
    """fp32 [SUPER * 64, BLOCK_M] partial products (out transposed) over k-tiles [k_begin, k_end), columns in n' order.

    n' = ((j * SUPER + s) * 2 + block) * 8 + i_hi for column 64 * tile(s) + 16 j + 8 block + i_hi (`_columns`).
    Super-tiles past n_pad read as zeros.
    """
    RH: tl.constexpr = ROWS // 4
    STEP: tl.constexpr = WARPS_K * ROWS
    if not FP32:
        _prefetch_l2(w_ptr, s_ptr, n_pad, tile0, tile_step, k_begin, tl.minimum(k_end, k_begin + prefetch), SUPER,
                     WARPS_K * 32)  # fmt: skip
        if PDL:
            _gdc_wait(FP32)
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
        q_ptrs = w_ptr + rows[:, None] * (2 * n_pad) + wcol[None, :]
        s_ptrs = s_ptr + rows[:, None] * n_pad + scol[None, :]
        k = k0 * 16 + warp_k0[:, None] + kk[None, :]  # [WARPS_K, ROWS * 16]
        x_ptrs = x_rows[None, :, None] + k[:, None, :]
        if EVEN_K:
            if EVEN_N:
                q = tl.load(q_ptrs)
                sb = tl.load(s_ptrs)
            else:
                q = tl.load(q_ptrs, mask=wcol_mask[None, :], other=0)
                sb = tl.load(s_ptrs, mask=scol_mask[None, :], other=0)
            x = tl.load(x_ptrs)
        else:
            row_mask = rows < k_end
            if EVEN_N:
                q = tl.load(q_ptrs, mask=row_mask[:, None], other=0)
                sb = tl.load(s_ptrs, mask=row_mask[:, None], other=0)
            else:
                q = tl.load(q_ptrs, mask=row_mask[:, None] & wcol_mask[None, :], other=0)
                sb = tl.load(s_ptrs, mask=row_mask[:, None] & scol_mask[None, :], other=0)
            k_mask = (k < size_k) & (k < k_end * 16)
            x = tl.load(x_ptrs, mask=k_mask[:, None, :], other=0.0)

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


@triton.jit(do_not_specialize=["M", "size_n", "size_k", "k_tiles", "split_k", "tiles_per_split", "prefetch"])
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
    prefetch,
    stride_xm,
    stride_om,
    BLOCK_M: tl.constexpr,
    SUPER: tl.constexpr,
    WARPS_K: tl.constexpr,
    ROWS: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    PDL: tl.constexpr,
    DECODE_ASM: tl.constexpr,
    FP32: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.arange(0, BLOCK_M)
    k_begin = pid_k * tiles_per_split
    k_end = tl.minimum(k_begin + tiles_per_split, k_tiles)
    acc = _accumulate(
        x_ptr + tl.minimum(m, M - 1) * stride_xm, size_k, w_ptr, s_ptr, n_pad, pid_n * SUPER, 1, k_begin, k_end,
        prefetch, BLOCK_M, SUPER, WARPS_K, ROWS, EVEN_K, EVEN_N, PDL, DECODE_ASM, FP32,
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


def check_config(config: GemvConfig) -> None:
    if (
        config.rows % 4
        or config.warps_k & (config.warps_k - 1)
        or config.super_tiles & (config.super_tiles - 1)
        or config.warps_k * 32 < config.super_tiles * 16  # one prefetch round spans a row's 16 sectors per tile
        or (config.decode_asm and INTERPRETED)
        or config.split_k < 1
        or config.prefetch < 0
    ):
        raise ValueError(f"invalid config {config}")


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
    *,
    warmup: bool = False,
) -> torch.Tensor:
    """bf16 [M, size_n] = x (bf16 [M, size_k], M <= 8) @ W.T, W in vLLM's Marlin NVFP4 layout, fp32 accumulation.

    qweight int32 [K_pad/16, 2 N_pad], scales bytes [K_pad/16, N_pad] (any 1-byte dtype), global_scale fp32 with
    one element (vLLM's processed weight_global_scale); padded sizes come from the tensors. `warmup` compiles the
    kernel for these arguments without running it (`out` is then returned unwritten).
    """
    m = x.shape[0]
    bm = block_m(m)
    x = x if x.stride(1) == 1 else x.contiguous()  # the kernel walks k with unit stride
    k_tiles, n_pad = qweight.shape[0], qweight.shape[1] // 2
    if x.shape[1] != size_k or size_k > k_tiles * TILE_K or size_n > n_pad or scales.shape != (k_tiles, n_pad):
        raise ValueError(f"shapes do not fit: x {tuple(x.shape)}, qweight {tuple(qweight.shape)}, "
                         f"scales {tuple(scales.shape)}, size_n {size_n}, size_k {size_k}")  # fmt: skip
    config = config or gemv_config(n_pad, k_tiles * TILE_K, bm)
    check_config(config)
    n_tiles = n_pad // SUPER_N
    n_blocks = triton.cdiv(n_tiles, config.super_tiles)
    tiles_per_split, split = split_plan(k_tiles, config.step, config.split_k)
    if out is None:
        out = torch.empty(m, size_n, dtype=torch.bfloat16, device=x.device)
    elif out.shape != (m, size_n) or out.stride(1) != 1:
        raise ValueError(f"out must be [M, size_n] with unit column stride, got {tuple(out.shape)}")
    workspace = workspace or default_workspace(x.device)
    if split > 1 and (workspace.partials.numel() < n_blocks * split * bm * config.super_tiles * SUPER_N
                      or workspace.counters.numel() < n_blocks):  # fmt: skip
        raise ValueError("workspace too small for this config")
    even_k = k_tiles % config.step == 0 and size_k == k_tiles * TILE_K
    even_n = n_tiles % config.super_tiles == 0
    launch(
        _gemv_kernel, (n_blocks, split),
        (x, qweight, scales.view(torch.uint8), global_scale, out, workspace.partials, workspace.counters,
         m, size_n, size_k, n_pad, k_tiles, split, tiles_per_split, min(config.prefetch, ALL), x.stride(0),
         out.stride(0)),
        dict(BLOCK_M=bm, SUPER=config.super_tiles, WARPS_K=config.warps_k, ROWS=config.rows, EVEN_K=even_k,
             EVEN_N=even_n, PDL=config.pdl, DECODE_ASM=config.decode_asm, FP32=INTERPRETED,
             **launch_options(config.num_warps, config.num_stages, config.pdl)),
        warmup,
    )  # fmt: skip
    return out
