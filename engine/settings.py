"""Everything a backend needs to start, filled from the CLI (app.py) or by tests and the benchmark."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL = "bg-digitalservices/Gemma-4-26B-A4B-it-NVFP4"
BACKENDS = ("auto", "vllm", "openai", "transformers")


@dataclass
class EngineSettings:
    model: str = DEFAULT_MODEL  # local directory or hub id (served model name for the openai backend)
    backend: str = "auto"
    # openai backend
    base_url: str | None = None
    api_key: str | None = None
    # vllm backend; defaults follow the model card's `vllm serve` flags
    max_model_len: int | None = 262144  # lowered, with a message, when the KV cache cannot hold it
    kv_cache_dtype: str = "fp8"
    gpu_memory_utilization: float = 0.85
    max_num_seqs: int = 4
    tensor_parallel_size: int = 1
    quantization: str | None = None  # None: read from the checkpoint (modelopt for NVFP4)
    moe_backend: str | None = None  # None: marlin on GPUs without FP4 tensor cores, else vLLM's choice
    linear_backend: str | None = None  # likewise
    attention_backend: str | None = None  # None: vLLM's choice, TRITON_ATTN when FA4's deps are missing
    load_format: str = "auto"  # "dummy": random weights of the checkpoint's shapes (benchmarks, GPU tests)
    enforce_eager: bool = False
    # Batches of up to this many tokens, prompt chunks included, run as CUDA graphs. 2048 (vLLM's prefill chunk
    # here): TTFT of a 512-token prompt 72 -> 29 ms on an H200 (bench/NOTES.md). None: vLLM's default of
    # 2 x max_num_seqs, which leaves every prompt of more than 8 tokens to launch its kernels one by one.
    cuda_graph_max_tokens: int | None = 2048
    torch_compile: bool = True  # False: a faster first start; decode steps still run as whole-model CUDA graphs
    # Speculative decoding with Gemma 4's assistant (MTP drafter): a folder, a hub id, "auto" (the published
    # assistant of a known Gemma 4 model, skipped with a note when it can't be had) or None. Off by default:
    # on an H200 it gained 10 % for one stream and halved four streams' throughput (bench/NOTES.md).
    draft_model: str | None = None
    num_speculative_tokens: int = 2
    # Benchmarks on random weights only: vLLM accepts drafts at these per-position rates instead of checking them.
    synthetic_acceptance: tuple[float, ...] | None = None
    # multimodal limits, shared by every backend and the UI
    max_images_per_prompt: int = 8
    max_video_frames: int = 32  # at most 32: what Gemma 4 takes per video
    max_videos_per_prompt: int = 1
    video_fps: float = 1.0  # frames sampled per second of video, until max_video_frames spread over the clip
