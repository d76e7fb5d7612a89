"""vLLM warms up its router GEMM kernels for other models' routers: point it at the loaded model's.

vLLM 0.26 compiles its CuTe DSL router GEMM (`ll_bf16`, Hopper and newer, where CUTLASS's Python DSL is
installed) at every engine start for the router shapes listed in `kernel_warmup._LL_BF16_WARMUP_MODEL_SHAPES`:
DeepSeek's and Inkling's (hidden size, experts), 17 kernels and 12-16 s of each start on an H200, compiled
again each time (not cached on disk). Gemma 4's router, (2816, 128) for 26B-A4B, is not among them, so its own
kernels compile on first use instead: in CUDA graph capture, or in the middle of a request for a batch size
the graphs don't cover. `install` makes the list this model's router shape (empty for a model without experts).
"""

from __future__ import annotations

NOTE = "vLLM's router GEMM warm-up compiles this model's router shape only"


def install(router_shape: tuple[int, int] | None) -> str | None:
    """Set vLLM's warm-up list to this router shape; a line saying so, or None where vLLM has no such list."""
    try:
        from vllm.model_executor.warmup import kernel_warmup
    except ImportError:
        return None
    if not hasattr(kernel_warmup, "_LL_BF16_WARMUP_MODEL_SHAPES"):
        return None  # a vLLM without this warm-up, or one that finds the shapes itself
    # Read when the engine core warms up, in the process vLLM forks from this one.
    kernel_warmup._LL_BF16_WARMUP_MODEL_SHAPES = (router_shape,) if router_shape else ()
    return NOTE
