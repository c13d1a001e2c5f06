"""The app driving a remote Helix server on loopback: connection selector (saved), Generate, Chat, Compare
this PC vs the remote, live charts from its /metrics, and a wrong key or a dead remote in the banner."""

from __future__ import annotations

import os
import socket
import stat
import time

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pyqtgraph")

from remote_app_checks import charts, chat, choose, compare_local_vs_remote, generate  # noqa: E402
from tiny import tiny_engine  # noqa: E402

from engine.host import EngineHost  # noqa: E402
from engine.remote_metrics import RemoteMetrics  # noqa: E402
from engine.server import ServerRunner  # noqa: E402

KEY = "app-remote-key"


@pytest.fixture(scope="module")
def remote():
    host = EngineHost()
    host.adopt(tiny_engine())  # same seeds as the window's engine: greedy outputs match
    runner = ServerRunner(host, port=0, api_key=KEY)
    runner.start()
    yield runner
    runner.stop()
    host.shutdown()


@pytest.fixture
def settings_dir(tmp_path, monkeypatch):
    folder = tmp_path / "settings"
    monkeypatch.setenv("HELIX_SETTINGS_DIR", str(folder))
    return folder


def _window(settings_dir):
    from helix_desktop.app import create_window
    from helix_desktop.settings import AppSettings

    host = EngineHost()
    host.adopt(tiny_engine())
    w = create_window(host, AppSettings(settings_dir))
    w.show()
    return w


def test_every_view_works_against_a_remote_helix(qtbot, settings_dir, remote):
    from helix_desktop.connections import make_remote

    window = _window(settings_dir)
    try:
        box = make_remote("box", remote.url + "/v1", KEY)
        choose(qtbot, window, box)
        assert "tiny-target" in window.connection_bar.status.text()
        if os.name == "posix":  # the settings file now holds a key
            assert stat.S_IMODE(window.settings.path.stat().st_mode) == 0o600
        generate(qtbot, window, provenance=True)
        chat(qtbot, window)
        compare_local_vs_remote(qtbot, window, box, same_model=True)
        charts(qtbot, window, spec_reported=True)
    finally:
        window.close()
    # saved: the next start opens on the remote
    window = _window(settings_dir)
    try:
        assert window.switch.connection == box and window.connection_bar.combo.currentText().startswith("box")
        assert window.charts_tab.remote is not None
        window.connection_bar.combo.setCurrentIndex(0)  # back to This PC
        assert not window.switch.is_remote and window.charts_tab.remote is None
        generate(qtbot, window, provenance=True)
    finally:
        window.close()


def test_wrong_key_and_dead_remote_are_explained(qtbot, settings_dir, remote):
    from helix_desktop.connections import make_remote

    window = _window(settings_dir)
    try:
        window.connection_bar.add_remote(make_remote("bad key", remote.url, "wrong"))
        qtbot.waitUntil(lambda: window.banner.level == "error", timeout=10000)
        assert "401" in window.banner.text() and "API key" in window.banner.text()
        tab = window.generate_tab
        with qtbot.waitSignal(window.switch.finished, timeout=10000):
            tab.run_button.click()
        assert tab.last_final.finish_reason == "error" and "401" in tab.stats.text()
        assert tab.run_button.isEnabled()  # nothing stuck
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        window.banner.dismiss()
        window.connection_bar.add_remote(make_remote("gone", f"http://127.0.0.1:{port}"))
        qtbot.waitUntil(lambda: window.banner.level == "error", timeout=10000)
        assert "cannot connect" in window.banner.text()
        qtbot.waitUntil(lambda: "Cannot read the server's metrics" in window.charts_tab.now_label.text()
                        or not window.charts_tab.isVisible(), timeout=5000)
    finally:
        window.close()


def test_stop_mid_stream_on_a_remote(qtbot, settings_dir, remote):
    from helix_desktop.connections import make_remote

    engine = remote.host.engine
    engine.fault_hook = lambda stage, rows: time.sleep(0.02)  # a slow remote, so Stop lands mid-stream
    window = _window(settings_dir)
    try:
        choose(qtbot, window, make_remote("box", remote.url, KEY))
        tab = window.generate_tab
        tab.form.max_new_tokens.setValue(400)
        tab.form.temperature.setValue(0.8)
        with qtbot.waitSignal(window.switch.token_batch, timeout=20000):
            tab.run_button.click()
        t0 = time.monotonic()
        with qtbot.waitSignal(window.switch.finished, timeout=5000):
            tab.stop_button.click()
        assert tab.last_final.finish_reason == "cancelled" and time.monotonic() - t0 < 2
        assert 0 < tab.output.token_count < 400 and tab.run_button.isEnabled()
        # the server saw the client go and freed the request
        qtbot.waitUntil(lambda: remote.host.worker.snapshot()["requests_running"] == 0, timeout=5000)
    finally:
        engine.fault_hook = None
        window.close()


def test_add_dialog_refuses_a_bad_url(qtbot, settings_dir):
    from helix_desktop.connection_bar import RemoteDialog

    dialog = RemoteDialog()
    qtbot.addWidget(dialog)
    dialog.name.setText("box")
    dialog.url.setText("gpu-box:8000")
    dialog.accept()
    assert "http://host:port" in dialog.error.text() and dialog.result_connection is None
    dialog.url.setText("https://gpu-box.example/v1/")
    dialog.accept()
    assert dialog.result_connection.url == "https://gpu-box.example"


def test_unreported_figures_say_so():
    from helix_desktop.formatting import format_stats
    from helix_desktop.remote_watch import NOT_REPORTED, summary, to_snapshot

    m = RemoteMetrics(server="vllm", kv_cache_usage=0.5)
    text = summary(m, 3.0)
    assert f"running {NOT_REPORTED}" in text and f"acceptance {NOT_REPORTED}" in text and "KV 50.0% used" in text
    assert to_snapshot(m)["spec"]["acceptance_rate"] is None
    assert "not reported by this server" in format_stats({"num_generated_tokens": 3, "num_drafts": None}, "length")
