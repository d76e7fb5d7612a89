"""Separate Gemma 4's thinking from its answer while the text streams in.

Gemma 4 writes `<|channel>thought\\nREASONING<channel|>ANSWER`: `<|channel>` and `<channel|>` are special
tokens (visible only when decoding keeps special tokens) and `thought\\n` is the channel's label. This
follows vLLM 0.26's gemma4 parser (vllm/parser/gemma4.py): the label is stripped, a second `<|channel>`
inside a thought and a stray `<channel|>` in the answer are dropped.
"""

from __future__ import annotations

START = "<|channel>"
END = "<channel|>"
LABEL = "thought\n"
_TURN = "<|turn>"


class ReasoningSplitter:
    """feed() text chunks as they arrive, flush() at the end; both return (reasoning, text).

    A chunk ending in what may be the start of a marker is held back until the next chunk tells.
    `prompt` (optional) is the rendered prompt: one that ends inside an open channel starts in reasoning.
    """

    def __init__(self, prompt: str = ""):
        self._in_reasoning = prompt.rfind(START) > max(prompt.rfind(END), prompt.rfind(_TURN))
        # The reasoning seen so far while it may still be the label; None once the label is settled.
        self._label: str | None = "" if self._in_reasoning else None
        self._held = ""

    def feed(self, chunk: str) -> tuple[str, str]:
        buffer = self._held + chunk
        reasoning, text = "", ""
        while (found := _next_marker(buffer)) is not None:
            position, marker = found
            r, t = self._route(buffer[:position])
            reasoning, text = reasoning + r, text + t
            buffer = buffer[position + len(marker) :]
            self._switch(marker)
        keep = _partial_marker_length(buffer)
        self._held = buffer[len(buffer) - keep :]
        r, t = self._route(buffer[: len(buffer) - keep])
        return reasoning + r, text + t

    def flush(self) -> tuple[str, str]:
        """What was held back, as plain text: the stream ended, so it is no marker."""
        held, self._held = self._held, ""
        reasoning, text = self._route(held)
        self._label = None  # a thought that is only (part of) the label is empty
        return reasoning, text

    def _route(self, piece: str) -> tuple[str, str]:
        if not self._in_reasoning:
            return "", piece
        if self._label is None:
            return piece, ""
        self._label += piece
        if self._label.startswith(LABEL):
            rest, self._label = self._label[len(LABEL) :], None
            return rest, ""
        if LABEL.startswith(self._label):
            return "", ""
        rest, self._label = self._label, None
        return rest, ""

    def _switch(self, marker: str) -> None:
        if marker == START and not self._in_reasoning:
            self._in_reasoning, self._label = True, ""
        elif marker == END and self._in_reasoning:
            self._in_reasoning, self._label = False, None


def _next_marker(buffer: str) -> tuple[int, str] | None:
    found = [(i, m) for m in (START, END) if (i := buffer.find(m)) >= 0]
    return min(found) if found else None


def _partial_marker_length(buffer: str) -> int:
    """Length of the longest tail of `buffer` that is a proper prefix of a marker."""
    return max(
        (k for marker in (START, END) for k in range(1, len(marker)) if buffer.endswith(marker[:k])),
        default=0,
    )
