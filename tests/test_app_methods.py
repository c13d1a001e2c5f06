"""Drafting methods in the app, on a tiny target with a draft model and a random EAGLE head: Compare runs plain
against each method (or every method in turn), the live charts show acceptance and speed per method, the forms
mark methods that are not loaded, the Models tab lists them, and the doctor is started for what is loaded."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pyqtgraph")

from engine import SamplingParams  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.host import EngineHost  # noqa: E402
from tests.tiny import tiny_engine, tiny_pair_engine  # noqa: E402

PROMPT = "The cat sat on the mat and looked at the moon. The cat sat on the mat and"


def _window(settings_dir, engine):
    from helix_desktop.app import create_window
    from helix_desktop.settings import AppSettings

    host = EngineHost()
    host.adopt(engine)
    window = create_window(host, AppSettings(settings_dir))
    window.show()
    return window


@pytest.fixture
def window(qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("HELIX_SETTINGS_DIR", str(tmp_path / "settings"))
    w = _window(tmp_path / "settings", tiny_pair_engine(eagle=True))
    yield w
    w.close()


def _choose(box, text: str) -> None:
    at = box.findText(text)
    assert at >= 0, [box.itemText(i) for i in range(box.count())]
    box.setCurrentIndex(at)


def test_compare_offers_each_method_and_runs_every_method_in_turn(qtbot, window):
    tab = window.compare_tab
    window.tabs.setCurrentWidget(tab)
    offered = [tab.side_boxes["b"].itemText(i) for i in range(tab.side_boxes["b"].count())]
    assert offered == ["This PC, plain decoding", "This PC, speculative: auto", "This PC, speculative: draft model",
                       "This PC, speculative: n-gram lookup", "This PC, speculative: EAGLE head",
                       "This PC, every drafting method in turn"]
    assert tab.form.draft_method.isHidden()  # each side names its method
    tab.prompt.setPlainText(PROMPT)
    tab.form.temperature.setValue(0.0)
    tab.form.max_new_tokens.setValue(24)
    tab.form.draft_len.setCurrentIndex(tab.form.draft_len.findData(3))  # fixed K: n-gram drafts wherever it matches
    tab.runs.setValue(1)
    _choose(tab.side_boxes["b"], "This PC, every drafting method in turn")
    with qtbot.waitSignal(tab.session.done, timeout=60000):
        tab.run_button.click()
    results = tab.session.results
    assert [r.b_side.draft_method for r in results] == ["model", "ngram", "eagle", "auto"]
    assert all(r.first_difference is None for r in results) and "Identical" in tab.verdict.text()
    for r in results[:3]:  # a fixed method drafts with that method only
        assert set(r.b.stats.by_method) <= {r.b_side.draft_method} and r.b.stats.num_drafts > 0
    assert [tab.table.item(i, 1).text() for i in range(4)] == ["draft model", "n-gram lookup", "EAGLE head", "auto"]
    assert all(name in tab.speedup.text() for name in ("draft model", "n-gram lookup", "EAGLE head", "auto"))


def test_compare_plain_against_one_method(qtbot, window):
    tab = window.compare_tab
    tab.prompt.setPlainText(PROMPT)
    tab.form.temperature.setValue(0.0)
    tab.form.max_new_tokens.setValue(16)
    tab.runs.setValue(2)
    _choose(tab.side_boxes["b"], "This PC, speculative: EAGLE head")
    with qtbot.waitSignal(tab.session.done, timeout=60000):
        tab.run_button.click()
    assert [r.b_side.draft_method for r in tab.session.results] == ["eagle", "eagle"]
    assert tab.table.rowCount() == 2 and "median of 2 runs" in tab.speedup.text()
    assert tab.panes["b"].title() == "B: This PC, speculative: EAGLE head"
    assert all(r.b.stats.by_method.keys() <= {"eagle"} for r in tab.session.results)


def test_charts_show_acceptance_and_speed_per_method(qtbot, window):
    charts = window.charts_tab
    window.tabs.setCurrentWidget(charts)
    worker = window.host.worker
    served = worker.snapshot()["requests_served"]
    for method in ("model", "ngram", "eagle"):  # requests from any client count (here: straight to the worker)
        worker.submit(PROMPT, SamplingParams(max_new_tokens=24, temperature=0, num_draft_tokens=3,
                                             draft_method=method, ignore_eos=True))
    qtbot.waitUntil(lambda: {"model", "ngram", "eagle"} <= set(charts.metrics.method_acceptance), timeout=20000)
    qtbot.waitUntil(lambda: worker.snapshot()["requests_served"] == served + 3, timeout=20000)
    charts.tick()
    charts.refresh()
    rows = {charts.methods_table.item(i, 0).text(): [charts.methods_table.item(i, c).text() for c in range(8)]
            for i in range(charts.methods_table.rowCount())}
    assert {"Draft model", "N-gram lookup", "EAGLE head"} <= set(rows)
    snap = worker.snapshot()["methods"]  # what the charts read
    assert rows["EAGLE head"][2] == f"{snap['eagle']['acceptance_rate'] * 100:.0f}%"
    assert rows["Draft model"][5] == f"{snap['model']['tokens_per_second']:.1f}"
    assert rows["EAGLE head"][6] == str(snap["eagle"]["num_steps"])
    for method in ("model", "ngram", "eagle"):
        acc, tps = charts.method_curves[method]
        assert any(not math.isnan(v) for v in acc.yData) and any(not math.isnan(v) and v > 0 for v in tps.yData)


def test_forms_mark_methods_that_are_not_loaded(qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("HELIX_SETTINGS_DIR", str(tmp_path / "s"))
    w = _window(tmp_path / "s", tiny_engine(draft=False))  # n-gram lookup only
    try:
        form = w.generate_tab.form
        texts = {form.draft_method.itemData(i): form.draft_method.itemText(i) for i in range(form.draft_method.count())}
        assert texts == {"auto": "Auto", "model": "Draft model (not loaded)", "ngram": "N-gram lookup",
                         "eagle": "EAGLE head (not loaded)"}
        assert form.speculative.isEnabled()  # n-gram lookup needs no draft model
        assert "Drafting methods</b> ngram" in w.models_tab.loaded.text()
        assert "every drafting method" not in [w.compare_tab.side_boxes["b"].itemText(i)
                                               for i in range(w.compare_tab.side_boxes["b"].count())]
    finally:
        w.close()


def test_doctor_runs_on_what_is_loaded():
    from helix_desktop.doctor_run import doctor_command

    argv = doctor_command(EngineConfig(target="t", draft=None, eagle=""), "/tmp/r.json")
    assert "--no-draft" in argv and "--no-eagle" in argv and "--draft" not in argv
    argv = doctor_command(EngineConfig(target="t", draft="d", eagle="h"), "/tmp/r.json")
    assert argv[argv.index("--draft") + 1] == "d" and argv[argv.index("--eagle") + 1] == "h"
    assert "--eagle" not in doctor_command(EngineConfig(target="t", draft="d"), "/tmp/r.json")


def test_status_bar_names_the_eagle_head():
    from helix_desktop.status_bar import pair_text

    assert pair_text(tiny_pair_engine(eagle=True)) == "tiny-target + tiny-draft + EAGLE head tiny-eagle"
    assert "EAGLE" not in pair_text(tiny_pair_engine(eagle=False))
