"""The GPU this process will use, read through NVML: no CUDA context, so vLLM can still fork its engine."""

from __future__ import annotations

import functools
import os
from typing import Any


def visible_gpu() -> Any:
    """NVML's handle of the first GPU in CUDA_VISIBLE_DEVICES (GPU 0 without it); raises where NVML is missing."""
    import pynvml

    pynvml.nvmlInit()
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    return pynvml.nvmlDeviceGetHandleByIndex(int(first) if first.isdigit() else 0)


@functools.cache
def visible_gpu_name() -> str | None:
    """The name of that GPU (e.g. "NVIDIA H200"); None without NVML (a CPU machine, a container without the
    driver library)."""
    try:
        import pynvml

        name = pynvml.nvmlDeviceGetName(visible_gpu())
    except Exception:
        return None
    return name.decode() if isinstance(name, bytes) else str(name)
