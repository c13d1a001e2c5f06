"""The conversation store on its own (no Qt): atomic saves, search, export."""

from __future__ import annotations

import json

import pytest

from helix_desktop.conversation_store import (
    Conversation,
    ConversationStore,
    Message,
    export,
    open_store,
    title_from,
)


@pytest.fixture
def store(tmp_path):
    s = ConversationStore(tmp_path / "c.sqlite3")
    yield s
    s.close()


def _conv(title: str, *texts: str, system: str = "") -> Conversation:
    roles = ["user", "assistant"] * len(texts)
    return Conversation(None, title, system, messages=[Message(r, t) for r, t in zip(roles, texts)])


def test_a_failed_save_leaves_the_previous_conversation_whole(store):
    conv = store.save(_conv("Cats", "Tell me about cats", "Cats purr."))
    conv.messages.append(Message("user", "And dogs?"))
    conv.messages.append(Message("assistant", "Dogs bark.", stats={"bad": object()}))  # not JSON: the save fails
    with pytest.raises(TypeError):
        store.save(conv)
    assert [m.content for m in store.load(conv.id).messages] == ["Tell me about cats", "Cats purr."]


def test_search_is_case_insensitive_and_takes_like_wildcards_literally(store):
    store.save(_conv("Maths", "What is 100% of 5?", "5."))
    store.save(_conv("Snakes", "a_b and c", "ok", system="Be brief."))
    store.save(_conv("Plain", "nothing here", "fine"))
    assert [s.title for s in store.list("100%")] == ["Maths"]
    assert [s.title for s in store.list("A_B")] == ["Snakes"]
    assert [s.title for s in store.list("brief")] == ["Snakes"]  # the system prompt counts
    assert [s.title for s in store.list("%")] == ["Maths"]
    assert len(store.list("")) == 3 and store.list("zebra") == []
    assert "100%" in store.list("100%")[0].snippet


def test_reopening_the_file_keeps_everything(tmp_path):
    first = ConversationStore(tmp_path / "c.sqlite3")
    conv = first.save(_conv("Kept", "hello", "hi there"))
    conv.messages[1].segments, conv.messages[1].stats = [["hi", "draft"], [" there", "target"]], {"num_drafts": 2}
    first.save(conv)
    first.close()
    again = ConversationStore(tmp_path / "c.sqlite3")
    loaded = again.load(conv.id)
    assert loaded.messages[1].segments == [["hi", "draft"], [" there", "target"]]
    assert loaded.messages[1].stats == {"num_drafts": 2}
    again.delete(conv.id)
    assert again.list() == []
    with pytest.raises(KeyError):
        again.load(conv.id)
    again.close()


def test_export_writes_markdown_or_json_and_refuses_other_suffixes(tmp_path):
    conv = _conv("Export me", "Q", "A", system="Sys")
    md = export(conv, tmp_path / "out.md").read_text(encoding="utf-8")
    assert md.startswith("# Export me") and "**System:**\n\nSys" in md and "**Assistant:**\n\nA" in md
    data = json.loads(export(conv, tmp_path / "out.json").read_text(encoding="utf-8"))
    assert data["title"] == "Export me" and [m["content"] for m in data["messages"]] == ["Q", "A"]
    with pytest.raises(ValueError, match=".md or .json"):
        export(conv, tmp_path / "out.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "out.md"]  # no temp files left
    assert title_from("  a  long\nmessage " * 10).endswith("…") and len(title_from("x" * 100)) == 48


def test_a_damaged_file_is_moved_aside_and_an_unwritable_folder_still_chats(tmp_path):
    damaged = tmp_path / "conversations.sqlite3"
    damaged.write_bytes(b"this is not a database" * 100)
    store, notice = open_store(damaged)
    assert "kept as conversations.corrupt-" in notice and store.list() == []
    assert len(list(tmp_path.glob("conversations.corrupt-*.sqlite3"))) == 1
    store.save(_conv("New", "hi", "hello"))
    store.close()

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    store, notice = open_store(blocked / "conversations.sqlite3")
    assert "cannot be saved" in notice
    assert store.load(store.save(_conv("Memory", "hi", "hello")).id).title == "Memory"
    store.close()
