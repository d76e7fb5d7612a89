"""What an upload is: sniffing a file's first bytes, classifying it as an image or a video, the shared file checks.

Magic bytes decide, then the name; anything else (text, PDF, audio, empty or unreadable files) raises
``MediaError`` with a message that can be shown as is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import cv2
from PIL import Image

from media.limits import MIB

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi")
# Pillow format names we accept. MPO is what Pillow calls many camera JPEGs.
_PIL_FORMATS = {"PNG", "JPEG", "MPO", "WEBP", "BMP", "DIB", "GIF"}

_SUPPORTED_HINT = "Attach an image (PNG, JPEG, WebP, BMP, GIF) or a video (MP4, WebM, MOV, MKV, AVI)."

MediaKind = Literal["image", "video"]


class MediaError(ValueError):
    """A problem with an upload, worded to be shown to the user as is."""


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


# Here because classify() probes with it too; media.video decodes with it.
def _open_capture(path: Path) -> cv2.VideoCapture:
    # Force the FFmpeg backend: the default list includes an image-sequence reader that
    # "opens" stills and patterns, which is never what an upload means.
    return cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
