"""Persistent settings (models, parameters, server, window) in a QSettings INI file.

The file lives in :func:`app_data_dir` (``HELIX_SETTINGS_DIR`` overrides it, so tests use a
temp dir). QSettings writes through QSaveFile, so a crash mid-write never leaves half a
file; a file that is unreadable anyway is moved aside and replaced, with a message.
Getters are typed and fall back to the default on a wrong or out-of-range value.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from PySide6.QtCore import QByteArray, QSettings

from helix_desktop.paths import app_data_dir

logger = logging.getLogger(__name__)

VERSION_KEY = "helix/version"
VERSION = 1


class AppSettings:
    def __init__(self, directory: Path | None = None):
        self.path = Path(directory or app_data_dir()) / "settings.ini"
        self.reset_message: str | None = None  # set when a corrupt file was replaced
        problem = self._check_file()
        if problem is not None:
            backup = self.path.with_name(f"settings.corrupt-{int(time.time())}.ini")
            try:
                self.path.replace(backup)
                where = f"; the old file was kept as {backup.name}"
            except OSError:
                self.path.unlink(missing_ok=True)
                where = ""
            self.reset_message = f"Your settings file was unreadable ({problem}) and has been reset to defaults{where}."
            logger.warning(self.reset_message)
        self.qsettings = QSettings(str(self.path), QSettings.Format.IniFormat)
        self.qsettings.setAtomicSyncRequired(True)
        self.qsettings.setValue(VERSION_KEY, VERSION)

    def _check_file(self) -> str | None:
        if not self.path.exists():
            return None
        try:
            raw = self.path.read_bytes()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            return f"not UTF-8 text: {exc.__class__.__name__}"
        if "\x00" in text:
            return "binary data"
        # parsed by hand: QSettings caches files per process, so a probe could see stale content
        if text.strip() and not re.search(r"^\[helix\]\s*$(?:\n(?!\[).*)*?\nversion\s*=", text, re.MULTILINE):
            return "no Helix version marker"
        return None

    # ---------------------------------------------------------------- typed access
    def get_str(self, key: str, default: str = "") -> str:
        value = self.qsettings.value(key)
        return value if isinstance(value, str) else default

    def get_int(self, key: str, default: int, lo: int | None = None, hi: int | None = None) -> int:
        try:
            value = int(self.qsettings.value(key, default))
        except (TypeError, ValueError):
            return default
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            return default
        return value

    def get_float(self, key: str, default: float, lo: float | None = None, hi: float | None = None) -> float:
        try:
            value = float(self.qsettings.value(key, default))
        except (TypeError, ValueError):
            return default
        if value != value or (lo is not None and value < lo) or (hi is not None and value > hi):
            return default
        return value

    def get_bool(self, key: str, default: bool) -> bool:
        value = self.qsettings.value(key, default)
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        return default

    def get_bytes(self, key: str) -> QByteArray | None:
        value = self.qsettings.value(key)
        return value if isinstance(value, QByteArray) and not value.isEmpty() else None

    def set(self, key: str, value) -> None:
        self.qsettings.setValue(key, value)

    def remove(self, key: str) -> None:
        self.qsettings.remove(key)

    def remember_models(self, config) -> None:
        """Keep the pair that just loaded, so the next start opens on it."""
        self.set("models/target", config.target)
        self.set("models/draft", config.draft or "")
        self.set("models/no_draft", config.draft is None)
        self.set("models/device", config.device)
        self.set("models/dtype", config.dtype or "auto")
        self.set("models/kv_cache_tokens", config.kv_cache_tokens or 0)
        self.sync()

    def sync(self) -> None:
        self.qsettings.sync()
        if self.qsettings.status() != QSettings.Status.NoError:
            logger.warning("could not write settings to %s", self.path)
