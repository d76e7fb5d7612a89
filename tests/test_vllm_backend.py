"""The vLLM backend's choices, checked on CPU against vLLM's real config classes."""

import dataclasses
import itertools
import logging
import types

import pytest

from engine import model_source, timeline, vllm_backend, vllm_launch
from engine.base import SamplingOptions, Stage
from engine.settings import EngineSettings
from engine.vllm_backend import request_metrics, sampling_params, split_media
from engine.vllm_launch import GpuFacts, LoadWatcher, engine_args

HOPPER = GpuFacts((9, 0), "NVIDIA H100")
B200 = GpuFacts((10, 0), "NVIDIA B200")
SPARK = GpuFacts((12, 1), "NVIDIA GB10")


@pytest.fixture
def tiny(tiny_model_dir):
    return model_source.inspect(tiny_model_dir)


def test_the_tiny_checkpoint_builds_a_vllm_model_config(tiny):
    notes = []
    args = engine_args(EngineSettings(model=str(tiny.path), max_model_len=512), tiny, HOPPER, notes)
    config = args.create_model_config()
    assert config.max_model_len == 512
    assert "Gemma4ForConditionalGeneration" in config.architectures
    assert args.kv_cache_dtype == "fp8" and args.max_num_seqs == 4 and args.gpu_memory_utilization == 0.85


def test_asking_for_the_full_context_lets_vllm_fit_it_to_the_kv_cache(tiny):
    args = engine_args(EngineSettings(model=str(tiny.path)), tiny, HOPPER, [])
    assert args.max_model_len == vllm_launch.AUTO_FIT


NVFP4 = dict(quant_algo="NVFP4")


@pytest.mark.parametrize("gpu,kernel", [(HOPPER, "marlin"), (SPARK, "marlin"), (B200, None)])
def test_nvfp4_uses_marlin_where_the_gpu_has_no_usable_fp4_path(tiny, gpu, kernel):
    notes = []
    args = engine_args(EngineSettings(), dataclasses.replace(tiny, **NVFP4), gpu, notes)
    assert args.quantization == "modelopt"
    assert (args.moe_backend == "marlin") == (kernel == "marlin")
    assert (args.linear_backend == "marlin") == (kernel == "marlin")
    assert any("Marlin" in note for note in notes) == (kernel == "marlin")


def test_explicit_kernels_win_over_the_per_gpu_choice(tiny):
    settings = EngineSettings(moe_backend="cutlass", linear_backend="cutlass")
    args = engine_args(settings, dataclasses.replace(tiny, **NVFP4), HOPPER, [])
    assert (args.moe_backend, args.linear_backend) == ("cutlass", "cutlass")


def test_the_seeds_gemm_env_var_still_selects_marlin_for_linear_layers(tiny, monkeypatch):
    monkeypatch.setenv("VLLM_NVFP4_GEMM_BACKEND", "marlin")
    args = engine_args(EngineSettings(), dataclasses.replace(tiny, **NVFP4), B200, [])
    assert args.linear_backend == "marlin"


def test_vllms_own_compilation_and_cuda_graphs_when_asked(tiny):
    config = engine_args(EngineSettings(cuda_graph_max_tokens=None), tiny, HOPPER, []).compilation_config
    assert config.mode is None and config.cudagraph_mode is None and config.cudagraph_capture_sizes is None


def test_prompt_chunks_run_as_cuda_graphs(tiny):
    args = engine_args(EngineSettings(), tiny, HOPPER, [])
    sizes = args.compilation_config.cudagraph_capture_sizes
    assert sizes[:4] == [1, 2, 4, 8] and sizes[-1] == 2048
    assert all(b - a <= 256 for a, b in itertools.pairwise(sizes))  # a chunk pads by at most 256 tokens
    assert vllm_launch.cuda_graph_sizes(300) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]


def test_without_torch_compile_decode_steps_are_still_cuda_graphs(tiny):
    from vllm.config import CompilationMode, CUDAGraphMode

    config = engine_args(EngineSettings(torch_compile=False), tiny, HOPPER, []).compilation_config
    assert config.mode == CompilationMode.NONE and config.cudagraph_mode == CUDAGraphMode.FULL_DECODE_ONLY


def test_triton_attention_when_flash_attention_4_cannot_run(tiny, monkeypatch):
    monkeypatch.setattr(vllm_launch, "flash_attention_4_usable", lambda: False)
    notes = []
    assert engine_args(EngineSettings(), tiny, HOPPER, notes).attention_backend == "TRITON_ATTN"
    assert any("FlashAttention 4" in note for note in notes)
    monkeypatch.setattr(vllm_launch, "flash_attention_4_usable", lambda: True)
    assert engine_args(EngineSettings(), tiny, HOPPER, []).attention_backend is None


def test_sampling_streams_deltas_and_keeps_gemmas_thinking_markers():
    params = sampling_params(SamplingOptions(temperature=0.0, top_k=-1, seed=7, max_tokens=9))
    assert params.skip_special_tokens is False
    assert params.output_kind.name == "DELTA"
    assert (params.top_k, params.seed, params.max_tokens) == (0, 7, 9)


def test_request_metrics_come_from_vllms_request_stats(monkeypatch):
    stats = types.SimpleNamespace(
        first_token_latency=0.05,
        num_generation_tokens=101,
        first_token_ts=100.0,
        last_token_ts=100.5,
        arrival_time=50.0,
    )
    monkeypatch.setattr(vllm_backend.time, "time", lambda: 51.0)
    metrics = request_metrics(stats, prompt_tokens=512)
    assert metrics.ttft_s == 0.05
    assert metrics.decode_tok_s == pytest.approx(200.0)
    assert (metrics.prompt_tokens, metrics.output_tokens, metrics.elapsed_s) == (512, 101, 1.0)


def test_load_milestones_in_vllms_log_become_stages():
    seen, notes = [], []
    watcher = LoadWatcher(seen.append, notes)
    watcher.feed("INFO 11-28 [gpu_model_runner.py:5251] Starting to load model /m...")
    watcher.feed("INFO 11-28 [gpu_model_runner.py:5348] Model loading took 14.8 GiB memory and 20.1 seconds")
    watcher.feed("INFO 11-28 [kv_cache_utils.py:1984] Auto-fit max_model_len: reduced from 262144 to 131072 to fit")
    watcher.feed("INFO 11-28 [kv_cache_utils.py:2177] GPU KV cache size: 4,600,000 tokens")
    assert [status.stage for status in seen] == [Stage.LOADING, Stage.COMPILING, Stage.COMPILING]
    assert "14.8 GiB" in seen[1].detail and "4,600,000" in seen[2].detail
    assert notes == ["context lowered from 262,144 to 131,072 tokens to fit the KV cache"]


def test_media_parts_become_placeholders_and_multimodal_data():
    image = object()
    clip = types.SimpleNamespace(vllm_video_item=lambda: ("frames", {"fps": 1.0}))
    messages = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image},
                {"type": "text", "text": "and this?"},
                {"type": "video", "video": clip},
            ],
        },
    ]
    rendered, media = split_media(messages)
    assert rendered[0] == messages[0]
    assert rendered[1]["content"] == [{"type": "image"}, {"type": "text", "text": "and this?"}, {"type": "video"}]
    assert media == {"image": [image], "video": [("frames", {"fps": 1.0})]}


def test_a_checkpoint_without_processor_files_runs_text_only(tiny):
    assert not tiny.has_vision
    assert engine_args(EngineSettings(), tiny, HOPPER, []).language_model_only is True


def test_a_vision_checkpoint_gets_the_apps_media_limits(tiny_vision_model_dir):
    checkpoint = model_source.inspect(tiny_vision_model_dir)
    assert checkpoint.has_vision
    settings = EngineSettings(
        model=str(checkpoint.path), max_model_len=4096, max_images_per_prompt=3, max_video_frames=8
    )
    args = engine_args(settings, checkpoint, HOPPER, [])
    assert args.limit_mm_per_prompt == {"image": 3, "video": {"count": 1, "num_frames": 8}}
    assert args.language_model_only is False
    # vLLM plans the memory of a video for the app's frame cap, not its own 32 frames.
    limits = args.create_model_config().multimodal_config.limit_per_prompt
    assert (limits["image"].count, limits["video"].count, limits["video"].num_frames) == (3, 1, 8)


def test_the_start_up_timeline_stamps_vllms_stages_when_vllm_logged_them(monkeypatch):
    monkeypatch.setattr(timeline, "_origin", 1000.0)
    monkeypatch.setattr(timeline, "_marks", {})
    watcher = LoadWatcher(lambda status: None, [])
    watcher.feed("1008.250 Initializing a V1 LLM engine (v0.26.0) with config: ...\n")
    watcher.feed("1016.500 Model loading took 14.8 GiB memory and 7.9 seconds\n")
    watcher.feed("1016.900 Model loading took 14.8 GiB memory and 7.9 seconds\n")  # the first stamp stays
    watcher.feed("1055.000 Graph capturing finished in 10 secs, took 0.30 GiB\n")
    timeline.mark("ready", wall=1058.1)
    assert timeline.marks() == {
        "engine core started": 8.25,
        "weights loaded": 16.5,
        "CUDA graphs": 55.0,
        "ready": 58.1,
    }


def test_the_app_logs_each_stage_in_the_line_the_bench_reads(monkeypatch, caplog):
    from bench import report

    monkeypatch.setattr(timeline, "_marks", {})
    with caplog.at_level(logging.INFO, logger="startup"):
        timeline.mark("imports")
        timeline.mark("gradio imported")
    marks = report.startup_marks("\n".join(f"2026-12-03 INFO startup: {r.getMessage()}" for r in caplog.records))
    assert marks == timeline.marks() and list(marks) == ["imports", "gradio imported"]
