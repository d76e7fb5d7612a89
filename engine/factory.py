"""Pick and build the backend the settings ask for; `auto` prefers vLLM on an NVIDIA GPU."""

from __future__ import annotations

import importlib.util
import os

from engine.base import Engine, EngineError
from engine.settings import EngineSettings


def cuda_available() -> bool:
    # Ask NVML, not the CUDA runtime: torch's runtime check poisons fork(), and vLLM forks its engine.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def choose_backend(settings: EngineSettings, *, cuda: bool | None = None, vllm: bool | None = None) -> str:
    if settings.backend != "auto":
        return settings.backend
    if settings.base_url:
        return "openai"
    cuda = cuda_available() if cuda is None else cuda
    vllm = vllm_installed() if vllm is None else vllm
    if cuda and vllm:
        return "vllm"
    missing = "no CUDA GPU is visible" if not cuda else "vLLM is not installed"
    raise EngineError(
        f"--backend auto picks vLLM, but {missing}. Use --backend openai --base-url URL to chat with a "
        "model served elsewhere (e.g. `vllm serve` on a DGX Spark), or --backend transformers --model PATH "
        "to run a small Gemma 4 on this machine's CPU."
    )


def create_engine(settings: EngineSettings) -> Engine:
    backend = choose_backend(settings)
    if backend == "vllm":
        from engine.vllm_backend import VllmEngine

        return VllmEngine(settings)
    if backend == "openai":
        from engine.openai_backend import OpenAIEngine

        return OpenAIEngine(settings)
    if backend == "transformers":
        from engine.transformers_backend import TransformersEngine

        return TransformersEngine(settings)
    raise EngineError(f"unknown backend {backend!r}; choose one of auto, vllm, openai, transformers")
