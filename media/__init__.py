"""Turn user uploads into model-ready images and video frames for Gemma 4.

Below chat and engine: both import it, it imports neither (tests/test_media.py checks).

    media.limits      every limit on an upload (sizes, pixels, video length, frames), in one place
    media.files       sniffing and classifying an upload as an image or a video; MediaError; the file checks
    media.images      load_image: upright RGB, downscaled, with notes
    media.video       load_video and VideoClip: OpenCV decoding, frame sampling, thumbnails, contact sheet
    media.timestamps  format_timestamp: a frame's mm:ss, as Gemma 4 prints it
    media.tokens      image detail -> soft-token budget; the prompt tokens an image or a video costs

Images come back as RGB ``PIL.Image``; videos as a handful of RGB ``uint8`` frames
sampled by timestamp, with the metadata Gemma 4's processors need to stamp each frame
``mm:ss``. Video is decoded with OpenCV, never through transformers' torchcodec path,
which needs FFmpeg's shared libraries that most machines here lack.

Every problem a user can cause (wrong type, corrupt, too big, too long) raises
``MediaError`` with a message that can be shown as is.

How the output reaches the model
--------------------------------
vLLM 0.26 (``vllm/model_executor/models/gemma4_mm.py``)::

    llm.generate({
        "prompt": prompt,                        # contains <|image|> / <|video|> placeholders
        "multi_modal_data": {
            "image": [loaded.image],
            "video": [clip.vllm_video_item()],   # (frames[T,H,W,3] uint8 RGB, metadata dict)
        },
        "mm_processor_kwargs": image_detail_kwargs("high"),   # {"max_soft_tokens": 560}
    })

The OpenAI-compatible server takes the same ``mm_processor_kwargs`` per request
(``extra_body={"mm_processor_kwargs": {...}}``) and an engine-wide default with
``--mm-processor-kwargs '{"max_soft_tokens": 560}'``. ``max_soft_tokens`` only sets
the *image* budget: vLLM always processes video frames at 70 soft tokens
(``_VIDEO_MAX_SOFT_TOKENS``) and plans memory for at most 32 frames per video.

transformers 5.14 (``Gemma4Processor``)::

    processor(text=..., images=[img], images_kwargs={"max_soft_tokens": 560},
              videos=[clip.as_array()], video_metadata=[clip.hf_metadata()],
              do_sample_frames=False)
"""

from media.files import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, MediaError, MediaKind, classify
from media.images import LoadedImage, load_image, to_rgb
from media.limits import (
    DEFAULT_VIDEO_FPS,
    MAX_DECODE_PIXELS,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_VIDEO_BYTES,
    MAX_VIDEO_DURATION_S,
    MAX_VIDEO_FRAME_PIXELS,
    MAX_VIDEO_FRAMES,
    MIB,
)
from media.timestamps import format_timestamp
from media.tokens import (
    DEFAULT_IMAGE_DETAIL,
    IMAGE_DETAIL_SOFT_TOKENS,
    SUPPORTED_SOFT_TOKENS,
    image_detail_kwargs,
    image_prompt_tokens,
    soft_tokens,
    video_prompt_tokens,
)
from media.video import VideoClip, load_video, sample_frame_indices

__all__ = [
    "DEFAULT_IMAGE_DETAIL",
    "DEFAULT_VIDEO_FPS",
    "IMAGE_DETAIL_SOFT_TOKENS",
    "IMAGE_EXTENSIONS",
    "MAX_DECODE_PIXELS",
    "MAX_IMAGE_BYTES",
    "MAX_IMAGE_PIXELS",
    "MAX_VIDEO_BYTES",
    "MAX_VIDEO_DURATION_S",
    "MAX_VIDEO_FRAMES",
    "MAX_VIDEO_FRAME_PIXELS",
    "MIB",
    "SUPPORTED_SOFT_TOKENS",
    "VIDEO_EXTENSIONS",
    "LoadedImage",
    "MediaError",
    "MediaKind",
    "VideoClip",
    "classify",
    "format_timestamp",
    "image_detail_kwargs",
    "image_prompt_tokens",
    "load_image",
    "load_video",
    "sample_frame_indices",
    "soft_tokens",
    "to_rgb",
    "video_prompt_tokens",
]
