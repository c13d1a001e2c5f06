"""The status bar: models, device and precision, memory in use (RSS; CUDA memory on CUDA), API state."""

from __future__ import annotations

import os

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QLabel, QStatusBar, QWidget

from engine.host import EngineHost
from helix_desktop.formatting import format_bytes, short_model_name

DEVICE_WORDS = {"directml": "DirectML", "cuda": "CUDA", "cpu": "CPU", "mps": "Apple MPS"}


def device_words(info: dict) -> str:
    """The device for people: an AMD GPU on a ROCm torch is a ``cuda`` device to torch, but says ROCm here."""
    if info["device"] == "cuda" and "(ROCm" in (info.get("device_name") or ""):
        return "ROCm"
    return DEVICE_WORDS.get(info["device"], info["device"])


def pair_text(engine) -> str:
    if engine is None:
        return "no models"
    info = engine.info()
    draft = short_model_name(info["draft"]) if info["has_draft"] else "no draft"
    eagle = f" + EAGLE head {short_model_name(info['eagle'])}" if info.get("eagle") else ""
    return f"{short_model_name(info['target'])} + {draft}{eagle}"


def memory_text(engine) -> str:
    """Process RSS, plus CUDA memory when the engine runs on CUDA."""
    parts = []
    try:
        import psutil

        parts.append(f"RAM {format_bytes(psutil.Process(os.getpid()).memory_info().rss)}")
    except Exception:  # psutil missing or denied
        pass
    if engine is not None and engine.device_kind == "cuda":
        try:
            import torch

            parts.append(f"GPU {format_bytes(torch.cuda.memory_allocated())}")
        except Exception:
            pass
    return " · ".join(parts)


class HelixStatusBar(QStatusBar):
    def __init__(self, host: EngineHost, parent: QWidget | None = None):
        super().__init__(parent)
        self.host = host
        self.models_label = QLabel()
        self.device_label = QLabel()
        self.memory_label = QLabel()
        self.server_label = QLabel("API: off")
        for label in (self.models_label, self.device_label, self.memory_label, self.server_label):
            self.addPermanentWidget(label)
        self.timer = QTimer(self)
        self.timer.setInterval(1000)
        self.timer.timeout.connect(self.refresh)
        self.timer.start()
        self.refresh()

    def set_server(self, url: str | None) -> None:
        self.server_label.setText(f"API: {url}" if url else "API: off")

    def refresh(self) -> None:
        engine = self.host.engine
        if engine is None:
            self.device_label.setText("Device: –")
            self.models_label.setText("No models loaded")
        else:
            info = engine.info()
            self.device_label.setText(f"{device_words(info)} · {info['dtype']}")
            self.device_label.setToolTip(info["device_name"])
            self.models_label.setText(pair_text(engine))
        self.memory_label.setText(memory_text(engine))

    def stop(self) -> None:
        self.timer.stop()
