"""Runs ``main.py doctor`` for the loaded models in a separate process and reads its JSON report.

The doctor steps an engine of its own, so it runs beside the app's engine rather than on it;
a QProcess keeps the window responsive and is killed if the app closes first.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from PySide6.QtCore import QObject, QProcess, Signal

from engine.config import EngineConfig


def doctor_command(config: EngineConfig, json_path: str) -> list[str]:
    """argv for the doctor on the same target, draft and EAGLE head: the frozen executable itself, or this
    interpreter running main.py."""
    args = ["doctor", "--target", config.target, *(["--draft", config.draft] if config.draft else ["--no-draft"]),
            "--device", config.device, "--json", json_path, "--prompts", "3", "--max-new-tokens", "48"]
    if config.eagle is not None:  # None: the target's own head, as the app loaded it
        args += ["--eagle", config.eagle] if config.eagle else ["--no-eagle"]
    if config.dtype:
        args += ["--dtype", config.dtype]
    if getattr(sys, "frozen", False):
        return [sys.executable, *args]
    return [sys.executable, str(Path(__file__).resolve().parent.parent / "main.py"), *args]


class DoctorRun(QObject):
    finished = Signal(object, str)  # report dict (None on failure), message

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self.process: QProcess | None = None
        self._json = ""

    @property
    def running(self) -> bool:
        return self.process is not None

    def start(self, config: EngineConfig) -> None:
        if self.process is not None:
            return
        self._json = str(Path(tempfile.mkdtemp(prefix="helix-doctor-")) / "report.json")
        argv = doctor_command(config, self._json)
        self.process = QProcess(self)
        self.process.setProcessChannelMode(QProcess.ProcessChannelMode.MergedChannels)
        self.process.finished.connect(self._on_finished)
        self.process.errorOccurred.connect(self._on_error)
        self.process.start(argv[0], argv[1:])

    def _on_error(self, error) -> None:
        if error == QProcess.ProcessError.FailedToStart:
            self.process = None
            self.finished.emit(None, "the doctor could not be started")

    def _on_finished(self, code: int, _status) -> None:
        process, self.process = self.process, None
        output = bytes(process.readAll()).decode("utf-8", "replace").strip() if process is not None else ""
        path = Path(self._json)
        report = None
        if code == 0 and path.is_file():
            try:
                report = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                report = None
        path.unlink(missing_ok=True)
        if report is None:
            last = [line for line in output.splitlines() if line.strip()][-1:] or ["no output"]
            self.finished.emit(None, f"the doctor failed: {last[0]}")
        else:
            self.finished.emit(report, report.get("verdict", ""))

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            process.finished.disconnect(self._on_finished)
            process.kill()
            process.waitForFinished(3000)
        if self._json:
            Path(self._json).unlink(missing_ok=True)
