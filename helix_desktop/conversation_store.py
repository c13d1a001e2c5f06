"""Chat conversations on disk: SQLite in the app-data folder, one transaction per save, search, Markdown/JSON export.

No Qt here. Each save replaces a conversation's messages inside one transaction, so a crash
leaves either the old or the new conversation, never half of one; exports go to a temp file
that is renamed into place.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY, title TEXT NOT NULL, system_prompt TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT '', created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY, conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    position INTEGER NOT NULL, role TEXT NOT NULL, content TEXT NOT NULL,
    segments TEXT, stats TEXT, finish_reason TEXT, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, position);
"""


@dataclass
class Message:
    role: str  # system | user | assistant
    content: str
    segments: list[list[str]] | None = None  # [[text, source], ...] for provenance colouring of a reply
    stats: dict | None = None  # the request's stats (tokens, tok/s, acceptance) for a reply
    finish_reason: str | None = None
    created: float = field(default_factory=time.time)


@dataclass
class Conversation:
    id: int | None
    title: str = "New chat"
    system_prompt: str = ""
    model: str = ""  # the short model id that answered last
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    messages: list[Message] = field(default_factory=list)

    def chat_messages(self) -> list[tuple[str, str]]:
        """(role, text) pairs for the model: the system prompt (if any) then the turns."""
        head = [("system", self.system_prompt)] if self.system_prompt.strip() else []
        return head + [(m.role, m.content) for m in self.messages]


@dataclass(frozen=True)
class Summary:
    id: int
    title: str
    updated: float
    num_messages: int
    snippet: str  # where the search matched, or the first user message


def title_from(text: str, limit: int = 48) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


class ConversationStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # the UI thread is the only user; check_same_thread off only so tests may close it from a fixture
        self._db = sqlite3.connect(str(self.path), check_same_thread=False)
        self._db.execute("PRAGMA foreign_keys = ON")
        self._db.execute("PRAGMA journal_mode = WAL")  # readers never see a half-written transaction
        with self._db:
            self._db.executescript(SCHEMA)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self._db.close()

    # ---------------------------------------------------------------- writing
    def save(self, conv: Conversation) -> Conversation:
        """Insert or replace ``conv`` and all its messages in one transaction; sets ``conv.id``."""
        conv.updated = time.time()
        with self._db:  # commit on success, roll back on any error
            if conv.id is None:
                cur = self._db.execute(
                    "INSERT INTO conversations (title, system_prompt, model, created, updated) VALUES (?, ?, ?, ?, ?)",
                    (conv.title, conv.system_prompt, conv.model, conv.created, conv.updated))
                conv.id = cur.lastrowid
            else:
                self._db.execute("UPDATE conversations SET title = ?, system_prompt = ?, model = ?, updated = ? "
                                 "WHERE id = ?", (conv.title, conv.system_prompt, conv.model, conv.updated, conv.id))
                self._db.execute("DELETE FROM messages WHERE conversation_id = ?", (conv.id,))
            self._db.executemany(
                "INSERT INTO messages (conversation_id, position, role, content, segments, stats, finish_reason, "
                "created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(conv.id, i, m.role, m.content, _dump(m.segments), _dump(m.stats), m.finish_reason, m.created)
                 for i, m in enumerate(conv.messages)])
        return conv

    def delete(self, conversation_id: int) -> None:
        with self._db:
            self._db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    # ---------------------------------------------------------------- reading
    def load(self, conversation_id: int) -> Conversation:
        row = self._db.execute("SELECT id, title, system_prompt, model, created, updated FROM conversations "
                               "WHERE id = ?", (conversation_id,)).fetchone()
        if row is None:
            raise KeyError(f"no conversation {conversation_id}")
        conv = Conversation(*row)
        rows = self._db.execute("SELECT role, content, segments, stats, finish_reason, created FROM messages "
                                "WHERE conversation_id = ? ORDER BY position", (conversation_id,))
        conv.messages = [Message(role, content, _load(seg), _load(stats), reason, created)
                         for role, content, seg, stats, reason, created in rows]
        return conv

    def list(self, query: str = "") -> list[Summary]:
        """Conversations, newest first; with ``query``, those whose title, system prompt or messages contain it
        (case-insensitive), each with a snippet around the first match."""
        pattern = f"%{_escape_like(query.strip())}%"
        rows = self._db.execute(
            "SELECT c.id, c.title, c.updated, (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id), "
            "  COALESCE((SELECT m.content FROM messages m WHERE m.conversation_id = c.id AND ? != '%%' "
            "            AND m.content LIKE ? ESCAPE '\\' ORDER BY m.position LIMIT 1), "
            "           (SELECT m.content FROM messages m WHERE m.conversation_id = c.id AND m.role = 'user' "
            "            ORDER BY m.position LIMIT 1), '') "
            "FROM conversations c WHERE c.title LIKE ? ESCAPE '\\' OR c.system_prompt LIKE ? ESCAPE '\\' "
            "  OR EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = c.id AND m.content LIKE ? ESCAPE '\\') "
            "  OR ? = '%%' "
            "ORDER BY c.updated DESC, c.id DESC", (pattern, pattern, pattern, pattern, pattern, pattern))
        return [Summary(cid, title, updated, n, _snippet(text, query)) for cid, title, updated, n, text in rows]


def open_store(path: str | Path) -> tuple[ConversationStore, str | None]:
    """The store at ``path`` and a notice for the user, if it could not be used as it was.

    A file that is not a database is moved aside and a new one started; a folder that cannot be
    written gives an in-memory store, so the chat still works (without saving).
    """
    path = Path(path)
    try:
        return ConversationStore(path), None
    except (OSError, sqlite3.OperationalError) as exc:  # read-only or missing folder, locked file
        return ConversationStore(":memory:"), (f"Conversations cannot be saved in {path.parent} ({exc}); "
                                               "this session's chats will be lost when Helix closes.")
    except sqlite3.DatabaseError as exc:  # "file is not a database": a damaged file
        backup = path.with_name(f"{path.stem}.corrupt-{int(time.time())}{path.suffix}")
        try:
            path.replace(backup)
            for suffix in ("-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        except OSError:
            return ConversationStore(":memory:"), f"Your conversations file is unreadable ({exc}) and could not be moved."
        return ConversationStore(path), (f"Your conversations file was unreadable ({exc}); it was kept as "
                                         f"{backup.name} and a new one started.")


# ---------------------------------------------------------------- export
def to_markdown(conv: Conversation) -> str:
    lines = [f"# {conv.title}", ""]
    if conv.model:
        lines += [f"Model: `{conv.model}`", ""]
    if conv.system_prompt.strip():
        lines += ["**System:**", "", conv.system_prompt.strip(), ""]
    for m in conv.messages:
        lines += [f"**{m.role.title()}:**", "", m.content.strip(), ""]
        if m.stats:
            lines += [f"<sub>{m.stats.get('num_generated_tokens', 0)} tokens · "
                      f"{m.stats.get('tokens_per_second', 0.0):.1f} tok/s · acceptance "
                      f"{m.stats.get('acceptance_rate', 0.0) * 100:.0f}%</sub>", ""]
    return "\n".join(lines).rstrip() + "\n"


def to_json(conv: Conversation) -> str:
    body = asdict(conv)
    body["format"] = "helix-conversation/1"
    return json.dumps(body, ensure_ascii=False, indent=2) + "\n"


def export(conv: Conversation, path: str | Path) -> Path:
    """Write ``conv`` as Markdown (``.md``) or JSON (``.json``), atomically; raises ValueError for other suffixes."""
    path = Path(path)
    kinds = {".md": to_markdown, ".markdown": to_markdown, ".json": to_json}
    if path.suffix.lower() not in kinds:
        raise ValueError(f"export to .md or .json, not '{path.suffix or path.name}'")
    text = kinds[path.suffix.lower()](conv)
    fd, tmp = tempfile.mkstemp(prefix=".helix-export-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------- helpers
def _dump(value) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


def _load(text: str | None):
    return None if text is None else json.loads(text)


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _snippet(text: str, query: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    at = flat.lower().find(query.strip().lower()) if query.strip() else 0
    start = max(0, at - width // 3)
    piece = flat[start:start + width]
    return ("…" if start else "") + piece + ("…" if start + width < len(flat) else "")
