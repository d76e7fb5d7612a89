"""The history's UI side, in-process against the Engine double of tests.fakes: what the chat shows becomes stored
messages and back, every streamed update is saved, stop/retry/edit mid-stream never corrupt a conversation,
owners are kept apart, a chatty session is slowed down; plus the engine's restart button."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import gradio as gr
import pytest
from gradio.utils import get_upload_folder

from chat import chat_view, ui
from chat.history import HistoryStore
from chat.history_ui import HistoryPanel, keep_stats, owner_of, to_chat, to_stored
from chat.limits import RateLimiter
from chat.messages import note, text_parts
from engine import lifecycle
from engine.base import Stage
from engine.settings import EngineSettings
from tests.fakes import CHAT_DEFAULTS, FakeEngine, FlakyEngine, titles

MAX_TOKENS = 2  # CHAT_DEFAULTS' index of max_tokens
THINKING = 1


def settings(max_tokens: int, thinking: bool = False) -> list:
    args = list(CHAT_DEFAULTS)
    args[MAX_TOKENS], args[THINKING] = max_tokens, thinking
    return args


def user(text: str, *files: str) -> dict:
    return {"role": "user", "content": [*({"path": f} for f in files), {"type": "text", "text": text}]}


@pytest.fixture
def store(tmp_path: Path) -> HistoryStore:
    store = HistoryStore(tmp_path / "history.sqlite3")
    yield store
    store.close()


def panel(store: HistoryStore | None, per_minute: int = 0) -> HistoryPanel:
    with gr.Blocks():  # the panel renders its components
        return HistoryPanel(store, RateLimiter(per_minute))


def request(username: str | None = None, session: str = "s1") -> gr.Request:
    return gr.Request(username=username, session_hash=session)


async def final_reply(engine: FakeEngine, text: str, history: list, max_tokens: int, thinking: bool = False):
    """The chat function's last update: the reply's messages and its stats row."""
    outs = [
        out
        async for out in chat_view.make_chat_fn(engine)(
            {"text": text, "files": []}, history, *settings(max_tokens, thinking)
        )
    ]
    messages, *_, replies = outs[-1]
    return messages, replies[-1]


async def test_a_shown_chat_comes_back_the_same_from_the_store(store):
    image = Path(get_upload_folder()) / "history-ui-test" / "cat.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    image.write_bytes(b"png")
    first, row = await final_reply(FakeEngine(), "Hi", [], 4, thinking=True)
    failed, failed_row = await final_reply(FakeEngine(fail_after=3), "More", [], 6)
    note = {"role": "assistant", "content": text_parts("About the attachments"), "metadata": {"title": "ℹ️ Notes"}}
    shown = [user("Hi", str(image)), *first, user("More"), note, *failed]
    assert titles(failed)[1].startswith("⚠️ The engine failed mid-reply")  # an error note, then the stats line

    # As the chat function's wrapper saves it: the earlier reply's numbers come from the store.
    earlier = to_stored(shown[: len(first) + 1], row)
    stored = keep_stats(to_stored(shown, failed_row), earlier)
    conversation = store.create("user:ann")
    store.save_messages("user:ann", conversation, stored)
    again, rows = to_chat(store.load("user:ann", conversation).messages)

    assert again == [
        {"role": "user", "content": [{"path": str(image)}, {"type": "text", "text": "Hi"}]},
        *first,
        user("More"),
        note,
        *failed,
    ]
    assert rows == [row, failed_row]
    assert stored[1]["reasoning"] == "t0 t1 " and stored[1]["stats"]["output_tokens"] == 4


async def test_a_replys_notes_export_to_markdown_as_quotes(store):
    messages, row = await final_reply(FakeEngine(fail_after=2), "Hi", [], 5)
    conversation = store.create("user:ann")
    store.save_messages("user:ann", conversation, to_stored([user("Hi"), *messages], row))
    markdown = store.export_markdown("user:ann", conversation)
    error = "> **⚠️ The engine failed mid-reply: GPU fell off the bus** The partial answer above is kept;"
    assert error in markdown
    # TTFT on the app's clock: the fake engine's 50 ms plus the app's own few ms.
    assert re.search(r"> Stats: ttft_s: 0\.\d+, decode_tok_s: 50\.0, output_tokens: 2,", markdown)
    assert "notes" not in markdown


def test_a_stats_line_without_its_numbers_is_kept_as_a_note():
    line = note("TTFT 0.05 s · 50.0 tok/s · 2 tokens", "prompt 7 tokens")
    shown = [user("Hi"), {"role": "assistant", "content": text_parts("w0 w1 ")}, line]
    stored = to_stored(shown)
    assert stored[1]["stats"]["notes"][0]["metadata"]["title"] == line["metadata"]["title"]
    assert to_chat(stored) == (shown, [])


def test_an_attachment_gone_from_the_server_is_named_not_served(tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"png")
    stored = to_stored([user("look", str(outside)), user("and", "/nowhere/gone.png")])
    shown, _ = to_chat(stored)
    assert shown[0]["content"][0] == {"type": "text", "text": "📎 secret.png (no longer on the server)"}
    assert shown[1]["content"][0] == {"type": "text", "text": "📎 gone.png (no longer on the server)"}


def test_an_imported_reply_with_odd_stats_still_shows():
    stored = to_stored([user("Hi")]) + [
        {
            "role": "assistant",
            "content": "Hello",
            "reasoning": None,
            "files": [],
            "stats": {"output_tokens": "many", "notes": [{"at": "x"}, {"at": 1, "metadata": {"title": 3}}]},
        }
    ]
    shown, rows = to_chat(stored)
    assert shown[1] == {"role": "assistant", "content": text_parts("Hello")} and rows == []


def test_owners_come_from_the_login_else_the_browser():
    browser = "0123456789abcdef" * 2
    assert owner_of(request("ann"), browser) == "user:ann"
    assert owner_of(request(), browser) == f"browser:{browser}"
    assert owner_of(request(), None) is None  # an API client without auth: nothing is saved
    assert owner_of(request(), "../../etc") is None  # only ids the page's script makes


async def run(chat, text: str, history: list, max_tokens: int, conversation: str | None, req: gr.Request) -> list:
    return [
        out async for out in chat({"text": text, "files": []}, history, *settings(max_tokens), conversation, None, req)
    ]


async def test_every_streamed_update_is_saved_before_it_is_shown(store, monkeypatch):
    monkeypatch.setattr(chat_view, "UI_REFRESH_S", 0.0)
    chat = panel(store).chat_fn(chat_view.make_chat_fn(FakeEngine(token_s=0.001)))
    stream = chat({"text": "Hi", "files": []}, [], *settings(6), None, None, request("ann"))
    # First the new message alone (ChatInterface shows it as it is sent), then each streamed update.
    messages, *_, conversation = await anext(stream)
    assert messages == [] and [m["content"] for m in store.load("user:ann", conversation).messages] == ["Hi"]
    updates = 0
    async for messages, *_, conversation in stream:
        stored = store.load("user:ann", conversation).messages
        assert stored[0]["content"] == "Hi"
        assert stored[1]["content"] == messages[0]["content"][0]["text"]  # what is about to be shown
        updates += 1
    assert updates >= 3
    assert stored[1]["stats"]["output_tokens"] == 6 and store.list("user:ann")[0].title == "Hi"


async def test_a_stopped_reply_keeps_what_was_shown(store, monkeypatch):
    monkeypatch.setattr(chat_view, "UI_REFRESH_S", 0.0)
    engine = FakeEngine(token_s=0.001)
    chat = panel(store).chat_fn(chat_view.make_chat_fn(engine))
    stream = chat({"text": "Go on", "files": []}, [], *settings(10_000), None, None, request("ann"))
    for _ in range(3):
        shown, *_, conversation = await anext(stream)
    await stream.aclose()  # what Gradio's stop does between updates
    assert engine.closed_early
    stored = store.load("user:ann", conversation).messages
    assert [m["content"] for m in stored] == ["Go on", shown[0]["content"][0]["text"]]


async def test_the_next_message_continues_the_saved_conversation_with_its_stats(store):
    chat = panel(store).chat_fn(chat_view.make_chat_fn(FakeEngine()))
    req = request("ann")
    first = await run(chat, "Hi", [], 2, None, req)
    shown, *_, conversation = first[-1]
    history = [user("Hi"), *shown]
    second = await run(chat, "More", history, 3, conversation, req)
    assert second[-1][-1] == conversation
    stored = store.load("user:ann", conversation).messages
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]
    assert stored[1]["stats"]["output_tokens"] == 2  # the first reply's numbers, kept from the store
    assert to_chat(stored)[0] == [*history, user("More"), *second[-1][0]]


async def test_a_newer_reply_takes_the_conversation_over(store, monkeypatch):
    """Retry or edit while a reply streams: the older stream goes on to its end, but can't save any more."""
    monkeypatch.setattr(chat_view, "UI_REFRESH_S", 0.0)
    chat = panel(store).chat_fn(chat_view.make_chat_fn(FakeEngine(token_s=0.002)))
    req = request("ann")
    conversation = (await run(chat, "Hi", [], 1, None, req))[-1][-1]
    old = chat({"text": "slow", "files": []}, [user("Hi")], *settings(60), conversation, None, req)
    await anext(old)
    edited = await run(chat, "edited", [user("Hi")], 2, conversation, req)
    async for _ in old:  # the old stream finishes after the new one
        pass
    stored = store.load("user:ann", conversation).messages
    assert [m["content"] for m in stored][-2:] == ["edited", edited[-1][0][0]["content"][0]["text"]]


async def test_owners_never_see_each_others_chats(store):
    p = panel(store)
    chat = p.chat_fn(chat_view.make_chat_fn(FakeEngine()))
    ann = (await run(chat, "ann's secret", [], 1, None, request("ann")))[-1][-1]
    bob = (await run(chat, "bob's", [], 1, None, request("bob", "s2")))[-1][-1]
    browser = [out async for out in chat({"text": "b", "files": []}, [], *settings(1), None, "browser:x", request())]
    assert [c.id for c in store.list("user:ann")] == [ann]
    assert [c.id for c in store.list("user:bob")] == [bob]
    assert [c.title for c in store.list("browser:x")] == ["b"] and browser[-1][-1] is not None
    # Bob's session holding Ann's conversation id (a forged request) saves into a new conversation of his own.
    forged = (await run(chat, "take over", [], 1, ann, request("bob", "s2")))[-1][-1]
    assert forged != ann and store.load("user:ann", ann).messages[0]["content"] == "ann's secret"


async def test_an_api_client_without_auth_chats_but_is_not_saved(store):
    chat = panel(store).chat_fn(chat_view.make_chat_fn(FakeEngine()))
    outs = await run(chat, "Hi", [], 2, None, request())
    assert outs[-1][0][0]["content"][0]["text"] == "w0 w1 " and outs[-1][-1] == gr.skip()
    assert store.list("user:anyone") == []


async def test_a_session_over_the_rate_limit_is_told_to_wait(store):
    engine = FakeEngine()
    chat = panel(store, per_minute=2).chat_fn(chat_view.make_chat_fn(engine))
    for _ in range(2):
        await run(chat, "Hi", [], 1, None, request("ann"))
    refused = await run(chat, "Hi", [], 1, None, request("ann"))
    assert titles(refused[-1][0])[0].startswith("⏳ Slow down: at most 2 messages a minute")
    assert len(engine.requests) == 2
    other_session = await run(chat, "Hi", [], 1, None, request("ann", "s2"))
    assert len(engine.requests) == 3 and titles(other_session[-1][0])[-1].startswith("TTFT")


async def test_messages_sent_while_the_engine_loads_do_not_count_against_the_rate_limit(store):
    engine = FakeEngine(Stage.LOADING, "compiling")
    chat = panel(store, per_minute=2).chat_fn(chat_view.make_chat_fn(engine), lambda: engine.status().ready)
    for _ in range(5):  # pressing retry while the model loads
        loading = await run(chat, "Hi", [], 1, None, request("ann"))
        assert titles(loading[-1][0])[0].startswith("⏳ The engine is still loading")
    await engine.start()
    answered = await run(chat, "Hi", [], 1, None, request("ann"))
    assert titles(answered[-1][0])[-1].startswith("TTFT") and len(engine.requests) == 1


def test_restart_shuts_the_engine_down_and_starts_it_again_once_at_a_time():
    engine = FlakyEngine()
    first = lifecycle.restart_in_background(engine)
    assert first is not None and lifecycle.restarting()
    assert lifecycle.restart_in_background(engine) is None  # pressed twice
    first.join(5)
    assert engine.status().failed and not lifecycle.restarting()
    lifecycle.restart_in_background(engine).join(5)
    assert engine.status().ready and (engine.starts, engine.shutdowns) == (2, 2)


def test_the_restart_button_shows_only_for_a_failed_engine():
    for engine, visible in ((FlakyEngine(), True), (FakeEngine(), False)):
        demo = ui.build_ui(engine, EngineSettings())
        button = next(b for b in demo.blocks.values() if isinstance(b, gr.Button) and b.value == "Restart the engine")
        assert button.visible is visible


def test_the_chat_api_keeps_its_parameters_with_the_history_on(store):
    with_history = ui.build_ui(FakeEngine(), EngineSettings(), store).get_api_info()["named_endpoints"]["/chat"]
    without = ui.build_ui(FakeEngine(), EngineSettings()).get_api_info()["named_endpoints"]["/chat"]

    def names(endpoint: dict) -> tuple[list, list]:
        return [p["parameter_name"] for p in endpoint["parameters"]], [r["label"] for r in endpoint["returns"]]

    assert names(with_history) == names(without)
    assert "conversation_id" not in str(with_history)


def test_waiting_on_a_slow_save_does_not_stall_other_sessions(store, monkeypatch):
    """Saves run in a worker thread: the server's event loop keeps streaming to everyone else."""
    slow = store.save_messages

    def save(*args):
        time.sleep(0.2)
        slow(*args)

    monkeypatch.setattr(store, "save_messages", save)
    chat = panel(store).chat_fn(chat_view.make_chat_fn(FakeEngine()))

    async def both() -> float:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        await run(chat, "Hi", [], 1, None, request("ann"))
        ticker.cancel()
        return ticks

    assert asyncio.run(both()) >= 10
