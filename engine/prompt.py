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


# Gemma 4's media placeholders: only attachments may put them into a prompt. Typed by a user, or written by
# the model into an earlier reply, they would make the processor look for media that is not there.
MEDIA_PLACEHOLDERS = ("<|image|>", "<|video|>", "<|audio|>")


def without_placeholders(text: str) -> str:
    for placeholder in MEDIA_PLACEHOLDERS:
        text = text.replace(placeholder, "")
    return text


def take_media(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any], list[Any]]:
    """Messages with image/video parts replaced by bare placeholders for the chat template, plus the images
    (PIL) and video clips (media.VideoClip) they held, in prompt order. Placeholders in the text are
    dropped, so the template's are the only ones."""
    images: list[Any] = []
    videos: list[Any] = []
    rendered: list[dict[str, Any]] = []
    for message in messages:
        parts = []
        for part in content_parts(message["content"]):
            if part["type"] == "image":
                images.append(part["image"])
                parts.append({"type": "image"})
            elif part["type"] == "video":
                videos.append(part["video"])
                parts.append({"type": "video"})
            elif part["type"] == "text":
                parts.append({**part, "text": without_placeholders(part["text"])})
            else:
                parts.append(part)
        content = message["content"]
        rendered.append({**message, "content": parts[0]["text"] if isinstance(content, str) else parts})
    return rendered, images, videos
