"""The Models tab on real folders: load a saved tiny pair with a progress bar, swap while serving, run the doctor."""

from __future__ import annotations

import pytest

pytest.importorskip("PySide6")

from engine.config import EngineConfig  # noqa: E402
from engine.host import EngineHost  # noqa: E402
from tests.tiny import tiny_engine, tiny_llama, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A tiny target/draft pair saved as Hugging Face folders."""
    root = tmp_path_factory.mktemp("tiny-pair")
    tok = tiny_tokenizer()
    for name, layers, seed in (("target", 2, 0), ("draft", 1, 1)):
        model = tiny_llama(len(tok), layers=layers, seed=seed)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root / "target", root / "draft"


@pytest.fixture
def window(qtbot, tmp_path, monkeypatch):
    from helix_desktop.app import create_window
    from helix_desktop.settings import AppSettings

    monkeypatch.setenv("HELIX_SETTINGS_DIR", str(tmp_path / "settings"))
    host = EngineHost()
    host.adopt(tiny_engine())
    w = create_window(host, AppSettings())
    w.show()
    yield w
    w.close()


def test_load_pair_from_folders_with_progress_and_remember_it(qtbot, window, tiny_pair):
    target, draft = tiny_pair
    tab = window.models_tab
    window.tabs.setCurrentWidget(tab)
    assert not tab.doctor_button.isEnabled()  # the adopted in-memory pair has no folders to check
    tab.target.set_text(str(target))
    tab.draft.set_text(str(draft))
    tab.device.setCurrentIndex(tab.device.findData("cpu"))
    tab.kv_tokens.setValue(2048)
    progress: list[float] = []
    window.bridge.progress.connect(lambda stage, frac: progress.append(frac))
    with qtbot.waitSignal(window.bridge.state_changed, check_params_cb=lambda state, _r: state == "loading",
                          timeout=10000):
        tab.load_button.click()
    qtbot.waitUntil(lambda: window.host.state == "ready" and window.host.config is not None, timeout=60000)
    # the host turns ready on the loader thread; its last progress signal is queued to this one
    qtbot.waitUntil(lambda: bool(progress) and max(progress) == pytest.approx(1.0), timeout=5000)
    assert window.host.engine.target_name == "target"  # the folder name, never the local path
    # the folders are remembered by the UI thread's handler of the ready state, queued after the progress signals
    qtbot.waitUntil(lambda: window.settings.get_str("models/target") == str(target), timeout=5000)
    assert "target" in tab.loaded.text() and "KV cache" in tab.loaded.text()
    assert window.settings.get_str("models/draft") == str(draft)
    assert tab.doctor_button.isEnabled()

    gen = window.generate_tab
    gen.form.temperature.setValue(0.0)
    gen.form.max_new_tokens.setValue(12)
    with qtbot.waitSignal(window.bridge.finished, timeout=30000):
        gen.run_button.click()
    assert gen.last_final.finish_reason in ("length", "eos")


def test_doctor_reports_a_verdict_for_the_loaded_pair(qtbot, window, tiny_pair):
    target, draft = tiny_pair
    window.bridge.load(EngineConfig(target=str(target), draft=str(draft), device="cpu", kv_cache_tokens=2048))
    qtbot.waitUntil(lambda: window.host.config is not None and window.host.state == "ready", timeout=60000)
    tab = window.models_tab
    window.tabs.setCurrentWidget(tab)
    with qtbot.waitSignal(tab.doctor.finished, timeout=180000) as blocker:
        tab.doctor_button.click()
    report, message = blocker.args
    assert report is not None, message
    assert "recommended_k" in report and message
    assert "Doctor:" in tab.doctor_result.text()


def test_hf_cache_scan_tolerates_missing_and_empty_caches(tmp_path):
    from helix_desktop.model_catalog import cached_models

    assert cached_models(tmp_path / "no-cache") == ([], None)
    (tmp_path / "empty").mkdir()
    models, note = cached_models(tmp_path / "empty")
    assert models == [] and note is None


def test_hf_cache_scan_lists_models(tmp_path):
    from helix_desktop.model_catalog import cached_models

    snapshot = tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--acme--tiny-llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-llama" / "refs" / "main").write_text("abc123")
    models, note = cached_models(tmp_path / "hub")
    assert [m.repo_id for m in models] == ["acme/tiny-llama"] and note is None
