"""Conversation state without Gradio: what the chat history means to the model, and each reply's stats.

The chatbot's history is the source of truth (Gradio edits it for undo, retry and edit). Assistant messages
that carry a metadata title are the UI's own annotations (the collapsed "Thinking" block, the stats line,
error notes) and never reach the model: Gemma 4 wants earlier turns without their thoughts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from engine.base import Delta, Metrics

Role = Literal["user", "assistant"]


class UnsupportedContent(ValueError):
    """History content the model cannot take yet, worded for the user."""


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
    def from_metrics(cls, metrics: Metrics, finish_reason: str | None = None) -> ReplyStats:
        return cls(
            ttft_s=metrics.ttft_s,
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

    def add(self, delta: Delta) -> None:
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
    def stats(self) -> ReplyStats:
        return ReplyStats.from_metrics(self.metrics, self.finish_reason)


def turns_from_history(history: Sequence[Mapping[str, Any]]) -> list[Turn]:
    """The model's view of a Gradio chat history, consecutive messages of one role merged into one turn.

    Accepts every shape Gradio 6 hands over: content as a string, or a list of strings, {"type": "text"}
    and {"type": "file"} parts, or {"path": ...} dicts (what ChatInterface appends before normalizing).
    """
    turns: list[Turn] = []
    for message in history:
        role = message["role"]
        if role not in ("user", "assistant"):
            continue
        metadata = message.get("metadata") or {}
        if role == "assistant" and metadata.get("title"):
            continue
        texts: list[str] = []
        files: list[str] = []
        content = message["content"]
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
                raise UnsupportedContent(f"a {type(item).__name__} in the chat cannot be sent to the model")
        text = "\n\n".join(t for t in texts if t)
        if not text and not files:
            continue
        if turns and turns[-1].role == role:
            turns[-1].text = "\n\n".join(t for t in (turns[-1].text, text) if t)
            turns[-1].files += files
        else:
            turns.append(Turn(role, text, files))
    return turns


def build_messages(
    history: Sequence[Mapping[str, Any]], message: Mapping[str, Any] | str, system_prompt: str = ""
) -> list[dict[str, Any]]:
    """OpenAI-style messages for GenerationRequest: the system prompt, the history, then the new message.

    `message` is the multimodal textbox value, {"text": str, "files": [path, ...]}, or a bare string
    (what ChatInterface resubmits after the user edits a message).
    """
    if isinstance(message, str):
        message = {"text": message}
    files = message.get("files") or []
    new = {"role": "user", "content": [message.get("text") or "", *({"path": p} for p in files)]}
    messages: list[dict[str, Any]] = []
    if system_prompt.strip():
        messages.append({"role": "system", "content": system_prompt.strip()})
    messages += [_to_message(turn) for turn in turns_from_history([*history, new])]
    return messages


def _to_message(turn: Turn) -> dict[str, Any]:
    # Attachments become image/video parts here once the engines take them (chat.media loads them).
    if turn.files:
        names = ", ".join(p.rsplit("/", 1)[-1] for p in turn.files)
        raise UnsupportedContent(f"attachments are not supported yet ({names}); send text only")
    return {"role": turn.role, "content": turn.text}


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
