"""render_chat: the checkpoint's own Gemma 4 template turns messages into the prompt text."""

from __future__ import annotations

import pytest
from transformers import AutoProcessor, AutoTokenizer

from engine.base import EngineError
from engine.prompt import content_parts, render_chat

HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_thinking_off_ends_the_prompt_in_an_empty_closed_thought(tokenizer):
    prompt = render_chat(tokenizer, HELLO, enable_thinking=False)
    assert prompt == "<bos><|turn>user\nHello there<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"


def test_thinking_on_adds_the_think_line_and_leaves_the_channel_to_the_model(tokenizer):
    prompt = render_chat(tokenizer, HELLO, enable_thinking=True)
    assert prompt == "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHello there<turn|>\n<|turn>model\n"


def test_past_thoughts_are_stripped_from_the_history_and_text_parts_render_like_strings(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "<|channel>thought\nhm<channel|>Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    prompt = render_chat(tokenizer, messages, enable_thinking=False)
    assert prompt == (
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\nHello!<turn|>\n"
        "<|turn>user\nBye<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    )


def test_a_processor_renders_the_same_prompt(tiny_vision_model_dir, tokenizer):
    processor = AutoProcessor.from_pretrained(tiny_vision_model_dir)
    assert render_chat(processor, HELLO, enable_thinking=True) == render_chat(tokenizer, HELLO, enable_thinking=True)


def test_a_checkpoint_without_a_template_is_a_clear_error(tokenizer):
    bare = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    bare.chat_template = None
    with pytest.raises(EngineError, match="no chat template"):
        render_chat(bare, HELLO, enable_thinking=False)


def test_a_template_error_reaches_the_user(tokenizer):
    strict = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    strict.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(EngineError, match="roles must alternate"):
        render_chat(strict, HELLO, enable_thinking=False)


def test_content_parts():
    assert content_parts("hi") == [{"type": "text", "text": "hi"}]
    parts = [{"type": "text", "text": "hi"}, {"type": "image", "image": None}]
    assert content_parts(parts) is parts


def test_media_placeholders_in_text_are_dropped_so_only_attachments_make_them():
    from engine.prompt import take_media

    image = object()
    messages = [
        {"role": "user", "content": "what does <|image|> mean?"},
        {"role": "assistant", "content": "a token<|video|>"},
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "and <|audio|>?"}]},
    ]
    rendered, images, videos = take_media(messages)
    assert rendered[0]["content"] == "what does  mean?"
    assert rendered[1]["content"] == "a token"
    assert rendered[2]["content"] == [{"type": "image"}, {"type": "text", "text": "and ?"}]
    assert (images, videos) == ([image], [])
