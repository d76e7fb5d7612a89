"""Compile many kernel configs at once: worker processes run the kernels' `warmup` (compile, no launch) on CPU
tensors of the real shapes, which fills Triton's on-disk cache; the caller's own calls then load the cubins from
there (milliseconds) instead of compiling one after another (~1 s each). A job whose compile fails is reported,
and the caller's later call simply compiles it again (and fails the same way, where it is handled).

A job is ("gemv", size_n, size_k, m, config) or ("moe", hidden, inter_pad, topk, m, config), config a tuple of
a config's (field, value) items (`job_config`, hashable: jobs are deduplicated); its
tensors have the shapes the kernels take (gemv: qweight [K_pad/16, 2 N_pad] ...; moe: top-k experts only, the
kernels' code does not depend on the expert count). The compiled kernel is the one a call with the same sizes,
token count and config gets (the same specialization: aligned tensors, the same strides).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed, wait
from dataclasses import asdict, replace
from typing import Any


def job_config(config) -> tuple:
    """A GemvConfig / MoeConfig as a job's config field."""
    return tuple(sorted(asdict(config).items()))


def gemv_job(size_n: int, size_k: int, m: int, config) -> tuple:
    return ("gemv", size_n, size_k, m, job_config(config))


def moe_job(hidden: int, inter_pad: int, topk: int, m: int, config) -> tuple:
    return ("moe", hidden, inter_pad, topk, m, job_config(config))


def compile_identity(job: tuple) -> tuple:
    """What decides the compiled code of a job, as far as these shapes go: the block of tokens, the compile-time
    knobs and the even-shape flags; split-K and prefetch are runtime arguments. (Approximate on purpose: jobs it
    merges wrongly are only compiled later, by the caller.)"""
    from . import gemv, moe
    from .marlin_layout import padded_nk

    if job[0] == "gemv":
        _, size_n, size_k, m, items = job
        c = gemv.GemvConfig(**dict(items))
        n_pad, k_pad = padded_nk(size_n, size_k)
        even = ((k_pad // 16) % c.step == 0 and size_k == k_pad, (n_pad // 64) % c.super_tiles == 0)
        return ("gemv", gemv.block_m(m), even, job_config(replace(c, split_k=1, prefetch=0)))
    _, hidden, inter_pad, topk, m, items = job
    c = moe.MoeConfig(**dict(items))
    flat = replace(c, gate_up_split_k=1, gate_up_prefetch=0, down_prefetch=0)
    return ("moe", hidden, inter_pad, topk, gemv.block_m(m), job_config(flat))


def distinct(jobs: list[tuple]) -> list[tuple]:
    """One job per compile identity (the first)."""
    seen: dict[tuple, tuple] = {}
    for job in jobs:
        seen.setdefault(compile_identity(job), job)
    return list(seen.values())


def _tensors_gemv(size_n: int, size_k: int, m: int):
    import torch

    from .marlin_layout import padded_nk

    n_pad, k_pad = padded_nk(size_n, size_k)
    x = torch.empty(m, size_k, dtype=torch.bfloat16)
    qweight = torch.empty(k_pad // 16, 2 * n_pad, dtype=torch.int32)
    scales = torch.empty(k_pad // 16, n_pad, dtype=torch.uint8)
    return x, qweight, scales, torch.ones(1, dtype=torch.float32)


def compile_job(job: tuple) -> str | None:
    """Compile one job's kernels; None, or what went wrong."""
    import torch

    from . import gemv, moe

    try:
        kind = job[0]
        if kind == "gemv":
            _, size_n, size_k, m, config = job
            x, qweight, scales, gs = _tensors_gemv(size_n, size_k, m)
            gemv.marlin_nvfp4_gemv(x, qweight, scales, gs, size_n, size_k, gemv.GemvConfig(**dict(config)), warmup=True)
        elif kind == "moe":
            _, hidden, inter_pad, topk, m, config = job
            e = topk
            w13 = torch.empty(e, hidden // 16, 4 * inter_pad, dtype=torch.int32)
            s13 = torch.empty(e, hidden // 16, 2 * inter_pad, dtype=torch.uint8)
            w2 = torch.empty(e, inter_pad // 16, 2 * hidden, dtype=torch.int32)
            s2 = torch.empty(e, inter_pad // 16, hidden, dtype=torch.uint8)
            gs = torch.ones(e, dtype=torch.float32)
            x = torch.empty(m, hidden, dtype=torch.bfloat16)
            weights = torch.empty(m, topk, dtype=torch.float32)
            ids = torch.zeros(m, topk, dtype=torch.int32)
            moe.marlin_nvfp4_moe(x, w13, s13, gs, w2, s2, gs, weights, ids, moe.MoeConfig(**dict(config)), warmup=True)
        else:
            return f"unknown job kind {kind!r}"
    except Exception as e:  # a config Triton cannot build: the caller records it when it runs it
        return repr(e)[:300]
    return None


def _chunk(jobs: list[tuple]) -> list[str | None]:
    return [compile_job(job) for job in jobs]


def precompile(jobs: list[tuple], workers: int | None = None, timeout: float = 150.0) -> dict[str, Any]:
    """Compile `jobs` in worker processes (spawned: CUDA and Triton start fresh in each); returns counts, the
    failures and the wall time. Jobs not done by `timeout` are left to the caller's calls."""
    started = time.time()
    jobs = list(dict.fromkeys(jobs))
    workers = max(1, min(workers or (os.cpu_count() or 2) - 1, len(jobs) or 1))
    chunks = [jobs[i::workers] for i in range(workers)]
    results: dict[tuple, str | None] = {}
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {pool.submit(_chunk, chunk): chunk for chunk in chunks if chunk}
        done, _ = wait(futures, timeout=timeout)
        for future in as_completed(done):
            try:
                results.update(zip(futures[future], future.result(), strict=True))
            except Exception as e:  # a worker died: its jobs compile later, in the caller
                results.update({job: f"worker: {e!r}"[:300] for job in futures[future]})
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        if len(results) < len(jobs):  # timed out: stop the workers still compiling (ours, by their process ids)
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()
    failed = {repr(job): err for job, err in results.items() if err}
    return {
        "jobs": len(jobs),
        "compiled": sum(1 for err in results.values() if err is None),
        "failed": failed,
        "not_done": len(jobs) - len(results),
        "workers": workers,
        "seconds": time.time() - started,
    }
