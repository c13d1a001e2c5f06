"""Where Helix finds its bundled resources and where it keeps per-user files."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def resources_root() -> Path:
    """The ``resources/`` folder: next to the package in a checkout, under ``sys._MEIPASS`` when frozen."""
    if getattr(sys, "frozen", False):
        base = Path(getattr(sys, "_MEIPASS", Path(sys.executable).resolve().parent))
        return base / "resources"
    return Path(__file__).resolve().parent.parent / "resources"


def resource_path(*parts: str) -> Path:
    """A bundled file, e.g. ``resource_path("icons", "helix.svg")``."""
    return resources_root().joinpath(*parts)


def app_data_dir() -> Path:
    """Per-user folder for settings and logs: ``$HELIX_SETTINGS_DIR`` or Qt's AppDataLocation (never the install dir)."""
    override = os.environ.get("HELIX_SETTINGS_DIR")
    if override:
        path = Path(override).expanduser()
    else:
        from PySide6.QtCore import QStandardPaths

        location = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.AppDataLocation)
        path = Path(location) if location else Path.home() / ".helix"
    path.mkdir(parents=True, exist_ok=True)
    return path
