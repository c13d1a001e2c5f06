"""Chat: a conversation with a system prompt, streamed replies with stats, stop / regenerate / edit / copy,
and saved conversations (listed, searchable, exportable).

It talks to the engine only through the bridge's ``submit_chat(messages, params)``, ``cancel`` and its
``token_batch`` / ``finished`` signals, so it can later be pointed at another backend.
"""

from __future__ import annotations

import logging

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QGuiApplication, QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from engine.errors import HelixError
from engine.sequence import FinishEvent
from helix_desktop.bridge import EngineBridge
from helix_desktop.chat_view import TranscriptView
from helix_desktop.conversation_store import Conversation, Message, export, open_store, title_from
from helix_desktop.formatting import format_stats
from helix_desktop.params_form import ParamsForm
from helix_desktop.settings import AppSettings
from helix_desktop.widgets import Legend, caption

logger = logging.getLogger(__name__)

STORE_FILE = "conversations.sqlite3"
NEW_TITLE = "New chat"


def has_chat_template(engine) -> bool:
    """An instruct model: its tokenizer brings a chat template."""
    return bool(getattr(getattr(engine, "tokenizer", None), "chat_template", None))


class ChatTab(QWidget):
    message = Signal(str, str)  # level, text: shown in the window's banner
    reply_finished = Signal(object)  # the assistant Message just stored (or None after an error)

    def __init__(self, bridge: EngineBridge, settings: AppSettings, parent: QWidget | None = None):
        super().__init__(parent)
        self.bridge = bridge
        self.settings = settings
        self.store, notice = open_store(settings.path.parent / STORE_FILE)
        if notice:  # after the window has connected ``message``
            QTimer.singleShot(0, lambda: self.message.emit("warning", notice))
        self.conv = Conversation(None)
        self.request_id: str | None = None
        self._speculative = True

        # --- conversations
        self.search = QLineEdit()
        self.search.setPlaceholderText("Search conversations")
        self.search.setClearButtonEnabled(True)
        self.search.textChanged.connect(self.refresh_list)
        self.conversations = QListWidget()
        self.conversations.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.conversations.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.conversations.itemClicked.connect(self._on_pick)
        new_button = QPushButton("New chat")
        new_button.clicked.connect(self.new_chat)
        self.delete_button = QPushButton("Delete")
        self.delete_button.clicked.connect(self.delete_chat)
        self.export_button = QPushButton("Export…")
        self.export_button.setToolTip("Save this conversation as Markdown (.md) or JSON (.json)")
        self.export_button.clicked.connect(self._export_dialog)
        side = QWidget()
        sl = QVBoxLayout(side)
        sl.setContentsMargins(0, 0, 0, 0)
        sl.addWidget(caption("Conversations"))
        sl.addWidget(self.search)
        sl.addWidget(self.conversations, 1)
        row = QHBoxLayout()
        for b in (new_button, self.delete_button, self.export_button):
            row.addWidget(b)
        sl.addLayout(row)

        # --- the conversation
        self.system_prompt = QPlainTextEdit()
        self.system_prompt.setPlaceholderText("System prompt (optional), e.g. You are a helpful assistant.")
        self.system_prompt.setMaximumHeight(56)
        self.transcript = TranscriptView()
        self.transcript.setPlaceholderText("Your conversation appears here. Replies are coloured by where each token "
                                           "came from.")
        self.legend = Legend()
        self.legend.toggled.connect(self.transcript.set_colouring)
        self.input = QPlainTextEdit()
        self.input.setPlaceholderText("Write a message, then press Ctrl+Enter")
        self.input.setMaximumHeight(96)
        self.send_button = QPushButton("Send")
        self.send_button.setObjectName("primary")
        self.send_button.setToolTip("Send (Ctrl+Enter)")
        self.send_button.clicked.connect(self.send)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("Stop (Esc)")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self.stop)
        self.regenerate_button = QPushButton("Regenerate")
        self.regenerate_button.setToolTip("Answer the last message again")
        self.regenerate_button.clicked.connect(self.regenerate)
        self.edit_button = QPushButton("Edit last")
        self.edit_button.setToolTip("Put your last message back in the box to change and resend it")
        self.edit_button.clicked.connect(self.edit_last)
        self.copy_button = QPushButton("Copy reply")
        self.copy_button.clicked.connect(self.copy_reply)
        self.stats = QLabel("Ready.")
        self.stats.setObjectName("statsLine")
        self.stats.setWordWrap(True)
        self.stats.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        centre = QWidget()
        cl = QVBoxLayout(centre)
        cl.setContentsMargins(0, 0, 0, 0)
        cl.addWidget(caption("System prompt"))
        cl.addWidget(self.system_prompt)
        cl.addWidget(self.transcript, 1)
        cl.addWidget(self.legend)
        cl.addWidget(self.input)
        buttons = QHBoxLayout()
        for b in (self.send_button, self.stop_button, self.regenerate_button, self.edit_button, self.copy_button):
            buttons.addWidget(b)
        buttons.addStretch(1)
        cl.addLayout(buttons)
        cl.addWidget(self.stats)

        # --- parameters
        self.form = ParamsForm()
        self.form.load(settings, "chat")
        if settings.get_int("chat/max_new_tokens", 0, 1) == 0:
            self.form.max_new_tokens.setValue(256)  # replies run longer than Generate's default
        params_box = QGroupBox("Parameters")
        QVBoxLayout(params_box).addWidget(self.form)
        scroll = QScrollArea()
        scroll.setWidget(params_box)
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        scroll.setMinimumWidth(240)
        scroll.setMaximumWidth(320)

        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(side)
        split.addWidget(centre)
        split.setStretchFactor(0, 1)
        split.setStretchFactor(1, 4)
        split.setChildrenCollapsible(False)
        layout = QHBoxLayout(self)
        layout.addWidget(split, 1)
        layout.addWidget(scroll)

        for keys in ("Ctrl+Return", "Ctrl+Enter"):
            QShortcut(QKeySequence(keys), self, self.send, context=Qt.ShortcutContext.WidgetWithChildrenShortcut)
        QShortcut(QKeySequence("Escape"), self, self.stop, context=Qt.ShortcutContext.WidgetWithChildrenShortcut)
        bridge.token_batch.connect(self._on_tokens)
        bridge.finished.connect(self._on_finished)

        self.refresh_list()
        if self.conversations.count():  # reopen the latest conversation
            self.open_conversation(self.conversations.item(0).data(Qt.ItemDataRole.UserRole))
        self._update_buttons()

    # ---------------------------------------------------------------- conversations
    def refresh_list(self) -> None:
        self.conversations.clear()
        query = self.search.text().strip()
        for s in self.store.list(query):
            # while searching, the second line shows where the text matched
            item = QListWidgetItem(f"{s.title}\n{s.snippet}" if query and s.snippet else s.title)
            item.setData(Qt.ItemDataRole.UserRole, s.id)
            item.setToolTip(f"{s.num_messages} messages")
            self.conversations.addItem(item)
            if s.id == self.conv.id:
                self.conversations.setCurrentItem(item)

    def _on_pick(self, item: QListWidgetItem) -> None:
        if self.request_id is not None:
            self.message.emit("warning", "Stop the reply being written before switching conversations.")
            return
        self.open_conversation(item.data(Qt.ItemDataRole.UserRole))

    def open_conversation(self, conversation_id: int) -> None:
        self._save_system_prompt()
        self.conv = self.store.load(conversation_id)
        self.system_prompt.setPlainText(self.conv.system_prompt)
        self.transcript.show_conversation(self.conv)
        self._update_buttons()

    def new_chat(self) -> None:
        if self.request_id is not None:
            return
        self._save_system_prompt()
        self.conv = Conversation(None, NEW_TITLE, self.system_prompt.toPlainText())
        self.transcript.show_conversation(self.conv)
        self.conversations.clearSelection()
        self.input.setFocus()
        self._update_buttons()

    def delete_chat(self) -> None:
        if self.request_id is not None or self.conv.id is None:
            return
        self.store.delete(self.conv.id)
        self.conv = Conversation(None, NEW_TITLE, self.system_prompt.toPlainText())
        self.transcript.show_conversation(self.conv)
        self.refresh_list()
        self._update_buttons()

    def export_to(self, path: str) -> None:
        try:
            export(self.conv, path)
        except (OSError, ValueError) as exc:
            self.message.emit("error", f"Could not export the conversation: {exc}")
            return
        self.message.emit("info", f"Conversation saved to {path}")

    def _export_dialog(self) -> None:
        name = "".join(c if c.isalnum() or c in " -_" else "_" for c in self.conv.title).strip() or "chat"
        path, _ = QFileDialog.getSaveFileName(self, "Export conversation", f"{name}.md",
                                              "Markdown (*.md);;JSON (*.json)")
        if path:
            self.export_to(path)

    def _save(self) -> None:
        self.conv.system_prompt = self.system_prompt.toPlainText()
        try:
            self.store.save(self.conv)
        except Exception as exc:  # disk full, read-only folder: the chat goes on, the user is told
            logger.exception("could not save the conversation")
            self.message.emit("error", f"Could not save the conversation ({exc}); check free space in "
                              f"{self.store.path.parent}.")
        self.refresh_list()

    def _save_system_prompt(self) -> None:
        if self.conv.id is not None and self.system_prompt.toPlainText() != self.conv.system_prompt:
            self._save()

    # ---------------------------------------------------------------- sending
    def send(self) -> None:
        if self.request_id is not None:
            return
        text = self.input.toPlainText().strip()
        if not text:
            self.message.emit("error", "Write a message first.")
            return
        self.conv.messages.append(Message("user", text))
        if self.conv.title == NEW_TITLE:
            self.conv.title = title_from(text)
        if self._start_reply():
            self.input.clear()
            self._save()
        else:
            self.conv.messages.pop()

    def regenerate(self) -> None:
        """Drop the last reply and answer the last user message again."""
        if self.request_id is not None:
            return
        while self.conv.messages and self.conv.messages[-1].role == "assistant":
            self.conv.messages.pop()
        if not self.conv.messages:
            return
        self._start_reply()

    def edit_last(self) -> None:
        """Put the last user message back in the input and remove it (and what followed); Send resends it."""
        if self.request_id is not None:
            return
        users = [i for i, m in enumerate(self.conv.messages) if m.role == "user"]
        if not users:
            return
        self.input.setPlainText(self.conv.messages[users[-1]].content)
        del self.conv.messages[users[-1]:]
        self._save()
        self.transcript.show_conversation(self.conv)
        self.input.setFocus()
        self._update_buttons()

    def copy_reply(self) -> None:
        replies = [m for m in self.conv.messages if m.role == "assistant"]
        if replies:
            QGuiApplication.clipboard().setText(replies[-1].content)
            self.stats.setText("Reply copied to the clipboard.")

    def stop(self) -> None:
        if self.request_id is not None:
            self.bridge.cancel(self.request_id)
            self.stop_button.setEnabled(False)
            self.stats.setText("Stopping…")

    def _start_reply(self) -> bool:
        self.conv.system_prompt = self.system_prompt.toPlainText()
        try:
            params = self.form.params()
            request_id = self.bridge.submit_chat(self.conv.chat_messages(), params)
        except HelixError as exc:
            self.message.emit("error", str(exc))
            return False
        self.request_id = request_id
        self._speculative = params.speculative
        self.transcript.show_conversation(self.conv)
        self.transcript.begin_reply()
        self.stats.setText("Writing…")
        self._update_buttons()
        return True

    # ---------------------------------------------------------------- bridge signals
    def _on_tokens(self, request_id: str, events: list) -> None:
        if request_id == self.request_id:
            self.transcript.append_tokens(events)

    def _on_finished(self, request_id: str, final: FinishEvent) -> None:
        if request_id != self.request_id:
            return
        self.request_id = None
        self.transcript.append_text(final.tail)
        runs = self.transcript.end_reply()
        stats = final.stats.to_dict()
        text = format_stats(stats, final.finish_reason, self._speculative)
        reply = None
        if final.finish_reason == "error" and not final.text:
            self.message.emit("error", f"The reply failed: {final.error}")
            self.transcript.show_conversation(self.conv)
            text += f" — {final.error}"
        else:
            if final.finish_reason == "error":  # keep what was written, and say why it ended
                self.message.emit("error", f"The reply stopped with an error: {final.error}")
            reply = Message("assistant", final.text, runs, stats, final.finish_reason)  # final.text includes the tail
            self.conv.messages.append(reply)
            self.conv.model = self.bridge.model_name or self.conv.model
            self.transcript.show_stats(text)
            self._save()
        self.stats.setText(text)
        self._update_buttons()
        self.reply_finished.emit(reply)

    # ---------------------------------------------------------------- state
    def _update_buttons(self) -> None:
        running = self.request_id is not None
        has_user = any(m.role == "user" for m in self.conv.messages)
        has_reply = any(m.role == "assistant" for m in self.conv.messages)
        self.send_button.setEnabled(not running)
        self.stop_button.setEnabled(running)
        self.regenerate_button.setEnabled(not running and has_user)
        self.edit_button.setEnabled(not running and has_user)
        self.copy_button.setEnabled(has_reply)
        self.delete_button.setEnabled(not running and self.conv.id is not None)
        self.export_button.setEnabled(self.conv.id is not None)

    def set_has_draft(self, has_draft: bool) -> None:
        self.form.set_has_draft(has_draft)

    def save(self) -> None:
        self.form.save(self.settings, "chat")
        self._save_system_prompt()

    def shutdown(self) -> None:
        if self.request_id is not None:
            self.bridge.cancel(self.request_id)
        self.store.close()
