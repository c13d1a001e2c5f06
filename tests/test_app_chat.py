"""The Chat tab on tiny models: send, stream, stop, regenerate, edit-and-resend, copy, persistence, search, export;
and prompts tokenized off the UI thread."""

from __future__ import annotations

import copy
import json
import time

import pytest

pytest.importorskip("PySide6")

from PySide6.QtCore import QTimer  # noqa: E402
from PySide6.QtGui import QGuiApplication  # noqa: E402

from engine.host import EngineHost  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from tests.tiny import tiny_engine  # noqa: E402

TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _window(settings_dir, engine=None):
    from helix_desktop.app import create_window
    from helix_desktop.settings import AppSettings

    host = EngineHost()
    host.adopt(engine or tiny_engine())
    w = create_window(host, AppSettings(settings_dir))
    w.show()
    return w


@pytest.fixture
def window(qtbot, tmp_path):
    w = _window(tmp_path / "settings")
    yield w
    w.close()


def _chat(window, max_new_tokens: int = 16):
    tab = window.chat_tab
    window.tabs.setCurrentWidget(tab)
    tab.form.temperature.setValue(0.0)
    tab.form.max_new_tokens.setValue(max_new_tokens)
    return tab


def _send(qtbot, tab, text: str):
    tab.input.setPlainText(text)
    with qtbot.waitSignal(tab.reply_finished, timeout=20000) as blocker:
        tab.send_button.click()
    return blocker.args[0]


def test_send_streams_a_coloured_reply_with_stats_and_keeps_it(qtbot, window):
    tab = _chat(window)
    assert window.tabs.indexOf(tab) == 1  # the tiny model has no chat template: Chat follows Generate
    tab.system_prompt.setPlainText("You are terse.")
    batches, sent = [], []
    window.bridge.token_batch.connect(lambda rid, events: batches.append(events))
    engine = window.host.engine
    original = engine.add_request
    engine.add_request = lambda prompt, params, **kw: (sent.append((prompt, params)), original(prompt, params, **kw))[1]
    reply = _send(qtbot, tab, "Tell me about the cat")
    # no chat template: Helix's plain one, stopping where the model would start the user's next turn
    assert sent[0][0] == "System: You are terse.\n\nUser: Tell me about the cat\n\nAssistant:"
    assert "\nUser:" in sent[0][1].stop
    assert batches and reply is not None and reply.role == "assistant"
    assert [m.role for m in tab.conv.messages] == ["user", "assistant"]
    assert "".join(t for t, _ in reply.segments) == reply.content
    # every token's text carries its source; only a tail the detokenizer held back (no single token) has none
    assert {s for _, s in reply.segments[:-1]} <= {"draft", "target", "bonus"}
    assert reply.segments[-1][1] in {"draft", "target", "bonus", ""}
    assert reply.stats["num_generated_tokens"] > 0
    transcript = tab.transcript.toPlainText()
    assert "You are terse." in transcript and "Tell me about the cat" in transcript and reply.content in transcript
    assert "tok/s" in transcript and "tok/s" in tab.stats.text()
    assert tab.conv.title == "Tell me about the cat" and tab.conv.model == "tiny-target"
    stored = tab.store.load(tab.conv.id)
    assert stored.system_prompt == "You are terse." and [m.content for m in stored.messages] == [
        "Tell me about the cat", reply.content]
    assert tab.input.toPlainText() == "" and tab.send_button.isEnabled() and not tab.stop_button.isEnabled()
    tab.copy_button.click()
    assert QGuiApplication.clipboard().text() == reply.content

    # regenerate (greedy): the same answer replaces the old one
    with qtbot.waitSignal(tab.reply_finished, timeout=20000) as again:
        tab.regenerate_button.click()
    assert again.args[0].content == reply.content and len(tab.conv.messages) == 2

    # edit and resend: the last message comes back to the box, the turn is removed, Send asks again
    tab.edit_button.click()
    assert tab.input.toPlainText() == "Tell me about the cat" and tab.conv.messages == []
    edited = _send(qtbot, tab, "Tell me about the dog")
    assert [m.content for m in tab.conv.messages] == ["Tell me about the dog", edited.content]
    assert [m.content for m in tab.store.load(tab.conv.id).messages][0] == "Tell me about the dog"

    # an empty message is refused with a message, nothing is sent
    tab.input.setPlainText("   ")
    tab.send_button.click()
    assert window.banner.level == "error" and "message" in window.banner.text() and tab.request_id is None


def test_stop_keeps_the_partial_reply(qtbot, tmp_path):
    engine = tiny_engine()
    engine.fault_hook = lambda stage, rows: time.sleep(0.01)  # slow steps so Stop lands mid-reply
    window = _window(tmp_path / "settings", engine)
    try:
        tab = _chat(window, max_new_tokens=200)
        tab.input.setPlainText("Once upon a time")
        with qtbot.waitSignal(window.bridge.token_batch, timeout=20000):
            tab.send_button.click()
        assert tab.stop_button.isEnabled() and not tab.send_button.isEnabled()
        with qtbot.waitSignal(tab.reply_finished, timeout=20000) as blocker:
            tab.stop_button.click()
        reply = blocker.args[0]
        assert reply.finish_reason == "cancelled" and reply.stats["num_generated_tokens"] < 200
        assert "stopped" in tab.stats.text()
        assert tab.store.load(tab.conv.id).messages[-1].finish_reason == "cancelled"
    finally:
        window.close()


def test_conversations_survive_a_restart_and_are_searchable_and_exportable(qtbot, tmp_path):
    settings = tmp_path / "settings"
    window = _window(settings)
    tab = _chat(window, max_new_tokens=6)
    _send(qtbot, tab, "A question about cats")
    cats = tab.conv.id
    tab.new_chat()
    tab.system_prompt.setPlainText("Answer in rhyme.")
    _send(qtbot, tab, "A question about dogs")
    window.close()

    again = _window(settings)  # a new window on the same app-data folder: a restart
    try:
        tab = again.chat_tab
        titles = [tab.conversations.item(i).text().splitlines()[0] for i in range(tab.conversations.count())]
        assert titles == ["A question about dogs", "A question about cats"]  # newest first
        assert tab.conv.title == "A question about dogs"  # the latest reopens
        assert tab.system_prompt.toPlainText() == "Answer in rhyme." and len(tab.conv.messages) == 2
        assert "A question about dogs" in tab.transcript.toPlainText()

        tab.search.setText("CATS")  # case-insensitive, over message text
        assert tab.conversations.count() == 1 and tab.conversations.item(0).data(256) == cats
        tab.search.setText("rhyme")  # and the system prompt
        assert tab.conversations.count() == 1
        tab.search.setText("zebra")
        assert tab.conversations.count() == 0
        tab.search.setText("")
        tab.open_conversation(cats)
        assert tab.conv.messages[0].content == "A question about cats"

        md, js = tmp_path / "cats.md", tmp_path / "cats.json"
        tab.export_to(str(md))
        tab.export_to(str(js))
        text = md.read_text(encoding="utf-8")
        assert text.startswith("# A question about cats") and "**User:**" in text and "**Assistant:**" in text
        data = json.loads(js.read_text(encoding="utf-8"))
        assert data["format"] == "helix-conversation/1" and data["model"] == "tiny-target"
        assert [m["role"] for m in data["messages"]] == ["user", "assistant"]
        assert data["messages"][1]["stats"]["num_generated_tokens"] > 0
        tab.export_to(str(tmp_path / "cats.txt"))
        assert again.banner.level == "error" and ".md or .json" in again.banner.text()

        tab.delete_chat()
        assert [tab.conversations.item(i).data(256) for i in range(tab.conversations.count())] != [cats]
        assert tab.conversations.count() == 1
    finally:
        again.close()


def test_instruct_model_opens_on_chat_and_uses_its_template(qtbot, tmp_path):
    base = tiny_engine()
    tok = copy.deepcopy(base.tokenizer)
    tok.chat_template = TEMPLATE
    engine = LLMEngine(base.target.model, tok, None, base.config, max_context=256, names=("tiny-instruct", None))
    prompts: list = []
    original = engine.add_request
    engine.add_request = lambda prompt, *a, **kw: (prompts.append(prompt), original(prompt, *a, **kw))[1]
    window = _window(tmp_path / "settings", engine)
    try:
        assert window.tabs.indexOf(window.chat_tab) == 0 and window.tabs.currentWidget() is window.chat_tab
        tab = _chat(window, max_new_tokens=4)
        tab.system_prompt.setPlainText("Be kind.")
        _send(qtbot, tab, "Hi")
        expected = tok("<|system|>Be kind.\n<|user|>Hi\n<|assistant|>", add_special_tokens=False)["input_ids"]
        assert prompts == [expected]
    finally:
        window.close()


def test_prompts_are_tokenized_off_the_ui_thread(qtbot, window):
    engine = window.host.engine
    original = engine.add_request

    def slow_add_request(prompt, *args, **kwargs):  # a long paste: tokenizing takes a while
        time.sleep(0.4)
        return original(prompt, *args, **kwargs)

    engine.add_request = slow_add_request
    ticks: list[float] = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(20)
    tab = window.generate_tab
    tab.prompt.setPlainText("Once upon a time")
    tab.form.max_new_tokens.setValue(4)
    t0 = time.perf_counter()
    with qtbot.waitSignal(window.bridge.finished, timeout=20000):
        tab.run_button.click()
        assert time.perf_counter() - t0 < 0.2  # submit returned before tokenizing finished
    timer.stop()
    during = [t for t in ticks if t0 < t < t0 + 0.4]
    assert len(during) >= 5  # the UI thread kept running its timers meanwhile
    assert tab.last_final.finish_reason in ("length", "eos")

    # a prompt too long for the context fails on that thread and still reaches the banner
    engine.add_request = original
    tab.prompt.setPlainText("the cat " * 300)
    with qtbot.waitSignal(window.bridge.finished, timeout=20000):
        tab.run_button.click()
    assert tab.last_final.finish_reason == "error" and "context" in window.banner.text()
    assert tab.run_button.isEnabled()


def test_a_conversation_longer_than_the_context_fails_with_a_message(qtbot, window):
    tab = _chat(window, max_new_tokens=4)
    tab.input.setPlainText("the cat " * 300)
    with qtbot.waitSignal(tab.reply_finished, timeout=20000) as blocker:
        tab.send_button.click()
    assert blocker.args[0] is None and window.banner.level == "error" and "context" in window.banner.text()
    assert [m.role for m in tab.conv.messages] == ["user"]  # kept, to shorten with Edit last
    assert tab.edit_button.isEnabled() and tab.send_button.isEnabled()
