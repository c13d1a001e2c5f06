"""Light and dark palettes that follow the system colour scheme, the app icon, and token colours."""

from __future__ import annotations

import os
from dataclasses import dataclass

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QGuiApplication, QIcon, QPalette
from PySide6.QtWidgets import QApplication

from helix_desktop.paths import resource_path


@dataclass(frozen=True)
class TokenColours:
    draft: str  # accepted draft token
    target: str  # target token (plain step, or the correction at a rejection)
    bonus: str  # extra token after a fully accepted draft

    def for_source(self, source: str) -> str:
        return getattr(self, source, self.target)


LIGHT_TOKENS = TokenColours(draft="#17803d", target="#b45309", bonus="#1d4ed8")
DARK_TOKENS = TokenColours(draft="#4ade80", target="#fbbf24", bonus="#60a5fa")
SOURCE_LABELS = {"draft": "accepted draft", "target": "target / correction", "bonus": "bonus"}
ACCENT = "#7c3aed"


def forced_scheme() -> str | None:
    """``HELIX_THEME=dark`` or ``light`` overrides the system scheme (screenshots, user preference)."""
    value = os.environ.get("HELIX_THEME", "").strip().lower()
    return value if value in ("dark", "light") else None


def system_is_dark() -> bool:
    forced = forced_scheme()
    if forced is not None:
        return forced == "dark"
    hints = QGuiApplication.styleHints()
    return hints is not None and hints.colorScheme() == Qt.ColorScheme.Dark


def is_dark() -> bool:
    if system_is_dark():
        return True
    app = QGuiApplication.instance()
    return app is not None and QGuiApplication.palette().color(QPalette.ColorRole.Window).lightness() < 128


def token_colours() -> TokenColours:
    return DARK_TOKENS if is_dark() else LIGHT_TOKENS


def _palette(dark: bool) -> QPalette:
    p = QPalette()
    if dark:
        colours = {
            QPalette.ColorRole.Window: "#1f2125", QPalette.ColorRole.WindowText: "#e6e6e6",
            QPalette.ColorRole.Base: "#16181b", QPalette.ColorRole.AlternateBase: "#24272c",
            QPalette.ColorRole.Text: "#e6e6e6", QPalette.ColorRole.Button: "#2a2d33",
            QPalette.ColorRole.ButtonText: "#e6e6e6", QPalette.ColorRole.ToolTipBase: "#2a2d33",
            QPalette.ColorRole.ToolTipText: "#e6e6e6", QPalette.ColorRole.PlaceholderText: "#8a8f98",
            QPalette.ColorRole.Highlight: ACCENT, QPalette.ColorRole.HighlightedText: "#ffffff",
            QPalette.ColorRole.Link: "#a78bfa", QPalette.ColorRole.Mid: "#3a3e45",
            QPalette.ColorRole.Dark: "#121316", QPalette.ColorRole.Light: "#3a3e45",
        }
        disabled = "#6b7079"
    else:
        colours = {
            QPalette.ColorRole.Window: "#f4f5f7", QPalette.ColorRole.WindowText: "#1c1e21",
            QPalette.ColorRole.Base: "#ffffff", QPalette.ColorRole.AlternateBase: "#f0f1f4",
            QPalette.ColorRole.Text: "#1c1e21", QPalette.ColorRole.Button: "#ffffff",
            QPalette.ColorRole.ButtonText: "#1c1e21", QPalette.ColorRole.ToolTipBase: "#ffffff",
            QPalette.ColorRole.ToolTipText: "#1c1e21", QPalette.ColorRole.PlaceholderText: "#8a8f98",
            QPalette.ColorRole.Highlight: ACCENT, QPalette.ColorRole.HighlightedText: "#ffffff",
            QPalette.ColorRole.Link: "#6d28d9", QPalette.ColorRole.Mid: "#c9ccd3",
            QPalette.ColorRole.Dark: "#9ca0a8", QPalette.ColorRole.Light: "#ffffff",
        }
        disabled = "#a0a4ab"
    for role, colour in colours.items():
        p.setColor(role, QColor(colour))
    for role in (QPalette.ColorRole.Text, QPalette.ColorRole.ButtonText, QPalette.ColorRole.WindowText):
        p.setColor(QPalette.ColorGroup.Disabled, role, QColor(disabled))
    return p


def apply_theme(app: QApplication) -> None:
    """Fusion style, a palette matching the system scheme, and the QSS; re-applied when the scheme changes."""
    app.setStyle("Fusion")

    def refresh() -> None:
        app.setPalette(_palette(system_is_dark()))
        qss = resource_path("styles", "helix.qss")
        app.setStyleSheet(qss.read_text(encoding="utf-8") if qss.is_file() else "")

    refresh()
    hints = QGuiApplication.styleHints()
    if hints is not None:
        hints.colorSchemeChanged.connect(lambda _scheme: refresh())


def app_icon() -> QIcon:
    icon = QIcon()
    for name in ("helix.svg", "helix-256.png", "helix.ico"):
        path = resource_path("icons", name)
        if path.is_file():
            icon.addFile(str(path))
    return icon
