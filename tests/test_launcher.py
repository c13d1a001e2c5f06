"""The frozen app's launcher (packaging/launcher.py): app-data logs, one log per kind of process, the GPU check in
a child process with a timeout and its CPU fallback, UTF-8 output; all from source, in seconds."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from tests.test_packaging import PACKAGING, _load


def test_launcher_app_data_dir_matches_qt_layout(monkeypatch, tmp_path):
    launcher = _load("launcher")
    monkeypatch.delenv("HELIX_SETTINGS_DIR", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert launcher.app_data_dir() == tmp_path / "Helix" / "Helix Desktop"
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("APPDATA", str(tmp_path / "Roaming"))
    assert launcher.app_data_dir() == tmp_path / "Roaming" / "Helix" / "Helix Desktop"
    monkeypatch.setenv("HELIX_SETTINGS_DIR", str(tmp_path / "override"))
    assert launcher.app_data_dir() == tmp_path / "override"


def test_launcher_names_match_the_app():
    import helix_desktop

    launcher = _load("launcher")
    assert (launcher.ORG_NAME, launcher.APP_NAME) == (helix_desktop.ORG_NAME, helix_desktop.APP_NAME)


def test_launcher_with_device_replaces_every_device_flag():
    launcher = _load("launcher")
    assert launcher.with_device([], "cpu") == ["--device", "cpu"]
    assert launcher.with_device(["--device", "directml", "--no-draft"], "cpu") == ["--no-draft", "--device", "cpu"]
    assert launcher.with_device(["--device=cuda", "--target", "x"], "cpu") == ["--target", "x", "--device", "cpu"]


@pytest.mark.slow  # a child Python that imports torch: 10-15 s on a busy 2-core machine
def test_launcher_gpu_check_runs_in_a_child_process(monkeypatch, tmp_path):
    """The real child (this interpreter on launcher.py --gpu-check): a CPU torch here, so a CPU build on purpose;
    the child logs to its own gpu-check.log."""
    launcher = _load("launcher")
    monkeypatch.setenv("HELIX_SETTINGS_DIR", str(tmp_path))
    monkeypatch.delenv("HELIX_SMOKE_FAULT", raising=False)
    assert launcher.check_device("cpu", tmp_path) == ("cpu", None)  # no child at all
    assert launcher.gpu_check_command("auto")[-2:] == ["--gpu-check", "auto"]
    assert launcher.check_device("auto", tmp_path) == ("auto", None)
    log = (tmp_path / "logs" / "gpu-check.log").read_text(encoding="utf-8")
    assert "--gpu-check" in log and "GPU check failed" not in log
    assert not (tmp_path / "logs" / "launcher.log").exists()  # the test process itself started no launcher log


@pytest.mark.parametrize("fault, expected", [
    ("device", "simulated GPU driver failure"),
    ("device-crash", "the check process stopped with exit code"),  # a native crash in DirectML.dll or the driver
])
def test_launcher_gpu_check_failure_or_crash_falls_back_to_cpu(monkeypatch, tmp_path, fault, expected):
    launcher = _load("launcher")
    monkeypatch.setenv("HELIX_SETTINGS_DIR", str(tmp_path))
    monkeypatch.setenv("HELIX_SMOKE_FAULT", fault)
    device, notice = launcher.check_device("directml", tmp_path)
    assert device == "cpu" and expected in notice and "runs on the CPU" in notice and str(tmp_path) in notice


def test_launcher_gpu_check_that_hangs_is_cut_off(monkeypatch, tmp_path):
    launcher = _load("launcher")
    monkeypatch.setenv("HELIX_SETTINGS_DIR", str(tmp_path))
    monkeypatch.setenv("HELIX_SMOKE_FAULT", "device-hang")
    t0 = time.monotonic()
    device, notice = launcher.check_device("directml", tmp_path, timeout_s=2.0)
    assert time.monotonic() - t0 < 20  # the child sleeps an hour; it was killed at the timeout
    assert device == "cpu" and "did not finish within 2 s" in notice and "runs on the CPU" in notice


def test_launcher_says_so_when_a_gpu_build_finds_no_gpu(monkeypatch, tmp_path, capsys):
    launcher = _load("launcher")
    # the child's side: what it prints when the build expected DirectML but found none
    monkeypatch.setattr(launcher, "_expected_gpu", lambda: "DirectML")
    monkeypatch.delenv("HELIX_SMOKE_FAULT", raising=False)
    assert launcher.gpu_check_child("auto") == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(printed) == {"device": "auto", "kind": "cpu", "name": json.loads(printed)["name"],
                                   "expected": "DirectML"}
    # the app's side, reading exactly that line from a child
    monkeypatch.setattr(launcher, "gpu_check_command", lambda device: [sys.executable, "-c", f"print({printed!r})"])
    device, notice = launcher.check_device("auto", tmp_path)
    assert device == "auto" and "No DirectML GPU could be used" in notice and "runs on the CPU" in notice


def test_launcher_expects_rocm_from_a_hip_torch(monkeypatch):
    import torch

    launcher = _load("launcher")
    monkeypatch.setattr(torch.version, "hip", "6.4.43483", raising=False)
    assert launcher._expected_gpu() == "ROCm"
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert launcher._expected_gpu() is None


def test_launcher_log_names_one_file_per_kind_of_process():
    launcher = _load("launcher")
    assert launcher.log_name([]) == "launcher.log"
    assert launcher.log_name(["--device", "cpu"]) == "launcher.log"
    assert launcher.log_name(["doctor", "--json", "x.json"]) == "cli-doctor.log"  # the app's doctor process
    assert launcher.log_name(["--log-level", "INFO", "serve"]) == "cli-serve.log"
    assert launcher.log_name(["--gpu-check", "directml"]) == "gpu-check.log"


def test_launcher_rotates_at_start_and_never_fails_on_a_locked_log(monkeypatch, tmp_path):
    launcher = _load("launcher")
    log = tmp_path / "launcher.log"
    log.write_bytes(b"x" * launcher.LOG_BYTES)
    (tmp_path / "launcher.log.1").write_text("older")
    launcher.rotate_log(log)
    assert not log.exists() and (tmp_path / "launcher.log.1").stat().st_size == launcher.LOG_BYTES
    assert (tmp_path / "launcher.log.2").read_text() == "older"
    log.write_bytes(b"y" * launcher.LOG_BYTES)

    def locked(src, dst):  # what Windows says when another process holds the file open
        raise PermissionError(32, "The process cannot access the file because it is being used by another process")

    monkeypatch.setattr(launcher.os, "replace", locked)
    launcher.rotate_log(log)  # no exception: the file is kept and appended to
    assert log.stat().st_size == launcher.LOG_BYTES


def test_launcher_forces_utf8_on_a_cp1252_stream(monkeypatch):
    launcher = _load("launcher")
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="cp1252", errors="strict")
    monkeypatch.setattr(sys, "stdout", stream)
    with pytest.raises(UnicodeEncodeError):
        print("日本語")
        stream.flush()
    launcher.force_utf8()
    print("日本語 ✓")
    stream.flush()
    monkeypatch.undo()
    assert "日本語 ✓".encode() in raw.getvalue()


@pytest.mark.slow  # a child Python that imports torch: 10-15 s on a busy 2-core machine
def test_cli_output_is_utf8_when_the_console_is_cp1252(tmp_path):
    """helix-cli from source with Windows' pipe encoding: the error names a non-Latin path, in UTF-8, exit 2."""
    env = {**os.environ, "PYTHONIOENCODING": "cp1252", "HELIX_SETTINGS_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(PACKAGING / "launcher.py"), "generate", "hi", "--no-draft",
                           "--target", str(tmp_path / "モデル")], capture_output=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "モデル".encode() in proc.stderr  # not \u30e2... escapes, not a UnicodeEncodeError
    assert (tmp_path / "logs" / "cli-generate.log").is_file()


def test_launcher_shows_no_window_without_a_display(monkeypatch):
    launcher = _load("launcher")
    monkeypatch.setattr(sys, "platform", "linux")
    for name in ("QT_QPA_PLATFORM", "DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(name, raising=False)
    assert not launcher.can_show_window()
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    assert launcher.can_show_window()
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.delenv("QT_QPA_PLATFORM")
    assert launcher.can_show_window()


def test_launcher_gives_a_windowed_exe_stdout_and_logs_to_app_data(monkeypatch, tmp_path):
    launcher = _load("launcher")
    monkeypatch.setenv("HELIX_SETTINGS_DIR", str(tmp_path))
    crash_files = []
    monkeypatch.setattr(launcher, "faulthandler", types.SimpleNamespace(enable=crash_files.append))  # keep pytest's
    monkeypatch.setattr(sys, "stdout", None)
    monkeypatch.setattr(sys, "stderr", None)
    try:
        log_dir = launcher.start_logging([])
        print("hello from a windowed exe")
        sys.stdout.flush()
    finally:
        for handler in list(launcher.logger.handlers):
            handler.close()
            launcher.logger.removeHandler(handler)
    monkeypatch.undo()
    for stream in launcher._keep_open:
        stream.close()
    assert log_dir == tmp_path / "logs"
    assert "hello from a windowed exe" in (log_dir / "console.log").read_text()
    assert "start:" in (log_dir / "launcher.log").read_text()
    assert [Path(f.name).name for f in crash_files] == ["crash.log"]
