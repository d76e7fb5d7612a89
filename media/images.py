"""Uploaded images -> upright RGB ``PIL.Image`` of at most ``MAX_IMAGE_PIXELS``, with notes for the user."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from media.files import _PIL_FORMATS, MediaError, _check_file, classify
from media.limits import MAX_DECODE_PIXELS, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS


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
