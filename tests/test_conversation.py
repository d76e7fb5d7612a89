from __future__ import annotations

import pytest

from chat.conversation import (
    Reply,
    ReplyStats,
    Turn,
    UnsupportedContent,
    build_messages,
    format_details,
    format_stats,
    turns_from_history,
)
from engine.base import Delta, Metrics


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def test_normalized_history_becomes_openai_messages_after_the_system_prompt():
    history = [
        {"role": "user", "content": [text("Hi")], "metadata": None, "options": None},
        {"role": "assistant", "content": [text("Hello!")], "metadata": None, "options": None},
    ]
    messages = build_messages(history, {"text": "How are you?", "files": []}, "  Be brief.  ")
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
    ]


def test_an_edited_message_comes_back_as_a_bare_string():
    history = [{"role": "user", "content": [text("Hi")]}, {"role": "assistant", "content": [text("Hello")]}]
    assert build_messages(history, "Bye")[-1] == {"role": "user", "content": "Bye"}


def test_blank_system_prompt_is_left_out():
    assert build_messages([], {"text": "Hi", "files": []}, " \n") == [{"role": "user", "content": "Hi"}]


def test_ui_annotations_never_reach_the_model():
    history = [
        {"role": "user", "content": [text("Q")]},
        {"role": "assistant", "content": [text("let me think")], "metadata": {"title": "Thinking", "status": "done"}},
        {"role": "assistant", "content": [text("A")], "metadata": {}},
        {"role": "assistant", "content": [text("prompt 3 tokens")], "metadata": {"title": "TTFT 0.10 s · 3 tokens"}},
    ]
    assert build_messages(history, {"text": "Q2"}) == [
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
    assert build_messages(history, {"text": "second", "files": []}) == [{"role": "user", "content": "first\n\nsecond"}]


def test_empty_messages_are_dropped_before_merging():
    history = [
        {"role": "user", "content": [text("Q")]},
        {"role": "assistant", "content": []},  # a reply stopped before its first word
        {"role": "user", "content": [text("Q2")]},
        {"role": "assistant", "content": [text("")]},
    ]
    assert turns_from_history(history) == [Turn("user", "Q\n\nQ2")]


def test_attachments_are_refused_with_a_clear_message():
    with pytest.raises(UnsupportedContent, match="cat.png"):
        build_messages([], {"text": "what is this?", "files": ["/tmp/x/cat.png"]})


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
