"""media.tokens: image detail -> Gemma 4's soft-token budget, and what an image or a video costs in prompt tokens,
checked against what the tiny model's processors really put in the prompt (transformers' and vLLM's)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import media
from media import VideoClip, image_prompt_tokens, soft_tokens, video_prompt_tokens

IMAGE_PROMPT = "<|turn>user\n<|image|>What?<turn|>\n"
VIDEO_PROMPT = "<|turn>user\n<|video|>What happens?<turn|>\n"
# (width, height): the tests' 320x240, a phone photo as load_image leaves it, strips both ways, tiny, odd sizes
IMAGE_SIZES = [(320, 240), (2048, 1536), (1536, 2048), (1000, 10), (3000, 2), (2, 3000), (17, 913), (1, 1)]
# (width, height, frame indices, source fps): stamps past a minute and up to 09:59, 32 frames of a 1 MP frame
VIDEOS = [
    (128, 96, [0, 10, 20, 30], 10.0),
    (640, 360, [0, 655, 5990], 10.0),
    (1024, 576, list(range(0, 3200, 100)), 10.0),
    (96, 1024, [0, 1, 2], 29.97),
]


def test_image_detail_levels_map_to_supported_budgets():
    assert media.IMAGE_DETAIL_SOFT_TOKENS == {"minimal": 70, "low": 140, "medium": 280, "high": 560, "max": 1120}
    assert media.image_detail_kwargs("high") == {"max_soft_tokens": 560}
    assert media.image_detail_kwargs() == {"max_soft_tokens": 280}
    with pytest.raises(ValueError, match="unknown image detail"):
        media.image_detail_kwargs("ultra")


def test_without_a_size_an_attachment_costs_the_most_it_can():
    assert image_prompt_tokens() == 280 + 2  # the default detail, "medium", and <|image> ... <image|>
    assert [image_prompt_tokens(n) for n in media.SUPPORTED_SOFT_TOKENS] == [72, 142, 282, 562, 1122]
    # Per frame 70 soft tokens and their wrapper; the stamps "mm:ss " then " mm:ss " estimated at 6 and 7.
    assert video_prompt_tokens(1) == 72 + 6
    assert video_prompt_tokens(32) == 32 * 72 + 6 + 31 * 7
    assert video_prompt_tokens([0.0, 1.0, 2.0]) == video_prompt_tokens(3)
    assert video_prompt_tokens(0) == video_prompt_tokens([]) == 0


def test_a_size_never_costs_more_than_the_budget():
    for size in IMAGE_SIZES:
        for budget in media.SUPPORTED_SOFT_TOKENS:
            assert 0 < soft_tokens(budget, size) <= budget
    assert soft_tokens(280, (320, 240)) == 266  # resized to 912 x 672: 19 x 14 blocks of 48 px
    assert soft_tokens(280, (3000, 2)) == 280  # a strip: one row of 48 px, as long as the budget


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="max_soft_tokens must be one of"):
        image_prompt_tokens(300)
    with pytest.raises(ValueError, match="positive width and height"):
        image_prompt_tokens(280, (0, 10))
    with pytest.raises(ValueError, match="needs the frames' times"):
        video_prompt_tokens(3, text_tokens=len)


# ----------------------------------------------------------------------------------------
# Against the processors
# ----------------------------------------------------------------------------------------
def blank(size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8))


def clip_of(width: int, height: int, indices: list[int], fps: float) -> VideoClip:
    rng = np.random.default_rng(0)
    return VideoClip(
        frames=[rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in indices],
        timestamps_s=[i / fps for i in indices],
        frame_indices=indices,
        source_fps=fps,
        total_frames=indices[-1] + 1,
        duration_s=(indices[-1] + 1) / fps,
    )


@pytest.fixture(scope="module")
def processor(tiny_vision_model_dir: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_vision_model_dir)


def stamp_tokens(processor):
    """The tiny tokenizer's count for a stamp's text: it merges some digits ("05", " 10"), unlike Gemma 4's."""
    return lambda text: len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])


def added(processor, prompt: str, ids: list[int]) -> int:
    """Tokens the one placeholder in `prompt` became."""
    return len(ids) - len(processor.tokenizer(prompt)["input_ids"]) + 1


@pytest.mark.parametrize("size", IMAGE_SIZES)
def test_image_tokens_are_what_transformers_puts_in_the_prompt(processor, size):
    for budget in media.SUPPORTED_SOFT_TOKENS:
        ids = processor(text=IMAGE_PROMPT, images=[blank(size)], images_kwargs={"max_soft_tokens": budget})
        assert added(processor, IMAGE_PROMPT, ids["input_ids"][0]) == image_prompt_tokens(budget, size), budget


@pytest.mark.parametrize("width, height, indices, fps", VIDEOS)
def test_video_tokens_are_what_transformers_puts_in_the_prompt(processor, width, height, indices, fps):
    clip = clip_of(width, height, indices, fps)
    ids = processor(
        text=VIDEO_PROMPT, videos=[clip.as_array()], video_metadata=[clip.hf_metadata()], do_sample_frames=False
    )["input_ids"][0]
    assert added(processor, VIDEO_PROMPT, ids) == video_prompt_tokens(
        clip.timestamps_s, (width, height), stamp_tokens(processor)
    )


def test_vllm_counts_the_same(tiny_vision_model_dir, processor):
    """vLLM, the app's engine, expands the same placeholders into the same number of tokens."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing.context import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs

    config = EngineArgs(model=str(tiny_vision_model_dir), max_model_len=16384).create_model_config()
    vllm_processor = MULTIMODAL_REGISTRY.create_processor(config)

    def added_by_vllm(prompt: str, mm_data: dict, mm_kwargs: dict) -> int:
        inputs = ProcessorInputs(prompt, vllm_processor.info.parse_mm_data(mm_data), hf_processor_mm_kwargs=mm_kwargs)
        return added(processor, prompt, vllm_processor.apply(inputs, TimingContext(enabled=False))["prompt_token_ids"])

    for size in IMAGE_SIZES:
        for budget in (70, 280, 1120):
            real = added_by_vllm(IMAGE_PROMPT, {"image": [blank(size)]}, {"max_soft_tokens": budget})
            assert real == image_prompt_tokens(budget, size), (size, budget)
    for width, height, indices, fps in VIDEOS:
        clip = clip_of(width, height, indices, fps)
        real = added_by_vllm(VIDEO_PROMPT, {"video": [clip.vllm_video_item()]}, {})
        assert real == video_prompt_tokens(clip.timestamps_s, (width, height), stamp_tokens(processor)), width
