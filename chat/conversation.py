"""Conversation state without Gradio: what the chat history means to the model, and each reply's stats.

The chatbot's history is the source of truth (Gradio edits it for undo, retry and edit). Assistant messages
that carry a metadata title are the UI's own annotations (the collapsed "Thinking" block, the stats line,
error notes, the frames seen of a video) and never reach the model: Gemma 4 wants earlier turns without their
thoughts. Attachments are read again from their files on every turn, so earlier images stay in the conversation.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import media
from engine.base import Delta, Metrics
from engine.settings import EngineSettings
from media import MediaError, MediaKind, VideoClip

Role = Literal["user", "assistant"]


class UnsupportedContent(ValueError):
    """History content the model cannot take, worded for the user."""


@dataclass
class Turn:
    """One message as the model sees it."""

    role: Role
    text: str = ""
    files: list[str] = field(default_factory=list)  # server paths of the user's attachments


@dataclass(frozen=True)
class ReplyStats:
    ttft_s: float | None
    decode_tok_s: float | None
    output_tokens: int
    prompt_tokens: int
    elapsed_s: float
    finish_reason: str | None

    @classmethod
    def from_metrics(
        cls, metrics: Metrics, finish_reason: str | None = None, ttft_s: float | None = None
    ) -> ReplyStats:
        return cls(
            ttft_s=metrics.ttft_s if ttft_s is None else ttft_s,
            decode_tok_s=metrics.decode_tok_s,
            output_tokens=metrics.output_tokens,
            prompt_tokens=metrics.prompt_tokens,
            elapsed_s=metrics.elapsed_s,
            finish_reason=finish_reason,
        )


@dataclass
class Reply:
    """The assistant turn being streamed: its answer, its reasoning and how fast it came."""

    text: str = ""
    reasoning: str = ""
    metrics: Metrics = field(default_factory=Metrics)
    finish_reason: str | None = None
    reasoning_s: float | None = None  # time to the first answer text after thinking; None while thinking
    error: str | None = None
    # time.monotonic() when the message reached the server (chat.arrival stamps the HTTP request): TTFT then counts
    # Gradio's queue and what the app does before the engine (media, chat template, context check), as the
    # user waits for those too
    received: float | None = None
    first_token_s: float | None = None

    def add(self, delta: Delta) -> None:
        if self.received is not None and self.first_token_s is None and delta.metrics.output_tokens:
            self.first_token_s = time.monotonic() - self.received
        self.reasoning += delta.reasoning
        if delta.text and self.reasoning and self.reasoning_s is None:
            self.reasoning_s = delta.metrics.elapsed_s
        self.text += delta.text
        self.metrics = delta.metrics
        self.finish_reason = delta.finish_reason or self.finish_reason

    @property
    def thinking(self) -> bool:
        """Still in the reasoning phase: thoughts so far, no answer yet, not finished."""
        return bool(self.reasoning) and not self.text and self.finish_reason is None

    @property
    def ttft_s(self) -> float | None:
        """Message received -> first token, on the app's clock; the engine's own TTFT for a restored reply."""
        return self.metrics.ttft_s if self.first_token_s is None else self.first_token_s

    @property
    def stats(self) -> ReplyStats:
        return ReplyStats.from_metrics(self.metrics, self.finish_reason, self.ttft_s)


def message_parts(content: Any) -> tuple[str, list[str], list[Any]]:
    """A chat message's text, its file paths, and whatever else it holds, in every shape Gradio 6 hands over:
    a string, or a list of strings, {"type": "text"} and {"type": "file"} parts, or {"path": ...} dicts (what
    ChatInterface appends before normalizing)."""
    texts: list[str] = []
    files: list[str] = []
    others: list[Any] = []
    for item in content if isinstance(content, list) else [content]:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, Mapping) and item.get("type") == "text":
            texts.append(item["text"])
        elif isinstance(item, Mapping) and item.get("type") == "file":
            files.append(item["file"]["path"])
        elif isinstance(item, Mapping) and "path" in item:
            files.append(item["path"])
        else:
            others.append(item)
    return "\n\n".join(t for t in texts if t), files, others


def turns_from_history(history: Sequence[Mapping[str, Any]]) -> list[Turn]:
    """The model's view of a Gradio chat history, consecutive messages of one role merged into one turn."""
    turns: list[Turn] = []
    for message in history:
        role = message["role"]
        if role not in ("user", "assistant"):
            continue
        metadata = message.get("metadata") or {}
        if role == "assistant" and metadata.get("title"):
            continue
        text, files, others = message_parts(message["content"])
        if others:
            raise UnsupportedContent(f"a {type(others[0]).__name__} in the chat cannot be sent to the model")
        if not text and not files:
            continue
        if turns and turns[-1].role == role:
            turns[-1].text = "\n\n".join(t for t in (turns[-1].text, text) if t)
            turns[-1].files += files
        else:
            turns.append(Turn(role, text, files))
    return turns


@dataclass(frozen=True)
class MediaLimits:
    """How many attachments one prompt may hold (vLLM is started with the same limits) and how videos are sampled."""

    max_images: int = 8
    max_videos: int = 1
    max_video_frames: int = media.MAX_VIDEO_FRAMES
    video_fps: float = media.DEFAULT_VIDEO_FPS

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> MediaLimits:
        return cls(
            max_images=settings.max_images_per_prompt,
            max_videos=settings.max_videos_per_prompt,
            max_video_frames=settings.max_video_frames,
            video_fps=settings.video_fps,
        )


@dataclass
class Prompt:
    """The conversation as the model gets it, and what the user should be told about the new attachments."""

    messages: list[dict[str, Any]]  # OpenAI-style, for GenerationRequest
    notes: list[str] = field(default_factory=list)  # downscaled images, GIF first frames, attachments left out
    videos: list[tuple[str, VideoClip]] = field(default_factory=list)  # the new message's videos by file name


def build_prompt(
    history: Sequence[Mapping[str, Any]],
    message: Mapping[str, Any] | str,
    system_prompt: str = "",
    limits: MediaLimits = MediaLimits(),
) -> Prompt:
    """The system prompt, the history, then the new message, with every attachment loaded as an image or video.

    `message` is the multimodal textbox value, {"text": str, "files": [path or {"path": ...}, ...]}, or a bare
    string (what ChatInterface resubmits after the user edits a message). A problem with the new message's
    files raises UnsupportedContent; earlier attachments that no longer load, or that would go over the
    per-prompt limits (oldest first), are left out with a note.
    """
    if isinstance(message, str):
        message = {"text": message}
    files = [f if isinstance(f, str) else f["path"] for f in message.get("files") or []]
    new = {"role": "user", "content": [message.get("text") or "", *({"path": p} for p in files)]}
    turns = turns_from_history([*history, new])
    # The new message's files are the last ones: it is the last turn, or merged onto the end of it.
    attachments = [(t, i) for t, turn in enumerate(turns) for i in range(len(turn.files))]
    fresh = set(attachments[len(attachments) - len(files) :])
    prompt = Prompt([])
    kinds = _pick_media(turns, attachments, fresh, limits, prompt.notes)
    if system_prompt.strip():
        prompt.messages.append({"role": "system", "content": system_prompt.strip()})
    for t, turn in enumerate(turns):
        parts: list[dict[str, Any]] = []
        for i, path in enumerate(turn.files):
            if (t, i) in kinds:
                parts += _load(path, kinds[t, i], (t, i) in fresh, limits, prompt)
        if not parts:
            prompt.messages.append({"role": turn.role, "content": turn.text})
            continue
        # Media before the text, as Gemma 4's model card advises.
        text = [{"type": "text", "text": turn.text}] if turn.text else []
        prompt.messages.append({"role": turn.role, "content": parts + text})
    return prompt


def _pick_media(
    turns: list[Turn],
    attachments: list[tuple[int, int]],
    fresh: set[tuple[int, int]],
    limits: MediaLimits,
    notes: list[str],
) -> dict[tuple[int, int], MediaKind]:
    """The kind of each attachment that goes to the model: every one of the new message's, then earlier ones,
    newest first, while the limits allow."""
    kinds: dict[tuple[int, int], MediaKind] = {}
    left = {"image": limits.max_images, "video": limits.max_videos}
    for t, i in attachments:
        if (t, i) in fresh:
            try:
                kinds[t, i] = media.classify(turns[t].files[i])
            except MediaError as e:
                raise UnsupportedContent(str(e)) from None
            left[kinds[t, i]] -= 1
    for kind, limit, noun in (("image", limits.max_images, "images"), ("video", limits.max_videos, "videos")):
        if left[kind] < 0:
            raise UnsupportedContent(
                f"{limit - left[kind]} {noun} attached: at most {limit} go in one message. Send fewer at a time."
            )
    left_out: list[str] = []
    for t, i in reversed(attachments):
        if (t, i) in fresh:
            continue
        path = turns[t].files[i]
        try:
            kind = media.classify(path)
        except MediaError as e:
            notes.append(f"An earlier attachment was left out: {e}")
            continue
        if left[kind] > 0:
            kinds[t, i] = kind
            left[kind] -= 1
        else:
            left_out.append(_name(path))
    if left_out:
        notes.append(
            f"Left out to stay within {limits.max_images} images and {limits.max_videos} video(s) per prompt: "
            f"the earlier attachments {', '.join(reversed(left_out))}."
        )
    return kinds


def _load(path: str, kind: MediaKind, fresh: bool, limits: MediaLimits, prompt: Prompt) -> list[dict[str, Any]]:
    """The content part for one attachment; only the new message's notes and videos are shown to the user."""
    try:
        if kind == "image":
            loaded = media.load_image(path)
            part, notes = {"type": "image", "image": loaded.image}, loaded.notes
        else:
            clip = media.load_video(path, fps=limits.video_fps, max_frames=limits.max_video_frames)
            part, notes = {"type": "video", "video": clip}, []  # its notes go with its frames
            if fresh:
                prompt.videos.append((_name(path), clip))
    except MediaError as e:
        if fresh:
            raise UnsupportedContent(str(e)) from None
        prompt.notes.append(f"An earlier attachment was left out: {e}")
        return []
    if fresh:
        prompt.notes += notes
    return [part]


def _name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def format_stats(stats: ReplyStats) -> str:
    """One short line, e.g. "TTFT 0.12 s · 45.3 tok/s · 128 tokens"."""
    parts = []
    if stats.ttft_s is not None:
        parts.append(f"TTFT {stats.ttft_s:.2f} s")
    if stats.decode_tok_s is not None:
        parts.append(f"{stats.decode_tok_s:.1f} tok/s")
    parts.append(f"{stats.output_tokens} token{'' if stats.output_tokens == 1 else 's'}")
    return " · ".join(parts)


def format_details(stats: ReplyStats) -> str:
    """The rest of a reply's numbers, for the expanded stats line."""
    finish = {"stop": "finished", "length": "hit the token limit", "abort": "stopped", "error": "failed"}
    reason = finish.get(stats.finish_reason or "", stats.finish_reason or "unfinished")
    return f"prompt {stats.prompt_tokens} tokens · {stats.elapsed_s:.2f} s in all · {reason}"
