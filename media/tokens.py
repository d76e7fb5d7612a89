"""Gemma 4's image budgets (the UI's "image detail") and what an image or a video costs in prompt tokens.

What Gemma 4's processor puts in the prompt in place of one placeholder (transformers 5.14
``Gemma4Processor.replace_image_token`` / ``replace_video_token``; vLLM 0.26 ``gemma4_mm.py``
``get_image_repl`` / ``get_video_repl``, the same sequence)::

    <|image|>  ->  <|image> <|image|> * n <image|>                 n <= max_soft_tokens (70 ... 1120)
    <|video|>  ->  "mm:ss " <|image> <|video|> * m <image|>        one group per frame, m <= 70,
                   " mm:ss " <|image> <|video|> * m <image|> ...   later stamps after a space

The soft-token counts follow from the size of the picture as sent: Gemma 4 resizes it, keeping its aspect ratio,
to the largest size whose sides are multiples of 48 px (16 px patches, pooled 3x3 into one soft token) within
the budget, so a 320x240 image takes 266 of its 280 tokens. Given the size, ``image_prompt_tokens`` and
``video_prompt_tokens`` count exactly what the processor does; without it they give the most it can be. The one
estimate is a video's ``mm:ss`` text, which depends on the tokenizer: pass ``text_tokens`` to count it exactly.
tests/test_media_tokens.py checks the counts against both processors on the tiny model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from media.timestamps import format_timestamp

# --------------------------------------------------------------------------------------
# Image detail -> Gemma 4 image budget.
# --------------------------------------------------------------------------------------
# The only budgets Gemma4ImageProcessor / vLLM accept (_SUPPORTED_SOFT_TOKENS in both).
SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)
# UI label -> max_soft_tokens. "medium" is the model's own default (280).
IMAGE_DETAIL_SOFT_TOKENS: dict[str, int] = {
    "minimal": 70,
    "low": 140,
    "medium": 280,
    "high": 560,
    "max": 1120,
}
DEFAULT_IMAGE_DETAIL = "medium"


def image_detail_kwargs(detail: str = DEFAULT_IMAGE_DETAIL) -> dict[str, int]:
    """``mm_processor_kwargs`` for an image-detail level, e.g. ``{"max_soft_tokens": 560}``.

    Pass as vLLM's per-request ``mm_processor_kwargs`` (offline prompt dict, or
    ``extra_body`` on the OpenAI server); for transformers use it as ``images_kwargs``.
    """
    try:
        return {"max_soft_tokens": IMAGE_DETAIL_SOFT_TOKENS[detail]}
    except KeyError:
        raise ValueError(f"unknown image detail {detail!r}; choose one of {list(IMAGE_DETAIL_SOFT_TOKENS)}") from None


# --------------------------------------------------------------------------------------
# Prompt tokens an attachment costs.
# --------------------------------------------------------------------------------------
PATCH_SIZE = 16  # Gemma4ImageProcessor / Gemma4VideoProcessor.patch_size
POOLING_KERNEL_SIZE = 3  # 3x3 patches pool into one soft token
# Every image and every video frame is wrapped in <|image> ... <image|> (boi, eoi).
WRAPPER_TOKENS = 2
# vLLM always processes video frames at this budget (_VIDEO_MAX_SOFT_TOKENS); it is also
# Gemma4VideoProcessor's default max_soft_tokens.
VIDEO_FRAME_SOFT_TOKENS = 70
# Estimates for a frame stamp's text in Gemma 4's own tokenizer, which gives every digit a token of its own:
# "mm:ss " is 5 characters and a space (the first frame), " mm:ss " a space more (every later one). Not checked
# against that tokenizer here (there is no copy offline); vLLM plans memory with about 6 a frame.
FIRST_STAMP_TOKENS = 6
STAMP_TOKENS = 7


def soft_tokens(max_soft_tokens: int, size: tuple[int, int] | None = None) -> int:
    """The soft tokens Gemma 4 makes of a picture of ``size`` (width, height) at a budget: exact.

    The arithmetic of transformers' ``get_aspect_ratio_preserving_size`` (image_processing_gemma4.py), which
    vLLM's ``_compute_num_soft_tokens`` repeats. ``size`` is the picture as sent: ``LoadedImage.image.size``, a
    video frame after ``load_video``'s downscale. Without a size: ``max_soft_tokens``, the most it can be.
    """
    if max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
        raise ValueError(f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, got {max_soft_tokens}")
    if size is None:
        return max_soft_tokens
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"an image has a positive width and height, got {width}x{height}")
    max_patches = max_soft_tokens * POOLING_KERNEL_SIZE**2
    factor = math.sqrt(max_patches * PATCH_SIZE**2 / (height * width))
    side = POOLING_KERNEL_SIZE * PATCH_SIZE  # 48 px: one soft token's square
    rows = int(math.floor(factor * height / side))
    cols = int(math.floor(factor * width / side))
    if rows == 0 or cols == 0:
        # More than max_soft_tokens:1 (a strip): one row of 48 px, as long as the budget allows.
        return max_soft_tokens
    return rows * cols


def image_prompt_tokens(
    max_soft_tokens: int = IMAGE_DETAIL_SOFT_TOKENS[DEFAULT_IMAGE_DETAIL], size: tuple[int, int] | None = None
) -> int:
    """Prompt tokens one image costs at a budget: its soft tokens and the two that wrap them.

    With ``size`` (width, height) of the image as sent, the processor's own count; without it the most it can be,
    ``max_soft_tokens + 2``. The template's one ``<|image|>`` is replaced by these, not added to.
    """
    return soft_tokens(max_soft_tokens, size) + WRAPPER_TOKENS


def video_prompt_tokens(
    frames: int | Sequence[float],
    frame_size: tuple[int, int] | None = None,
    text_tokens: Callable[[str], int] | None = None,
) -> int:
    """Prompt tokens one video costs: for each frame its ``mm:ss`` stamp, soft tokens and the two that wrap them.

    ``frames`` is the frames' times in seconds (``VideoClip.timestamps_s``) or just how many there are;
    ``frame_size`` is (width, height) of the frames as sent (all one size), without it 70 soft tokens a frame,
    the most. The stamps' text is the estimate (``FIRST_STAMP_TOKENS``, ``STAMP_TOKENS``) unless ``text_tokens``
    counts it with the tokenizer at hand, e.g. ``lambda s: len(tokenizer.encode(s, add_special_tokens=False))``;
    that needs the times. Exact then for vLLM, which tokenizes each stamp on its own; transformers tokenizes the
    first stamp together with the text before the ``<|video|>``, which can merge with it in some tokenizers.
    """
    per_frame = soft_tokens(VIDEO_FRAME_SOFT_TOKENS, frame_size) + WRAPPER_TOKENS
    if isinstance(frames, int):
        if text_tokens is not None:
            raise ValueError("counting the stamps with a tokenizer needs the frames' times, not their number")
        return frames * per_frame + (FIRST_STAMP_TOKENS + (frames - 1) * STAMP_TOKENS if frames else 0)
    if text_tokens is None:
        return video_prompt_tokens(len(frames), frame_size)
    stamps = sum(
        text_tokens(f" {format_timestamp(t)} " if i else f"{format_timestamp(t)} ") for i, t in enumerate(frames)
    )
    return len(frames) * per_frame + stamps
