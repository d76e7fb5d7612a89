"""VllmEngine on a real GPU: the tiny checkpoint in BF16 and the full Gemma 4 26B-A4B shapes in NVFP4.

Run on the device machine: `python -m pytest -m gpu tests/test_gpu_vllm.py -s` prints TTFT and tok/s.
"""

import asyncio
import os

import pytest

from bench.checkpoints import write_full_size_checkpoint
from engine.base import GenerationRequest, SamplingOptions, Stage
from engine.settings import EngineSettings
from engine.vllm_backend import VllmEngine

pytestmark = pytest.mark.gpu


async def stream_one_reply(engine, prompt: str, max_tokens: int, ignore_eos: bool = False):
    request = GenerationRequest(
        [{"role": "user", "content": prompt}],
        SamplingOptions(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos),
    )
    deltas = [delta async for delta in engine.generate(request)]
    return deltas, deltas[-1].metrics


async def started(settings: EngineSettings) -> VllmEngine:
    engine = VllmEngine(settings)
    await engine.start()
    assert engine.status().stage is Stage.READY
    return engine


async def test_tiny_bf16_streams_a_reply_with_metrics_and_stops_on_close(tiny_model_dir):
    engine = await started(EngineSettings(model=str(tiny_model_dir), max_model_len=2048, gpu_memory_utilization=0.3))
    try:
        deltas, metrics = await stream_one_reply(engine, "Tell me a story.", max_tokens=200)
        assert len(deltas) > 1 and deltas[-1].finish_reason in {"stop", "length"}
        assert metrics.ttft_s > 0 and metrics.output_tokens == len(deltas)
        print(
            f"\ntiny bf16: TTFT {metrics.ttft_s * 1000:.1f} ms, {metrics.decode_tok_s:.0f} tok/s, "
            f"{metrics.output_tokens} tokens; notes: {engine.notes}"
        )

        request = GenerationRequest([{"role": "user", "content": "again"}], SamplingOptions(max_tokens=2000))
        stream = engine.generate(request)
        await anext(stream)
        await stream.aclose()  # what the UI's stop button does
        for _ in range(50):
            if engine.stats().running == 0:
                break
            await asyncio.sleep(0.1)
        assert engine.stats().running == 0, "closing the stream must abort the request in vLLM"
    finally:
        await engine.shutdown()


async def test_full_size_nvfp4_with_dummy_weights(tiny_vision_model_dir, tmp_path):
    folder = write_full_size_checkpoint(
        tmp_path / "gemma4-26b-a4b-nvfp4", tokenizer_from=tiny_vision_model_dir, nvfp4=True
    )
    engine = await started(EngineSettings(model=str(folder), load_format="dummy"))
    try:
        prompt = " ".join(f"word{i}" for i in range(300))
        await stream_one_reply(engine, prompt, max_tokens=16)  # warm-up
        deltas, metrics = await stream_one_reply(engine, prompt, max_tokens=1000, ignore_eos=True)
        stats = engine.stats()
        print(
            f"\n26B-A4B NVFP4 dummy: prompt {metrics.prompt_tokens} tokens, TTFT {metrics.ttft_s * 1000:.1f} ms, "
            f"decode {metrics.decode_tok_s:.1f} tok/s over {metrics.output_tokens} tokens; "
            f"context {engine.max_model_len}; GPU memory {stats.gpu_memory_used_gib:.1f}/"
            f"{stats.gpu_memory_total_gib:.1f} GiB; notes: {engine.notes}"
        )
        assert metrics.output_tokens == 1000 and metrics.decode_tok_s > 0
    finally:
        await engine.shutdown()


async def test_tiny_vision_answers_about_an_image_and_a_video(tiny_vision_model_dir, tmp_path):
    from PIL import Image
    from transformers import AutoProcessor, AutoTokenizer

    from engine.transformers_backend import model_inputs
    from media import load_image, load_video
    from tests.test_media import write_video

    Image.new("RGB", (320, 240), (200, 30, 30)).save(tmp_path / "red.png")
    image = load_image(tmp_path / "red.png").image
    clip = load_video(write_video(tmp_path / "clip.mp4", n_frames=40, fps=10.0))  # 4 s at 1 fps: 4 frames
    # What Gemma 4's own processor makes of the same request (CPU, no CUDA: vLLM must still fork).
    tokenizer, processor = (
        AutoTokenizer.from_pretrained(tiny_vision_model_dir),
        AutoProcessor.from_pretrained(tiny_vision_model_dir),
    )
    engine = await started(
        EngineSettings(model=str(tiny_vision_model_dir), max_model_len=4096, gpu_memory_utilization=0.3)
    )
    try:
        for name, part in (("image", {"type": "image", "image": image}), ("video", {"type": "video", "video": clip})):
            content = [part, {"type": "text", "text": "what is this?"}]
            request = GenerationRequest([{"role": "user", "content": content}], SamplingOptions(max_tokens=8))
            expected = model_inputs(tokenizer, processor, request)[1]["input_ids"].shape[1]
            *_, last = [d async for d in engine.generate(request)]
            print(
                f"\ntiny vision {name}: prompt {last.metrics.prompt_tokens} tokens (transformers: {expected}), "
                f"TTFT {last.metrics.ttft_s * 1000:.1f} ms, {last.metrics.output_tokens} tokens out"
            )
            assert last.metrics.prompt_tokens == expected
    finally:
        await engine.shutdown()


async def test_tiny_mtp_drafting_runs_and_starts_as_greedy_decoding(tiny_model_dir, tiny_assistant_dir):
    """MTP through VllmEngine. Every drafted token is checked by the model, so the reply is greedy decoding's up
    to bf16 rounding, which the verify pass (several positions in one batch) does in another order; on this
    random model, whose top logits are close, the replies agreed on their first 42 of 233 characters (H200,
    2026-11-28). A drafter that broke the model's output would differ from the first token on."""
    prompt = "Tell me a story about a fox."
    replies = {}
    for draft in (None, str(tiny_assistant_dir)):
        settings = EngineSettings(
            model=str(tiny_model_dir),
            max_model_len=2048,
            gpu_memory_utilization=0.3,
            draft_model=draft,
            attention_backend="TRITON_ATTN",  # what drafting needs: the same kernels in both runs
        )
        engine = await started(settings)
        try:
            deltas, metrics = await stream_one_reply(engine, prompt, max_tokens=64, ignore_eos=True)
            assert metrics.output_tokens == 64
            replies[draft is not None] = "".join(d.text for d in deltas)
            print(
                f"\ntiny bf16 {'with' if draft else 'without'} MTP drafter: {metrics.output_tokens} tokens in "
                f"{len(deltas)} deltas, {metrics.decode_tok_s:.0f} tok/s; notes: {engine.notes}"
            )
        finally:
            await engine.shutdown()
    plain, drafted = replies[False], replies[True]
    same = len(os.path.commonprefix([plain, drafted]))
    print(f"greedy replies agree on their first {same} of {len(plain)} characters")
    assert same >= 16
