"""The app against a remote engine (pytest-qt): Generate, Chat, Compare and the live charts; run against
a Helix server and a vLLM server."""

from __future__ import annotations

from helix_desktop.connections import Connection


def choose(qtbot, window, connection: Connection) -> None:
    """Add and select ``connection``; the bar's check names the served model."""
    window.connection_bar.add_remote(connection)
    qtbot.waitUntil(lambda: window.connection_bar.status.text().startswith("serving"), timeout=20000)
    assert window.switch.connection == connection and window.switch.is_remote


def generate(qtbot, window, provenance: bool) -> None:
    tab = window.generate_tab
    window.tabs.setCurrentWidget(tab)
    tab.prompt.setPlainText("Once upon a time")
    tab.form.temperature.setValue(0.0)
    tab.form.max_new_tokens.setValue(16)
    with qtbot.waitSignal(window.switch.finished, timeout=60000):
        tab.run_button.click()
    qtbot.waitUntil(lambda: tab.last_final is not None, timeout=5000)
    final = tab.last_final
    assert final.finish_reason in ("length", "stop"), final.error
    assert tab.output.token_count > 0 and tab.output.text() == final.text  # tokens + tail
    if provenance:
        assert tab.output.sources() <= {"draft", "target", "bonus"} and "acceptance" in tab.stats.text()
    else:  # no colours and no numbers the server did not send
        assert tab.output.sources() <= {""}, tab.output.sources()
        assert "acceptance not reported by this server" in tab.stats.text()


def chat(qtbot, window) -> None:
    tab = window.chat_tab
    window.tabs.setCurrentWidget(tab)
    tab.form.temperature.setValue(0.0)
    tab.form.max_new_tokens.setValue(8)
    tab.input.setPlainText("Tell me a story")
    with qtbot.waitSignal(tab.reply_finished, timeout=60000):
        tab.send_button.click()
    reply = tab.conv.messages[-1]
    # (the tiny model's tokens may decode to nothing, so the count is checked, not the text)
    assert reply.role == "assistant" and reply.finish_reason in ("length", "stop"), reply
    assert reply.stats["num_generated_tokens"] > 0 and tab.request_id is None


def compare_local_vs_remote(qtbot, window, connection: Connection, same_model: bool) -> None:
    tab = window.compare_tab
    window.tabs.setCurrentWidget(tab)
    tab.form.temperature.setValue(0.0)
    tab.form.max_new_tokens.setValue(12)
    tab.runs.setValue(1)
    tab.side_boxes["a"].setCurrentText("This PC, speculative: auto")
    tab.side_boxes["b"].setCurrentText(f"{connection.name} (remote)")
    with qtbot.waitSignal(tab.session.done, timeout=60000):
        tab.run_button.click()
    (result,) = tab.session.results
    assert result.a.finish_reason == "length" and result.b.finish_reason == "length"
    assert tab.panes["b"].title().endswith(f"{connection.name} (remote)") and tab.table.rowCount() == 1
    if same_model:  # greedy: the same weights give the same tokens here and there
        assert result.first_difference is None and "Identical" in tab.verdict.text(), tab.verdict.text()


def charts(qtbot, window, spec_reported: bool) -> None:
    tab = window.charts_tab
    window.tabs.setCurrentWidget(tab)
    assert tab.remote is not None
    # the requests above were served there: the scraped counters (every 0.5 s) show them
    qtbot.waitUntil(lambda: (tab.metrics.latest or {}).get("tokens_generated", 0) > 0, timeout=10000)
    qtbot.waitUntil(lambda: "running" in tab.now_label.text(), timeout=5000)
    text = tab.now_label.text()
    assert "KV" in text and "%" in text
    if spec_reported:
        assert "acceptance" in text and "not reported" not in text.split("acceptance")[1].split("·")[0]
        assert tab.metrics.accepted_per_position  # the per-position bars have data
