"""The sidebar's chats: every conversation kept server-side (chat.history), and the saving that feeds it.

Whose chats: with --auth the login name's; without, a random id the browser keeps in its localStorage, so a
reload or an app restart finds them again (localStorage is per origin: the same host and port). Two browsers
are two owners. API clients without auth have neither, and their chats are not saved.

When they are saved: the chat function is wrapped, and each update it streams is saved before it is shown,
so a crash loses nothing already on screen. Undo doesn't call the chat function, so it has a handler of its
own; retry and edit do, with the chat cut back to before the message they resend. A newer reply to the same
conversation (an edit or retry while one streams) takes it over, so the older stream can never overwrite it.

How: a user message is {content, files}; each run of assistant messages is one stored reply with its
answer, thoughts and stats (chat.history's format). Notes shown with a reply (errors, attachment notes)
ride along in stats["notes"] with their place, so loading a chat shows exactly what was on screen.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import re
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.utils import get_upload_folder, is_in_or_equal

from chat.arrival import arrived
from chat.conversation import Reply, ReplyStats, message_parts
from chat.history import HistoryStore, Message, NotFound
from chat.limits import RateLimiter, rate_note
from chat.messages import THINKING, note, reply_messages, text_parts
from engine.base import Metrics

log = logging.getLogger(__name__)

STATS_KEYS = tuple(f.name for f in dataclasses.fields(ReplyStats))
METRICS_KEYS = {f.name for f in dataclasses.fields(Metrics)}
# Runs in the browser on page load: the browser's id, made on its first visit. Not gr.BrowserState: its
# value can reach the load event before it is read from localStorage, and a new id then replaces the old.
# crypto.getRandomValues, not randomUUID: that one exists only on https and localhost pages.
BROWSER_ID_JS = """() => {
    const key = "gemma4-chat-id";
    let id = localStorage.getItem(key);
    if (!/^[0-9a-f]{32}$/.test(id || "")) {
        id = Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
        localStorage.setItem(key, id);
    }
    return id;
}"""
BROWSER_ID = re.compile(r"[0-9a-f]{32}")


# ---------------------------------------------------------------------------------------------
# The chatbot's messages <-> chat.history's messages
# ---------------------------------------------------------------------------------------------


def _reply(group: Sequence[Mapping[str, Any]], numbers: Mapping[str, Any] | None) -> Message:
    """One stored reply for a run of assistant messages; `numbers`: its stats, whose line is then the last one."""
    if numbers is not None:
        group = group[:-1]
    answer: list[str] = []
    reasoning: list[str] = []
    stats: dict[str, Any] = dict(numbers or {})
    notes: list[dict[str, Any]] = []
    for at, message in enumerate(group):
        metadata = dict(message.get("metadata") or {})
        text, files, _ = message_parts(message["content"])
        if not metadata.get("title"):
            answer.append(text)
        elif metadata["title"] == THINKING:
            reasoning.append(text)
            if metadata.get("duration") is not None:
                stats["reasoning_s"] = metadata["duration"]
        else:
            notes.append({"at": at, "metadata": metadata, "text": text, "files": files})
    if notes:
        stats["notes"] = notes
    return Message(
        role="assistant",
        content="\n\n".join(answer),
        reasoning="\n\n".join(reasoning) or None,
        files=[],
        stats=stats or None,
    )


def to_stored(messages: Sequence[Mapping[str, Any]], last_numbers: Mapping[str, Any] | None = None) -> list[Message]:
    """chat.history messages for the chatbot's: one per user message, one per run of assistant messages.

    `last_numbers`: the final reply's ReplyStats fields (the chat function's stats row); without them a stats
    line is kept as a note, shown the same.
    """
    stored: list[Message] = []
    group: list[Mapping[str, Any]] = []
    for message in messages:
        if message["role"] == "assistant":
            group.append(message)
            continue
        if group:
            stored.append(_reply(group, None))
            group = []
        if message["role"] == "user":
            text, files, _ = message_parts(message["content"])
            stored.append(Message(role="user", content=text, reasoning=None, files=files, stats=None))
    if group:
        stored.append(_reply(group, last_numbers))
    return stored


def keep_stats(fresh: list[Message], saved: Sequence[Message]) -> list[Message]:
    """`fresh` with each message that `saved` holds unchanged at the same place taken from `saved`: the
    chatbot shows a reply's stats only as text, the store has its numbers."""

    def same(a: Message, b: Message) -> bool:
        return all(a[k] == b[k] for k in ("role", "content", "reasoning", "files"))

    return [saved[i] if i < len(saved) and same(saved[i], m) else m for i, m in enumerate(fresh)]


def _shown_file(path: str) -> dict[str, Any]:
    """A file part, or a text part saying it is gone: Gradio serves only what is in its upload folder."""
    if Path(path).is_file() and is_in_or_equal(path, get_upload_folder()):
        return {"path": path}
    return {"type": "text", "text": f"📎 {Path(path).name} (no longer on the server)"}


def _numbers(stats: Mapping[str, Any]) -> dict[str, Any] | None:
    """A reply's ReplyStats fields, if the stats hold them (an imported file may hold anything)."""
    numbers = {k: stats.get(k) for k in STATS_KEYS}
    counts = ("output_tokens", "prompt_tokens")
    times = ("ttft_s", "decode_tok_s", "elapsed_s")
    if not (
        all(type(numbers[k]) is int for k in counts)
        and all(numbers[k] is None or isinstance(numbers[k], (int, float)) for k in times)
        and isinstance(numbers["finish_reason"], (str, type(None)))
    ):
        return None
    return numbers if numbers["output_tokens"] else None


def _notes(stats: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The well-formed notes in a reply's stats, with only the metadata the chatbot takes."""
    notes = stats.get("notes")
    kept = []
    for n in notes if isinstance(notes, list) else []:
        if not (
            isinstance(n, dict)
            and type(n.get("at")) is int
            and isinstance(n.get("metadata"), dict)
            and isinstance(n["metadata"].get("title"), str)
            and isinstance(n.get("text"), str)
            and isinstance(n.get("files", []), list)
            and all(isinstance(f, str) for f in n.get("files", []))
        ):
            continue
        metadata = {"title": n["metadata"]["title"]}
        if n["metadata"].get("status") == "done":  # a "pending" one would spin forever
            metadata["status"] = "done"
        kept.append({**n, "metadata": metadata})
    return kept


def to_chat(stored: Sequence[Message]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The chatbot's messages for a stored conversation, and the stats rows of its replies for the plots."""
    shown: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for message in stored:
        if message["role"] == "user":
            text = [{"type": "text", "text": message["content"]}] if message["content"] else []
            shown.append({"role": "user", "content": [*map(_shown_file, message["files"]), *text]})
        elif message["role"] == "assistant":
            stats = message["stats"] or {}
            numbers = _numbers(stats)
            reasoning_s = stats.get("reasoning_s")
            reply = Reply(
                text=message["content"],
                reasoning=message["reasoning"] or "",
                metrics=Metrics(**{k: v for k, v in (numbers or {}).items() if k in METRICS_KEYS}),
                finish_reason=(numbers or {}).get("finish_reason"),
                reasoning_s=reasoning_s if isinstance(reasoning_s, (int, float)) else None,
            )
            group = reply_messages(reply, done=True)
            for kept in _notes(stats):
                content = [*map(_shown_file, kept.get("files", [])), *text_parts(kept["text"])]
                group.insert(kept["at"], {"role": "assistant", "content": content, "metadata": kept["metadata"]})
            shown += group
            if numbers:
                rows.append(numbers)
        # A system message (from an imported file) is not part of the chat: the system prompt is a setting.
    return shown, rows


# ---------------------------------------------------------------------------------------------
# Owners and the panel
# ---------------------------------------------------------------------------------------------


def owner_of(request: gr.Request | None, browser_id: str | None) -> str | None:
    """The history owner: the login name when auth is on, else the browser's id; None for an API client."""
    if request is not None and request.username:
        return f"user:{request.username}"
    return f"browser:{browser_id}" if browser_id and BROWSER_ID.fullmatch(browser_id) else None


def _user_message(message: Mapping[str, Any] | str) -> dict[str, Any]:
    """The new message as ChatInterface appends it to the chat: its files, then its text."""
    if isinstance(message, str):
        return {"role": "user", "content": message}
    files = [f if isinstance(f, str) else f["path"] for f in message.get("files") or []]
    return {"role": "user", "content": [*({"path": p} for p in files), message.get("text") or ""]}


def _slug(title: str) -> str:
    return re.sub(r"[^\w-]+", "-", title).strip("-")[:40] or "chat"


class HistoryPanel:
    """The "Chats" section of the sidebar and the per-session state behind it.

    Create it inside the sidebar (it renders its components there), wrap the chat function with
    `chat_fn`, pass `inputs`/`outputs` to ChatInterface as extra inputs and outputs, then `wire` it.
    """

    def __init__(self, store: HistoryStore | None, limiter: RateLimiter):
        self.store = store
        self.limiter = limiter
        self.conversation = gr.State(None)  # the open conversation's id; None until its first message
        self.owner = gr.State(None)  # owner_of() for browsers, set on page load
        self._writers: dict[str, object] = {}  # conversation id -> the chat call that saves it now
        self._lock = threading.Lock()
        if store is None:
            return
        self._exports = tempfile.TemporaryDirectory(prefix="gemma4-chat-export-")  # removed at exit
        self.browser_id = gr.Textbox(visible=False)  # carries BROWSER_ID_JS's id to the page load
        with gr.Accordion("Chats", open=True):
            self.new_chat = gr.Button("+ New chat", size="sm")
            self.chats = gr.Radio([], label="Chats", show_label=False, elem_id="chat-list")
            with gr.Row():
                self.title = gr.Textbox(
                    placeholder="Rename this chat…", show_label=False, container=False, scale=3, max_length=200
                )
                self.delete = gr.Button("Delete", size="sm", variant="stop", scale=1, min_width=60)
            with gr.Row():
                self.export = gr.Button("Export", size="sm")
                self.import_ = gr.UploadButton("Import JSON", size="sm", file_types=[".json"])
            self.exported = gr.File(
                label="Exported", file_count="multiple", visible=False, interactive=False, elem_id="chat-export"
            )

    @property
    def inputs(self) -> list[gr.State]:
        return [self.conversation, self.owner]

    @property
    def outputs(self) -> list[gr.State]:
        return [self.conversation]

    # -- the chat function ------------------------------------------------------------------

    def chat_fn(
        self, inner: Callable[..., AsyncIterator[tuple[Any, ...]]], engine_ready: Callable[[], bool] = lambda: True
    ) -> Callable[..., AsyncIterator[Any]]:
        """`inner` (chat.chat_view.make_chat_fn's chat) with the rate limit and saving around it.

        inner yields (messages, ttft, tok/s, tokens, replies); the wrapper adds the conversation id, and gives
        inner the time the message reached the server (`received`, where its TTFT clock starts). Messages sent
        while the engine is not ready (inner answers them with a note) don't count against the rate limit.
        """

        async def chat(message: Any, history: list[dict[str, Any]], *args: Any) -> AsyncIterator[Any]:
            *inner_args, conversation_id, session_owner, request = args
            received = arrived(request)
            wait = self.limiter.wait_s(request.session_hash or "") if engine_ready() else 0.0
            if wait:
                yield [note(f"⏳ {rate_note(self.limiter.per_minute, wait)}")], None, None, None, gr.skip(), gr.skip()
                return
            owner = owner_of(request, None) or session_owner  # the login, else what the page load found
            if self.store is None or owner is None:
                async with aclosing(inner(message, history, *inner_args, received=received)) as stream:
                    async for out in stream:
                        yield *out, gr.skip()
                return
            conversation_id, kept = await asyncio.to_thread(self._prepare, owner, conversation_id, history)
            user = to_stored([_user_message(message)])
            me = object()
            with self._lock:
                self._writers[conversation_id] = me
            try:
                # The message is on screen already: saved, and the conversation listed, before the engine is asked.
                await asyncio.to_thread(self._save_as, me, owner, conversation_id, [*kept, *user])
                yield [], None, None, None, gr.skip(), conversation_id
                async with aclosing(inner(message, history, *inner_args, received=received)) as stream:
                    async for out in stream:
                        messages, *_, replies = out
                        numbers = replies[-1] if isinstance(replies, list) and replies else None
                        await asyncio.to_thread(
                            self._save_as, me, owner, conversation_id, [*kept, *user, *to_stored(messages, numbers)]
                        )
                        yield *out, conversation_id
            finally:
                with self._lock:
                    if self._writers.get(conversation_id) is me:
                        del self._writers[conversation_id]

        # ChatInterface names the /chat API's parameters after the function's and hands gr.Request to a
        # parameter annotated with it: show it inner's positional parameters (not `received`), then ours.
        params = [p for p in inspect.signature(inner).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
        extra = ["conversation_id", "owner", "request"]
        params += [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in extra]
        chat.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        chat.__annotations__ = {"request": gr.Request}
        return chat

    def _prepare(self, owner: str, conversation_id: str | None, history: list[dict[str, Any]]) -> tuple[str, list]:
        """The conversation to save into (a new one on the first message) and what it keeps before this turn."""
        assert self.store is not None
        saved: list[Message] = []
        if conversation_id is not None:
            try:
                saved = self.store.load(owner, conversation_id).messages
            except NotFound:  # deleted meanwhile, e.g. from another tab: start over
                conversation_id = None
        if conversation_id is None:
            conversation_id = self.store.create(owner)
        return conversation_id, keep_stats(to_stored(history), saved)

    def _save_as(self, writer: object, owner: str, conversation_id: str, messages: list[Message]) -> None:
        assert self.store is not None
        with self._lock:
            if self._writers.get(conversation_id) is not writer:
                return  # a newer reply to this conversation took over
            try:
                self.store.save_messages(owner, conversation_id, messages)
            except NotFound:  # deleted (the Delete button, another tab) while the reply streamed into it
                log.info("conversation %s was deleted while a reply streamed into it", conversation_id)
                del self._writers[conversation_id]  # the rest of this reply goes unsaved

    # -- the panel ------------------------------------------------------------------------------

    def wire(self, demo: gr.Blocks, chat: gr.ChatInterface, replies: gr.State) -> None:
        if self.store is None:
            return
        store = self.store
        # What opening a chat (or a new one) sets: the chat and ChatInterface's copy of it, the id, the plots'
        # rows, the list; and it hides an earlier chat's export.
        opened = [chat.chatbot, chat.chatbot_state, self.conversation, replies, self.chats, self.exported]
        quiet: dict[str, Any] = {"api_visibility": "private", "show_progress": "hidden"}

        def choices(owner: str | None, current: str | None) -> Any:
            items = [(c.title, c.id) for c in store.list(owner)] if owner else []
            return gr.update(choices=items, value=current if any(i == current for _, i in items) else None)

        def open_chat(owner: str | None, conversation_id: str | None) -> tuple[Any, ...]:
            hidden = gr.update(visible=False)
            if owner is None or conversation_id is None:
                return [], [], None, [], choices(owner, None), hidden
            shown, rows = to_chat(store.load(owner, conversation_id).messages)
            return shown, shown, conversation_id, rows, choices(owner, conversation_id), hidden

        def on_load(browser_id: str | None, request: gr.Request) -> tuple[Any, ...]:
            owner = owner_of(request, browser_id)
            return owner, choices(owner, None)

        demo.load(on_load, [self.browser_id], [self.owner, self.chats], js=BROWSER_ID_JS, **quiet)

        def select(conversation_id: str, owner: str | None) -> tuple[Any, ...]:
            try:
                return open_chat(owner, conversation_id)
            except NotFound:
                gr.Warning("That chat is gone (deleted in another tab?).")
                return open_chat(owner, None)

        self.chats.input(select, [self.chats, self.owner], opened, **quiet)
        self.new_chat.click(lambda owner: open_chat(owner, None), [self.owner], opened, **quiet)
        # The chatbot's own clear (trash) button starts a new chat too; the old one stays in the list.
        chat.chatbot.clear(
            lambda owner: (choices(owner, None), None), [self.owner], [self.chats, self.conversation], **quiet
        )

        def undone(conversation_id: str | None, owner: str | None) -> Any:
            """Undo doesn't call the chat function: drop the last exchange from the stored chat too, as
            ChatInterface drops it from the shown one (the last replies, then the user message before them).
            Worked out from the store, which holds what is shown: the chat a second handler of the same click
            gets may already be the undone one."""
            if owner and conversation_id:
                with self._lock:
                    if conversation_id not in self._writers:  # a reply still streaming saves itself
                        try:
                            kept = store.load(owner, conversation_id).messages
                            end = len(kept)
                            for role in ("assistant", "user"):
                                while end and kept[end - 1]["role"] == role:
                                    end -= 1
                            store.save_messages(owner, conversation_id, kept[:end])
                        except NotFound:
                            pass
            return choices(owner, conversation_id)

        chat.chatbot.undo(undone, [self.conversation, self.owner], [self.chats], **quiet)
        # A new chat is listed as soon as its first message is saved, before the reply starts.
        self.conversation.change(choices, [self.owner, self.conversation], [self.chats], **quiet)

        def rename(title: str, conversation_id: str | None, owner: str | None) -> tuple[Any, str]:
            if not (owner and conversation_id):
                gr.Warning("This chat is not saved yet: send a message first.")
            elif title.strip():
                try:
                    store.rename(owner, conversation_id, title)
                except NotFound:
                    gr.Warning("This chat is gone (deleted in another tab?).")
            return choices(owner, conversation_id), ""

        self.title.submit(rename, [self.title, self.conversation, self.owner], [self.chats, self.title], **quiet)

        def delete(conversation_id: str | None, owner: str | None) -> tuple[Any, ...]:
            if owner and conversation_id:
                try:
                    store.delete(owner, conversation_id)
                except NotFound:
                    pass
            return open_chat(owner, None)

        self.delete.click(delete, [self.conversation, self.owner], opened, **quiet)

        def export(conversation_id: str | None, owner: str | None) -> Any:
            if not owner or not conversation_id:
                gr.Warning("This chat is not saved yet: send a message first.")
                return gr.update(visible=False)
            try:
                title = store.load(owner, conversation_id).title
                folder = Path(tempfile.mkdtemp(dir=self._exports.name))
                paths = [folder / f"{_slug(title)}.json", folder / f"{_slug(title)}.md"]
                paths[0].write_text(store.export_json(owner, conversation_id), encoding="utf-8")
                paths[1].write_text(store.export_markdown(owner, conversation_id), encoding="utf-8")
            except NotFound:
                gr.Warning("This chat is gone (deleted in another tab?).")
                return gr.update(visible=False)
            return gr.update(value=[str(p) for p in paths], visible=True)

        self.export.click(export, [self.conversation, self.owner], [self.exported], **quiet)

        def import_chat(file: str, owner: str | None) -> tuple[Any, ...]:
            if not owner:
                raise gr.Error("Can't import: this browser has no history (reload the page).")
            try:
                conversation_id = store.import_json(owner, Path(file).read_bytes())
            except ValueError as e:
                raise gr.Error(str(e)) from None
            return open_chat(owner, conversation_id)

        self.import_.upload(import_chat, [self.import_, self.owner], opened, **quiet)
