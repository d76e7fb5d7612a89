"""Turn user uploads into model-ready images and video frames for Gemma 4.

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

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

# --------------------------------------------------------------------------------------
# Limits, all in one place.
# --------------------------------------------------------------------------------------
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
# Seek instead of decoding forward only across gaps longer than a typical keyframe
# interval (x264's default is 250): a seek decodes from the previous keyframe anyway.
SEEK_MIN_GAP_FRAMES = 250
# Containers report odd rates (0, NaN, a 1/1000 time base read as 1000 fps); beyond
# this a reported rate is treated as unknown.
MAX_PLAUSIBLE_FPS = 480.0

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi")
# Pillow format names we accept. MPO is what Pillow calls many camera JPEGs.
_PIL_FORMATS = {"PNG", "JPEG", "MPO", "WEBP", "BMP", "DIB", "GIF"}

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

_SUPPORTED_HINT = "Attach an image (PNG, JPEG, WebP, BMP, GIF) or a video (MP4, WebM, MOV, MKV, AVI)."

MediaKind = Literal["image", "video"]


class MediaError(ValueError):
    """A problem with an upload, worded to be shown to the user as is."""


def image_detail_kwargs(detail: str = DEFAULT_IMAGE_DETAIL) -> dict[str, int]:
    """``mm_processor_kwargs`` for an image-detail level, e.g. ``{"max_soft_tokens": 560}``.

    Pass as vLLM's per-request ``mm_processor_kwargs`` (offline prompt dict, or
    ``extra_body`` on the OpenAI server); for transformers use it as ``images_kwargs``.
    """
    try:
        return {"max_soft_tokens": IMAGE_DETAIL_SOFT_TOKENS[detail]}
    except KeyError:
        raise ValueError(f"unknown image detail {detail!r}; choose one of {list(IMAGE_DETAIL_SOFT_TOKENS)}") from None


def format_timestamp(seconds: float) -> str:
    """``mm:ss`` exactly as Gemma 4's processors print frame stamps (truncated, not rounded)."""
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


# --------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------
def _sniff(head: bytes) -> tuple[str, str] | None:
    """(kind, description) from a file's first bytes, or None if unrecognised.

    kind is "image", "video", or "other" (recognised but unsupported). Magic bytes decide
    because the name can lie and OpenCV will happily "open" many non-videos.
    """
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image", "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "image", "JPEG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image", "GIF"
    if head.startswith(b"BM"):
        return "image", "BMP"
    if head[:4] == b"RIFF":
        sub = head[8:12]
        if sub == b"WEBP":
            return "image", "WebP"
        if sub == b"AVI ":
            return "video", "AVI"
        if sub == b"WAVE":
            return "other", "a WAV audio file"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "video", "Matroska/WebM"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"M4A ", b"M4B ", b"M4P "):
            return "other", "an M4A audio file"
        if brand in (b"heic", b"heix", b"mif1", b"msf1", b"avif"):
            return "other", "a HEIC/AVIF image (not supported; export it as JPEG or PNG)"
        return "video", "MP4/MOV"
    if head[4:8] in (b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"):
        return "video", "QuickTime"
    if head.startswith(b"%PDF"):
        return "other", "a PDF document"
    if head.startswith(b"ID3") or head[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):
        return "other", "an MP3 audio file"
    if head.startswith((b"fLaC", b"OggS")):
        return "other", "an audio file"
    if head.startswith(b"PK\x03\x04"):
        return "other", "a ZIP archive or office document"
    return None


def _check_file(path: Path, max_bytes: int | None, what: str) -> int:
    """Existence, emptiness and size checks shared by every loader; returns the size."""
    name = path.name
    if not path.is_file():
        raise MediaError(f"{name}: file not found. Try attaching it again.")
    size = path.stat().st_size
    if size == 0:
        raise MediaError(f"{name} is empty (0 bytes). The upload may have failed; try attaching it again.")
    if max_bytes is not None and size > max_bytes:
        raise MediaError(
            f"{name} is {_fmt_bytes(size)}, over the {_fmt_bytes(max_bytes)} limit for {what}s. "
            f"Attach a smaller or compressed {what}."
        )
    return size


def _fmt_bytes(n: int) -> str:
    if n >= MIB:
        return f"{n / MIB:.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n} bytes"


def classify(path: str | os.PathLike[str]) -> MediaKind:
    """Say whether an upload is an "image" or a "video", by content first, then by name.

    Content wins over the extension (a PNG named .jpg is still an image). Raises
    MediaError for anything else: text, PDF, audio, empty or unreadable files.
    """
    p = Path(path)
    _check_file(p, None, "file")
    with p.open("rb") as f:
        head = f.read(64)
    ext = p.suffix.lower()
    sniffed = _sniff(head)
    if sniffed is not None:
        kind, desc = sniffed
        if kind in ("image", "video"):
            return kind  # type: ignore[return-value]
        raise MediaError(f"{p.name} looks like {desc}, which can't be attached here. {_SUPPORTED_HINT}")

    # Unrecognised magic: give the decoders a chance only when the name claims our type.
    if ext in IMAGE_EXTENSIONS:
        try:
            with Image.open(p) as im:
                if im.format in _PIL_FORMATS:
                    return "image"
        except Exception:
            pass
        raise MediaError(
            f"{p.name} is not a valid image: its content isn't PNG, JPEG, WebP, BMP or GIF. "
            "It may be damaged, or a different kind of file renamed; re-export it as PNG or JPEG."
        )
    if ext in VIDEO_EXTENSIONS:
        cap = _open_capture(p)
        try:
            if cap.isOpened() and cap.grab():
                return "video"
        finally:
            cap.release()
        raise MediaError(
            f"{p.name} could not be read as a video: the file is damaged, incomplete, or not really "
            f"{ext[1:].upper()}. Re-export it as MP4 (H.264) and attach it again."
        )
    if _looks_like_text(head):
        raise MediaError(f"{p.name} is a text file, which can't be attached here. {_SUPPORTED_HINT}")
    raise MediaError(f"{p.name} isn't a supported file type. {_SUPPORTED_HINT}")


def _looks_like_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\x00" not in head


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------
@dataclass
class LoadedImage:
    image: Image.Image  # RGB, at most max_pixels
    notes: list[str] = field(default_factory=list)  # things the user should know
    format: str = ""  # Pillow's format name: PNG, JPEG, ...
    original_size: tuple[int, int] = (0, 0)  # (width, height) after EXIF rotation, before downscale


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB, with transparency composited on white.

    16-bit and 32-bit integer grayscale are scaled from the 16-bit range to 8 bits
    (Pillow's own convert clips them, turning most of the image white).
    """
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im).astype(np.int64)
        if mode == "I" and (arr.min() < 0 or arr.max() > 0xFFFF):
            # Not 16-bit data in a 32-bit container: stretch what is there.
            lo, hi = int(arr.min()), int(arr.max())
            arr = (arr - lo) * 255 // max(hi - lo, 1)
        else:
            arr = (arr * 255 + 0x7FFF) // 0xFFFF  # 0..65535 -> 0..255, rounded
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        arr = np.nan_to_num(arr)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.round(arr).astype(np.uint8), "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        # Transparent pixels usually hold black; on white they look as the author meant.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # 1, L, P, CMYK, YCbCr, ...


def _fit_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """Largest (w, h) with the same aspect ratio and w*h <= max_pixels."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    w, h = max(1, int(width * scale)), max(1, int(height * scale))
    return w, h


def load_image(
    path: str | os.PathLike[str],
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_bytes: int = MAX_IMAGE_BYTES,
) -> LoadedImage:
    """Open an uploaded image as an upright RGB image of at most ``max_pixels``.

    Accepts PNG, JPEG, WebP, BMP and GIF (animated: first frame, with a note). EXIF
    orientation is applied; alpha is composited on white; 16-bit is scaled to 8-bit.
    """
    p = Path(path)
    _check_file(p, max_bytes, "image")
    if classify(p) != "image":
        raise MediaError(f"{p.name} is a video, not an image. Attach it as a video instead.")
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            # Our own MAX_DECODE_PIXELS check replaces Pillow's bomb warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                fmt = im.format or ""
                if fmt not in _PIL_FORMATS:
                    raise MediaError(
                        f"{p.name} is a {fmt or 'unknown'} image, which isn't supported. "
                        "Convert it to PNG or JPEG and attach it again."
                    )
                w, h = im.size
                if w * h > MAX_DECODE_PIXELS:
                    raise MediaError(
                        f"{p.name} is {w}×{h} pixels ({w * h / 1e6:.0f} MP), over the "
                        f"{MAX_DECODE_PIXELS / 1e6:.0f} MP limit. Resize it and attach it again."
                    )
                if getattr(im, "is_animated", False) and fmt != "MPO":
                    notes.append(
                        f"{p.name} is animated ({im.n_frames} frames); only the first frame is used. "
                        "Attach it as a video to show motion."
                    )
                    im.seek(0)
                if fmt in ("JPEG", "MPO") and w * h > max_pixels:
                    # Let libjpeg decode at 1/2, 1/4 or 1/8 scale, still >= the target size.
                    im.draft(None, _fit_size(w, h, max_pixels))
                im.load()
                try:
                    # Orientations 5-8 are quarter turns: width and height trade places.
                    swaps_axes = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
                    upright = ImageOps.exif_transpose(im)
                except Exception:
                    swaps_axes = False
                    upright = im.copy()
                    notes.append(f"{p.name}: its orientation tag couldn't be read; shown as stored.")
                rgb = to_rgb(upright)
                if rgb is im:
                    rgb = im.copy()  # detach from the file before it closes
    except MediaError:
        raise
    except Image.DecompressionBombError:
        raise MediaError(
            f"{p.name} has too many pixels to open safely. Resize it below "
            f"{MAX_DECODE_PIXELS / 1e6:.0f} MP and attach it again."
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise MediaError(
            f"{p.name} could not be decoded ({e}). The file may be damaged or incomplete; "
            "re-save it as PNG or JPEG and attach it again."
        ) from None

    # Size as the user sees it: header size (draft() may have decoded smaller), rotated.
    original_size = (h, w) if swaps_axes else (w, h)
    target = _fit_size(rgb.width, rgb.height, max_pixels)
    if target != rgb.size:
        rgb = rgb.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
    if rgb.size != original_size:
        ow, oh = original_size
        notes.append(
            f"{p.name} was downscaled from {ow}×{oh} to {rgb.width}×{rgb.height} (limit {max_pixels / 1e6:.1f} MP)."
        )
    return LoadedImage(image=rgb, notes=notes, format=fmt, original_size=original_size)


# --------------------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------------------
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


def _open_capture(path: Path) -> cv2.VideoCapture:
    # Force the FFmpeg backend: the default list includes an image-sequence reader that
    # "opens" stills and patterns, which is never what an upload means.
    return cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)


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
