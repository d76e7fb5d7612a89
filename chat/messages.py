"""How the app's own things become Gradio chat messages: a reply (thoughts, answer, error, stats line), the notes
on a message's attachments, and the UI's other remarks.

Every message the UI adds besides the answer carries a metadata title: titled messages never reach the model
(chat.conversation leaves them out) and chat.history_ui stores them as a reply's notes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradio.processing_utils import save_pil_to_cache
from gradio.utils import get_upload_folder

from chat.conversation import Prompt, Reply, format_details, format_stats
from media import format_timestamp

THINKING = "Thinking"  # the title of a reply's collapsed thoughts


def text_parts(text: str) -> list[dict[str, str]]:
    """A message's content holding `text`: a typed text part, not a bare string, which Gradio runs through
    inspect.cleandoc, stripping the indentation of code in the reply."""
    return [{"type": "text", "text": text}]


def note(title: str, body: str = "") -> dict[str, Any]:
    """An assistant message that is the UI's own remark; titled, so it never reaches the model."""
    return {"role": "assistant", "content": text_parts(body or title), "metadata": {"title": title, "status": "done"}}


def reply_messages(reply: Reply, done: bool) -> list[dict[str, Any]]:
    """The chat messages showing a reply: collapsed thoughts, the answer, an error note, its stats."""
    messages: list[dict[str, Any]] = []
    if reply.reasoning:
        metadata: dict[str, Any] = {"title": THINKING, "status": "pending" if reply.thinking and not done else "done"}
        if reply.reasoning_s is not None:
            metadata["duration"] = round(reply.reasoning_s, 1)
        messages.append({"role": "assistant", "content": text_parts(reply.reasoning), "metadata": metadata})
    if reply.text:
        messages.append({"role": "assistant", "content": text_parts(reply.text)})
    if reply.error:
        kept = "The partial answer above is kept; " if reply.text else ""
        messages.append(note(f"⚠️ {reply.error}", f"{kept}press retry to try again."))
    if done and reply.metrics.output_tokens:
        messages.append(note(format_stats(reply.stats), format_details(reply.stats)))
    return messages


def media_messages(prompt: Prompt) -> list[dict[str, Any]]:
    """Notes on the new message's attachments: the frames the model sees of each video, then other remarks.

    Titled without a status, so the chat shows them open; being titled, they never reach the model.
    """
    messages: list[dict[str, Any]] = []
    for name, clip in prompt.videos:
        stamps = [format_timestamp(t) for t in clip.timestamps_s]
        # Written into Gradio's cache, which serves it as is, rather than a temp file it would copy there.
        sheet = save_pil_to_cache(clip.contact_sheet(), get_upload_folder(), f"{Path(name).stem}-frames", "png")
        body = "Frames at " + ", ".join(stamps) + "".join(f"\n\n{remark}" for remark in clip.notes)
        span = stamps[0] if len(stamps) == 1 else f"{stamps[0]}–{stamps[-1]}"
        title = f"🎞️ {name}: the {len(stamps)} frame{'s' * (len(stamps) > 1)} the model sees ({span})"
        content = [*text_parts(body), {"path": sheet}]
        messages.append({"role": "assistant", "content": content, "metadata": {"title": title}})
    if prompt.notes:
        body = "\n".join(f"- {remark}" for remark in prompt.notes)
        metadata = {"title": "ℹ️ About the attachments"}
        messages.append({"role": "assistant", "content": text_parts(body), "metadata": metadata})
    return messages
