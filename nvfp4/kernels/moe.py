"""`marlin_nvfp4_moe`: Gemma 4's routed experts for M <= 8 tokens on vLLM's Marlin NVFP4 tensors, in two kernels.

out[m] = sum_t topk_weights[m, t] * W2[e] @ (gelu_tanh(W_gate[e] @ x[m]) * (W_up[e] @ x[m])), e = topk_ids[m, t].

No sort or align kernel: a program is one (token, slot) assignment x one column block, and the first assignment
of each distinct expert (a scan of the <= 64 ids, in registers) does the work for every token routed to that
expert, the others return at once. Tokens sharing an expert then read its weights once (at M = 8, 128 experts,
top-8, about 12 of 64 assignments repeat an expert) and ride along in the same mma (its token side is 8 wide).

Grid arithmetic (132 SMs, Gemma 4: hidden 2816, I 704, top-8; at M = 1 there are 8 experts):
- gate_up: one program = gate super-tile g and up super-tile g + I/64 (64 + 64 columns, so GeGLU happens in
  registers) x WARPS_K warps along K (2816 = 176 k-tiles). 8 x 11 = 88 programs at M = 1, one warp per
  scheduler on two thirds of the SMs: compute-latency-bound. With split_k = s, 88 s programs; the partial sums
  meet in a workspace and the last program of a block applies GeGLU.
- down: one program = SUPER 64-column super-tiles of the 2816 outputs (44 of them) x WARPS_K warps over the
  704 inputs (44 k-tiles). Looping over a token's 8 experts inside one program would leave 44 programs, a third
  of the SMs; instead every (expert, column block) is a program (8 x 44 = 352 at M = 1), each writes its routing-
  weighted rows to a [M, top-k, hidden] fp32 workspace, and the last one per column block (an acq_rel counter
  that expects as many arrivals as there are distinct experts) adds a token's top-k rows in slot order and
  writes bf16. Deterministic, one kernel, no atomics on data.

Latency, as in `gemv`: each program prefetches its experts' weights into L2 first (`*_prefetch` k-tiles), and
with `pdl` both kernels are launched as programmatic dependents. gate_up waits (griddepcontrol.wait) before it
reads anything, since even which weights to read comes from the router, and at once lets down launch
(griddepcontrol.launch_dependents); down's programs then start while gate_up is still running where they fit,
read the routing (the router finished before gate_up's wait returned), prefetch their W2 slices into L2, and wait
for gate_up to complete before they read its intermediate or write anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import tuning
from .gemv import (
    ALL,
    INTERPRETED,
    SCALE_TO_TRUE,
    Workspace,
    _accumulate,
    _arrive,
    _columns,
    _gdc_launch_dependents,
    _gdc_wait,
    _sum_splits,
    _to_bf16,
    block_m,
    default_workspace,
    launch,
    launch_options,
    sm_count,
    split_plan,
)
from .marlin_layout import SUPER_N, TILE_K

SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)


@dataclass(frozen=True)
class MoeConfig:
    gate_up_warps_k: int = 4
    gate_up_rows: int = 4
    gate_up_split_k: int = 1
    gate_up_stages: int = 4
    gate_up_prefetch: int = ALL  # k-tiles each gate_up program prefetches into L2 first (0: none)
    down_super_tiles: int = 1
    down_warps_k: int = 4
    down_rows: int = 4
    down_stages: int = 4
    down_prefetch: int = ALL
    pdl: bool = False  # both kernels as programmatic dependents (see the module docstring)
    decode_asm: bool = not INTERPRETED


# Measured choices, block_m -> config, for GPUs without a tuned file (Gemma 4's expert shapes).
DEFAULT_CONFIGS: dict[int, MoeConfig] = {}
PREFETCH_BYTES = 32 << 20  # prefetch whole slices while the routed experts' bytes stay inside the 50 MB L2


def heuristic_config(m: int, topk: int, i_tiles: int, k_tiles: int = 176, sms: int | None = None) -> MoeConfig:
    """Split gate_up's K until there are ~3 programs per SM (at M = 1, 8 x 11 = 88 programs -> split 4-5);
    prefetch whole slices while the routed experts' bytes fit well in L2 (M = 1), else the first steps only."""
    sms = sms or sm_count()
    blocks = m * topk * i_tiles
    steps = triton.cdiv(k_tiles, 16)
    split = min(max(1, steps // 2), max(1, round(3 * sms / blocks)))
    expert_bytes = 3 * k_tiles * i_tiles * 576  # words + scales: gate_up 2 I x K, down K x I
    prefetch = ALL if m * topk * expert_bytes <= PREFETCH_BYTES else 32
    return MoeConfig(gate_up_split_k=split, gate_up_prefetch=prefetch, down_prefetch=prefetch)


def moe_config(m: int, topk: int, i_tiles: int, k_tiles: int = 176) -> MoeConfig:
    """This GPU's tuned config for (hidden, I_pad, top-k, block_m) (`tuning`), else DEFAULT_CONFIGS, else
    `heuristic_config`."""
    bm = block_m(m)
    return (
        tuning.lookup("moe", (k_tiles * TILE_K, i_tiles * SUPER_N, topk, bm), MoeConfig)
        or DEFAULT_CONFIGS.get(bm)
        or heuristic_config(m, topk, i_tiles, k_tiles)
    )


@triton.jit
def _routing(ids_ptr, a, M, TOPK: tl.constexpr, BLOCK_M: tl.constexpr, A_BLOCK: tl.constexpr, T_BLOCK: tl.constexpr):
    """For assignment a (= m * TOPK + t): its expert, whether a is the expert's first assignment, the number of
    distinct experts, and per token row whether it routes to the expert and through which slot (0 where not).
    The ids are read from L2 (.cg): down reads them before its griddepcontrol.wait."""
    n_assign = M * TOPK
    expert = tl.load(ids_ptr + a, cache_modifier=".cg").to(tl.int32)
    i = tl.arange(0, A_BLOCK)
    ids = tl.load(ids_ptr + i, mask=i < n_assign, other=-1, cache_modifier=".cg").to(tl.int32)
    leads = tl.min(tl.where(ids == expert, i, A_BLOCK)) == a
    same = (ids[:, None] == ids[None, :]) & (i[None, :] < n_assign)
    first = tl.min(tl.where(same, i[None, :], A_BLOCK), axis=1)
    distinct = tl.sum(((first == i) & (i < n_assign)).to(tl.int32))
    m = tl.arange(0, BLOCK_M)
    t = tl.arange(0, T_BLOCK)
    valid = (m[:, None] < M) & (t[None, :] < TOPK)
    row_ids = tl.load(ids_ptr + m[:, None] * TOPK + t[None, :], mask=valid, other=-1, cache_modifier=".cg").to(tl.int32)
    match = row_ids == expert
    uses = tl.max(match.to(tl.int32), axis=1) > 0
    slot = tl.sum(tl.where(match, t[None, :], 0), axis=1)
    return expert, leads, distinct, uses, slot


@triton.jit
def _gelu_tanh(g):
    # 0.5 * (1 + tanh(u)) = sigmoid(2u)
    u = SQRT_2_OVER_PI * (g + 0.044715 * g * g * g)
    return g / (1.0 + tl.exp(-2.0 * u))


@triton.jit(do_not_specialize=["M", "size_k", "k_tiles", "split_k", "tiles_per_split", "prefetch"])
def _gate_up_kernel(
    x_ptr,
    ids_ptr,
    w_ptr,
    s_ptr,
    gs_ptr,
    h_ptr,
    part_ptr,
    count_ptr,
    M,
    size_k,
    k_tiles,
    i_tiles,  # padded intermediate size / 64
    split_k,
    tiles_per_split,
    prefetch,
    stride_xm,
    TOPK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    A_BLOCK: tl.constexpr,
    T_BLOCK: tl.constexpr,
    WARPS_K: tl.constexpr,
    ROWS: tl.constexpr,
    EVEN_K: tl.constexpr,
    PDL: tl.constexpr,
    DECODE_ASM: tl.constexpr,
    FP32: tl.constexpr,
):
    if PDL:  # the routing and x come from the kernels before: wait for them, then let down's programs start
        _gdc_wait(FP32)
        _gdc_launch_dependents(FP32)
    a = tl.program_id(0)
    g = tl.program_id(1)
    pid_k = tl.program_id(2)
    expert, leads, _, uses, slot = _routing(ids_ptr, a, M, TOPK, BLOCK_M, A_BLOCK, T_BLOCK)
    if leads:
        m = tl.arange(0, BLOCK_M)
        n_pad = i_tiles * 128  # w13 columns: gate then up, i_tiles super-tiles each
        k_begin = pid_k * tiles_per_split
        k_end = tl.minimum(k_begin + tiles_per_split, k_tiles)
        w_e = w_ptr + expert.to(tl.int64) * (k_tiles * 2 * n_pad)
        s_e = s_ptr + expert.to(tl.int64) * (k_tiles * n_pad)
        # Super-tiles g (gate) and g + i_tiles (up): s in n' order is 0 for gate, 1 for up. Every token's row is
        # computed (rows of tokens not routed here are not stored), none masked.
        acc = _accumulate(
            x_ptr + tl.minimum(m, M - 1) * stride_xm, size_k, w_e, s_e, n_pad, g, i_tiles, k_begin, k_end, prefetch,
            BLOCK_M, 2, WARPS_K, ROWS, EVEN_K, True, False, DECODE_ASM, FP32,
        )  # fmt: skip
        finish = split_k == 1
        if split_k > 1:
            block = a * i_tiles + g
            tile_part = part_ptr + block * split_k * (128 * BLOCK_M)
            offs = tl.arange(0, 128)[:, None] * BLOCK_M + m[None, :]
            tl.store(tile_part + pid_k * (128 * BLOCK_M) + offs, acc)
            finish = _arrive(count_ptr + block) == split_k - 1
            if finish:
                acc = _sum_splits(tile_part, offs, 128 * BLOCK_M, split_k, None)
                tl.atomic_xchg(count_ptr + block, 0)
        if finish:
            acc = acc * (tl.load(gs_ptr + expert) * SCALE_TO_TRUE)
            # n' = ((j * 2 + s) * 2 + block) * 8 + i_hi: move s last and split gate from up.
            gate, up = tl.split(acc.reshape(4, 2, 2, 8, BLOCK_M).permute(0, 2, 3, 4, 1))
            h = (_gelu_tanh(gate) * up).reshape(64, BLOCK_M)
            n = _columns(g, 0, 1)  # column inside the intermediate of (j, block, i_hi)
            rows = (m * TOPK + slot) * (i_tiles * 64)
            tl.store(h_ptr + rows[None, :] + n[:, None], _to_bf16(h, FP32), mask=(uses & (m < M))[None, :])


@triton.jit(do_not_specialize=["M", "size_n", "k_tiles", "prefetch"])
def _down_kernel(
    h_ptr,
    ids_ptr,
    tw_ptr,
    w_ptr,
    s_ptr,
    gs_ptr,
    out_ptr,
    part_ptr,
    count_ptr,
    M,
    size_n,
    k_tiles,
    n_pad,
    prefetch,
    stride_om,
    TOPK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    A_BLOCK: tl.constexpr,
    T_BLOCK: tl.constexpr,
    SUPER: tl.constexpr,
    WARPS_K: tl.constexpr,
    ROWS: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    PDL: tl.constexpr,
    DECODE_ASM: tl.constexpr,
    FP32: tl.constexpr,
):
    a = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert, leads, distinct, uses, slot = _routing(ids_ptr, a, M, TOPK, BLOCK_M, A_BLOCK, T_BLOCK)
    if leads:
        m = tl.arange(0, BLOCK_M)
        used = uses & (m < M)
        size_k = k_tiles * 16  # h has every padded intermediate column (zeros past the true size)
        rows = m * TOPK + slot
        w_e = w_ptr + expert.to(tl.int64) * (k_tiles * 2 * n_pad)
        s_e = s_ptr + expert.to(tl.int64) * (k_tiles * n_pad)
        # With PDL, _accumulate prefetches this expert's slice, then waits for gate_up before it reads h.
        acc = _accumulate(
            h_ptr + (tl.minimum(m, M - 1) * TOPK + slot) * size_k, size_k, w_e, s_e, n_pad, pid_n * SUPER, 1, 0,
            k_tiles, prefetch, BLOCK_M, SUPER, WARPS_K, ROWS, EVEN_K, EVEN_N, PDL, DECODE_ASM, FP32,
        )  # fmt: skip
        weight = tl.load(tw_ptr + rows, mask=used, other=0.0)
        acc = acc * (tl.load(gs_ptr + expert) * SCALE_TO_TRUE) * weight[None, :]
        n = _columns(pid_n * SUPER, 1, SUPER)
        tl.store(part_ptr + rows[None, :] * n_pad + n[:, None], acc, mask=used[None, :])
        if _arrive(count_ptr + pid_n) == distinct - 1:
            out_mask = (m[None, :] < M) & (n[:, None] < size_n)
            total = _sum_splits(part_ptr + (m * TOPK)[None, :] * n_pad + n[:, None], 0, n_pad, TOPK, out_mask)
            tl.store(out_ptr + m[None, :] * stride_om + n[:, None], _to_bf16(total, FP32), mask=out_mask)
            tl.atomic_xchg(count_ptr + pid_n, 0)


def check_config(config: MoeConfig) -> None:
    pow2 = lambda v: v >= 1 and v & (v - 1) == 0  # noqa: E731
    if (
        config.gate_up_rows % 4
        or config.down_rows % 4
        or not (pow2(config.gate_up_warps_k) and pow2(config.down_warps_k) and pow2(config.down_super_tiles))
        or config.gate_up_warps_k * 32 < 2 * 16  # a prefetch round spans a row's 16 sectors per super-tile
        or config.down_warps_k * 32 < config.down_super_tiles * 16
        or config.gate_up_split_k < 1
        or min(config.gate_up_prefetch, config.down_prefetch) < 0
        or (config.decode_asm and INTERPRETED)
    ):
        raise ValueError(f"invalid config {config}")


def marlin_nvfp4_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w13_gs: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    w2_gs: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    config: MoeConfig | None = None,
    workspace: Workspace | None = None,
    intermediate: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    *,
    warmup: bool = False,
) -> torch.Tensor:
    """bf16 [M, K]: the routed experts of x (bf16 [M, K], M <= 8) with GeGLU (tanh gelu), weighted by topk_weights.

    w13 int32 [E, K/16, 4 I_pad] (gate then up), w2 int32 [E, I_pad/16, 2 K], their scale bytes and processed
    global scales [E] as vLLM's prepare_nvfp4_moe_layer_for_marlin leaves them; topk_weights fp32 [M, top-k]
    (per-expert scales folded in), topk_ids int32/int64 [M, top-k], distinct within a row. `intermediate`
    (bf16 [M, top-k, I_pad]) receives the GeGLU outputs, rounded to bf16 as in vLLM's Marlin MoE. `warmup`
    compiles both kernels for these arguments without running them.
    """
    m, hidden = x.shape
    bm = block_m(m)
    x = x if x.stride(1) == 1 else x.contiguous()  # the kernel walks k with unit stride
    topk = topk_ids.shape[1]
    k_tiles, i_tiles = w13.shape[1], w13.shape[2] // 4 // SUPER_N
    config = config or moe_config(m, topk, i_tiles, k_tiles)
    check_config(config)
    down_k_tiles, n_pad = w2.shape[1], w2.shape[2] // 2
    if hidden > k_tiles * TILE_K or hidden > n_pad or down_k_tiles * TILE_K != i_tiles * SUPER_N:
        raise ValueError(f"shapes do not fit: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
    if topk_weights.dtype != torch.float32 or topk_weights.shape != topk_ids.shape or topk_ids.shape[0] != m:
        raise ValueError("topk_weights must be fp32 and shaped like topk_ids [M, top-k]")
    topk_weights, topk_ids = topk_weights.contiguous(), topk_ids.contiguous()  # read as [M * top-k]
    workspace = workspace or default_workspace(x.device)
    gate_up_step = config.gate_up_warps_k * config.gate_up_rows
    tiles_per_split, split = split_plan(k_tiles, gate_up_step, config.gate_up_split_k)
    n_tiles = n_pad // SUPER_N
    n_down = triton.cdiv(n_tiles, config.down_super_tiles)
    partials = max(m * topk * n_pad, m * topk * i_tiles * split * 128 * bm if split > 1 else 0)
    if workspace.partials.numel() < partials or workspace.counters.numel() < max(m * topk * i_tiles, n_down):
        raise ValueError("workspace too small for this call")
    if intermediate is None:
        intermediate = torch.empty(m, topk, i_tiles * SUPER_N, dtype=torch.bfloat16, device=x.device)
    elif intermediate.shape != (m, topk, i_tiles * SUPER_N) or not intermediate.is_contiguous():
        raise ValueError(f"intermediate must be contiguous [M, top-k, I_pad], got {tuple(intermediate.shape)}")
    if out is None:
        out = torch.empty(m, hidden, dtype=torch.bfloat16, device=x.device)
    elif out.shape != (m, hidden) or out.stride(1) != 1:
        raise ValueError(f"out must be [M, K] with unit column stride, got {tuple(out.shape)}")
    routing = dict(
        TOPK=topk, BLOCK_M=bm, A_BLOCK=triton.next_power_of_2(m * topk), T_BLOCK=triton.next_power_of_2(topk)
    )
    common = dict(PDL=config.pdl, DECODE_ASM=config.decode_asm, FP32=INTERPRETED)
    launch(
        _gate_up_kernel, (m * topk, i_tiles, split),
        (x, topk_ids, w13, w13_scale.view(torch.uint8), w13_gs, intermediate, workspace.partials, workspace.counters,
         m, hidden, k_tiles, i_tiles, split, tiles_per_split, min(config.gate_up_prefetch, ALL), x.stride(0)),
        dict(**routing, WARPS_K=config.gate_up_warps_k, ROWS=config.gate_up_rows,
             EVEN_K=k_tiles % gate_up_step == 0 and hidden == k_tiles * TILE_K, **common,
             **launch_options(config.gate_up_warps_k, config.gate_up_stages, config.pdl)),
        warmup,
    )  # fmt: skip
    launch(
        _down_kernel, (m * topk, n_down),
        (intermediate, topk_ids, topk_weights, w2, w2_scale.view(torch.uint8), w2_gs, out, workspace.partials,
         workspace.counters, m, hidden, down_k_tiles, n_pad, min(config.down_prefetch, ALL), out.stride(0)),
        dict(**routing, SUPER=config.down_super_tiles, WARPS_K=config.down_warps_k, ROWS=config.down_rows,
             EVEN_K=down_k_tiles % (config.down_warps_k * config.down_rows) == 0,
             EVEN_N=n_tiles % config.down_super_tiles == 0, **common,
             **launch_options(config.down_warps_k, config.down_stages, config.pdl)),
        warmup,
    )  # fmt: skip
    return out
