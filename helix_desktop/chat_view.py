"""The chat transcript: one paragraph per message, replies coloured by token provenance, a stats line under each."""

from __future__ import annotations

from PySide6.QtGui import QColor, QFont, QTextBlockFormat, QTextCharFormat, QTextCursor
from PySide6.QtWidgets import QTextEdit, QWidget

from engine.sequence import TokenEvent
from helix_desktop.conversation_store import Conversation, Message
from helix_desktop.formatting import format_stats
from helix_desktop.theme import ACCENT, token_colours

ROLE_NAMES = {"user": "You", "assistant": "Assistant", "system": "System"}


class TranscriptView(QTextEdit):
    """Read-only; ``show_conversation`` renders finished messages, ``begin_reply`` / ``append_tokens`` /
    ``end_reply`` stream the reply being generated at the end."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setReadOnly(True)
        self.setAcceptRichText(False)
        self.colouring = True
        self._conversation: Conversation | None = None
        self._streaming: list[list[str]] | None = None  # the reply being streamed, as [text, source] runs

    # ---------------------------------------------------------------- rendering
    def show_conversation(self, conv: Conversation) -> None:
        self._conversation = conv
        self._streaming = None
        self.clear()
        if conv.system_prompt.strip():
            self._header("system")
            self._text(conv.system_prompt.strip(), "", muted=True)
        for m in conv.messages:
            self._message(m)
        self._to_bottom()

    def _message(self, m: Message) -> None:
        self._header(m.role)
        if m.role == "assistant" and m.segments:
            for text, source in m.segments:
                self._text(text, source)
        else:
            self._text(m.content, "")
        if m.role == "assistant" and m.stats is not None:
            self._stats(format_stats(m.stats, m.finish_reason, bool(m.stats.get("num_drafts"))))

    def set_colouring(self, on: bool) -> None:
        self.colouring = on
        if self._conversation is not None and self._streaming is None:
            self.show_conversation(self._conversation)

    # ---------------------------------------------------------------- streaming
    def begin_reply(self) -> None:
        self._streaming = []
        self._header("assistant")

    def append_tokens(self, events: list[TokenEvent]) -> None:
        for ev in events:
            self.append_text(ev.text, ev.source)

    def append_text(self, text: str, source: str = "") -> None:
        if not text or self._streaming is None:
            return
        if self._streaming and self._streaming[-1][1] == source:
            self._streaming[-1][0] += text
        else:
            self._streaming.append([text, source])
        self._text(text, source)

    def end_reply(self) -> list[list[str]]:
        """Stop streaming; return the reply's [text, source] runs (for the store)."""
        runs, self._streaming = self._streaming or [], None
        return runs

    def streamed_text(self) -> str:
        return "".join(t for t, _ in self._streaming or [])

    # ---------------------------------------------------------------- low level
    def _cursor_at_end(self) -> QTextCursor:
        cursor = QTextCursor(self.document())
        cursor.movePosition(QTextCursor.MoveOperation.End)
        return cursor

    def _header(self, role: str) -> None:
        cursor = self._cursor_at_end()
        if not self.document().isEmpty():
            block = QTextBlockFormat()
            block.setTopMargin(12)
            cursor.insertBlock(block)
        fmt = QTextCharFormat()
        fmt.setFontWeight(QFont.Weight.Bold)
        fmt.setForeground(QColor(ACCENT) if role == "assistant" else self.palette().text())
        cursor.insertText(ROLE_NAMES.get(role, role.title()), fmt)
        cursor.insertBlock(QTextBlockFormat())

    def _text(self, text: str, source: str, muted: bool = False) -> None:
        bar = self.verticalScrollBar()
        at_bottom = bar.value() >= bar.maximum() - 4
        fmt = QTextCharFormat()
        if self.colouring and source:
            fmt.setForeground(QColor(token_colours().for_source(source)))
        elif muted:
            fmt.setForeground(self.palette().placeholderText())
        else:
            fmt.setForeground(self.palette().text())
        self._cursor_at_end().insertText(text, fmt)
        if at_bottom:
            bar.setValue(bar.maximum())

    def _stats(self, text: str) -> None:
        cursor = self._cursor_at_end()
        cursor.insertBlock(QTextBlockFormat())
        fmt = QTextCharFormat()
        fmt.setForeground(self.palette().placeholderText())
        fmt.setFontPointSize(max(7.0, self.font().pointSizeF() * 0.85))
        cursor.insertText(text, fmt)

    def show_stats(self, text: str) -> None:
        """The stats line under the reply that just finished streaming."""
        self._stats(text)
        self._to_bottom()

    def _to_bottom(self) -> None:
        self.verticalScrollBar().setValue(self.verticalScrollBar().maximum())
