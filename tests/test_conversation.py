from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from PIL import Image

from chat.conversation import (
    MediaLimits,
    Reply,
    ReplyStats,
    Turn,
    UnsupportedContent,
    build_prompt,
    format_details,
    format_stats,
    turns_from_history,
)
from engine.base import Delta, Metrics
from engine.settings import EngineSettings
from media import VideoClip
from tests.test_media import write_video


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def test_normalized_history_becomes_openai_messages_after_the_system_prompt():
    history = [
        {"role": "user", "content": [text("Hi")], "metadata": None, "options": None},
        {"role": "assistant", "content": [text("Hello!")], "metadata": None, "options": None},
    ]
    messages = build_prompt(history, {"text": "How are you?", "files": []}, "  Be brief.  ").messages
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
    ]


def test_an_edited_message_comes_back_as_a_bare_string():
    history = [{"role": "user", "content": [text("Hi")]}, {"role": "assistant", "content": [text("Hello")]}]
    assert build_prompt(history, "Bye").messages[-1] == {"role": "user", "content": "Bye"}


def test_blank_system_prompt_is_left_out():
    assert build_prompt([], {"text": "Hi", "files": []}, " \n").messages == [{"role": "user", "content": "Hi"}]


def test_ui_annotations_never_reach_the_model():
    history = [
        {"role": "user", "content": [text("Q")]},
        {"role": "assistant", "content": [text("let me think")], "metadata": {"title": "Thinking", "status": "done"}},
        {"role": "assistant", "content": [text("A")], "metadata": {}},
        {"role": "assistant", "content": [text("prompt 3 tokens")], "metadata": {"title": "TTFT 0.10 s · 3 tokens"}},
    ]
    assert build_prompt(history, {"text": "Q2"}).messages == [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "Q2"},
    ]


def test_every_content_shape_gradio_hands_over_is_read():
    # ChatInterface's API path keeps un-normalized history: bare strings, lists of strings, typed parts.
    history = [
        {"role": "user", "content": "plain"},
        {"role": "assistant", "content": ["a", "b"]},
        {"role": "user", "content": [{"path": "/tmp/cat.png"}, "look"]},
        {"role": "user", "content": [{"type": "file", "file": {"path": "/tmp/dog.mp4"}}]},
    ]
    assert turns_from_history(history) == [
        Turn("user", "plain"),
        Turn("assistant", "a\n\nb"),
        Turn("user", "look", ["/tmp/cat.png", "/tmp/dog.mp4"]),
    ]


def test_consecutive_user_messages_merge_so_roles_alternate():
    # A message sent while the engine was loading stays in the chat; the next one joins it.
    history = [
        {"role": "user", "content": [text("first")]},
        {"role": "assistant", "content": [text("still loading")], "metadata": {"title": "⏳ loading"}},
    ]
    prompt = build_prompt(history, {"text": "second", "files": []})
    assert prompt.messages == [{"role": "user", "content": "first\n\nsecond"}]


def test_empty_messages_are_dropped_before_merging():
    history = [
        {"role": "user", "content": [text("Q")]},
        {"role": "assistant", "content": []},  # a reply stopped before its first word
        {"role": "user", "content": [text("Q2")]},
        {"role": "assistant", "content": [text("")]},
    ]
    assert turns_from_history(history) == [Turn("user", "Q\n\nQ2")]


def image_file(path: Path, size: tuple[int, int] = (64, 48)) -> str:
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return str(path)


def user_files(*paths: str, text: str = "") -> dict:
    """A user message with attachments, as Gradio's chatbot hands it back in the history."""
    files = [{"type": "file", "file": {"path": p}} for p in paths]
    return {"role": "user", "content": [*files, *([{"type": "text", "text": text}] if text else [])]}


def part_types(message: dict) -> list[str]:
    return [part["type"] for part in message["content"]]


def test_an_image_becomes_an_image_part_before_the_text(tmp_path):
    prompt = build_prompt([], {"text": "What is this?", "files": [image_file(tmp_path / "cat.png")]})
    [message] = prompt.messages
    image, question = message["content"]
    assert image["type"] == "image" and image["image"].mode == "RGB" and image["image"].size == (64, 48)
    assert question == {"type": "text", "text": "What is this?"}
    assert prompt.notes == [] and prompt.videos == []


def test_a_video_becomes_a_video_part_and_is_listed_for_the_user(tmp_path):
    path = write_video(tmp_path / "clip.mp4", 40, 10.0)  # 4 s at 10 fps
    prompt = build_prompt([], {"text": "", "files": [str(path)]}, limits=MediaLimits(video_fps=2.0))
    [part] = prompt.messages[0]["content"]  # no text: the video alone
    clip = part["video"]
    assert isinstance(clip, VideoClip) and clip.timestamps_s == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]
    assert prompt.videos == [("clip.mp4", clip)]


def test_the_frame_cap_spreads_the_frames_over_the_clip(tmp_path):
    path = write_video(tmp_path / "clip.mp4", 40, 10.0)
    prompt = build_prompt([], {"text": "", "files": [str(path)]}, limits=MediaLimits(max_video_frames=3))
    [(_, clip)] = prompt.videos
    assert clip.frame_indices == [0, 20, 39]
    assert "3 frames were taken evenly across the whole clip" in clip.notes[0]


def test_earlier_images_stay_in_the_conversation(tmp_path):
    cat = image_file(tmp_path / "cat.png")
    history = [user_files(cat, text="What is this?"), {"role": "assistant", "content": "A red square."}]
    prompt = build_prompt(history, {"text": "And its colour?", "files": []})
    assert [m["role"] for m in prompt.messages] == ["user", "assistant", "user"]
    assert part_types(prompt.messages[0]) == ["image", "text"]
    assert prompt.messages[2] == {"role": "user", "content": "And its colour?"}


def test_a_retried_message_brings_its_files_as_dicts(tmp_path):
    # ChatInterface's retry hands back the files of the popped message as FileData dicts.
    prompt = build_prompt([], {"text": "again", "files": [{"path": image_file(tmp_path / "cat.png"), "url": None}]})
    assert part_types(prompt.messages[0]) == ["image", "text"]


def test_only_the_new_messages_attachments_are_reported(tmp_path):
    big = image_file(tmp_path / "big.png", (4200, 1050))  # over the 4 MP cap
    clip = str(write_video(tmp_path / "clip.mp4", 20, 10.0))
    prompt = build_prompt([], {"text": "", "files": [big, clip]})
    assert len(prompt.notes) == 1 and prompt.notes[0].startswith("big.png was downscaled from 4200×1050 to ")
    assert [name for name, _ in prompt.videos] == ["clip.mp4"]
    later = build_prompt([user_files(big, clip), {"role": "assistant", "content": "ok"}], {"text": "more"})
    assert part_types(later.messages[0]) == ["image", "video"]
    assert later.notes == [] and later.videos == []


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.png", b"", "empty.png is empty (0 bytes)"),
        ("notes.txt", b"just some text\n", "notes.txt is a text file"),
        ("broken.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "broken.png could not be decoded"),
    ],
)
def test_a_new_file_the_model_cannot_take_is_refused_with_its_reason(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UnsupportedContent, match=re.escape(message)):
        build_prompt([], {"text": "what is this?", "files": [str(path)]})


def test_more_images_than_a_prompt_takes_are_refused(tmp_path):
    cats = [image_file(tmp_path / f"cat{i}.png") for i in range(3)]
    with pytest.raises(UnsupportedContent, match="3 images attached: at most 2 go in one message"):
        build_prompt([], {"text": "", "files": cats}, limits=MediaLimits(max_images=2))


def test_earlier_attachments_over_the_limit_are_left_out_oldest_first(tmp_path):
    old, mid, new = (image_file(tmp_path / f"{name}.png") for name in ("old", "mid", "new"))
    history = [
        user_files(old, text="one"),
        {"role": "assistant", "content": "1"},
        user_files(mid, text="two"),
        {"role": "assistant", "content": "2"},
    ]
    prompt = build_prompt(history, {"text": "three", "files": [new]}, limits=MediaLimits(max_images=2))
    assert prompt.messages[0] == {"role": "user", "content": "one"}  # its text stays
    assert part_types(prompt.messages[2]) == part_types(prompt.messages[4]) == ["image", "text"]
    assert prompt.notes == [
        "Left out to stay within 2 images and 1 video(s) per prompt: the earlier attachments old.png."
    ]


def test_an_earlier_file_that_no_longer_loads_is_left_out_with_a_note(tmp_path):
    history = [user_files(str(tmp_path / "gone.png"), text="look"), {"role": "assistant", "content": "nice"}]
    prompt = build_prompt(history, {"text": "and now?"})
    assert prompt.messages[0] == {"role": "user", "content": "look"}
    assert prompt.notes == ["An earlier attachment was left out: gone.png: file not found. Try attaching it again."]


def test_a_refused_upload_keeps_its_text_for_the_next_message(tmp_path):
    # The refused message stays in the chat, the UI's titled note after it, and joins the next one.
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    history = [
        user_files(str(empty), text="what is this?"),
        {"role": "assistant", "content": "empty.png is empty", "metadata": {"title": "⚠️ empty.png is empty"}},
    ]
    prompt = build_prompt(history, {"text": "this one", "files": [image_file(tmp_path / "cat.png")]})
    [message] = prompt.messages
    assert part_types(message) == ["image", "text"]
    assert message["content"][1]["text"] == "what is this?\n\nthis one"
    assert prompt.notes[0].startswith("An earlier attachment was left out: empty.png is empty")


def test_media_limits_come_from_the_engine_settings():
    settings = EngineSettings(max_images_per_prompt=3, max_videos_per_prompt=2, max_video_frames=8, video_fps=0.5)
    assert MediaLimits.from_settings(settings) == MediaLimits(3, 2, 8, 0.5)


def test_unknown_content_is_refused():
    with pytest.raises(UnsupportedContent):
        turns_from_history([{"role": "user", "content": [object()]}])


def test_reply_accumulates_deltas_and_times_the_thinking():
    reply = Reply()
    reply.add(Delta(reasoning="hmm ", metrics=Metrics(ttft_s=0.2, output_tokens=1, elapsed_s=0.2)))
    assert reply.thinking and reply.reasoning_s is None
    reply.add(Delta(reasoning="ok", metrics=Metrics(ttft_s=0.2, output_tokens=2, elapsed_s=0.3)))
    reply.add(Delta(text="Answer", metrics=Metrics(ttft_s=0.2, output_tokens=3, elapsed_s=0.5)))
    assert not reply.thinking and reply.reasoning_s == 0.5
    reply.add(Delta(text=".", finish_reason="stop", metrics=Metrics(0.2, 7, 4, 20.0, 0.6)))
    assert (reply.text, reply.reasoning) == ("Answer.", "hmm ok")
    assert reply.stats == ReplyStats(0.2, 20.0, 4, 7, 0.6, "stop")


def test_ttft_runs_on_the_apps_clock_from_the_moment_the_message_arrived():
    received = time.monotonic() - 0.5  # the app spent 0.5 s on the message (say, decoding a video) before vLLM
    reply = Reply(received=received)
    reply.add(Delta(metrics=Metrics(ttft_s=0.05, output_tokens=0)))  # no token yet: no TTFT
    assert reply.first_token_s is None
    reply.add(Delta(text="Hi", metrics=Metrics(ttft_s=0.05, output_tokens=1)))
    assert 0.5 <= reply.ttft_s < 5 and reply.stats.ttft_s == reply.ttft_s
    first = reply.ttft_s
    reply.add(Delta(text="!", metrics=Metrics(ttft_s=0.05, output_tokens=2)))
    assert reply.ttft_s == first
    # A reply restored from the history has no arrival time: it shows the TTFT it was saved with.
    assert Reply(metrics=Metrics(ttft_s=0.05)).ttft_s == 0.05


def test_reply_without_thinking_has_no_thinking_time():
    reply = Reply()
    reply.add(Delta(text="Hi", metrics=Metrics(ttft_s=0.1, output_tokens=1)))
    assert reply.reasoning_s is None and not reply.thinking


def test_format_stats():
    assert format_stats(ReplyStats(0.1234, 45.26, 128, 10, 3.0, "stop")) == "TTFT 0.12 s · 45.3 tok/s · 128 tokens"
    # One token: no decode rate yet.
    assert format_stats(ReplyStats(0.5, None, 1, 10, 0.5, "length")) == "TTFT 0.50 s · 1 token"


def test_format_details_names_the_finish_reason():
    stats = ReplyStats(0.1, 40.0, 128, 31, 3.456, "length")
    assert format_details(stats) == "prompt 31 tokens · 3.46 s in all · hit the token limit"
    assert format_details(ReplyStats(0.1, None, 2, 3, 1.0, None)).endswith("unfinished")
