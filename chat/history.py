"""Server-side conversation history: one SQLite file, conversations kept per owner.

The owner is whoever the UI says is asking: the auth username when auth is on, else a
per-browser id. Every query filters by owner, so one owner can never see, change or
delete another's conversations; a foreign id looks exactly like an unknown one
(``NotFound``).

The UI saves the whole message list after every completed *and* every partial reply.
Each save is its own committed transaction, so a crash loses nothing already shown, and
it only rewrites the rows that changed, so saving every few tokens stays cheap.

Messages are plain dicts, stored as JSON text, one row per message::

    {"role": "user" | "assistant" | "system", "content": str,
     "reasoning": str | None, "files": [path, ...], "stats": {...} | None}
"""

from __future__ import annotations

import builtins
import json
import os
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
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
EXPORT_VERSION = 1

# MIGRATIONS[i] takes a file from schema version i to i + 1; PRAGMA user_version holds
# the version. Append a step to change the schema, never edit a released one.
MIGRATIONS: list[tuple[str, ...]] = [
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
]
SCHEMA_VERSION = len(MIGRATIONS)


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
    message_count: int


@dataclass(frozen=True)
class Conversation:
    id: str
    title: str
    created_at: float  # Unix seconds
    updated_at: float
    messages: list[Message] = field(default_factory=list)


class NotFound(KeyError):
    """No conversation with this id belongs to this owner."""


def default_data_dir() -> Path:
    """The per-user data folder the app keeps its history in unless told otherwise."""
    if sys.platform == "win32":
        base = Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / APP_NAME


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


def _encode(messages: Sequence[Any]) -> list[str]:
    """Validate and serialise every message up front, so a bad one writes nothing."""
    encoded = []
    for i, raw in enumerate(messages):
        message = validate_message(raw, f"messages[{i}]")
        try:
            encoded.append(json.dumps(message, ensure_ascii=False, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise ValueError(f"messages[{i}].stats must hold only JSON values: {e}") from None
    return encoded


def _check_owner(owner: str) -> None:
    # An empty owner would quietly pool every session that lacks an id into one history.
    if not isinstance(owner, str) or not owner:
        raise ValueError("owner must be a non-empty string")


class HistoryStore:
    """Conversations in one SQLite file (WAL mode). Safe to share between threads."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection behind a lock: Gradio calls in from many threads, and SQLite
        # allows one writer at a time anyway. isolation_level=None: we BEGIN ourselves.
        self._conn = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        try:
            self._conn.execute("PRAGMA journal_mode = WAL")
            # In WAL mode NORMAL still survives an app crash (only power loss can drop the
            # last commits) and skips an fsync per save, which streaming saves would feel.
            self._conn.execute("PRAGMA synchronous = NORMAL")
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._migrate()
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

    def _migrate(self) -> None:
        with self._transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} has history schema v{version}, newer than this app's v{SCHEMA_VERSION}; "
                    "update the app or use another --data-dir"
                )
            for step in MIGRATIONS[version:]:
                for statement in step:
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

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
        """The owner's conversations, most recently updated first."""
        _check_owner(owner)
        with self._lock:
            rows = self._conn.execute(
                """SELECT id, title, updated_at,
                          (SELECT COUNT(*) FROM messages WHERE conversation_id = conversations.id)
                   FROM conversations WHERE owner = ?
                   ORDER BY updated_at DESC, rowid DESC""",
                (owner,),
            ).fetchall()
        return [ConversationSummary(cid, title or UNTITLED, updated, count) for cid, title, updated, count in rows]

    def load(self, owner: str, conversation_id: str) -> Conversation:
        _check_owner(owner)
        with self._lock:
            row = self._conn.execute(
                "SELECT title, created_at, updated_at FROM conversations WHERE id = ? AND owner = ?",
                (conversation_id, owner),
            ).fetchone()
            if row is None:
                raise NotFound(conversation_id)
            data = self._conn.execute(
                "SELECT data FROM messages WHERE conversation_id = ? ORDER BY position", (conversation_id,)
            ).fetchall()
        title, created_at, updated_at = row
        return Conversation(
            conversation_id, title or UNTITLED, created_at, updated_at, [json.loads(d) for (d,) in data]
        )

    def save_messages(self, owner: str, conversation_id: str, messages: Sequence[Message]) -> None:
        """Make ``messages`` the conversation's whole message list, in one committed transaction.

        Appending, editing the last (streaming) reply and truncating after a retry are all
        this one call. Rows whose JSON is unchanged are not rewritten.
        """
        _check_owner(owner)
        encoded = _encode(messages)
        with self._transaction() as db:
            # COALESCE: a title the user (or an earlier save) already set stays.
            cursor = db.execute(
                "UPDATE conversations SET title = COALESCE(title, ?), updated_at = ? WHERE id = ? AND owner = ?",
                (auto_title(messages), time.time(), conversation_id, owner),
            )
            if cursor.rowcount == 0:
                raise NotFound(conversation_id)
            db.executemany(
                """INSERT INTO messages (conversation_id, position, data) VALUES (?, ?, ?)
                   ON CONFLICT (conversation_id, position) DO UPDATE SET data = excluded.data
                   WHERE data != excluded.data""",
                [(conversation_id, position, data) for position, data in enumerate(encoded)],
            )
            db.execute(
                "DELETE FROM messages WHERE conversation_id = ? AND position >= ?", (conversation_id, len(encoded))
            )

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
        _check_owner(owner)
        with self._transaction() as db:
            cursor = db.execute("DELETE FROM conversations WHERE id = ? AND owner = ?", (conversation_id, owner))
            if cursor.rowcount == 0:
                raise NotFound(conversation_id)

    def export_json(self, owner: str, conversation_id: str) -> str:
        conversation = self.load(owner, conversation_id)
        return json.dumps(
            {
                "format": EXPORT_FORMAT,
                "version": EXPORT_VERSION,
                "title": conversation.title,
                # For people reading the file; import stamps its own times.
                "created_at": _iso(conversation.created_at),
                "updated_at": _iso(conversation.updated_at),
                "messages": conversation.messages,
            },
            ensure_ascii=False,
            indent=2,
        )

    def export_markdown(self, owner: str, conversation_id: str) -> str:
        conversation = self.load(owner, conversation_id)
        parts = [f"# {conversation.title}", f"*Exported from {APP_NAME}, last updated {_iso(conversation.updated_at)}*"]
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
        """Add a conversation from ``export_json`` output; a bad file raises ValueError and adds nothing."""
        _check_owner(owner)
        try:
            title, encoded = _parse_export(text)
        except ValueError as e:
            raise ValueError(f"Can't import this conversation: {e}") from None
        conversation_id = uuid.uuid4().hex
        now = time.time()
        with self._transaction() as db:
            db.execute(
                "INSERT INTO conversations (id, owner, title, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                (conversation_id, owner, title, now, now),
            )
            db.executemany(
                "INSERT INTO messages (conversation_id, position, data) VALUES (?, ?, ?)",
                [(conversation_id, position, data) for position, data in enumerate(encoded)],
            )
        return conversation_id


def _parse_export(text: str | bytes) -> tuple[str | None, list[str]]:
    """The title and encoded messages of an export file, or ValueError saying what is wrong."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        raise ValueError(f'not a {APP_NAME} export (expected "format": "{EXPORT_FORMAT}")')
    version = data.get("version")
    if type(version) is not int or not 1 <= version <= EXPORT_VERSION:
        raise ValueError(f"unsupported version {version!r}; this app reads version {EXPORT_VERSION}")
    title = data.get("title")
    if title is not None and not isinstance(title, str):
        raise ValueError("title must be a string")
    messages = data.get("messages")
    if not isinstance(messages, list):
        raise ValueError("messages must be a list")
    encoded = _encode(messages)
    return " ".join((title or "").split()) or auto_title(messages), encoded


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
