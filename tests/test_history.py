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


def _writes(store, action) -> set[str]:
    """The writing statements `action` runs itself (not the search index's bookkeeping), values filled in."""
    statements: list[str] = []
    store._conn.set_trace_callback(statements.append)
    try:
        action()
    finally:
        store._conn.set_trace_callback(None)
    return {" ".join(s.split()) for s in statements if s.startswith(("INSERT INTO ", "UPDATE ", "DELETE FROM "))}


def test_a_streaming_save_rewrites_only_the_reply_being_streamed(store):
    cid = store.create("alice")
    history = [msg("user" if i % 2 == 0 else "assistant", f"message {i}") for i in range(40)]
    store.save_messages("alice", cid, history)
    reply = store.tree("alice", cid)[-1].id

    longer = [*history[:-1], msg("assistant", "message 39, longer now")]
    writes = _writes(store, lambda: store.save_messages("alice", cid, longer))
    # The conversation's updated time and the changed message, in place (the search index follows it).
    assert len(writes) == 2
    assert any(w.startswith("UPDATE conversations SET title = COALESCE(title,") for w in writes)
    assert any(w.startswith("UPDATE messages SET content =") and w.endswith(f"WHERE id = {reply}") for w in writes)
    assert store.load("alice", cid).messages == longer
    assert len(store.tree("alice", cid)) == 40  # no new version


def test_saving_a_shorter_list_shows_less_and_keeps_the_rest_as_a_branch(store):
    cid = store.create("alice")
    store.save_messages("alice", cid, CHAT)
    store.save_messages("alice", cid, CHAT[:2])  # e.g. "retry" removed the last reply
    assert store.load("alice", cid).messages == CHAT[:2]
    assert [node.message for node in store.tree("alice", cid)] == CHAT


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


# ---------------------------------------------------------------------------------------------
# Branches: a conversation is a tree, the chat shows its active path
# ---------------------------------------------------------------------------------------------

U1, A1, U2, A2 = msg("user", "u1"), msg("assistant", "a1"), msg("user", "u2"), msg("assistant", "a2")


def contents(messages) -> list[str]:
    return [m["content"] for m in messages]


def shape(store, owner, cid) -> dict[str, str | None]:
    """Each message's content -> its parent's content: the tree, readable."""
    nodes = store.tree(owner, cid)
    by_id = {n.id: n.message["content"] for n in nodes}
    return {n.message["content"]: by_id.get(n.parent_id) for n in nodes}


def test_an_edit_keeps_the_old_version_as_a_sibling(store):
    cid = store.create("alice")
    store.save_messages("alice", cid, [U1, A1, U2, A2])
    # As the chat function saves an edit of u2 today: the chat cut back to before it, the new message, its reply.
    store.save_messages("alice", cid, [U1, A1, msg("user", "u2 edited")])
    store.save_messages("alice", cid, [U1, A1, msg("user", "u2 edited"), msg("assistant", "a2 again")])

    assert contents(store.active_path("alice", cid)) == ["u1", "a1", "u2 edited", "a2 again"]
    assert shape(store, "alice", cid) == {
        "u1": None,
        "a1": "u1",
        "u2": "a1",
        "a2": "u2",
        "u2 edited": "a1",
        "a2 again": "u2 edited",
    }
    assert store.siblings("alice", cid, 2) == (1, 2)  # shown as ‹ 2/2 ›
    assert store.siblings("alice", cid, 3) == (0, 1)
    assert contents(store.switch_branch("alice", cid, 2, 0)) == ["u1", "a1", "u2", "a2"]
    assert contents(store.load("alice", cid).messages) == ["u1", "a1", "u2", "a2"]


def test_a_retry_keeps_the_old_reply_as_a_sibling_and_streams_the_new_one_in_place(store):
    cid = store.create("alice")
    store.save_messages("alice", cid, [U1, A1])
    store.save_messages("alice", cid, [U1])  # retry: the reply is cut off, the message resent
    for partial in ("a", "a1 b", "a1 bis"):
        store.save_messages("alice", cid, [U1, msg("assistant", partial)])

    assert contents(store.active_path("alice", cid)) == ["u1", "a1 bis"]
    assert shape(store, "alice", cid) == {"u1": None, "a1": "u1", "a1 bis": "u1"}
    assert store.path_siblings("alice", cid) == [(0, 1), (1, 2)]


def test_branch_from_adds_a_version_under_the_same_parent(store):
    cid = store.create("alice")
    store.save_messages("alice", cid, [U1, A1, U2, A2])
    path = store.branch_from("alice", cid, 2, [msg("user", "u2'"), msg("assistant", "a2'")])

    assert path == store.active_path("alice", cid) == [U1, A1, msg("user", "u2'"), msg("assistant", "a2'")]
    assert shape(store, "alice", cid)["u2'"] == shape(store, "alice", cid)["u2"] == "a1"
    # A regenerate: a new version of the reply, then streamed as usual.
    store.branch_from("alice", cid, 3, [msg("assistant", "")])
    store.save_messages("alice", cid, [U1, A1, msg("user", "u2'"), msg("assistant", "a2'' streamed")])
    assert store.path_siblings("alice", cid) == [(0, 1), (0, 1), (1, 2), (1, 2)]
    # At the end of the path: one more message; the first message itself: a new version of it.
    assert len(store.branch_from("alice", cid, 4, [msg("user", "more")])) == 5
    assert store.branch_from("alice", cid, 0, [msg("user", "start over")]) == [msg("user", "start over")]
    assert store.siblings("alice", cid, 0) == (1, 2)

    with pytest.raises(IndexError):
        store.branch_from("alice", cid, 2, [msg("user", "past the end")])
    with pytest.raises(ValueError, match="at least one"):
        store.branch_from("alice", cid, 0, [])
    with pytest.raises(ValueError, match=r"messages\[0\]\.role"):
        store.branch_from("alice", cid, 0, [msg("robot", "x")])


def test_switching_back_follows_the_version_last_shown(store):
    cid = store.create("alice")
    store.save_messages("alice", cid, [U1, A1, U2, A2])
    store.branch_from("alice", cid, 3, [msg("assistant", "a2 newer")])
    assert contents(store.switch_branch("alice", cid, 3, 0))[-1] == "a2"  # the older reply, shown last
    store.branch_from("alice", cid, 2, [msg("user", "u2'"), msg("assistant", "a2'")])

    # Back to u2: to its older reply, where the chat was, not the newer one.
    assert contents(store.switch_branch("alice", cid, 2, 0)) == ["u1", "a1", "u2", "a2"]
    assert store.path_siblings("alice", cid) == [(0, 1), (0, 1), (0, 2), (0, 2)]
    assert contents(store.switch_branch("alice", cid, 2, 1)) == ["u1", "a1", "u2'", "a2'"]

    with pytest.raises(IndexError):
        store.switch_branch("alice", cid, 2, 2)
    with pytest.raises(IndexError):
        store.switch_branch("alice", cid, 4, 0)
    with pytest.raises(IndexError):
        store.siblings("alice", cid, 4)


def test_a_never_shown_version_opens_at_its_newest_leaf(store):
    cid = store.create("alice")
    store.save_messages("alice", cid, [U1, A1])
    store.save_messages("alice", cid, [msg("user", "other")])  # a new first message: u1's branch stays
    tree = {n.message["content"]: n.id for n in store.tree("alice", cid)}
    exported = json.loads(store.export_json("alice", cid))
    copy = store.import_json("alice", json.dumps({**exported, "active_path": [1]}))  # shows u1 only

    assert contents(store.active_path("alice", copy)) == ["u1"]
    assert contents(store.switch_branch("alice", copy, 0, 1)) == ["other"]
    assert contents(store.switch_branch("alice", copy, 0, 0)) == ["u1"]  # where it was last shown
    assert contents(store.activate_message("alice", cid, tree["u1"])) == ["u1", "a1"]


def test_undo_with_prune_deletes_the_undone_exchange(store):
    cid = store.create("alice")
    store.save_messages("alice", cid, [U1, A1, U2, A2])
    store.branch_from("alice", cid, 3, [msg("assistant", "a2 bis")])
    store.save_messages("alice", cid, [U1, A1], prune=True)  # undo: u2 with both its replies

    assert contents(store.active_path("alice", cid)) == ["u1", "a1"]
    assert [n.message for n in store.tree("alice", cid)] == [U1, A1]
    # Without prune the undone exchange stays, a version of the next message sent there.
    store.save_messages("alice", cid, [U1, A1, U2, A2])
    store.save_messages("alice", cid, [U1, A1])
    store.save_messages("alice", cid, [U1, A1, msg("user", "instead")])
    assert store.siblings("alice", cid, 2) == (1, 2)


def test_a_changed_reply_that_was_followed_up_branches_instead_of_being_overwritten(store):
    cid = store.create("alice")
    store.save_messages("alice", cid, [U1, A1, U2, A2])
    store.save_messages("alice", cid, [U1, A1])
    store.save_messages("alice", cid, [U1, msg("assistant", "a1 changed")])
    assert shape(store, "alice", cid) == {"u1": None, "a1": "u1", "u2": "a1", "a2": "u2", "a1 changed": "u1"}


def test_new_stats_for_a_shown_message_are_written_in_place(store):
    cid = store.create("alice")
    store.save_messages("alice", cid, [U1, A1])
    with_stats = {**A1, "stats": {"output_tokens": 2}}
    store.save_messages("alice", cid, [U1, with_stats, U2])
    assert [n.message for n in store.tree("alice", cid)] == [U1, with_stats, U2]


def test_list_counts_the_active_path_only(store):
    cid = store.create("alice")
    store.save_messages("alice", cid, [U1, A1, U2, A2])
    store.branch_from("alice", cid, 1, [msg("assistant", "short")])
    assert store.list("alice")[0].message_count == 2
    store.switch_branch("alice", cid, 1, 0)
    assert store.list("alice")[0].message_count == 4


def test_deleting_a_conversation_deletes_every_version(store):
    cid = store.create("alice")
    store.save_messages("alice", cid, [U1, A1, U2, A2])
    store.branch_from("alice", cid, 1, [msg("assistant", "other")])
    store.delete("alice", cid)
    assert store._conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0


def test_a_long_chat_branches_prunes_and_deletes_in_one_statement_each(store):
    # No cascade from message to message: SQLite would stop at its trigger depth (1000).
    cid = store.create("alice")
    chat = [msg("user" if i % 2 == 0 else "assistant", f"m{i}") for i in range(2500)]
    store.save_messages("alice", cid, chat)
    assert store.siblings("alice", cid, 2499) == (0, 1)
    store.save_messages("alice", cid, chat[:1], prune=True)
    assert len(store.tree("alice", cid)) == 1
    store.save_messages("alice", cid, chat)
    store.delete("alice", cid)
    assert store._conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0


def test_owners_never_see_or_touch_each_others_branches(store):
    mine = store.create("alice")
    store.save_messages("alice", mine, [U1, A1])
    message_id = store.tree("alice", mine)[-1].id
    theirs = store.create("bob")
    for attempt in (
        lambda: store.active_path("bob", mine),
        lambda: store.tree("bob", mine),
        lambda: store.branch_from("bob", mine, 1, [msg("assistant", "hijack")]),
        lambda: store.siblings("bob", mine, 0),
        lambda: store.path_siblings("bob", mine),
        lambda: store.switch_branch("bob", mine, 0, 0),
        lambda: store.activate_message("bob", mine, message_id),
        lambda: store.activate_message("bob", theirs, message_id),  # alice's message through bob's chat
        lambda: store.save_messages("bob", mine, [U1], prune=True),
    ):
        with pytest.raises(NotFound):
            attempt()
    assert [n.message for n in store.tree("alice", mine)] == [U1, A1]


# ---------------------------------------------------------------------------------------------
# Migrating a v1 file (one row per message, in order)
# ---------------------------------------------------------------------------------------------

V1_SCHEMA = """
CREATE TABLE conversations (id TEXT PRIMARY KEY, owner TEXT NOT NULL, title TEXT,
                            created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE INDEX conversations_by_owner ON conversations (owner, updated_at);
CREATE TABLE messages (conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
                       position INTEGER NOT NULL, data TEXT NOT NULL,
                       PRIMARY KEY (conversation_id, position)) WITHOUT ROWID;
PRAGMA user_version = 1;
"""


def v1_file(path: Path, conversations: dict[str, tuple[str, str | None, float, list]]) -> Path:
    """A history file as the app before branches wrote it: {id: (owner, title, updated_at, messages)}."""
    raw = sqlite3.connect(path)
    raw.executescript(V1_SCHEMA)
    for cid, (owner, title, updated_at, messages) in conversations.items():
        raw.execute("INSERT INTO conversations VALUES (?, ?, ?, ?, ?)", (cid, owner, title, 1.0, updated_at))
        raw.executemany(
            "INSERT INTO messages VALUES (?, ?, ?)",
            [(cid, i, json.dumps(m, ensure_ascii=False)) for i, m in enumerate(messages)],
        )
    raw.commit()
    raw.close()
    return path


def test_a_v1_file_migrates_in_place_each_chat_one_linear_branch(tmp_path):
    path = v1_file(
        tmp_path / "history.sqlite3",
        {
            "c1": ("alice", None, 5.0, CHAT),
            "c2": ("alice", "Named", 5.0, [msg("user", "Grüße aus Köln"), msg("assistant", "Hallo!")]),
            "c3": ("bob", None, 3.0, []),
        },
    )
    store = HistoryStore(path)
    try:
        assert [(c.id, c.title, c.updated_at, c.message_count) for c in store.list("alice")] == [
            ("c2", "Named", 5.0, 2),  # same time: the later row first, as before
            ("c1", UNTITLED, 5.0, 3),
        ]
        assert store.load("alice", "c1").messages == CHAT
        tree = store.tree("alice", "c1")
        assert [n.parent_id for n in tree] == [None, tree[0].id, tree[1].id]
        assert store.path_siblings("alice", "c1") == [(0, 1)] * 3
        assert store.load("bob", "c3").messages == []
        assert [h.conversation_id for h in store.search("alice", "grüße KOLN")] == ["c2"]  # indexed on migration
        # And it goes on as a tree.
        store.save_messages("alice", "c1", CHAT[:2])  # a retry
        store.save_messages("alice", "c1", [*CHAT[:2], msg("assistant", "A dog.")])
        assert store.siblings("alice", "c1", 2) == (1, 2)
        store.save_messages("bob", "c3", [msg("user", "first")])
        assert store.list("bob")[0].title == "first"
    finally:
        store.close()
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
    assert {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE name LIKE '%_v1'")} == set()
    raw.close()


def test_a_migration_that_fails_changes_nothing(tmp_path):
    path = v1_file(tmp_path / "history.sqlite3", {"c1": ("alice", None, 1.0, [msg("user", "kept")])})
    raw = sqlite3.connect(path)
    raw.execute('INSERT INTO messages VALUES (\'c1\', 1, \'{"role": "robot", "content": "x"}\')')
    raw.commit()
    raw.close()
    with pytest.raises(ValueError, match="role"):
        HistoryStore(path)
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == 1
    assert raw.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 2
    raw.close()


# ---------------------------------------------------------------------------------------------
# Export and import of the tree
# ---------------------------------------------------------------------------------------------

# A file the app wrote before branches: version 1, the chat in order.
OLD_EXPORT = """{
  "format": "gemma4-chat.conversation",
  "version": 1,
  "title": "Cats",
  "created_at": "2025-05-01T10:00:00+00:00",
  "updated_at": "2025-05-01T10:05:00+00:00",
  "messages": [
    {"role": "system", "content": "You are terse.", "reasoning": null, "files": [], "stats": null},
    {"role": "user", "content": "What is in this picture?", "reasoning": null,
     "files": ["/data/uploads/cat.png"], "stats": null},
    {"role": "assistant", "content": "A cat on a **sofa**.", "reasoning": "Fur, whiskers, cushions.",
     "files": [], "stats": {"ttft_s": 0.2512, "decode_tok_s": 87.456, "output_tokens": 7}}
  ]
}"""


def branched(store, owner="alice") -> str:
    cid = store.create(owner, title="Branched")
    store.save_messages(owner, cid, [U1, A1, U2, A2])
    store.branch_from(owner, cid, 2, [msg("user", "u2'"), msg("assistant", "a2'")])
    store.switch_branch(owner, cid, 2, 0)
    return cid


def test_export_writes_every_version_with_ids_parents_and_the_active_path(store):
    data = json.loads(store.export_json("alice", branched(store)))
    assert data["version"] == 2
    assert [(m["id"], m["parent"], m["content"]) for m in data["messages"]] == [
        (1, None, "u1"),
        (2, 1, "a1"),
        (3, 2, "u2"),
        (4, 3, "a2"),
        (5, 2, "u2'"),
        (6, 5, "a2'"),
    ]
    assert data["active_path"] == [1, 2, 3, 4]
    assert {k: v for k, v in data["messages"][0].items() if k not in ("id", "parent")} == U1


def test_a_tree_export_imports_back_with_every_version(store):
    cid = branched(store)
    copy = store.import_json("bob", store.export_json("alice", cid))
    assert store.load("bob", copy).title == "Branched"
    assert store.active_path("bob", copy) == store.active_path("alice", cid)
    assert shape(store, "bob", copy) == shape(store, "alice", cid)
    assert store.path_siblings("bob", copy) == [(0, 1), (0, 1), (0, 2), (0, 1)]
    assert contents(store.switch_branch("bob", copy, 2, 1))[-1] == "a2'"
    # The copy's ids are its own: the original is untouched by what the copy does.
    store.save_messages("bob", copy, [U1], prune=True)
    assert len(store.tree("alice", cid)) == 6


def test_an_old_linear_export_still_imports(store):
    cid = store.import_json("alice", OLD_EXPORT)
    conversation = store.load("alice", cid)
    assert (conversation.title, conversation.messages) == ("Cats", CHAT)
    assert store.path_siblings("alice", cid) == [(0, 1)] * 3


def test_a_tree_export_without_an_active_path_shows_its_last_message(store):
    data = json.loads(store.export_json("alice", branched(store)))
    del data["active_path"]
    cid = store.import_json("alice", json.dumps(data))
    assert contents(store.active_path("alice", cid)) == ["u1", "a1", "u2'", "a2'"]


def _tree_export(messages, **changes):
    return json.dumps({"format": "gemma4-chat.conversation", "version": 2, "messages": messages, **changes})


def node(id, parent, content="x", role="user", **extra):
    return {"id": id, "parent": parent, **msg(role, content), **extra}


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (_tree_export([msg("user", "x")]), r'messages\[0\] needs an "id" and a "parent"'),
        (_tree_export([node(True, None)]), r"messages\[0\]\.id must be an integer or a string"),
        (_tree_export([node(1, None), node(1, 1)]), r"messages\[1\]\.id 1 is used twice"),
        (_tree_export([node(1, 2), node(2, None)]), r"messages\[0\]\.parent 2 is not the id of an earlier message"),
        (_tree_export([node(1, None), node(2, [1])]), r"messages\[1\]\.parent \[1\] is not the id"),
        (_tree_export([node(1, None), node(2, 1, role="bot")]), r"messages\[1\]\.role"),
        (_tree_export([node(1, None, extra=1)]), r"messages\[0\] has unknown keys: extra"),
        (_tree_export([node(1, None), node(2, 1)], active_path=[2]), "active_path must go from a first message"),
        (_tree_export([node(1, None), node(2, None)], active_path=[1, 2]), "active_path must go from a first"),
        (_tree_export([node(1, None)], active_path=[7]), "active_path must be a list of the messages' ids"),
        (_tree_export([node(1, None)], active_path="1"), "active_path must be a list"),
    ],
    ids=[
        "no-id",
        "bool-id",
        "duplicate-id",
        "parent-later",
        "parent-not-an-id",
        "wrong-role",
        "unknown-key",
        "path-not-from-a-root",
        "path-not-a-chain",
        "path-unknown-id",
        "path-not-a-list",
    ],
)
def test_a_malformed_tree_import_says_why_and_creates_nothing(store, text, error):
    with pytest.raises(ValueError, match=error) as raised:
        store.import_json("alice", text)
    assert str(raised.value).startswith("Can't import this conversation:")
    assert store.list("alice") == []


def test_a_hand_made_tree_with_string_ids_imports(store):
    text = _tree_export([node("a", None, "hi"), node("b", "a", "one", "assistant"), node("c", "a", "two", "assistant")])
    cid = store.import_json("alice", text)
    assert contents(store.active_path("alice", cid)) == ["hi", "two"]
    assert store.load("alice", cid).title == "hi"


def test_markdown_export_shows_the_active_path_and_says_other_versions_exist(store):
    cid = branched(store)
    markdown = store.export_markdown("alice", cid)
    assert "u2'" not in markdown and "a2" in markdown
    assert "the JSON export keeps the other versions" in markdown
    plain = store.create("alice")
    store.save_messages("alice", plain, CHAT)
    assert "other versions" not in store.export_markdown("alice", plain)
