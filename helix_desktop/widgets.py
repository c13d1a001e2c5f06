"""Small widgets shared by the tabs: the message banner, the token view, the provenance legend."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor, QFont, QFontDatabase, QTextCharFormat, QTextCursor
from PySide6.QtWidgets import (
    QCheckBox,
    QFrame,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QSizePolicy,
    QTextEdit,
    QToolButton,
    QWidget,
)

from engine.sequence import TokenEvent
from helix_desktop.theme import SOURCE_LABELS, token_colours

BANNER_STYLES = {
    "info": ("#dbeafe", "#1e3a8a", "#1e3a5f", "#bfdbfe"),
    "warning": ("#fef3c7", "#78350f", "#4a3a12", "#fde68a"),
    "error": ("#fee2e2", "#7f1d1d", "#4c1d1d", "#fecaca"),
}


class Banner(QFrame):
    """An inline message bar (never modal, so tests and users are never blocked)."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("banner")
        self.level = ""
        self._label = QLabel()
        self._label.setWordWrap(True)
        self._label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self._label.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        close = QToolButton()
        close.setText("✕")
        close.setAutoRaise(True)
        close.setToolTip("Dismiss")
        close.clicked.connect(self.dismiss)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(12, 6, 6, 6)
        layout.addWidget(self._label)
        layout.addWidget(close, 0, Qt.AlignmentFlag.AlignTop)
        self.hide()

    def show_message(self, level: str, text: str) -> None:
        from helix_desktop.theme import is_dark

        self.level = level
        light_bg, light_fg, dark_bg, dark_fg = BANNER_STYLES.get(level, BANNER_STYLES["info"])
        bg, fg = (dark_bg, dark_fg) if is_dark() else (light_bg, light_fg)
        self.setStyleSheet(f"QFrame#banner {{ background: {bg}; border-radius: 6px; }} QLabel {{ color: {fg}; }}")
        self._label.setText(text)
        self.show()

    def text(self) -> str:
        return self._label.text() if self.isVisible() else ""

    def dismiss(self) -> None:
        self.level = ""
        self._label.clear()
        self.hide()


def monospace_font() -> QFont:
    font = QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont)
    font.setPointSizeF(max(font.pointSizeF(), 10.0))
    return font


class TokenView(QPlainTextEdit):
    """Streams generated text, each run of tokens coloured by where it came from."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setReadOnly(True)
        self.setFont(monospace_font())
        self.setLineWrapMode(QPlainTextEdit.LineWrapMode.WidgetWidth)
        self._segments: list[list[str]] = []  # [text, source]; source "" = uncoloured (held-back tail)
        self.colouring = True
        self.token_count = 0
        self._offsets: list[int] = []  # character offset where each token's text starts
        self._length = 0

    def reset(self) -> None:
        self._segments.clear()
        self._offsets.clear()
        self._length = 0
        self.token_count = 0
        self.setExtraSelections([])
        self.clear()

    def _format(self, source: str) -> QTextCharFormat:
        fmt = QTextCharFormat()
        if self.colouring and source:
            fmt.setForeground(QColor(token_colours().for_source(source)))
        else:
            fmt.setForeground(self.palette().text())
        return fmt

    def _insert(self, text: str, source: str) -> None:
        bar = self.verticalScrollBar()
        at_bottom = bar.value() >= bar.maximum() - 4
        cursor = QTextCursor(self.document())
        cursor.movePosition(QTextCursor.MoveOperation.End)
        cursor.insertText(text, self._format(source))
        if at_bottom:
            bar.setValue(bar.maximum())

    def append_tokens(self, events: list[TokenEvent]) -> None:
        """Append a batch in order, merging neighbours of the same source into one insert."""
        self.token_count += len(events)
        runs: list[list[str]] = []
        for ev in events:
            self._offsets.append(self._length)
            self._length += len(ev.text)
            if not ev.text:
                continue
            if runs and runs[-1][1] == ev.source:
                runs[-1][0] += ev.text
            else:
                runs.append([ev.text, ev.source])
        for text, source in runs:
            self._add_segment(text, source)

    def append_text(self, text: str, source: str = "") -> None:
        if text:
            self._length += len(text)
            self._add_segment(text, source)

    def mark_token(self, index: int) -> None:
        """Highlight token ``index`` (e.g. where two outputs first differ)."""
        if not 0 <= index < len(self._offsets):
            return
        end = self._offsets[index + 1] if index + 1 < len(self._offsets) else self._length
        cursor = QTextCursor(self.document())
        cursor.setPosition(self._offsets[index])
        cursor.setPosition(max(end, self._offsets[index] + 1), QTextCursor.MoveMode.KeepAnchor)
        mark = QTextEdit.ExtraSelection()
        mark.cursor = cursor
        mark.format.setBackground(QColor("#dc2626"))
        mark.format.setForeground(QColor("#ffffff"))
        self.setExtraSelections([mark])
        self.setTextCursor(cursor)
        self.ensureCursorVisible()

    def _add_segment(self, text: str, source: str) -> None:
        if self._segments and self._segments[-1][1] == source:
            self._segments[-1][0] += text
        else:
            self._segments.append([text, source])
        self._insert(text, source)

    def set_colouring(self, on: bool) -> None:
        self.colouring = on
        self.clear()
        for text, source in self._segments:
            self._insert(text, source)

    def text(self) -> str:
        return "".join(t for t, _ in self._segments)

    def sources(self) -> set[str]:
        return {s for _, s in self._segments if s}


class Legend(QWidget):
    """Swatches for draft / target / bonus and a switch to turn the colouring off."""

    toggled = Signal(bool)

    def __init__(self, parent: QWidget | None = None, with_toggle: bool = True):
        super().__init__(parent)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self._swatches: list[tuple[QLabel, str]] = []
        for source in ("draft", "target", "bonus"):
            label = QLabel()
            label.setToolTip({
                "draft": "Proposed by the draft model and accepted by the target",
                "target": "Chosen by the target model: a plain step, or the correction where a draft was rejected",
                "bonus": "Extra target token after every draft token was accepted",
            }[source])
            self._swatches.append((label, source))
            layout.addWidget(label)
        layout.addStretch(1)
        self.toggle = QCheckBox("Colour by source")
        self.toggle.setChecked(True)
        self.toggle.toggled.connect(self.toggled)
        self.toggle.setVisible(with_toggle)
        layout.addWidget(self.toggle)
        self.refresh()

    def refresh(self) -> None:
        colours = token_colours()
        for label, source in self._swatches:
            label.setText(f'<span style="color:{colours.for_source(source)}; font-size: 14px">■</span>'
                          f"&nbsp;{SOURCE_LABELS[source]}")


def caption(text: str) -> QLabel:
    """A small bold heading above a pane."""
    label = QLabel(text)
    label.setObjectName("caption")
    return label
