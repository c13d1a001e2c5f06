"""The desktop app end to end on tiny models: streaming, stop, compare, server, model errors, settings, threads."""

from __future__ import annotations

import socket
import threading
import time

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pyqtgraph")

from PySide6.QtCore import Qt  # noqa: E402

from engine.config import EngineConfig  # noqa: E402
from engine.errors import TokenizerMismatch  # noqa: E402
from engine.host import EngineHost  # noqa: E402
from tests.tiny import tiny_engine  # noqa: E402


@pytest.fixture
def settings_dir(tmp_path, monkeypatch):
    folder = tmp_path / "settings"
    monkeypatch.setenv("HELIX_SETTINGS_DIR", str(folder))
    return folder


def _make_window(settings_dir, slow_s: float = 0.0):
    from helix_desktop.app import create_window
    from helix_desktop.settings import AppSettings

    host = EngineHost()
    engine = tiny_engine()
    if slow_s:  # slow each engine step so a test can act mid-stream
        engine.fault_hook = lambda stage, rows: time.sleep(slow_s)
    host.adopt(engine)
    window = create_window(host, AppSettings(settings_dir))
    window.show()
    return window


@pytest.fixture
def window(qtbot, settings_dir):
    w = _make_window(settings_dir)
    yield w
    w.close()


@pytest.fixture
def slow_window(qtbot, settings_dir):
    w = _make_window(settings_dir, slow_s=0.01)
    yield w
    w.close()


def _greedy(form, max_new_tokens: int) -> None:
    form.temperature.setValue(0.0)
    form.max_new_tokens.setValue(max_new_tokens)


def test_generate_streams_tokens_and_shows_stats(qtbot, window):
    tab = window.generate_tab
    tab.prompt.setPlainText("Once upon a time")
    _greedy(tab.form, 40)
    bridge = window.bridge
    with qtbot.waitSignals([bridge.started, bridge.token_batch, bridge.finished], order="simple", timeout=20000):
        qtbot.mouseClick(tab.run_button, Qt.MouseButton.LeftButton)
    final = tab.last_final
    assert final is not None and final.finish_reason in ("length", "eos")
    assert tab.output.token_count == len(final.token_ids) > 0
    assert tab.output.text() == final.text + final.tail
    assert tab.output.sources() <= {"draft", "target", "bonus"}
    assert "tokens" in tab.stats.text() and "tok/s" in tab.stats.text() and "first token" in tab.stats.text()
    assert tab.run_button.isEnabled() and not tab.stop_button.isEnabled()
    tab.legend.toggle.setChecked(False)  # colouring off keeps the text
    assert tab.output.toPlainText() == tab.output.text()


def test_ctrl_enter_runs_and_escape_stops_mid_stream(qtbot, slow_window):
    tab = slow_window.generate_tab
    tab.prompt.setPlainText("Once upon a time")
    _greedy(tab.form, 240)
    tab.prompt.setFocus()
    with qtbot.waitSignal(slow_window.bridge.token_batch, timeout=20000):
        qtbot.keyClick(tab.prompt, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)
    assert tab.request_id is not None and tab.stop_button.isEnabled()
    with qtbot.waitSignal(slow_window.bridge.finished, timeout=20000):
        qtbot.keyClick(tab.prompt, Qt.Key.Key_Escape)
    assert tab.last_final.finish_reason == "cancelled"
    assert len(tab.last_final.token_ids) < 240
    assert "stopped" in tab.stats.text()


def test_stop_button_cancels_within_one_engine_step(qtbot, slow_window):
    engine = slow_window.host.engine
    steps: list[str] = []
    engine.fault_hook = lambda stage, rows: (steps.append(stage), time.sleep(0.01))
    tab = slow_window.generate_tab
    _greedy(tab.form, 240)
    with qtbot.waitSignal(slow_window.bridge.token_batch, timeout=20000):
        tab.run_button.click()
    with qtbot.waitSignal(slow_window.bridge.finished, timeout=20000):
        tab.stop_button.click()
        steps_at_stop = len(steps)
    assert tab.last_final.finish_reason == "cancelled"
    assert len(steps) - steps_at_stop <= 1  # at most the step already running when Stop was pressed
    assert tab.run_button.isEnabled()


def test_bad_input_shows_banner_not_crash(qtbot, window):
    tab = window.generate_tab
    tab.prompt.setPlainText("   ")
    tab.run_button.click()
    assert window.banner.level == "error" and "prompt" in window.banner.text()
    assert tab.request_id is None and tab.run_button.isEnabled()


def test_compare_greedy_is_identical_and_shows_speedup(qtbot, window):
    tab = window.compare_tab
    window.tabs.setCurrentWidget(tab)
    tab.prompt.setPlainText("The cat sat on the mat")
    _greedy(tab.form, 32)
    tab.runs.setValue(2)
    with qtbot.waitSignal(tab.session.done, timeout=30000):
        tab.run_button.click()
    results = tab.session.results
    assert len(results) == 2
    assert all(r.first_difference is None for r in results)
    assert results[0].a.token_ids == results[0].b.token_ids
    assert "Identical" in tab.verdict.text()
    assert "×" in tab.speedup.text() and "median of 2 runs" in tab.speedup.text()
    assert tab.table.rowCount() == 2
    assert tab.panes["a"].view.text() and tab.panes["b"].view.text()  # A: this PC plain, B: speculative
    assert tab.panes["a"].view.text() == tab.panes["b"].view.text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_serves_http_while_window_lives_and_frees_port(qtbot, window):
    httpx = pytest.importorskip("httpx")
    from helix_desktop.server_control import server_available

    if server_available() is not None:
        pytest.skip(server_available())
    tab = window.server_tab
    window.tabs.setCurrentWidget(tab)
    port = _free_port()
    tab.port.setValue(port)
    with qtbot.waitSignal(window.server.started, timeout=20000):
        tab.switch.click()
    url = tab.url.text()
    assert url.endswith(str(port)) and tab.switch.text() == "Stop server"
    seen_before = window.metrics.tokens_seen

    answer: dict = {}

    def call() -> None:
        r = httpx.post(f"{url}/generate", json={"prompt": "Once upon a time", "max_new_tokens": 24,
                                                "temperature": 0}, timeout=30)
        answer["status"] = r.status_code
        answer["body"] = r.json()

    client = threading.Thread(target=call)
    client.start()
    qtbot.waitUntil(lambda: "status" in answer, timeout=30000)  # the UI loop keeps running meanwhile
    client.join()
    assert answer["status"] == 200, answer
    qtbot.waitUntil(lambda: tab.log_model.rowCount() >= 1, timeout=10000)
    entry = tab.log_model.entries[-1]
    assert entry["path"].startswith("/generate") and entry["status"] == 200
    qtbot.waitUntil(lambda: window.metrics.tokens_seen - seen_before >= 1, timeout=10000)
    assert max(window.metrics.tokens_per_s) > 0

    with qtbot.waitSignal(window.server.stopped, timeout=20000):
        tab.switch.click()
    assert tab.switch.text() == "Start server"
    with socket.socket() as s:  # the port is free again
        s.bind(("127.0.0.1", port))


def test_bad_model_folder_shows_error_and_keeps_previous_models(qtbot, window, tmp_path):
    tab = window.models_tab
    window.tabs.setCurrentWidget(tab)
    tab.target.set_text(str(tmp_path / "no-such-model"))
    tab.no_draft.setChecked(True)
    tab.load_button.click()
    qtbot.waitUntil(lambda: window.banner.level == "error", timeout=20000)
    assert "does not exist" in window.banner.text() and "Still using" in window.banner.text()
    qtbot.waitUntil(lambda: tab.load_button.isEnabled(), timeout=5000)
    assert window.host.state == "ready" and window.host.engine.target_name == "tiny-target"

    gen = window.generate_tab
    _greedy(gen.form, 8)
    with qtbot.waitSignal(window.bridge.finished, timeout=20000):
        gen.run_button.click()
    assert gen.last_final.finish_reason in ("length", "eos")


def test_tokenizer_mismatch_is_a_message(qtbot, window):
    def builder(config, progress):
        progress("target: loading weights", 0.4)
        raise TokenizerMismatch("draft and target tokenizers are incompatible: vocabulary size 10 vs 20")

    window.bridge.load(EngineConfig(target="x", draft="y"), builder=builder)
    qtbot.waitUntil(lambda: window.banner.level == "error", timeout=10000)
    assert "tokenizers are incompatible" in window.banner.text()
    assert window.host.worker is not None


def test_missing_demo_models_explained(qtbot, window, monkeypatch):
    import helix_desktop.main_window as mw
    from engine.config import DEMO_DRAFT, DEMO_TARGET

    monkeypatch.setattr(mw, "demo_pair_present", lambda: False)
    window.load_models(EngineConfig(target=str(DEMO_TARGET), draft=str(DEMO_DRAFT)))
    assert "demo models are not installed" in window.banner.text()
    assert window.tabs.currentWidget() is window.models_tab


def test_generate_without_models_says_what_to_do(qtbot, settings_dir):
    from helix_desktop.app import create_window
    from helix_desktop.settings import AppSettings

    w = create_window(EngineHost(), AppSettings(settings_dir))
    w.show()
    w.generate_tab.run_button.click()
    assert w.banner.level == "error" and "Models tab" in w.banner.text()
    w.close()


def test_charts_and_kv_view_follow_the_engine(qtbot, window):
    window.tabs.setCurrentWidget(window.charts_tab)
    gen = window.generate_tab
    _greedy(gen.form, 64)
    with qtbot.waitSignal(window.bridge.finished, timeout=20000):
        gen.run_button.click()
    qtbot.waitUntil(lambda: window.metrics.tokens_seen >= 1, timeout=5000)
    assert window.metrics.kv_total[-1] > 0
    assert "recommends K" in window.charts_tab.adaptive_label.text()
    assert "Last decision:" in window.charts_tab.adaptive_label.text()  # the adaptive choice and why
    window.tabs.setCurrentWidget(window.kv_tab)
    window.kv_tab.refresh()
    assert window.kv_tab.grid.total > 0 and "free" in window.kv_tab.counts.text()


def test_settings_persist_and_corrupt_file_is_reset(qtbot, settings_dir):
    w = _make_window(settings_dir)
    w.generate_tab.form.max_new_tokens.setValue(77)
    w.generate_tab.form.draft_len.setCurrentIndex(3)
    w.generate_tab.form.draft_method.setCurrentIndex(w.generate_tab.form.draft_method.findData("ngram"))
    w.server_tab.port.setValue(8123)
    w.close()
    w = _make_window(settings_dir)
    assert w.generate_tab.form.max_new_tokens.value() == 77
    assert w.generate_tab.form.draft_len.currentData() == 3
    assert w.generate_tab.form.params().draft_method == "ngram"
    assert w.server_tab.port.value() == 8123
    w.close()
    (settings_dir / "settings.ini").write_bytes(b"\xff\xfe\x00garbage")
    w = _make_window(settings_dir)
    assert w.banner.level == "warning" and "reset" in w.banner.text()
    assert w.generate_tab.form.max_new_tokens.value() == 128
    w.close()


def test_open_and_close_three_times_leaks_no_threads(qtbot, settings_dir):
    from PySide6.QtCore import QThreadPool

    from helix_desktop.app import ensure_app

    ensure_app()
    from helix_desktop.server_control import server_available

    before = set(threading.enumerate())
    for i in range(3):
        w = _make_window(settings_dir)
        gen = w.generate_tab
        _greedy(gen.form, 8)
        with qtbot.waitSignal(w.bridge.finished, timeout=20000):
            gen.run_button.click()
        if i == 1 and server_available() is None:  # quitting with the server on stops it too
            w.server_tab.port.setValue(_free_port())
            with qtbot.waitSignal(w.server.started, timeout=20000):
                w.server_tab.switch.click()
        w.close()
        w.deleteLater()
        qtbot.wait(10)
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not leaked, leaked
    assert QThreadPool.globalInstance().activeThreadCount() == 0


def test_main_opens_window_reports_bad_models_and_exits_cleanly(tmp_path):
    """``python main.py --target <missing>`` in a fresh process: window, error banner, clean exit, no traceback."""
    import subprocess
    import sys
    from pathlib import Path

    script = f"""
import sys, time
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication
import main
from helix_desktop.app import ensure_app
from helix_desktop.main_window import MainWindow

ensure_app()
t0 = time.monotonic()

def check():
    windows = [w for w in QApplication.topLevelWidgets() if isinstance(w, MainWindow) and w.isVisible()]
    if windows and windows[0].banner.level == "error":
        print("BANNER:", windows[0].banner.text(), flush=True)
        windows[0].close()
    elif time.monotonic() - t0 > 60:
        QApplication.quit()
    else:
        QTimer.singleShot(50, check)

QTimer.singleShot(50, check)
sys.exit(main.main(["--target", {str(tmp_path / "missing")!r}, "--no-draft", "--device", "cpu"]))
"""
    root = Path(__file__).resolve().parent.parent
    env = {**__import__("os").environ, "HELIX_SETTINGS_DIR": str(tmp_path / "settings"), "QT_QPA_PLATFORM": "offscreen"}
    out = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "BANNER:" in out.stdout and "does not exist" in out.stdout
    assert "Traceback" not in out.stderr, out.stderr
    assert (tmp_path / "settings" / "settings.ini").is_file()


def test_server_beyond_loopback_warns_and_needs_a_key(qtbot, window):
    from helix_desktop.server_control import server_available

    if server_available() is not None:
        pytest.skip(server_available())
    tab = window.server_tab
    window.tabs.setCurrentWidget(tab)
    tab.host.setCurrentText("0.0.0.0")
    assert "other machines" in tab.warning.text() and tab.warning.isVisible()
    tab.api_key.clear()
    tab.port.setValue(_free_port())
    with qtbot.waitSignal(window.server.failed, timeout=20000):
        tab.switch.click()
    assert window.banner.level == "error" and "key" in window.banner.text().lower()
    assert not window.server.running and tab.switch.text() == "Start server" and tab.host.isEnabled()
    tab.host.setCurrentText("127.0.0.1")
    assert "Only programs on this PC" in tab.warning.text()


def test_compare_points_at_the_first_difference(qtbot, window):
    from PySide6.QtGui import QTextCursor

    from engine.sequence import FinishEvent, TokenEvent
    from engine.stats import RequestStats
    from helix_desktop.compare_session import RunResult

    tab = window.compare_tab
    tab._greedy = True
    views = {slot: tab.panes[slot].view for slot in ("a", "b")}
    for slot, ids in (("a", [5, 6, 7]), ("b", [5, 6, 9])):
        views[slot].append_tokens([TokenEvent("r", t, f"<{t}>", i, "target", 0.0) for i, t in enumerate(ids)])
    finals = [FinishEvent("r", "length", "", ids, RequestStats()) for ids in ([5, 6, 7], [5, 6, 9])]
    tab._show_verdict(RunResult(0, *finals))
    assert "differ first at token 2" in tab.verdict.text()
    selections = views["b"].extraSelections()
    cursor = QTextCursor(selections[0].cursor)
    assert cursor.selectedText() == "<9>"


def test_missing_gpu_falls_back_to_auto_with_a_notice(window):
    from engine import EngineConfig
    from helix_desktop.app import _usable_device

    config = _usable_device(EngineConfig(device="cuda"), window)  # this machine has no CUDA
    assert config.device == "auto"
    assert window.banner.level == "warning" and "not available" in window.banner.text()
    assert _usable_device(EngineConfig(device="cpu"), window).device == "cpu"
