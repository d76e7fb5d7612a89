"""media: uploads -> RGB images and timestamped video frames for Gemma 4, and media below chat and engine.

Every file is generated here into tmp_path. Video frames carry their own index as a
12-bit pattern of black/white blocks, so a test can tell exactly which source frame it
got back, even after lossy compression.
"""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import media
import media.images
import media.video
from media import MediaError, classify, load_image, load_video

# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------
W, H = 96, 64  # multiples of 16 so every codec keeps the size
BITS = 12  # 3 rows x 4 columns of 24x16 blocks: indices 0..4095


def index_frame(i: int) -> np.ndarray:
    """A BGR frame whose white blocks spell ``i`` in binary."""
    f = np.zeros((H, W, 3), np.uint8)
    for b in range(BITS):
        if i >> b & 1:
            r, c = divmod(b, 4)
            f[r * 16 + 2 : r * 16 + 14, c * 24 + 2 : c * 24 + 22] = 255
    return f


def read_index(rgb: np.ndarray) -> int:
    """Inverse of index_frame, sampling block centres (works on RGB or BGR)."""
    h, w = rgb.shape[:2]
    sy, sx = h / H, w / W
    v = 0
    for b in range(BITS):
        r, c = divmod(b, 4)
        y0, y1 = int((r * 16 + 5) * sy), int((r * 16 + 11) * sy)
        x0, x1 = int((c * 24 + 6) * sx), int((c * 24 + 18) * sx)
        if rgb[y0:y1, x0:x1].mean() > 127:
            v |= 1 << b
    return v


# (extension, fourcc) pairs this OpenCV build may write; see test_writable_containers.
CONTAINERS = [("mp4", "mp4v"), ("mov", "mp4v"), ("avi", "MJPG"), ("avi", "XVID"), ("mkv", "XVID"), ("webm", "VP80")]


def write_video(path: Path, n_frames: int, fps: float, fourcc: str = "mp4v", size=(W, H), frame=index_frame) -> Path:
    """Write ``n_frames`` index frames; skip the test if this OpenCV can't write the container."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
    if not writer.isOpened():
        pytest.skip(f"this OpenCV build can't write {fourcc} into {path.suffix}")
    for i in range(n_frames):
        f = frame(i)
        if f.shape[:2] != (size[1], size[0]):
            f = cv2.resize(f, size, interpolation=cv2.INTER_NEAREST)
        writer.write(f)
    writer.release()
    if n_frames and (not path.exists() or path.stat().st_size == 0):
        pytest.skip(f"this OpenCV build wrote an empty {path.suffix} file for {fourcc}")
    return path


@pytest.fixture(scope="module")
def ten_second_mp4(tmp_path_factory) -> Path:
    """10 s at 10 fps: 100 frames."""
    return write_video(tmp_path_factory.mktemp("v") / "ten.mp4", 100, 10.0)


@pytest.fixture(scope="module")
def hundred_second_mp4(tmp_path_factory) -> Path:
    """100 s at 10 fps: 1000 frames."""
    return write_video(tmp_path_factory.mktemp("v") / "hundred.mp4", 1000, 10.0)


def assert_frames_are(clip: media.VideoClip, indices: list[int], fps: float) -> None:
    """The clip holds exactly these source frames, stamped index / fps."""
    assert clip.frame_indices == indices
    assert [read_index(f) for f in clip.frames] == indices
    assert clip.timestamps_s == pytest.approx([i / fps for i in indices])
    for f in clip.frames:
        assert f.dtype == np.uint8 and f.ndim == 3 and f.shape[2] == 3 and f.flags.c_contiguous


def pixel(im: Image.Image, xy=(0, 0)) -> tuple[int, int, int]:
    return im.getpixel(xy)


def close(a, b, tol=6) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


# ----------------------------------------------------------------------------------------
# Images: formats
# ----------------------------------------------------------------------------------------
def two_colour(size=(40, 20)) -> Image.Image:
    """Left half red, right half blue."""
    im = Image.new("RGB", size, (255, 0, 0))
    im.paste((0, 0, 255), (size[0] // 2, 0, size[0], size[1]))
    return im


@pytest.mark.parametrize("ext, pil_format", [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP"), ("bmp", "BMP")])
def test_each_still_format_loads_as_rgb(tmp_path, ext, pil_format):
    path = tmp_path / f"photo.{ext}"
    two_colour().save(path, quality=95) if ext in ("jpg", "webp") else two_colour().save(path)

    loaded = load_image(path)

    assert loaded.image.mode == "RGB" and loaded.image.size == (40, 20)
    assert loaded.format == pil_format
    assert close(pixel(loaded.image, (5, 10)), (255, 0, 0), tol=20)
    assert close(pixel(loaded.image, (35, 10)), (0, 0, 255), tol=20)
    assert loaded.notes == []


def test_animated_gif_gives_first_frame_and_says_so(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)

    loaded = load_image(path)

    assert close(pixel(loaded.image), (255, 0, 0))
    assert len(loaded.notes) == 1
    assert "animated (3 frames)" in loaded.notes[0] and "first frame" in loaded.notes[0]


def test_animated_webp_gives_first_frame_and_says_so(tmp_path):
    path = tmp_path / "anim.webp"
    frames = [Image.new("RGB", (16, 16), c) for c in [(0, 255, 0), (255, 0, 0)]]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, lossless=True)

    loaded = load_image(path)

    assert close(pixel(loaded.image), (0, 255, 0))
    assert "first frame" in loaded.notes[0]


def test_exif_orientation_6_is_applied(tmp_path):
    """Orientation 6 means "rotate 90° clockwise to display": the left edge ends up on top."""
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    two_colour((40, 20)).save(path, exif=exif, quality=95)

    loaded = load_image(path)

    assert loaded.image.size == (20, 40)
    assert loaded.original_size == (20, 40)
    assert close(pixel(loaded.image, (10, 5)), (255, 0, 0), tol=20)  # top: was left, red
    assert close(pixel(loaded.image, (10, 35)), (0, 0, 255), tol=20)  # bottom: was right, blue


# ----------------------------------------------------------------------------------------
# Images: colour modes. Each test first checks the file really opens in that mode.
# ----------------------------------------------------------------------------------------
def saved(tmp_path: Path, im: Image.Image, name: str, expect_mode: str, **save_kw) -> Path:
    path = tmp_path / name
    im.save(path, **save_kw)
    with Image.open(path) as check:
        assert check.mode == expect_mode, f"{name} reopened as {check.mode}; the test would not cover {expect_mode}"
    return path


@pytest.mark.parametrize("ext", ["png", "webp"])
def test_rgba_is_composited_on_white(tmp_path, ext):
    im = Image.new("RGBA", (3, 1))
    im.putpixel((0, 0), (255, 0, 0, 255))  # opaque red stays red
    im.putpixel((1, 0), (0, 0, 0, 0))  # fully transparent -> white, not black
    im.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black -> mid grey
    path = saved(tmp_path, im, f"alpha.{ext}", "RGBA", **({"lossless": True} if ext == "webp" else {}))

    out = load_image(path).image

    assert out.mode == "RGB"
    assert close(pixel(out, (0, 0)), (255, 0, 0), tol=2)
    assert pixel(out, (1, 0)) == (255, 255, 255)
    assert close(pixel(out, (2, 0)), (127, 127, 127), tol=2)


def test_la_is_composited_on_white(tmp_path):
    im = Image.new("LA", (2, 1))
    im.putpixel((0, 0), (0, 255))  # opaque black
    im.putpixel((1, 0), (0, 0))  # transparent
    out = load_image(saved(tmp_path, im, "la.png", "LA")).image
    assert pixel(out, (0, 0)) == (0, 0, 0)
    assert pixel(out, (1, 0)) == (255, 255, 255)


@pytest.mark.parametrize("ext", ["png", "gif"])
def test_palette_with_transparency_is_composited_on_white(tmp_path, ext):
    im = Image.new("P", (2, 1))
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # 0: black (transparent), 1: red
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    path = saved(tmp_path, im, f"pal.{ext}", "P", transparency=0)

    out = load_image(path).image

    assert pixel(out, (0, 0)) == (255, 255, 255)
    assert pixel(out, (1, 0)) == (255, 0, 0)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    im = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # no cyan, full magenta + yellow = red
    out = load_image(saved(tmp_path, im, "print.jpg", "CMYK", quality=100)).image
    assert out.mode == "RGB"
    assert close(pixel(out), (255, 0, 0), tol=10)


@pytest.mark.parametrize("ext", ["png", "jpg", "bmp"])
def test_grayscale_l_becomes_rgb(tmp_path, ext):
    im = Image.new("L", (8, 8), 100)
    out = load_image(saved(tmp_path, im, f"grey.{ext}", "L")).image
    assert out.mode == "RGB" and close(pixel(out), (100, 100, 100), tol=2)


@pytest.mark.parametrize("ext", ["png", "bmp"])
def test_one_bit_becomes_black_and_white(tmp_path, ext):
    im = Image.new("1", (2, 1), 0)
    im.putpixel((1, 0), 1)
    out = load_image(saved(tmp_path, im, f"bits.{ext}", "1")).image
    assert pixel(out, (0, 0)) == (0, 0, 0)
    assert pixel(out, (1, 0)) == (255, 255, 255)


def test_16_bit_png_is_scaled_to_8_bit_not_clipped(tmp_path):
    """Pillow's own convert() clips 16-bit values at 255, turning nearly everything white."""
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    out = load_image(saved(tmp_path, Image.fromarray(values), "scan16.png", "I;16")).image
    assert [pixel(out, (x, 0))[0] for x in range(4)] == [0, 4, 128, 255]
    assert pixel(out, (2, 0)) == (128, 128, 128)


def test_32_bit_integer_mode_holding_16_bit_data_is_scaled():
    """Mode I doesn't survive our file formats (PNG reopens as I;16), so use to_rgb directly."""
    im = Image.fromarray(np.array([[0, 1000, 32768, 65535]], dtype=np.int32))
    assert im.mode == "I"
    out = media.to_rgb(im)
    assert [pixel(out, (x, 0))[0] for x in range(4)] == [0, 4, 128, 255]


def test_32_bit_integer_mode_outside_16_bit_range_is_stretched():
    im = Image.fromarray(np.array([[-100, 0, 100]], dtype=np.int32))
    out = media.to_rgb(im)
    assert [pixel(out, (x, 0))[0] for x in range(3)] == [0, 127, 255]


# ----------------------------------------------------------------------------------------
# Images: size limits
# ----------------------------------------------------------------------------------------
def test_large_image_is_downscaled_keeping_aspect_with_a_note(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (3000, 1000), (0, 128, 0)).save(path)

    loaded = load_image(path, max_pixels=300_000)

    w, h = loaded.image.size
    assert w * h <= 300_000 and w * h > 290_000
    assert abs(w / h - 3.0) < 0.01
    assert loaded.original_size == (3000, 1000)
    assert loaded.notes == [f"wide.png was downscaled from 3000×1000 to {w}×{h} (limit 0.3 MP)."]


def test_large_jpeg_uses_reduced_decoding_and_still_reports_true_size(tmp_path):
    path = tmp_path / "camera.jpg"
    two_colour((4000, 3000)).save(path, quality=80)

    loaded = load_image(path, max_pixels=1_000_000)

    w, h = loaded.image.size
    assert w * h <= 1_000_000 and abs(w / h - 4 / 3) < 0.01
    assert loaded.original_size == (4000, 3000)
    assert "from 4000×3000" in loaded.notes[0]
    assert close(pixel(loaded.image, (10, h // 2)), (255, 0, 0), tol=20)


def test_small_image_is_left_alone(tmp_path):
    path = tmp_path / "small.png"
    Image.new("RGB", (640, 480)).save(path)
    loaded = load_image(path)
    assert loaded.image.size == (640, 480) and loaded.notes == []


def test_image_over_decode_pixel_cap_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(media.images, "MAX_DECODE_PIXELS", 10_000)
    path = tmp_path / "huge.png"
    Image.new("RGB", (200, 100)).save(path)
    with pytest.raises(MediaError, match=r"huge\.png is 200×100 pixels .* Resize it"):
        load_image(path)


# ----------------------------------------------------------------------------------------
# Images: errors the user can cause
# ----------------------------------------------------------------------------------------
def test_zero_byte_file_is_refused(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(MediaError, match=r"empty\.png is empty \(0 bytes\).*try attaching it again"):
        load_image(path)


def test_text_file_renamed_png_is_refused(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n" * 10)
    with pytest.raises(MediaError, match=r"notes\.png is not a valid image.*renamed"):
        load_image(path)


def test_truncated_png_is_refused(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(good)
    path = tmp_path / "cut.png"
    path.write_bytes(good.read_bytes()[:3000])
    with pytest.raises(MediaError, match=r"cut\.png could not be decoded.*damaged or incomplete"):
        load_image(path)


def test_image_over_file_size_cap_is_refused(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    with pytest.raises(MediaError, match=r"big\.png is .* over the 100 bytes limit for images\. Attach a smaller"):
        load_image(path, max_bytes=100)


def test_video_passed_to_load_image_is_refused(ten_second_mp4):
    with pytest.raises(MediaError, match="is a video, not an image"):
        load_image(ten_second_mp4)


# ----------------------------------------------------------------------------------------
# classify
# ----------------------------------------------------------------------------------------
def test_classify_uses_content_not_just_the_name(tmp_path, ten_second_mp4):
    png_named_jpg = tmp_path / "really_png.jpg"
    Image.new("RGB", (4, 4)).save(png_named_jpg, format="PNG")
    assert classify(png_named_jpg) == "image"
    assert classify(ten_second_mp4) == "video"


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("readme.txt", b"hello\n", r"readme\.txt is a text file"),
        ("paper.pdf", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", r"paper\.pdf looks like a PDF document"),
        ("song.mp3", b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(100), r"song\.mp3 looks like an MP3 audio file"),
        ("voice.wav", b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(100), r"voice\.wav looks like a WAV audio file"),
        ("clip.mp4", np.random.default_rng(1).bytes(4096), r"clip\.mp4 could not be read as a video"),
        ("blob.bin", b"\x00\x01\x02\x03" * 64, r"blob\.bin isn't a supported file type"),
    ],
)
def test_classify_refuses_other_files_with_a_helpful_message(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(MediaError, match=message) as err:
        classify(path)
    assert "Attach" in str(err.value) or "Re-export" in str(err.value)


def test_classify_missing_file(tmp_path):
    with pytest.raises(MediaError, match="file not found"):
        classify(tmp_path / "gone.png")


# ----------------------------------------------------------------------------------------
# Video: sampling
# ----------------------------------------------------------------------------------------
def test_writable_containers(tmp_path):
    """Documents which containers this OpenCV build can produce (all were, when written)."""
    writable = []
    for ext, fourcc in CONTAINERS:
        w = cv2.VideoWriter(str(tmp_path / f"probe_{fourcc}.{ext}"), cv2.VideoWriter_fourcc(*fourcc), 10.0, (W, H))
        if w.isOpened():
            writable.append(ext)
        w.release()
    assert "mp4" in writable  # the rest are skipped per test if missing


@pytest.mark.parametrize("ext, fourcc", CONTAINERS)
def test_one_fps_on_ten_seconds_at_ten_fps_gives_frames_at_0_to_9_s(tmp_path, ext, fourcc):
    path = write_video(tmp_path / f"ten.{ext}", 100, 10.0, fourcc)

    clip = load_video(path)

    assert_frames_are(clip, [0, 10, 20, 30, 40, 50, 60, 70, 80, 90], fps=10.0)
    assert clip.timestamps_s == pytest.approx([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert (clip.source_fps, clip.total_frames, clip.duration_s) == (10.0, 100, 10.0)
    assert clip.frames[0].shape == (H, W, 3)
    assert clip.notes == []


def test_higher_sampling_rate(ten_second_mp4):
    clip = load_video(ten_second_mp4, fps=2.0)
    assert_frames_are(clip, list(range(0, 100, 5)), fps=10.0)


def test_sampling_faster_than_the_source_gives_each_frame_once(tmp_path):
    path = write_video(tmp_path / "slow.mp4", 6, 2.0)  # 3 s at 2 fps
    clip = load_video(path, fps=5.0)
    assert_frames_are(clip, [0, 1, 2, 3, 4, 5], fps=2.0)


def test_long_clip_falls_back_to_32_frames_spread_over_the_whole_clip(hundred_second_mp4):
    clip = load_video(hundred_second_mp4)

    idx = clip.frame_indices
    assert len(idx) == 32 and idx[0] == 0 and idx[-1] == 999
    assert set(np.diff(idx)) <= {32, 33}  # evenly spaced: 999 / 31 = 32.2
    assert_frames_are(clip, idx, fps=10.0)
    assert clip.notes == [
        "hundred.mp4 is 01:40 long: 1 fps would give 100 frames, so 32 frames were taken "
        "evenly across the whole clip (one every 3.2 s)."
    ]


def test_lower_max_frames_is_honoured(ten_second_mp4):
    clip = load_video(ten_second_mp4, max_frames=4)
    assert_frames_are(clip, [0, 33, 66, 99], fps=10.0)
    assert "4 frames were taken evenly" in clip.notes[0]


def test_max_frames_cannot_exceed_32(ten_second_mp4):
    with pytest.raises(ValueError, match="between 1 and 32"):
        load_video(ten_second_mp4, max_frames=33)


@pytest.mark.parametrize("ext, fourcc", CONTAINERS)
def test_seeking_lands_on_the_exact_frame(tmp_path, monkeypatch, ext, fourcc):
    """Long gaps are crossed by seeking; force it everywhere and check each frame's content."""
    path = write_video(tmp_path / f"long.{ext}", 1000, 10.0, fourcc)
    monkeypatch.setattr(media.video, "SEEK_MIN_GAP_FRAMES", 1)
    seeks = []
    real_open = media.video._open_capture

    def spying_open(p):
        cap = real_open(p)
        real_set = cap.set

        class Spy:
            def set(self, prop, value):
                seeks.append(value)
                return real_set(prop, value)

            def __getattr__(self, name):
                return getattr(cap, name)

        return Spy()

    monkeypatch.setattr(media.video, "_open_capture", spying_open)

    clip = load_video(path, max_frames=7)

    assert seeks == [167, 333, 500, 666, 833, 999]  # every gap crossed by a seek, none abandoned
    assert_frames_are(clip, [0, 167, 333, 500, 666, 833, 999], fps=10.0)  # 999/6 = 166.5 apart


def test_large_frames_are_downscaled_with_a_note(tmp_path):
    path = write_video(tmp_path / "hd.mp4", 20, 10.0, size=(640, 480))

    clip = load_video(path, max_pixels=50_000)

    h, w = clip.frames[0].shape[:2]
    assert w * h <= 50_000 and abs(w / h - 4 / 3) < 0.02
    assert_frames_are(clip, [0, 10], fps=10.0)
    assert clip.notes == [f"hd.mp4: frames downscaled from 640×480 to {w}×{h}."]


# ----------------------------------------------------------------------------------------
# Video: containers that don't report fps or frame count
# ----------------------------------------------------------------------------------------
class HeaderlessCapture:
    """A real capture whose container header claims no frame count and/or no fps."""

    def __init__(self, real, fps, count, pos_msec=True):
        self.real, self.fps, self.count, self.pos_msec = real, fps, count, pos_msec

    def get(self, prop):
        if prop == cv2.CAP_PROP_FPS:
            return self.fps
        if prop == cv2.CAP_PROP_FRAME_COUNT:
            return self.count
        if prop == cv2.CAP_PROP_POS_MSEC and not self.pos_msec:
            return 0.0
        return self.real.get(prop)

    def __getattr__(self, name):
        return getattr(self.real, name)


def headerless(monkeypatch, **kw):
    real_open = media.video._open_capture
    monkeypatch.setattr(media.video, "_open_capture", lambda p: HeaderlessCapture(real_open(p), **kw))


def test_missing_frame_count_is_found_by_counting(ten_second_mp4, monkeypatch):
    headerless(monkeypatch, fps=10.0, count=0)
    clip = load_video(ten_second_mp4)
    assert clip.total_frames == 100
    assert_frames_are(clip, list(range(0, 100, 10)), fps=10.0)


@pytest.mark.parametrize("bad_fps", [0.0, float("nan")])
def test_missing_fps_is_estimated_from_frame_times_with_a_note(ten_second_mp4, monkeypatch, bad_fps):
    headerless(monkeypatch, fps=bad_fps, count=-1)
    clip = load_video(ten_second_mp4)
    assert clip.source_fps == pytest.approx(10.0)
    assert clip.total_frames == 100
    assert clip.frame_indices == list(range(0, 100, 10))
    assert clip.notes == ["ten.mp4 doesn't report its frame rate; estimated 10.00 fps from frame times."]


def test_fps_that_cannot_be_determined_is_refused(ten_second_mp4, monkeypatch):
    headerless(monkeypatch, fps=float("nan"), count=0, pos_msec=False)
    with pytest.raises(MediaError, match=r"ten\.mp4 doesn't say its frame rate and it couldn't be worked out"):
        load_video(ten_second_mp4)


# ----------------------------------------------------------------------------------------
# Video: errors the user can cause
# ----------------------------------------------------------------------------------------
def test_video_with_no_decodable_frames_is_refused(tmp_path):
    path = write_video(tmp_path / "nothing.avi", 0, 10.0, "MJPG")  # header only
    assert path.stat().st_size > 0
    with pytest.raises(MediaError, match=r"nothing\.avi contains no frames that could be decoded"):
        load_video(path)


def test_corrupt_bytes_named_mp4_are_refused(tmp_path):
    path = tmp_path / "holiday.mp4"
    path.write_bytes(np.random.default_rng(2).bytes(10_000))
    with pytest.raises(MediaError, match=r"holiday\.mp4 could not be read as a video.*Re-export it as MP4"):
        load_video(path)


def test_truncated_mp4_is_refused(tmp_path, ten_second_mp4):
    """OpenCV writes the index (moov) last, so a cut-short upload can't be opened at all."""
    path = tmp_path / "partial.mp4"
    path.write_bytes(ten_second_mp4.read_bytes()[: ten_second_mp4.stat().st_size // 2])
    with pytest.raises(MediaError, match=r"partial\.mp4 could not be opened as a video"):
        load_video(path)


def test_zero_byte_video_is_refused(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(MediaError, match=r"empty\.mp4 is empty"):
        load_video(path)


def test_video_over_file_size_cap_is_refused(ten_second_mp4):
    with pytest.raises(MediaError, match=r"ten\.mp4 is .* over the 1\.0 KiB limit for videos"):
        load_video(ten_second_mp4, max_bytes=1024)


def test_video_over_duration_cap_is_refused(ten_second_mp4):
    with pytest.raises(MediaError, match=r"ten\.mp4 is 00:10 long, over the 00:05 limit\. Trim it"):
        load_video(ten_second_mp4, max_duration_s=5)


def test_image_passed_to_load_video_is_refused(tmp_path):
    path = tmp_path / "still.png"
    Image.new("RGB", (8, 8)).save(path)
    with pytest.raises(MediaError, match="is an image, not a video"):
        load_video(path)


# ----------------------------------------------------------------------------------------
# Handing frames to the model and the UI
# ----------------------------------------------------------------------------------------
def test_vllm_metadata_has_the_keys_vllm_loaders_produce(ten_second_mp4):
    """Same keys as vllm/multimodal/video.py VideoLoader.create_hf_metadata (vLLM 0.26)."""
    frames, meta = load_video(ten_second_mp4).vllm_video_item()
    assert frames.shape == (10, H, W, 3) and frames.dtype == np.uint8
    assert meta == {
        "total_num_frames": 100,
        "fps": 10.0,
        "duration": 10.0,
        "video_backend": "opencv",
        "frames_indices": [0, 10, 20, 30, 40, 50, 60, 70, 80, 90],
        "do_sample_frames": False,
    }


def test_hf_metadata_builds_transformers_video_metadata_with_our_timestamps(ten_second_mp4):
    video_utils = pytest.importorskip("transformers.video_utils")
    clip = load_video(ten_second_mp4)
    meta = video_utils.VideoMetadata(**clip.hf_metadata())
    assert meta.timestamps == pytest.approx(clip.timestamps_s)
    assert (meta.width, meta.height) == (W, H)


def test_thumbnails_are_labelled_mm_ss(hundred_second_mp4):
    thumbs = load_video(hundred_second_mp4, max_frames=3).thumbnails(height=32)
    assert [label for _, label in thumbs] == ["00:00", "00:50", "01:39"]  # frames 0, 500, 999 at 10 fps
    assert all(t.size == (48, 32) for t, _ in thumbs)


def test_contact_sheet_is_one_image_of_all_frames(ten_second_mp4):
    sheet = load_video(ten_second_mp4).contact_sheet(height=32, columns=4)
    assert sheet.mode == "RGB"
    assert sheet.width >= 4 * 48 and sheet.height >= 3 * 32  # 10 frames -> 4 x 3 grid


@pytest.mark.parametrize("seconds, text", [(0, "00:00"), (9.99, "00:09"), (61, "01:01"), (600, "10:00")])
def test_timestamps_are_formatted_like_gemma_4(seconds, text):
    assert media.format_timestamp(seconds) == text


def test_sample_frame_indices_handles_fractional_source_rates():
    """29.97 fps at 1 fps: nearest frame to each whole second."""
    assert media.sample_frame_indices(300, 29.97, 1.0, 32) == [0, 30, 60, 90, 120, 150, 180, 210, 240, 270]
    assert media.sample_frame_indices(0, 30.0, 1.0, 32) == []
    assert math.isclose(len(media.sample_frame_indices(10_000, 30.0, 1.0, 32)), 32)


# ----------------------------------------------------------------------------------------
# The layer: chat and engine import media; media imports neither
# ----------------------------------------------------------------------------------------
MEDIA_DIR = Path(media.__file__).resolve().parent
ROOT = MEDIA_DIR.parent
# The project's own top-level modules and packages, media aside: app, bench, chat, engine, nvfp4, patches, tests.
OURS = {p.stem for p in ROOT.glob("*.py")} | {p.parent.name for p in ROOT.glob("*/*.py")}
OURS = {name for name in OURS if not name.startswith(".")} - {"media"}


def test_media_imports_nothing_of_the_project_above_it():
    """Every import in media/, at the top or inside a function: none reaches chat, engine or any other of ours."""
    assert {"chat", "engine", "app"} <= OURS
    for path in sorted(MEDIA_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []  # relative: inside media
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in OURS, f"media/{path.name} imports {name}"


def test_importing_every_media_module_loads_neither_chat_nor_engine():
    code = (
        "import pkgutil, sys, importlib, media\n"
        "for m in pkgutil.iter_modules(media.__path__): importlib.import_module('media.' + m.name)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(OURS)!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
