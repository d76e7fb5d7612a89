"""Limits on uploads, all in one place: file sizes, pixels, video length, frame rate and frame count.

The loaders (``load_image``, ``load_video``) take them as keyword defaults.
"""

from __future__ import annotations

MIB = 1024 * 1024

MAX_IMAGE_BYTES = 20 * MIB
MAX_VIDEO_BYTES = 200 * MIB
# Refuse to decode anything larger: a small compressed file can expand to gigabytes.
MAX_DECODE_PIXELS = 64_000_000
# Images above this are downscaled. The largest Gemma 4 image budget (1120 soft tokens)
# sees about 2.6 MP (1120 * 3*3 patches * 16*16 px), so 4 MP loses nothing the model uses.
MAX_IMAGE_PIXELS = 2048 * 2048
# Video frames go through the vision tower at 70 soft tokens (~0.16 MP) in vLLM; 1 MP
# leaves headroom for larger transformers budgets and keeps 32 frames near 100 MB.
MAX_VIDEO_FRAME_PIXELS = 1024 * 1024
MAX_VIDEO_DURATION_S = 10 * 60.0
DEFAULT_VIDEO_FPS = 1.0
# Gemma 4 takes at most 32 frames per video (vLLM's _VIDEO_MAX_FRAMES, transformers'
# Gemma4VideoProcessor.num_frames); a caller may ask for fewer, never more.
MAX_VIDEO_FRAMES = 32
