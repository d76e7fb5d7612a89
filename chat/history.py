"""Server-side conversation history: one SQLite file, conversations kept per owner.

The owner is whoever the UI says is asking: the auth username when auth is on, else a
per-browser id. Every query filters by owner, so one owner can never see, change or
delete another's conversations; a foreign id looks exactly like an unknown one
(``NotFound``).

**A conversation is a tree of messages.** Each message row has a parent (the message it
follows; none for a first message), so an edit or a regenerate adds a *sibling* of the
message it replaces and the old version stays, with everything that followed it. The
conversation remembers its *current* message, the end of the **active path**: the root to
current chain is what the chat shows (``load().messages``, ``active_path``). ``siblings``
and ``switch_branch`` drive a ‹ 2/3 › control; switching follows the most recently active
message under the chosen version (its newest leaf if it was never shown).

The UI saves the whole active path after every completed *and* every partial reply
(``save_messages``). Each save is its own committed transaction, so a crash loses nothing
already shown, and it only writes what changed, so saving every few tokens stays cheap:
the shared start is kept, a reply still streaming is rewritten in place, and a save that
differs earlier (an edit, a retry, an undo) branches off, keeping the old tail, unless the
caller passes ``prune=True`` to delete it (what undo should do).

**Search** (``search``): SQLite FTS5 indexes every message's text and every title, kept in
sync by triggers in the same transactions. Where this Python's SQLite lacks FTS5 the rest
works and ``search`` raises ``SearchUnavailable``; the index is rebuilt once FTS5 is there.

Messages are plain dicts, one row per message (the text in its own column, for search)::

    {"role": "user" | "assistant" | "system", "content": str,
     "reasoning": str | None, "files": [path, ...], "stats": {...} | None}
"""

from __future__ import annotations

import builtins
import html
import json
import os
import re
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TypedDict

APP_NAME = "gemma4-chat"
DB_FILENAME = "history.sqlite3"
UNTITLED = "New chat"
TITLE_MAX_CHARS = 60
ROLES = ("user", "assistant", "system")
EXPORT_FORMAT = "gemma4-chat.conversation"
EXPORT_VERSION = 2  # 1: "messages" is the chat, in order; 2: every version, with "id"/"parent", and "active_path"

# One stored message: the columns of a messages row after its tree columns.
Row = tuple[str, str, str | None, str, str | None]  # role, content, reasoning, files (JSON), stats (JSON)
_MESSAGE_COLUMNS = "role, content, reasoning, files, stats"


def _tree_schema(db: sqlite3.Connection) -> None:
    """v1 -> v2: messages become a tree (each row has a parent; the conversation its current message).

    Both tables are rebuilt (SQLite can't add a primary key): conversations get ``num``, a stable
    integer key that messages and the title index refer to. A v1 chat becomes one linear branch,
    its last message the current one. Runs with foreign keys off; ``_migrate`` checks them after.
    """
    db.execute("DROP INDEX conversations_by_owner")
    db.execute("ALTER TABLE conversations RENAME TO conversations_v1")
    db.execute("ALTER TABLE messages RENAME TO messages_v1")
    for statement in (
        """CREATE TABLE conversations (
            num INTEGER PRIMARY KEY,  -- what messages and the title index refer to
            id TEXT NOT NULL UNIQUE,  -- what the API and the UI call it
            owner TEXT NOT NULL,
            title TEXT,  -- NULL until the user names it or the first user message does
            created_at REAL NOT NULL,  -- Unix seconds
            updated_at REAL NOT NULL,
            current_id INTEGER  -- messages.id ending the active path; NULL while it is empty
        )""",
        "CREATE INDEX conversations_by_owner ON conversations (owner, updated_at)",
        """CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused; also the search index's rowid
            conversation INTEGER NOT NULL REFERENCES conversations (num) ON DELETE CASCADE,
            parent_id INTEGER REFERENCES messages (id),  -- NULL: a first message; a subtree goes in one DELETE
            depth INTEGER NOT NULL,  -- its index on every path through it (0 for a first message)
            visited INTEGER NOT NULL DEFAULT 0,  -- per-conversation counter: when it last ended the active path
            role TEXT NOT NULL,
            content TEXT NOT NULL,
            reasoning TEXT,
            files TEXT NOT NULL,  -- a JSON list of paths
            stats TEXT  -- a JSON object or NULL
        )""",
        # A message's versions (children of one parent; first messages: parent_id IS NULL), and a
        # conversation's rows for its cascade delete.
        "CREATE INDEX messages_by_parent ON messages (conversation, parent_id)",
        # The foreign key's own lookups (is a deleted message still someone's parent?) and walks down a subtree.
        "CREATE INDEX messages_children ON messages (parent_id)",
        """INSERT INTO conversations (id, owner, title, created_at, updated_at)
           SELECT id, owner, title, created_at, updated_at FROM conversations_v1 ORDER BY rowid""",
    ):
        db.execute(statement)
    nums = dict(db.execute("SELECT id, num FROM conversations"))
    last: dict[str, tuple[int, int]] = {}  # conversation id -> (its last message's id, depth)
    for conversation_id, data in db.execute(
        "SELECT conversation_id, data FROM messages_v1 ORDER BY conversation_id, position"
    ):
        parent, depth = last.get(conversation_id, (None, -1))
        row = _row(validate_message(json.loads(data), f"a stored message of conversation {conversation_id}"))
        cursor = db.execute(
            f"INSERT INTO messages (conversation, parent_id, depth, visited, {_MESSAGE_COLUMNS})"
            " VALUES (?, ?, ?, 1, ?, ?, ?, ?, ?)",
            (nums[conversation_id], parent, depth + 1, *row),
        )
        last[conversation_id] = (cursor.lastrowid, depth + 1)
    db.executemany(
        "UPDATE conversations SET current_id = ? WHERE num = ?",
        [(message_id, nums[cid]) for cid, (message_id, _) in last.items()],
    )
    db.execute("DROP TABLE messages_v1")
    db.execute("DROP TABLE conversations_v1")


# MIGRATIONS[i] takes a file from schema version i to i + 1; PRAGMA user_version holds
# the version. A step is SQL statements or a function of the connection (run inside the
# migration's transaction, foreign keys off). Append a step to change the schema, never
# edit a released one.
MIGRATIONS: list[tuple[str, ...] | Callable[[sqlite3.Connection], None]] = [
    (
        """CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            title TEXT,  -- NULL until the user names it or the first user message does
            created_at REAL NOT NULL,  -- Unix seconds
            updated_at REAL NOT NULL
        )""",
        "CREATE INDEX conversations_by_owner ON conversations (owner, updated_at)",
        """CREATE TABLE messages (
            conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            data TEXT NOT NULL,  -- one message dict as JSON
            PRIMARY KEY (conversation_id, position)
        ) WITHOUT ROWID""",
    ),
    _tree_schema,
]
SCHEMA_VERSION = len(MIGRATIONS)

# -- search -------------------------------------------------------------------------------
# unicode61 folds case and, with remove_diacritics, accents ("Café" finds "cafe"); 2 also
# handles letters with several marks but needs SQLite 3.27. prefix='2 3' keeps prefix
# queries (a word as it is typed) fast.
TOKENIZE = "unicode61 remove_diacritics " + ("2" if sqlite3.sqlite_version_info >= (3, 27) else "1")
SEARCH_TABLES = {
    "messages_fts": f"""CREATE VIRTUAL TABLE messages_fts USING fts5(
        content, content='messages', content_rowid='id', tokenize='{TOKENIZE}', prefix='2 3')""",
    "titles_fts": f"""CREATE VIRTUAL TABLE titles_fts USING fts5(
        title, content='conversations', content_rowid='num', tokenize='{TOKENIZE}', prefix='2 3')""",
}
# External-content tables: the text stays in messages/conversations, the triggers keep the
# index in step in the same transaction (cascade deletes fire them too). 'delete' must be
# given the old text exactly, which the triggers do.
SEARCH_TRIGGERS = {
    "messages_fts_insert": """CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
        INSERT INTO messages_fts (rowid, content) VALUES (new.id, new.content); END""",
    "messages_fts_delete": """CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
        INSERT INTO messages_fts (messages_fts, rowid, content) VALUES ('delete', old.id, old.content); END""",
    "messages_fts_update": """CREATE TRIGGER messages_fts_update AFTER UPDATE OF content ON messages
        WHEN old.content IS NOT new.content BEGIN
        INSERT INTO messages_fts (messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
        INSERT INTO messages_fts (rowid, content) VALUES (new.id, new.content); END""",
    "titles_fts_insert": """CREATE TRIGGER titles_fts_insert AFTER INSERT ON conversations BEGIN
        INSERT INTO titles_fts (rowid, title) VALUES (new.num, new.title); END""",
    "titles_fts_delete": """CREATE TRIGGER titles_fts_delete AFTER DELETE ON conversations BEGIN
        INSERT INTO titles_fts (titles_fts, rowid, title) VALUES ('delete', old.num, old.title); END""",
    "titles_fts_update": """CREATE TRIGGER titles_fts_update AFTER UPDATE OF title ON conversations
        WHEN old.title IS NOT new.title BEGIN
        INSERT INTO titles_fts (titles_fts, rowid, title) VALUES ('delete', old.num, old.title);
        INSERT INTO titles_fts (rowid, title) VALUES (new.num, new.title); END""",
}
SEARCH_LIMIT_MAX = 100
QUERY_MAX_CHARS = 500
QUERY_MAX_TERMS = 16
TITLE_WEIGHT = 2.0  # a title match counts as much as twice the same match in a message
SNIPPET_TOKENS = 16
# snippet() wraps each match in these; SearchHit turns them into offsets. Private-use
# characters, so chat text hardly ever holds them (where it does they are dropped).
_OPEN, _CLOSE = "\ue000", "\ue001"


class Message(TypedDict):
    role: Literal["user", "assistant", "system"]
    content: str
    reasoning: str | None
    files: list[str]
    stats: dict[str, Any] | None


@dataclass(frozen=True)
class ConversationSummary:
    id: str
    title: str
    updated_at: float  # Unix seconds
    message_count: int  # on the active path


@dataclass(frozen=True)
class Conversation:
    id: str
    title: str
    created_at: float  # Unix seconds
    updated_at: float
    messages: list[Message] = field(default_factory=list)  # the active path


@dataclass(frozen=True)
class TreeMessage:
    """One message of a conversation's tree; ids are the store's, parents come before children."""

    id: int
    parent_id: int | None
    message: Message


@dataclass(frozen=True)
class SearchHit:
    """A chat that matched: its best match, the title or one message (of any version).

    ``snippet`` is plain text (escape it for HTML or Markdown; ``html()`` does) and
    ``highlights`` the [start, end) offsets in it of each matched word.
    """

    conversation_id: str
    title: str  # the chat's title, as listed
    message_id: int | None  # None: the title matched; else open it with HistoryStore.activate_message
    index: int | None  # that message's place on the path through it (its index once activated)
    snippet: str
    highlights: tuple[tuple[int, int], ...]
    rank: float  # FTS5's bm25, titles weighted by TITLE_WEIGHT: lower is better; hits come best first

    def marked(self, left: str = "«", right: str = "»") -> str:
        """The snippet with each match between ``left`` and ``right`` (plain text: escape it yourself)."""
        return self._join(lambda text: text, left, right)

    def html(self) -> str:
        """The snippet as HTML: its text escaped, each match in <mark>."""
        return self._join(html.escape, "<mark>", "</mark>")

    def _join(self, escape: Callable[[str], str], left: str, right: str) -> str:
        parts, at = [], 0
        for start, end in self.highlights:
            parts += [escape(self.snippet[at:start]), left, escape(self.snippet[start:end]), right]
            at = end
        return "".join([*parts, escape(self.snippet[at:])])


class NotFound(KeyError):
    """No conversation with this id belongs to this owner (or no such message in it)."""


class SearchUnavailable(RuntimeError):
    """This Python's SQLite has no FTS5; the message says so in words the UI can show."""


def default_data_dir() -> Path:
    """The per-user data folder the app keeps its history in unless told otherwise."""
    if sys.platform == "win32":
        base = Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / APP_NAME


def fts5_available(conn: sqlite3.Connection) -> bool:
    """Whether this connection's SQLite has FTS5 with the tokenizer search uses."""
    try:
        conn.execute(f"CREATE VIRTUAL TABLE temp.fts5_probe USING fts5(x, tokenize='{TOKENIZE}')")
    except sqlite3.OperationalError:
        return False
    conn.execute("DROP TABLE temp.fts5_probe")
    return True


def fts_query(text: str, prefix: bool = True) -> str | None:
    """A safe FTS5 query for what the user typed: all its words, anywhere; None if it has none.

    Each whitespace-separated chunk becomes one quoted FTS5 string (a ``"`` in it doubled), so
    operators (AND OR NOT NEAR), ``*``, ``^``, ``:``, ``-``, ``+``, parentheses and column
    filters are plain text; the tokenizer then reads the chunk as a phrase ("e-mail" finds
    "e mail"). A chunk with no letter or digit is dropped. With ``prefix``, the last word,
    unless followed by a space, matches as a prefix (``"caf"*``), for search as you type.
    """
    # NUL would end the query early (an unterminated string), a lone surrogate can't be encoded.
    text = text[:QUERY_MAX_CHARS].replace("\x00", " ").encode("utf-8", "replace").decode("utf-8")
    chunks = text.split()
    terms = ['"' + chunk.replace('"', '""') + '"' for chunk in chunks[:QUERY_MAX_TERMS] if any(map(str.isalnum, chunk))]
    if not terms:
        return None
    if prefix and len(chunks) <= QUERY_MAX_TERMS and not text[-1].isspace() and any(map(str.isalnum, chunks[-1])):
        terms[-1] += "*"
    return " ".join(terms)


def auto_title(messages: Sequence[Message]) -> str | None:
    """The first user message with text, on one line, cut to ``TITLE_MAX_CHARS``."""
    for message in messages:
        text = " ".join(message["content"].split())
        if message["role"] == "user" and text:
            return text if len(text) <= TITLE_MAX_CHARS else text[: TITLE_MAX_CHARS - 1].rstrip() + "…"
    return None


def validate_message(raw: Any, where: str = "message") -> Message:
    """Check one message dict and fill in the optional keys; ``ValueError`` says what is wrong."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be an object, got {type(raw).__name__}")
    unknown = set(raw) - set(Message.__annotations__)
    if unknown:
        raise ValueError(f"{where} has unknown keys: {', '.join(sorted(map(str, unknown)))}")
    role = raw.get("role")
    if role not in ROLES:
        raise ValueError(f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}")
    if not isinstance(raw.get("content"), str):
        raise ValueError(f"{where}.content must be a string")
    reasoning = raw.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, str):
        raise ValueError(f"{where}.reasoning must be a string or null")
    files = raw.get("files")
    if files is None:
        files = []
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise ValueError(f"{where}.files must be a list of paths")
    stats = raw.get("stats")
    if stats is not None and not isinstance(stats, dict):
        raise ValueError(f"{where}.stats must be an object or null")
    return Message(role=role, content=raw["content"], reasoning=reasoning, files=list(files), stats=stats)


def _row(message: Message) -> Row:
    stats = None if message["stats"] is None else json.dumps(message["stats"], ensure_ascii=False, allow_nan=False)
    files = json.dumps(message["files"], ensure_ascii=False)
    return (message["role"], message["content"], message["reasoning"], files, stats)


def _message(row: Sequence[Any]) -> Message:
    role, content, reasoning, files, stats = row
    return Message(
        role=role,
        content=content,
        reasoning=reasoning,
        files=json.loads(files),
        stats=None if stats is None else json.loads(stats),
    )


def _encode(messages: Sequence[Any]) -> list[Row]:
    """Validate and serialise every message up front, so a bad one writes nothing."""
    rows = []
    for i, raw in enumerate(messages):
        message = validate_message(raw, f"messages[{i}]")
        try:
            rows.append(_row(message))
        except (TypeError, ValueError) as e:
            raise ValueError(f"messages[{i}].stats must hold only JSON values: {e}") from None
    return rows


def _check_owner(owner: str) -> None:
    # An empty owner would quietly pool every session that lacks an id into one history.
    if not isinstance(owner, str) or not owner:
        raise ValueError("owner must be a non-empty string")


@dataclass(frozen=True)
class _Stored:
    """A message on the active path as read back: its ids and its row."""

    id: int
    parent_id: int | None
    row: Row


# The active path: from the current message up to its first message, returned first to last.
_PATH = f"""WITH RECURSIVE up(id) AS (
        SELECT ? UNION ALL SELECT m.parent_id FROM messages m JOIN up ON m.id = up.id WHERE m.parent_id IS NOT NULL
    )
    SELECT m.id, m.parent_id, {", ".join("m." + c for c in _MESSAGE_COLUMNS.split(", "))}
    FROM up JOIN messages m ON m.id = up.id ORDER BY m.depth"""
# The message under (or at) one to show when it is chosen: the one that most recently ended the
# active path; in a part never shown, its newest leaf.
_LATEST_UNDER = """WITH RECURSIVE down(id) AS (
        SELECT ? UNION ALL SELECT m.id FROM messages m JOIN down ON m.parent_id = down.id
    )
    SELECT m.id FROM down JOIN messages m ON m.id = down.id
    ORDER BY m.visited DESC, EXISTS (SELECT 1 FROM messages c WHERE c.parent_id = m.id), m.id DESC
    LIMIT 1"""
_SUBTREE = """WITH RECURSIVE down(id) AS (
        SELECT ? UNION ALL SELECT m.id FROM messages m JOIN down ON m.parent_id = down.id
    )
    SELECT id FROM down"""
# Each active-path message's place among its versions, and their number.
_PATH_VERSIONS = f"""WITH path AS ({_PATH})
    SELECT (SELECT COUNT(*) FROM messages s WHERE s.conversation = ? AND s.parent_id IS path.parent_id
                                              AND s.id < path.id),
           (SELECT COUNT(*) FROM messages s WHERE s.conversation = ? AND s.parent_id IS path.parent_id)
    FROM path"""
# The best match of each of the owner's chats: in its title or in any version of a message.
_SEARCH = """WITH hits AS (
        SELECT c.num AS num, m.id AS message_id, m.depth AS depth, bm25(messages_fts) AS rank
        FROM messages_fts CROSS JOIN messages m ON m.id = messages_fts.rowid
        CROSS JOIN conversations c ON c.num = m.conversation
        WHERE messages_fts MATCH :query AND c.owner = :owner AND m.role != 'system'
        UNION ALL
        SELECT c.num, NULL, NULL, bm25(titles_fts) * :title_weight
        FROM titles_fts CROSS JOIN conversations c ON c.num = titles_fts.rowid  -- CROSS: the matches first
        WHERE titles_fts MATCH :query AND c.owner = :owner
    ), best AS (
        SELECT *, ROW_NUMBER() OVER (PARTITION BY num ORDER BY rank, message_id IS NOT NULL, message_id DESC) AS n
        FROM hits
    )
    SELECT c.num, c.id, c.title, best.message_id, best.depth, best.rank
    FROM best JOIN conversations c ON c.num = best.num
    WHERE best.n = 1 ORDER BY best.rank, c.updated_at DESC LIMIT :limit"""


def _marked(db: sqlite3.Connection, table: str, function: str, match: str, rowids: Sequence[int]) -> dict[int, str]:
    """``function`` (snippet or highlight, marking with _OPEN/_CLOSE) of each row of ``table`` in ``rowids``."""
    if not rowids:
        return {}
    marks = ", ".join("?" * len(rowids))
    rows = db.execute(
        f"SELECT rowid, {function} FROM {table} WHERE {table} MATCH ? AND rowid IN ({marks})",
        (_OPEN, _CLOSE, match, *rowids),
    )
    return {rowid: text or "" for rowid, text in rows}


def _highlights(marked: str) -> tuple[str, tuple[tuple[int, int], ...]]:
    """snippet()'s text without its markers, and where the marked parts are in it."""
    text: list[str] = []
    spans: list[tuple[int, int]] = []
    at, start = 0, None
    for piece in re.split(f"([{_OPEN}{_CLOSE}])", marked):
        if piece == _OPEN:
            start = at
        elif piece == _CLOSE:
            if start is not None and start < at:
                spans.append((start, at))
            start = None
        else:
            text.append(piece)
            at += len(piece)
    return "".join(text), tuple(spans)


def _sync_search_index(db: sqlite3.Connection, available: bool) -> None:
    """Make the search tables and triggers match what this SQLite can do.

    Without FTS5 the triggers would make every write fail, so they go; with it, missing
    ones (a file migrated or written where FTS5 was missing) are made and the index rebuilt
    from the text, which stays in messages and conversations.
    """
    triggers = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
    if not available:
        for name in sorted(SEARCH_TRIGGERS.keys() & triggers):
            db.execute(f"DROP TRIGGER {name}")
        return
    if SEARCH_TRIGGERS.keys() <= triggers:
        return
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    for name, statement in SEARCH_TABLES.items():
        if name not in tables:
            db.execute(statement)
    for name, statement in SEARCH_TRIGGERS.items():
        if name not in triggers:
            db.execute(statement)
    for name in SEARCH_TABLES:
        db.execute(f"INSERT INTO {name} ({name}) VALUES ('rebuild')")


def _path(db: sqlite3.Connection, current: int | None) -> list[_Stored]:
    if current is None:
        return []
    return [_Stored(r[0], r[1], tuple(r[2:])) for r in db.execute(_PATH, (current,))]  # type: ignore[arg-type]


def _append(db: sqlite3.Connection, num: int, parent: int | None, depth: int, rows: Sequence[Row]) -> int | None:
    """Add ``rows`` as a chain under ``parent`` (the first at ``depth``); the last one's id (else ``parent``)."""
    for row in rows:
        parent = db.execute(
            f"INSERT INTO messages (conversation, parent_id, depth, {_MESSAGE_COLUMNS})"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (num, parent, depth, *row),
        ).lastrowid
        depth += 1
    return parent


def _visit(db: sqlite3.Connection, num: int, message_id: int | None) -> None:
    """End the active path at ``message_id`` (None: empty), stamped as the most recently shown there."""
    db.execute("UPDATE conversations SET current_id = ? WHERE num = ?", (message_id, num))
    if message_id is not None:
        db.execute(
            "UPDATE messages SET visited = 1 + (SELECT MAX(visited) FROM messages WHERE conversation = ?) WHERE id = ?",
            (num, message_id),
        )


def _show(db: sqlite3.Connection, num: int, message_id: int) -> list[Message]:
    """Make the path through ``message_id`` the active one, down to where it was last shown; that path."""
    (end,) = db.execute(_LATEST_UNDER, (message_id,)).fetchone()
    _visit(db, num, end)
    return [_message(s.row) for s in _path(db, end)]


def _touch(db: sqlite3.Connection, num: int, shown: Sequence[Message]) -> None:
    # COALESCE: a title the user (or an earlier save) already set stays.
    db.execute(
        "UPDATE conversations SET title = COALESCE(title, ?), updated_at = ? WHERE num = ?",
        (auto_title(shown), time.time(), num),
    )


class HistoryStore:
    """Conversations in one SQLite file (WAL mode). Safe to share between threads."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.search_available = False  # set by _migrate: whether this SQLite has FTS5
        # One connection behind a lock: Gradio calls in from many threads, and SQLite
        # allows one writer at a time anyway. isolation_level=None: we BEGIN ourselves.
        self._conn = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        try:
            self._conn.execute("PRAGMA journal_mode = WAL")
            # In WAL mode NORMAL still survives an app crash (only power loss can drop the
            # last commits) and skips an fsync per save, which streaming saves would feel.
            self._conn.execute("PRAGMA synchronous = NORMAL")
            self._migrate()
            self._conn.execute("PRAGMA foreign_keys = ON")
        except BaseException:
            self._conn.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            # IMMEDIATE takes the write lock up front, so another process holding the
            # file makes us wait (up to the timeout) instead of failing midway.
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                if self._conn.in_transaction:  # some errors already rolled it back
                    self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: its queries see one snapshot, whatever other processes write meanwhile."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield self._conn
            finally:
                if self._conn.in_transaction:
                    self._conn.execute("COMMIT")

    def _migrate(self) -> None:
        search = fts5_available(self._conn)
        # Foreign keys stay off (the default) until migrated: rebuilding a table drops the old
        # one, which with them on would cascade. They are checked before the commit instead.
        with self._transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} has history schema v{version}, newer than this app's v{SCHEMA_VERSION}; "
                    "update the app or use another --data-dir"
                )
            for step in MIGRATIONS[version:]:
                if callable(step):
                    step(db)
                else:
                    for statement in step:
                        db.execute(statement)
            if version < SCHEMA_VERSION:
                broken = db.execute("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise RuntimeError(f"migrating {self.path} would break {len(broken)} references; nothing changed")
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            _sync_search_index(db, search)
        self.search_available = search

    @staticmethod
    def _find(db: sqlite3.Connection, owner: str, conversation_id: str) -> tuple[int, int | None]:
        """The conversation's num and current message, if it is the owner's."""
        _check_owner(owner)
        row = db.execute(
            "SELECT num, current_id FROM conversations WHERE id = ? AND owner = ?", (conversation_id, owner)
        ).fetchone()
        if row is None:
            raise NotFound(conversation_id)
        return row

    # -- conversations ----------------------------------------------------------------------

    def create(self, owner: str, title: str | None = None) -> str:
        _check_owner(owner)
        conversation_id = uuid.uuid4().hex
        now = time.time()
        with self._transaction() as db:
            db.execute(
                "INSERT INTO conversations (id, owner, title, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                (conversation_id, owner, title or None, now, now),
            )
        return conversation_id

    def list(self, owner: str) -> builtins.list[ConversationSummary]:  # builtins: this method shadows list
        """The owner's conversations, most recently updated first; one query."""
        _check_owner(owner)
        with self._lock:
            rows = self._conn.execute(
                """SELECT c.id, c.title, c.updated_at, COALESCE(m.depth + 1, 0)
                   FROM conversations c LEFT JOIN messages m ON m.id = c.current_id
                   WHERE c.owner = ? ORDER BY c.updated_at DESC, c.num DESC""",
                (owner,),
            ).fetchall()
        return [ConversationSummary(cid, title or UNTITLED, updated, count) for cid, title, updated, count in rows]

    def _load(self, db: sqlite3.Connection, owner: str, conversation_id: str) -> tuple[Conversation, list[_Stored]]:
        """The conversation, its ``messages`` being the active path, and that path as stored."""
        num, current = self._find(db, owner, conversation_id)
        title, created_at, updated_at = db.execute(
            "SELECT title, created_at, updated_at FROM conversations WHERE num = ?", (num,)
        ).fetchone()
        path = _path(db, current)
        messages = [_message(s.row) for s in path]
        return Conversation(conversation_id, title or UNTITLED, created_at, updated_at, messages), path

    def load(self, owner: str, conversation_id: str) -> Conversation:
        """The conversation, its ``messages`` being the active path: what the chat shows."""
        with self._read() as db:
            return self._load(db, owner, conversation_id)[0]

    def active_path(self, owner: str, conversation_id: str) -> builtins.list[Message]:
        """The messages the chat shows: from the first message to the current one."""
        return self.load(owner, conversation_id).messages

    def rename(self, owner: str, conversation_id: str, title: str) -> None:
        _check_owner(owner)
        title = " ".join(title.split())
        if not title:
            raise ValueError("title must not be empty")
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE conversations SET title = ?, updated_at = ? WHERE id = ? AND owner = ?",
                (title, time.time(), conversation_id, owner),
            )
            if cursor.rowcount == 0:
                raise NotFound(conversation_id)

    def delete(self, owner: str, conversation_id: str) -> None:
        """Delete the conversation with every version of every message."""
        _check_owner(owner)
        with self._transaction() as db:
            cursor = db.execute("DELETE FROM conversations WHERE id = ? AND owner = ?", (conversation_id, owner))
            if cursor.rowcount == 0:
                raise NotFound(conversation_id)

    # -- writing the active path ------------------------------------------------------------

    def save_messages(
        self, owner: str, conversation_id: str, messages: Sequence[Message], *, prune: bool = False
    ) -> None:
        """Make ``messages`` the conversation's active path, in one committed transaction.

        Appending, streaming the last reply and cutting back after a retry, undo or edit are
        all this one call; what is stored is kept where it matches:

        - the longest start of the active path whose messages match (same role, content,
          reasoning and files) stays; a changed ``stats`` there is rewritten in place;
        - the active path's last message, an assistant reply nothing follows yet, is rewritten
          in place by an assistant message at its place: the reply being streamed;
        - anything else that differs branches off: the new messages become a new version
          under the shared start and the old tail stays, a sibling one can switch back to.
          With ``prune`` the old tail (with every version below it) is deleted instead:
          what undo should ask for.

        Rows that don't change are not written, so saving every few tokens stays cheap.
        """
        rows = _encode(messages)
        with self._transaction() as db:
            num, current = self._find(db, owner, conversation_id)
            _touch(db, num, messages)
            path = _path(db, current)
            shared = 0
            while shared < min(len(path), len(rows)) and path[shared].row[:4] == rows[shared][:4]:
                shared += 1
            db.executemany(
                "UPDATE messages SET stats = ? WHERE id = ?",
                [
                    (new[4], old.id)
                    for old, new in zip(path[:shared], rows[:shared], strict=True)
                    if old.row[4] != new[4]
                ],
            )
            parent, start = (path[shared - 1].id if shared else None), shared
            if shared < len(path):
                old = path[shared]
                streaming = (
                    shared == len(path) - 1
                    and shared < len(rows)
                    and old.row[0] == rows[shared][0] == "assistant"
                    and db.execute("SELECT 1 FROM messages WHERE parent_id = ?", (old.id,)).fetchone() is None
                )
                if streaming:
                    db.execute(
                        "UPDATE messages SET content = ?, reasoning = ?, files = ?, stats = ? WHERE id = ?",
                        (*rows[shared][1:], old.id),
                    )
                    parent, start = old.id, shared + 1
                elif prune:
                    db.execute(f"DELETE FROM messages WHERE id IN ({_SUBTREE})", (old.id,))
            last = _append(db, num, parent, start, rows[start:])
            if last != current:
                _visit(db, num, last)

    # -- branches ---------------------------------------------------------------------------

    def branch_from(
        self, owner: str, conversation_id: str, message_index: int, new_messages: Sequence[Message]
    ) -> builtins.list[Message]:
        """A new version of the active path's message at ``message_index``: ``new_messages``
        go under the same parent (the first a sibling of that message, the rest following it)
        and become the active path's tail; the old version stays. ``message_index`` may be the
        path's length (a new version after the last message). Returns the new active path.

        An edit: ``branch_from(i, [edited])``; a regenerate: ``branch_from(i, [first_chunk])``,
        then stream with ``save_messages`` as usual.
        """
        rows = _encode(new_messages)
        if not rows:
            raise ValueError("new_messages must hold at least one message")
        with self._transaction() as db:
            num, current = self._find(db, owner, conversation_id)
            path = _path(db, current)
            if not 0 <= message_index <= len(path):
                raise IndexError(f"message_index {message_index} is not in 0..{len(path)}")
            kept = path[:message_index]
            last = _append(db, num, kept[-1].id if kept else None, message_index, rows)
            shown = [*(_message(s.row) for s in kept), *map(_message, rows)]
            _touch(db, num, shown)
            _visit(db, num, last)
        return shown

    def path_siblings(self, owner: str, conversation_id: str) -> builtins.list[tuple[int, int]]:
        """For each message of the active path: (its place among its versions from 0, their number); one query."""
        with self._read() as db:
            num, current = self._find(db, owner, conversation_id)
            if current is None:
                return []
            return [tuple(r) for r in db.execute(_PATH_VERSIONS, (current, num, num))]  # type: ignore[misc]

    def siblings(self, owner: str, conversation_id: str, message_index: int) -> tuple[int, int]:
        """(position from 0, count) of the active path's message at ``message_index`` among its
        versions: the ‹ position+1/count › control. IndexError off the path."""
        versions = self.path_siblings(owner, conversation_id)
        if not 0 <= message_index < len(versions):
            raise IndexError(f"message_index {message_index} is not on the active path ({len(versions)} messages)")
        return versions[message_index]

    def switch_branch(
        self, owner: str, conversation_id: str, message_index: int, position: int
    ) -> builtins.list[Message]:
        """Show version ``position`` (from 0) of the active path's message at ``message_index``:
        the path follows it down to where it was last shown (a never shown one: its newest
        leaf). Returns the new active path; doesn't count as an update (the list order stays)."""
        with self._transaction() as db:
            num, current = self._find(db, owner, conversation_id)
            path = _path(db, current)
            if not 0 <= message_index < len(path):
                raise IndexError(f"message_index {message_index} is not on the active path ({len(path)} messages)")
            versions = [
                message_id
                for (message_id,) in db.execute(
                    "SELECT id FROM messages WHERE conversation = ? AND parent_id IS ? ORDER BY id",
                    (num, path[message_index].parent_id),
                )
            ]
            if not 0 <= position < len(versions):
                raise IndexError(f"position {position} is not in 0..{len(versions) - 1}")
            return _show(db, num, versions[position])

    def activate_message(self, owner: str, conversation_id: str, message_id: int) -> builtins.list[Message]:
        """Show the path through ``message_id`` (a search hit's, of any version), down to where it
        was last shown; returns the new active path (the message at its ``depth``). NotFound if
        the message isn't in this owner's conversation."""
        with self._transaction() as db:
            num, _ = self._find(db, owner, conversation_id)
            found = db.execute("SELECT 1 FROM messages WHERE id = ? AND conversation = ?", (message_id, num))
            if found.fetchone() is None:
                raise NotFound(message_id)
            return _show(db, num, message_id)

    def tree(self, owner: str, conversation_id: str) -> builtins.list[TreeMessage]:
        """Every version of every message, parents before children, versions oldest first."""
        with self._read() as db:
            return self._tree(db, owner, conversation_id)

    def _tree(self, db: sqlite3.Connection, owner: str, conversation_id: str) -> builtins.list[TreeMessage]:
        num, _ = self._find(db, owner, conversation_id)
        rows = db.execute(
            f"SELECT id, parent_id, {_MESSAGE_COLUMNS} FROM messages WHERE conversation = ? ORDER BY id", (num,)
        )
        return [TreeMessage(r[0], r[1], _message(r[2:])) for r in rows]

    # -- search -----------------------------------------------------------------------------

    def search(self, owner: str, query: str, limit: int = 20, *, prefix: bool = True) -> builtins.list[SearchHit]:
        """The owner's chats matching every word of ``query`` (see ``fts_query``), best first, one hit
        per chat: its best match, in its title or in any version of a message (system prompts
        aside). [] for a query without words. SearchUnavailable where SQLite lacks FTS5."""
        _check_owner(owner)
        if not self.search_available:
            raise SearchUnavailable(
                f"Search needs SQLite's FTS5, which this Python's sqlite3 (SQLite {sqlite3.sqlite_version}) "
                "lacks; chats are still saved."
            )
        match = fts_query(query, prefix) if isinstance(query, str) else None
        if match is None or limit < 1:
            return []
        with self._read() as db:
            best = db.execute(
                _SEARCH,
                {"query": match, "owner": owner, "title_weight": TITLE_WEIGHT, "limit": min(limit, SEARCH_LIMIT_MAX)},
            ).fetchall()
            message_ids = [message_id for _, _, _, message_id, _, _ in best if message_id is not None]
            title_nums = [num for num, _, _, message_id, _, _ in best if message_id is None]
            snippets = _marked(
                db, "messages_fts", f"snippet(messages_fts, 0, ?, ?, '…', {SNIPPET_TOKENS})", match, message_ids
            )
            titles = _marked(db, "titles_fts", "highlight(titles_fts, 0, ?, ?)", match, title_nums)
        hits = []
        for num, conversation_id, title, message_id, depth, rank in best:
            snippet, highlights = _highlights(titles[num] if message_id is None else snippets[message_id])
            hits.append(SearchHit(conversation_id, title or UNTITLED, message_id, depth, snippet, highlights, rank))
        return hits

    # -- export and import ------------------------------------------------------------------

    def export_json(self, owner: str, conversation_id: str) -> str:
        """Version 2: every message (all versions) with a file-local "id" and "parent", parents
        first, and "active_path", the ids of the messages shown."""
        with self._read() as db:
            conversation, path = self._load(db, owner, conversation_id)
            tree = self._tree(db, owner, conversation_id)
        numbers = {node.id: n for n, node in enumerate(tree, 1)}  # the store's ids stay in the store
        return json.dumps(
            {
                "format": EXPORT_FORMAT,
                "version": EXPORT_VERSION,
                "title": conversation.title,
                # For people reading the file; import stamps its own times.
                "created_at": _iso(conversation.created_at),
                "updated_at": _iso(conversation.updated_at),
                "messages": [
                    {"id": numbers[node.id], "parent": numbers.get(node.parent_id), **node.message} for node in tree
                ],
                "active_path": [numbers[s.id] for s in path],
            },
            ensure_ascii=False,
            indent=2,
        )

    def export_markdown(self, owner: str, conversation_id: str) -> str:
        """The active path (what the chat shows), for people to read."""
        with self._read() as db:
            conversation, _ = self._load(db, owner, conversation_id)
            num, _ = self._find(db, owner, conversation_id)
            (total,) = db.execute("SELECT COUNT(*) FROM messages WHERE conversation = ?", (num,)).fetchone()
        parts = [f"# {conversation.title}", f"*Exported from {APP_NAME}, last updated {_iso(conversation.updated_at)}*"]
        if total > len(conversation.messages):
            parts.append("*The current version of each message; the JSON export keeps the other versions too.*")
        for message in conversation.messages:
            parts.append(f"## {message['role'].capitalize()}")
            if message["reasoning"]:
                parts.append(f"<details>\n<summary>Reasoning</summary>\n\n{message['reasoning']}\n\n</details>")
            if message["content"]:
                parts.append(message["content"])
            if message["files"]:
                parts.append("Files: " + ", ".join(f"`{path}`" for path in message["files"]))
            stats = dict(message["stats"] or {})
            notes = stats.pop("notes", None)  # the UI's remarks shown with a reply (chat.history_ui)
            if isinstance(notes, list):
                parts += [_note_line(note) for note in notes if isinstance(note, dict)]
            if stats:
                parts.append(_stats_line(stats))
        return "\n\n".join(parts) + "\n"

    def import_json(self, owner: str, text: str | bytes) -> str:
        """Add a conversation from ``export_json`` output (version 2, or 1: a linear chat); a bad
        file raises ValueError and adds nothing."""
        _check_owner(owner)
        try:
            title, nodes, active = _parse_export(text)
        except ValueError as e:
            raise ValueError(f"Can't import this conversation: {e}") from None
        conversation_id = uuid.uuid4().hex
        now = time.time()
        with self._transaction() as db:
            num = db.execute(
                "INSERT INTO conversations (id, owner, title, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                (conversation_id, owner, title, now, now),
            ).lastrowid
            ids: list[int] = []
            depths: list[int] = []
            for parent, row in nodes:
                depth = 0 if parent is None else depths[parent] + 1
                ids.append(_append(db, num, None if parent is None else ids[parent], depth, [row]))  # type: ignore[arg-type]
                depths.append(depth)
            if active:
                _visit(db, num, ids[active[-1]])
        return conversation_id


def _parse_export(text: str | bytes) -> tuple[str | None, list[tuple[int | None, Row]], list[int]]:
    """An export file's title, messages (each with its parent's index, parents first) and the
    indices of its active path; or ValueError saying what is wrong."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        raise ValueError(f'not a {APP_NAME} export (expected "format": "{EXPORT_FORMAT}")')
    version = data.get("version")
    if type(version) is not int or not 1 <= version <= EXPORT_VERSION:
        raise ValueError(f"unsupported version {version!r}; this app reads versions 1 to {EXPORT_VERSION}")
    title = data.get("title")
    if title is not None and not isinstance(title, str):
        raise ValueError("title must be a string")
    messages = data.get("messages")
    if not isinstance(messages, list):
        raise ValueError("messages must be a list")
    if version == 1:  # one linear chat, in order
        rows = _encode(messages)
        nodes: list[tuple[int | None, Row]] = [(i - 1 if i else None, row) for i, row in enumerate(rows)]
        active = list(range(len(rows)))
    else:
        nodes, active = _parse_tree(messages, data.get("active_path"))
    shown = [_message(nodes[i][1]) for i in active]
    return " ".join((title or "").split()) or auto_title(shown), nodes, active


def _is_id(value: Any) -> bool:
    return (type(value) is int) or (isinstance(value, str) and bool(value))


def _parse_tree(messages: list[Any], active_path: Any) -> tuple[list[tuple[int | None, Row]], list[int]]:
    """A version 2 file's messages (each with "id" and "parent") and active path, as indices."""
    nodes: list[tuple[int | None, Row]] = []
    index: dict[int | str, int] = {}  # a file id -> its message's index
    for i, raw in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(raw, dict):
            raise ValueError(f"{where} must be an object, got {type(raw).__name__}")
        if "id" not in raw or "parent" not in raw:
            raise ValueError(f'{where} needs an "id" and a "parent" (null for a first message)')
        node_id, parent = raw["id"], raw["parent"]
        if not _is_id(node_id):
            raise ValueError(f"{where}.id must be an integer or a string")
        if node_id in index:
            raise ValueError(f"{where}.id {node_id!r} is used twice")
        if parent is not None and not (_is_id(parent) and parent in index):
            raise ValueError(f"{where}.parent {parent!r} is not the id of an earlier message")
        message = {k: v for k, v in raw.items() if k not in ("id", "parent")}
        (row,) = _encode_at([message], where)
        index[node_id] = i
        nodes.append((None if parent is None else index[parent], row))
    if active_path is None:  # not written by this app: show the last message's path
        active, at = [], len(nodes) - 1 if nodes else None
        while at is not None:
            active.append(at)
            at = nodes[at][0]
        return nodes, active[::-1]
    if not isinstance(active_path, list) or not all(_is_id(a) and a in index for a in active_path):
        raise ValueError("active_path must be a list of the messages' ids")
    active = [index[a] for a in active_path]
    if any(nodes[at][0] != (active[n - 1] if n else None) for n, at in enumerate(active)):
        raise ValueError("active_path must go from a first message down, each message the parent of the next")
    return nodes, active


def _encode_at(messages: Sequence[Any], where: str) -> list[Row]:
    """_encode for one message, its errors naming ``where``."""
    try:
        return _encode(messages)
    except ValueError as e:
        raise ValueError(str(e).replace("messages[0]", where, 1)) from None


def _stats_line(stats: dict[str, Any]) -> str:
    # Speeds and times are floats with long tails; two decimals are enough to read.
    shown = (f"{key}: {round(value, 2) if isinstance(value, float) else value}" for key, value in stats.items())
    return "> Stats: " + ", ".join(shown)


def _note_line(note: dict[str, Any]) -> str:
    metadata = note.get("metadata")
    title = str(metadata.get("title", "")) if isinstance(metadata, dict) else ""
    text = str(note.get("text", ""))
    return f"> **{title}**" + (f" {text}" if text and text != title else "")


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")
