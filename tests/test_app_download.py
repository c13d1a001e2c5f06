"""The Models tab's Download panel against a stand-in hub on loopback: search, drafts, a download cancelled
halfway and resumed, then a real load of what was downloaded; offline it lists the local cache."""

from __future__ import annotations

import pytest

pytest.importorskip("PySide6")

from PySide6.QtCore import Qt  # noqa: E402

from engine.config import DEMO_DRAFT, DEMO_TARGET  # noqa: E402
from engine.host import EngineHost  # noqa: E402
from tests.hub_stand_in import StandInHub, point_hub_at  # noqa: E402
from tests.tiny import tiny_engine  # noqa: E402

pytestmark = pytest.mark.skipif(not (DEMO_TARGET / "model.safetensors").is_file(), reason="demo pair not present")


@pytest.fixture
def window(qtbot, tmp_path, monkeypatch):
    from helix_desktop.app import create_window
    from helix_desktop.settings import AppSettings

    with StandInHub({"helix/demo-target": DEMO_TARGET, "helix/demo-draft": DEMO_DRAFT},
                    slow_bytes_per_s=30e6) as server:
        point_hub_at(server, tmp_path / "hub-cache", monkeypatch)
        host = EngineHost()
        host.adopt(tiny_engine())
        w = create_window(host, AppSettings(tmp_path / "settings"))
        w.show()
        w.hub = server
        yield w
        w.close()


def _item(panel, repo_id: str):
    return next(panel.results.item(i) for i in range(panel.results.count())
                if panel.results.item(i).data(Qt.ItemDataRole.UserRole).repo_id == repo_id)


def test_search_find_drafts_download_with_cancel_and_resume_then_load(qtbot, window, monkeypatch):
    tab, panel = window.models_tab, window.models_tab.downloads
    window.tabs.setCurrentWidget(tab)
    assert panel.search_button.isEnabled() and "cache" in panel.status.text()

    panel.query.setText("demo")
    with qtbot.waitSignal(panel.search_job.done, timeout=10000):
        panel.search_button.click()
    assert panel.results.count() == 2
    text = _item(panel, "helix/demo-target").text()
    assert "LlamaForCausalLM" in text and "apache-2.0" in text and "MiB" in text

    panel.results.setCurrentItem(_item(panel, "helix/demo-target"))
    with qtbot.waitSignal(panel.drafts_job.done, timeout=10000):
        panel.drafts_button.click()
    assert "✔ draft for helix/demo-target" in _item(panel, "helix/demo-draft").text()
    assert "✔" not in _item(panel, "helix/demo-target").text()

    # download the target, cancel it halfway
    fractions: list[float] = []

    def on_progress(done: int, total: int, name: str) -> None:
        fractions.append(done / total)
        if done > total // 2:
            panel.cancel_button.click()

    panel.download_job.progress.connect(on_progress)
    with qtbot.waitSignal(panel.download_job.failed, timeout=20000) as failed:
        panel.as_target.click()
    assert failed.args[1] is True and "resume" in panel.progress_text.text()
    panel.download_job.progress.disconnect(on_progress)
    assert fractions and 0.5 < max(fractions) < 1.0

    # again: it resumes (one Range request) and fills the Target field with the snapshot folder
    with qtbot.waitSignal(panel.downloaded, timeout=20000) as done:
        panel.as_target.click()
    role, folder = done.args
    assert role == "target" and tab.target.text() == folder and "snapshots" in folder
    assert [r for r in window.hub.requests if r[0] == "GET" and r[2]]
    assert "helix/demo-target" in window.banner.text()

    # a real load of the downloaded model, named by its hub id
    tab.no_draft.setChecked(True)
    tab.device.setCurrentIndex(tab.device.findData("cpu"))
    tab.load_button.click()
    qtbot.waitUntil(lambda: window.host.state == "ready" and window.host.config is not None
                    and window.host.config.target == folder, timeout=60000)
    assert window.host.engine.target_name == "helix/demo-target"
    qtbot.waitUntil(lambda: "helix/demo-target" in tab.loaded.text(), timeout=5000)  # the state signal is queued

    # offline: the panel says so, and the local cache lists what was downloaded
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    panel.refresh_mode()
    tab.scan_cache()
    assert "Offline" in panel.status.text() and not panel.search_button.isEnabled()
    listed = [tab.cache_list.item(i).text() for i in range(tab.cache_list.count())]
    assert any(t.startswith("helix/demo-target") for t in listed)


def test_curated_pairs_show_expected_memory(qtbot, window):
    panel = window.models_tab.downloads
    labels = [panel.curated.item(i).text() for i in range(panel.curated.count())]
    assert any(label.startswith("Qwen/Qwen2.5-7B-Instruct + Qwen2.5-0.5B-Instruct") for label in labels)
    assert all("GB on a GPU" in label and "GB on the CPU" in label for label in labels)
    panel.download_pair()  # nothing selected: a clear message, no download
    assert window.banner.level == "error" and "pairs" in window.banner.text()


def test_an_unreachable_hub_says_offline_and_shows_the_local_cache(qtbot, window, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", dead)
    tab, panel = window.models_tab, window.models_tab.downloads
    with qtbot.waitSignal(panel.offline, timeout=10000):
        window.tabs.setCurrentWidget(tab)  # showing the panel probes the hub once
    assert "Offline: could not reach" in panel.status.text() and "Local cache" in panel.status.text()
    assert tab.sources.currentIndex() == 1
