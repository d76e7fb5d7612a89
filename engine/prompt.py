"""Chat messages -> prompt text, always through the checkpoint's own chat template."""

from __future__ import annotations

from typing import Any

import jinja2

from engine.base import EngineError


def render_chat(template_owner: Any, messages: list[dict[str, Any]], *, enable_thinking: bool) -> str:
    """Render `messages` plus the generation prompt with the template of a tokenizer or processor.

    Gemma 4's template turns `enable_thinking` into a `<|think|>` system line; with it off, the generation
    prompt ends in an empty, closed thought channel.
    """
    if not getattr(template_owner, "chat_template", None):
        raise EngineError("The checkpoint has no chat template (chat_template.jinja or tokenizer_config.json).")
    try:
        return template_owner.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, enable_thinking=enable_thinking
        )
    except jinja2.TemplateError as e:  # the template's raise_exception(), e.g. roles out of order
        raise EngineError(f"The chat template rejected this conversation: {e}") from e


def content_parts(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A message's content as a list of parts, so callers handle text and media one way."""
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def take_media(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any], list[Any]]:
    """Messages with image/video parts replaced by bare placeholders for the chat template, plus the images
    (PIL) and video clips (chat.media.VideoClip) they held, in prompt order."""
    images: list[Any] = []
    videos: list[Any] = []
    rendered: list[dict[str, Any]] = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            rendered.append(message)
            continue
        parts = []
        for part in content:
            if part["type"] == "image":
                images.append(part["image"])
                parts.append({"type": "image"})
            elif part["type"] == "video":
                videos.append(part["video"])
                parts.append({"type": "video"})
            else:
                parts.append(part)
        rendered.append({**message, "content": parts})
    return rendered, images, videos
