"""The conversation history store: what it keeps, for whom, and what survives a crash."""

import json
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from chat.history import (
    SCHEMA_VERSION,
    UNTITLED,
    HistoryStore,
    NotFound,
    default_data_dir,
)

REPO = Path(__file__).resolve().parents[1]


def msg(role, content, reasoning=None, files=(), stats=None):
    return {"role": role, "content": content, "reasoning": reasoning, "files": list(files), "stats": stats}


CHAT = [
    msg("system", "You are terse."),
    msg("user", "What is in this picture?", files=["/data/uploads/cat.png"]),
    msg(
        "assistant",
        "A cat on a **sofa**.",
        reasoning="Fur, whiskers, cushions.",
        stats={"ttft_s": 0.2512, "decode_tok_s": 87.456, "output_tokens": 7},
    ),
]


@pytest.fixture
def store(tmp_path):
    store = HistoryStore(tmp_path / "history.sqlite3")
    yield store
    store.close()


def test_saved_messages_load_back_unchanged(store):
    cid = store.create("alice")
    store.save_messages("alice", cid, CHAT)
    conversation = store.load("alice", cid)
    assert conversation.id == cid
    assert conversation.messages == CHAT


def test_optional_message_keys_are_filled_in(store):
    cid = store.create("alice")
    store.save_messages("alice", cid, [{"role": "user", "content": "hi"}])
    assert store.load("alice", cid).messages == [msg("user", "hi")]


def test_title_defaults_to_the_first_user_message_cut_to_60_chars(store):
    cid = store.create("alice")
    assert store.load("alice", cid).title == UNTITLED
    store.save_messages("alice", cid, [msg("system", "Be kind."), msg("user", "word " * 30)])
    title = store.load("alice", cid).title
    assert title.startswith("word word") and title.endswith("…") and len(title) <= 60
    # Once set, later saves don't retitle it.
    store.save_messages("alice", cid, [msg("user", "something else")])
    assert store.load("alice", cid).title == title


def test_an_explicit_title_wins_over_the_default(store):
    cid = store.create("alice", title="Cats")
    store.save_messages("alice", cid, CHAT)
    assert store.load("alice", cid).title == "Cats"


def test_list_is_newest_first_with_title_time_and_message_count(store):
    first = store.create("alice", title="first")
    second = store.create("alice", title="second")
    assert [c.id for c in store.list("alice")] == [second, first]

    store.save_messages("alice", first, CHAT)  # updating a conversation moves it to the top
    summaries = store.list("alice")
    assert [(c.id, c.title, c.message_count) for c in summaries] == [(first, "first", 3), (second, "second", 0)]
    assert summaries[0].updated_at >= summaries[1].updated_at


def test_rename_and_delete(store):
    cid = store.create("alice")
    store.save_messages("alice", cid, CHAT)
    store.rename("alice", cid, "  Cat\nphotos ")
    assert store.load("alice", cid).title == "Cat photos"
    with pytest.raises(ValueError, match="empty"):
        store.rename("alice", cid, "   ")

    store.delete("alice", cid)
    assert store.list("alice") == []
    with pytest.raises(NotFound):
        store.load("alice", cid)
    with pytest.raises(NotFound):
        store.delete("alice", cid)


def test_owners_never_see_or_touch_each_others_conversations(store):
    mine = store.create("alice", title="private")
    store.save_messages("alice", mine, CHAT)
    assert store.list("bob") == []
    for attempt in (
        lambda: store.load("bob", mine),
        lambda: store.save_messages("bob", mine, [msg("user", "overwrite")]),
        lambda: store.rename("bob", mine, "hijacked"),
        lambda: store.delete("bob", mine),
        lambda: store.export_json("bob", mine),
        lambda: store.export_markdown("bob", mine),
    ):
        with pytest.raises(NotFound):
            attempt()
    assert store.load("alice", mine).messages == CHAT
    assert store.load("alice", mine).title == "private"


def test_an_empty_owner_is_refused(store):
    # Otherwise every session without an id would share one history.
    with pytest.raises(ValueError, match="owner"):
        store.create("")


def test_everything_survives_a_restart(tmp_path):
    path = tmp_path / "history.sqlite3"
    before = HistoryStore(path)
    cid = before.create("alice", title="kept")
    before.save_messages("alice", cid, CHAT)
    before.close()

    after = HistoryStore(path)
    assert [(c.id, c.title, c.message_count) for c in after.list("alice")] == [(cid, "kept", 3)]
    assert after.load("alice", cid).messages == CHAT
    after.close()


def test_file_is_in_wal_mode_with_the_schema_version_recorded(store):
    raw = sqlite3.connect(store.path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    raw.close()


def test_a_file_from_a_newer_app_is_refused_not_clobbered(tmp_path):
    path = tmp_path / "history.sqlite3"
    HistoryStore(path).close()
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(RuntimeError, match="newer"):
        HistoryStore(path)


def test_concurrent_saves_from_eight_threads_all_land(store):
    ids = [store.create(f"user{n}") for n in range(8)]

    def chat(n: int) -> None:
        messages = []
        for turn in range(25):
            messages = [*messages, msg("user", f"u{n}-{turn}"), msg("assistant", f"a{n}-{turn}")]
            store.save_messages(f"user{n}", ids[n], messages)

    threads = [threading.Thread(target=chat, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    for n, cid in enumerate(ids):
        messages = store.load(f"user{n}", cid).messages
        assert len(messages) == 50
        assert messages[-1]["content"] == f"a{n}-24"


def test_a_streaming_save_rewrites_only_the_reply_being_streamed(store):
    cid = store.create("alice")
    history = [msg("user" if i % 2 == 0 else "assistant", f"message {i}") for i in range(40)]
    store.save_messages("alice", cid, history)

    changes_before = store._conn.total_changes
    store.save_messages("alice", cid, [*history[:-1], msg("assistant", "message 39, longer now")])
    # One row for the conversation's updated time, one for the changed message.
    assert store._conn.total_changes - changes_before == 2


def test_saving_a_shorter_list_drops_the_rest(store):
    cid = store.create("alice")
    store.save_messages("alice", cid, CHAT)
    store.save_messages("alice", cid, CHAT[:2])  # e.g. "retry" removed the last reply
    assert store.load("alice", cid).messages == CHAT[:2]


def test_an_invalid_save_changes_nothing(store):
    cid = store.create("alice")
    store.save_messages("alice", cid, CHAT)
    with pytest.raises(ValueError, match=r"messages\[1\]\.role"):
        store.save_messages("alice", cid, [msg("user", "ok"), msg("robot", "beep")])
    assert store.load("alice", cid).messages == CHAT


def test_json_export_imports_back_as_an_equal_conversation(store):
    cid = store.create("alice", title="Cats")
    store.save_messages("alice", cid, CHAT)
    exported = store.export_json("alice", cid)

    copy = store.import_json("bob", exported)  # e.g. moved to another account
    original, imported = store.load("alice", cid), store.load("bob", copy)
    assert copy != cid
    assert (imported.title, imported.messages) == (original.title, original.messages)


def test_markdown_export_shows_roles_text_reasoning_files_and_stats(store):
    cid = store.create("alice", title="Cats")
    store.save_messages("alice", cid, CHAT)
    markdown = store.export_markdown("alice", cid)

    assert markdown.startswith("# Cats\n")
    for heading in ("## System", "## User", "## Assistant"):
        assert heading in markdown
    assert "A cat on a **sofa**." in markdown
    assert "<details>\n<summary>Reasoning</summary>\n\nFur, whiskers, cushions.\n\n</details>" in markdown
    assert "`/data/uploads/cat.png`" in markdown
    assert "> Stats: ttft_s: 0.25, decode_tok_s: 87.46, output_tokens: 7" in markdown
    # Reasoning comes before the answer it led to.
    assert markdown.index("Fur, whiskers") < markdown.index("A cat on a")


def _export(**changes):
    data = {"format": "gemma4-chat.conversation", "version": 1, "title": "t", "messages": CHAT, **changes}
    return json.dumps(data)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps([1, 2]), "not a gemma4-chat export"),
        (json.dumps({"title": "t", "messages": []}), "not a gemma4-chat export"),
        (_export(version=99), "unsupported version 99"),
        (_export(messages={"role": "user"}), "messages must be a list"),
        (_export(messages=[msg("user", "hi"), {**msg("assistant", "x"), "role": "bot"}]), r"messages\[1\]\.role"),
        (_export(messages=[{"role": "user"}]), r"messages\[0\]\.content must be a string"),
        (_export(messages=[{**msg("user", "x"), "files": "a.png"}]), r"messages\[0\]\.files"),
        (_export(messages=[{**msg("user", "x"), "extra": 1}]), "unknown keys: extra"),
        (_export(title=5), "title must be a string"),
    ],
    ids=[
        "not-json",
        "not-an-object",
        "no-format",
        "future-version",
        "messages-not-list",
        "wrong-role",
        "no-content",
        "files-not-list",
        "unknown-key",
        "title-not-string",
    ],
)
def test_a_malformed_import_says_why_and_creates_nothing(store, text, error):
    with pytest.raises(ValueError, match=error) as raised:
        store.import_json("alice", text)
    assert str(raised.value).startswith("Can't import this conversation:")
    assert store.list("alice") == []


def test_a_partial_reply_saved_mid_stream_survives_a_crash(tmp_path):
    path = tmp_path / "history.sqlite3"
    # A separate process that saves half a reply and dies without closing anything.
    crash = textwrap.dedent(
        f"""
        import os
        from chat.history import HistoryStore
        store = HistoryStore({str(path)!r})
        cid = store.create("alice")
        store.save_messages("alice", cid, [{{"role": "user", "content": "Count to ten"}}])
        store.save_messages("alice", cid, [{{"role": "user", "content": "Count to ten"}},
                                           {{"role": "assistant", "content": "One, two, thr"}}])
        print(cid, flush=True)
        os._exit(1)
        """
    )
    result = subprocess.run([sys.executable, "-c", crash], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    cid = result.stdout.strip()

    store = HistoryStore(path)
    assert store.load("alice", cid).messages[-1] == msg("assistant", "One, two, thr")
    store.close()


def test_default_data_dir_follows_each_platforms_convention(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "gemma4-chat"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_data_dir() == Path.home() / ".local" / "share" / "gemma4-chat"

    monkeypatch.setattr(sys, "platform", "darwin")
    assert default_data_dir() == Path.home() / "Library" / "Application Support" / "gemma4-chat"

    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("APPDATA", str(tmp_path / "Roaming"))
    assert default_data_dir() == tmp_path / "Roaming" / "gemma4-chat"
