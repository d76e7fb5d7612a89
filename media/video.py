"""Uploaded videos -> a handful of RGB ``uint8`` frames sampled by timestamp, decoded with OpenCV.

Never through transformers' torchcodec path, which needs FFmpeg's shared libraries that most machines here lack.
``VideoClip`` carries the metadata Gemma 4's processors need to stamp each frame ``mm:ss``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from media.files import MediaError, _check_file, _open_capture, classify
from media.images import _fit_size
from media.limits import (
    DEFAULT_VIDEO_FPS,
    MAX_DECODE_PIXELS,
    MAX_VIDEO_BYTES,
    MAX_VIDEO_DURATION_S,
    MAX_VIDEO_FRAME_PIXELS,
    MAX_VIDEO_FRAMES,
)
from media.timestamps import format_timestamp

# Seek instead of decoding forward only across gaps longer than a typical keyframe
# interval (x264's default is 250): a seek decodes from the previous keyframe anyway.
SEEK_MIN_GAP_FRAMES = 250
# Containers report odd rates (0, NaN, a 1/1000 time base read as 1000 fps); beyond
# this a reported rate is treated as unknown.
MAX_PLAUSIBLE_FPS = 480.0


@dataclass
class VideoClip:
    frames: list[np.ndarray]  # each [H, W, 3] uint8 RGB, all the same size
    timestamps_s: list[float]  # frame_indices[i] / source_fps
    frame_indices: list[int]  # indices into the source stream, increasing
    source_fps: float
    total_frames: int
    duration_s: float  # total_frames / source_fps
    notes: list[str] = field(default_factory=list)

    def as_array(self) -> np.ndarray:
        """Frames stacked as [T, H, W, 3] uint8 RGB."""
        return np.stack(self.frames)

    def vllm_metadata(self) -> dict[str, Any]:
        """Per-video metadata in the shape vLLM 0.26's own video loaders produce.

        Keys (``VideoLoader.create_hf_metadata``, vllm/multimodal/video.py:194-207):
        ``total_num_frames``, ``fps``, ``duration``, ``video_backend``,
        ``frames_indices``, ``do_sample_frames``. Gemma 4's processor reads ``fps``
        (``or 24``) and ``frames_indices`` to stamp each frame ``idx / fps`` as ``mm:ss``
        (gemma4_mm.py:603-617, 655); ``do_sample_frames=False`` says the frames are
        already chosen. The parser requires metadata for Gemma 4
        (``video_needs_metadata=True``, gemma4_mm.py:271; parse.py:660-665).
        """
        return {
            "total_num_frames": self.total_frames,
            "fps": self.source_fps,
            "duration": self.duration_s,
            "video_backend": "opencv",
            "frames_indices": list(self.frame_indices),
            "do_sample_frames": False,
        }

    def vllm_video_item(self) -> tuple[np.ndarray, dict[str, Any]]:
        """One entry of vLLM's ``multi_modal_data["video"]`` list: (frames[T,H,W,3], metadata)."""
        return self.as_array(), self.vllm_metadata()

    def hf_metadata(self) -> dict[str, Any]:
        """Fields of transformers' ``VideoMetadata`` (video_utils.py), for ``video_metadata=``.

        No ``do_sample_frames`` here: ``VideoMetadata(**d)`` rejects unknown keys; pass
        ``do_sample_frames=False`` to the processor call instead.
        """
        h, w = self.frames[0].shape[:2]
        return {
            "total_num_frames": self.total_frames,
            "fps": self.source_fps,
            "width": w,
            "height": h,
            "duration": self.duration_s,
            "video_backend": "opencv",
            "frames_indices": list(self.frame_indices),
        }

    def thumbnails(self, height: int = 96) -> list[tuple[Image.Image, str]]:
        """(thumbnail, "mm:ss") per frame, e.g. for a Gradio Gallery."""
        out = []
        for frame, t in zip(self.frames, self.timestamps_s, strict=True):
            im = Image.fromarray(frame)
            w = max(1, round(im.width * height / im.height))
            out.append((im.resize((w, height), Image.Resampling.BILINEAR), format_timestamp(t)))
        return out

    def contact_sheet(self, height: int = 96, columns: int = 8, pad: int = 4) -> Image.Image:
        """The sampled frames in a grid, each labelled with its ``mm:ss`` stamp."""
        thumbs = self.thumbnails(height)
        tw = max(t.width for t, _ in thumbs)
        font = _label_font(max(10, height // 8))
        label_h = font.getbbox("00:00")[3] + 4
        cols = max(1, min(columns, len(thumbs)))
        rows = math.ceil(len(thumbs) / cols)
        sheet = Image.new("RGB", (pad + cols * (tw + pad), pad + rows * (height + label_h + pad)), "white")
        draw = ImageDraw.Draw(sheet)
        for i, (thumb, label) in enumerate(thumbs):
            r, c = divmod(i, cols)
            x, y = pad + c * (tw + pad), pad + r * (height + label_h + pad)
            sheet.paste(thumb, (x, y))
            draw.text((x + 2, y + height + 2), label, fill="black", font=font)
        return sheet


def _label_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except Exception:  # Pillow built without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _valid_fps(fps: float) -> bool:
    return math.isfinite(fps) and 0 < fps <= MAX_PLAUSIBLE_FPS


def sample_frame_indices(total_frames: int, source_fps: float, fps: float, max_frames: int) -> list[int]:
    """Frames to keep: one per ``1/fps`` seconds from t=0, the nearest frame to each time.

    If that gives more than ``max_frames``, take ``max_frames`` spread evenly over the
    whole clip instead, first and last frame included, so the model sees the ending.
    """
    if total_frames <= 0:
        return []
    step = source_fps / fps  # source frames per sample
    count = int(math.floor((total_frames - 1) / step + 1e-9)) + 1
    # Round half up (not Python's half-to-even) so the choice is easy to predict.
    if count <= max_frames:
        indices = [min(total_frames - 1, math.floor(k * step + 0.5)) for k in range(count)]
    else:
        indices = [math.floor(x + 0.5) for x in np.linspace(0, total_frames - 1, max_frames)]
    return sorted(set(indices))


def _count_frames(path: Path, need_fps: bool, stop_after: int | None) -> tuple[int, float | None]:
    """Walk the stream with grab() (no colour conversion) to count frames; estimate fps from their times.

    Used when the container doesn't say how many frames it has (e.g. browser-recorded
    WebM without a duration). Stops early after ``stop_after`` frames (too long anyway).
    """
    cap = _open_capture(path)
    count = 0
    first_ms = last_ms = None
    try:
        while cap.grab():
            if need_fps:
                ms = cap.get(cv2.CAP_PROP_POS_MSEC)
                if first_ms is None:
                    first_ms = ms
                last_ms = ms
            count += 1
            if stop_after is not None and count > stop_after:
                break
    finally:
        cap.release()
    fps = None
    if need_fps and count > 1 and first_ms is not None and last_ms is not None and last_ms > first_ms:
        fps = (count - 1) * 1000.0 / (last_ms - first_ms)
    return count, fps


def _read_frames(
    path: Path,
    indices: Sequence[int],
    convert: Callable[[np.ndarray], np.ndarray],
) -> tuple[list[int], list[np.ndarray]]:
    """Decode only the chosen frames, in order, keeping nothing else in memory.

    Walks forward with ``grab()`` (demux + decode, no colour conversion) and converts only
    chosen frames. Across gaps longer than SEEK_MIN_GAP_FRAMES it seeks instead; if the
    stream can't seek or lands elsewhere, it reopens and walks forward from the start.
    """
    got_idx: list[int] = []
    frames: list[np.ndarray] = []
    cap = _open_capture(path)
    pos = 0  # index of the next frame grab() returns
    can_seek = True
    try:
        for target in indices:
            if can_seek and target - pos > SEEK_MIN_GAP_FRAMES:
                if cap.set(cv2.CAP_PROP_POS_FRAMES, target) and int(cap.get(cv2.CAP_PROP_POS_FRAMES)) == target:
                    pos = target
                else:
                    can_seek = False
                    cap.release()
                    cap = _open_capture(path)
                    pos = 0
            while pos < target and cap.grab():
                pos += 1
            if pos < target or not cap.grab():
                break  # stream ended or stopped decoding early
            pos += 1
            ok, bgr = cap.retrieve()
            if not ok or bgr is None:
                continue
            got_idx.append(target)
            frames.append(convert(bgr))
    finally:
        cap.release()
    return got_idx, frames


def load_video(
    path: str | os.PathLike[str],
    *,
    fps: float = DEFAULT_VIDEO_FPS,
    max_frames: int = MAX_VIDEO_FRAMES,
    max_duration_s: float = MAX_VIDEO_DURATION_S,
    max_bytes: int = MAX_VIDEO_BYTES,
    max_pixels: int = MAX_VIDEO_FRAME_PIXELS,
) -> VideoClip:
    """Decode an uploaded video into at most ``max_frames`` RGB frames sampled at ``fps``.

    Frames are taken every ``1/fps`` seconds; when that would exceed ``max_frames``,
    ``max_frames`` are spread evenly over the whole clip instead (see
    ``sample_frame_indices``). Frames larger than ``max_pixels`` are downscaled.
    Timestamps are ``index / source_fps``, the convention Gemma 4's processors use.
    """
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be positive, got {fps}")
    if not 1 <= max_frames <= MAX_VIDEO_FRAMES:
        raise ValueError(f"max_frames must be between 1 and {MAX_VIDEO_FRAMES}, got {max_frames}")
    p = Path(path)
    _check_file(p, max_bytes, "video")
    if classify(p) != "video":
        raise MediaError(f"{p.name} is an image, not a video. Attach it as an image instead.")
    name = p.name
    notes: list[str] = []

    cap = _open_capture(p)
    try:
        if not cap.isOpened():
            raise MediaError(
                f"{name} could not be opened as a video: the file is damaged or uses a codec this "
                "machine can't decode. Re-export it as MP4 (H.264) and attach it again."
            )
        source_fps = float(cap.get(cv2.CAP_PROP_FPS))
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    finally:
        cap.release()
    if width * height > MAX_DECODE_PIXELS:
        raise MediaError(
            f"{name} is {width}×{height} pixels per frame, too large to decode. "
            "Export it at 4K or less and attach it again."
        )

    fps_known = _valid_fps(source_fps)
    if not fps_known or total <= 0:
        # The container's header is missing or wrong: count (and time) the frames ourselves.
        stop = int(max_duration_s * source_fps) + 1 if fps_known else None
        total, measured_fps = _count_frames(p, need_fps=not fps_known, stop_after=stop)
        if total == 0:
            raise MediaError(_no_frames_message(name))
        if not fps_known:
            if measured_fps is None or not _valid_fps(measured_fps):
                raise MediaError(
                    f"{name} doesn't say its frame rate and it couldn't be worked out, so frame times "
                    "would be wrong. Re-export it as MP4 (H.264) and attach it again."
                )
            source_fps = measured_fps
            notes.append(f"{name} doesn't report its frame rate; estimated {source_fps:.2f} fps from frame times.")

    duration = total / source_fps
    if duration > max_duration_s:
        raise MediaError(
            f"{name} is {format_timestamp(duration)} long, over the {format_timestamp(max_duration_s)} "
            "limit. Trim it to the part you want to ask about and attach it again."
        )

    indices = sample_frame_indices(total, source_fps, fps, max_frames)
    at_fps = int(math.floor((total - 1) * fps / source_fps + 1e-9)) + 1
    if at_fps > max_frames:
        notes.append(
            f"{name} is {format_timestamp(duration)} long: {fps:g} fps would give {at_fps} frames, so "
            f"{len(indices)} frames were taken evenly across the whole clip "
            f"(one every {duration / max(len(indices) - 1, 1):.1f} s)."
        )

    def convert(bgr: np.ndarray) -> np.ndarray:
        h, w = bgr.shape[:2]
        tw, th = _fit_size(w, h, max_pixels)
        if (tw, th) != (w, h):
            bgr = cv2.resize(bgr, (tw, th), interpolation=cv2.INTER_AREA)
        if bgr.ndim == 2:
            return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_GRAY2RGB))
        return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))

    got, frames = _read_frames(p, indices, convert)
    if not frames:
        raise MediaError(_no_frames_message(name))
    if len(got) < len(indices):
        notes.append(
            f"{name}: {len(indices) - len(got)} of {len(indices)} chosen frames couldn't be decoded "
            "(the file may be cut short); using the rest."
        )
    src_h, src_w = _decoded_size(frames[0], width, height, max_pixels)
    if frames[0].shape[:2] != (src_h, src_w):
        notes.append(f"{name}: frames downscaled from {src_w}×{src_h} to {frames[0].shape[1]}×{frames[0].shape[0]}.")
    return VideoClip(
        frames=frames,
        timestamps_s=[i / source_fps for i in got],
        frame_indices=got,
        source_fps=source_fps,
        total_frames=total,
        duration_s=duration,
        notes=notes,
    )


def _decoded_size(frame: np.ndarray, width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """(h, w) of the stream before our downscale; the header may be pre-rotation."""
    h, w = frame.shape[:2]
    if width > 0 and height > 0:
        for sw, sh in ((width, height), (height, width)):
            if _fit_size(sw, sh, max_pixels) == (w, h):
                return sh, sw
    return h, w


def _no_frames_message(name: str) -> str:
    return (
        f"{name} contains no frames that could be decoded. It may be audio-only, empty, or damaged; "
        "re-export it as MP4 (H.264) and attach it again."
    )
