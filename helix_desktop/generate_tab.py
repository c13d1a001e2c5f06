"""Generate: prompt, parameters, a live token stream coloured by provenance, Stop, and a stats line."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QGroupBox,
    QHBoxLayout,
    QLabel,
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
from helix_desktop.formatting import format_stats
from helix_desktop.params_form import ParamsForm
from helix_desktop.settings import AppSettings
from helix_desktop.widgets import Legend, TokenView, caption, monospace_font

DEFAULT_PROMPT = "Once upon a time"


class GenerateTab(QWidget):
    message = Signal(str, str)  # level, text: shown in the window's banner
    running_changed = Signal(bool)

    def __init__(self, bridge: EngineBridge, settings: AppSettings, parent: QWidget | None = None):
        super().__init__(parent)
        self.bridge = bridge
        self.settings = settings
        self.request_id: str | None = None
        self.last_final: FinishEvent | None = None

        self.prompt = QPlainTextEdit()
        self.prompt.setFont(monospace_font())
        self.prompt.setPlaceholderText("Write a prompt, then press Ctrl+Enter")
        self.prompt.setPlainText(settings.get_str("generate/prompt", DEFAULT_PROMPT))
        self.output = TokenView()
        self.output.setPlaceholderText("Generated text streams here, coloured by where each token came from.")
        self.legend = Legend()
        self.legend.toggled.connect(self.output.set_colouring)
        self.stats = QLabel("Ready.")
        self.stats.setObjectName("statsLine")
        self.stats.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.stats.setWordWrap(True)

        self.run_button = QPushButton("Generate")
        self.run_button.setObjectName("primary")
        self.run_button.setToolTip("Generate (Ctrl+Enter)")
        self.run_button.clicked.connect(self.run)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("Stop (Esc)")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self.stop)
        hint = QLabel("Ctrl+Enter to run · Esc to stop")
        hint.setObjectName("hint")

        prompt_box = QWidget()
        pl = QVBoxLayout(prompt_box)
        pl.setContentsMargins(0, 0, 0, 0)
        pl.addWidget(caption("Prompt"))
        pl.addWidget(self.prompt)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.stop_button)
        buttons.addWidget(hint)
        buttons.addStretch(1)
        pl.addLayout(buttons)

        output_box = QWidget()
        ol = QVBoxLayout(output_box)
        ol.setContentsMargins(0, 0, 0, 0)
        ol.addWidget(caption("Output"))
        ol.addWidget(self.output, 1)
        ol.addWidget(self.legend)
        ol.addWidget(self.stats)

        left = QSplitter(Qt.Orientation.Vertical)
        left.addWidget(prompt_box)
        left.addWidget(output_box)
        left.setStretchFactor(0, 1)
        left.setStretchFactor(1, 3)
        left.setChildrenCollapsible(False)

        self.form = ParamsForm()
        self.form.load(settings, "generate")
        params_box = QGroupBox("Parameters")
        QVBoxLayout(params_box).addWidget(self.form)
        side = QWidget()
        sl = QVBoxLayout(side)
        sl.setContentsMargins(0, 0, 0, 0)
        sl.addWidget(params_box)
        sl.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidget(side)
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        scroll.setMinimumWidth(250)
        scroll.setMaximumWidth(360)

        layout = QHBoxLayout(self)
        layout.addWidget(left, 1)
        layout.addWidget(scroll)

        for keys in ("Ctrl+Return", "Ctrl+Enter"):
            QShortcut(QKeySequence(keys), self, self.run, context=Qt.ShortcutContext.WidgetWithChildrenShortcut)
        QShortcut(QKeySequence("Escape"), self, self.stop, context=Qt.ShortcutContext.WidgetWithChildrenShortcut)

        bridge.token_batch.connect(self._on_tokens)
        bridge.finished.connect(self._on_finished)

    # ---------------------------------------------------------------- actions
    def run(self) -> None:
        if self.request_id is not None:
            return
        prompt = self.prompt.toPlainText()
        try:
            params = self.form.params()
            request_id = self.bridge.submit(prompt, params)
        except HelixError as exc:
            self.message.emit("error", str(exc))
            return
        self.request_id = request_id
        self.last_final = None
        self._speculative = params.speculative
        self.output.reset()
        self.stats.setText("Generating…")
        self._set_running(True)

    def stop(self) -> None:
        if self.request_id is not None:
            self.bridge.cancel(self.request_id)
            self.stop_button.setEnabled(False)
            self.stats.setText("Stopping…")

    # ---------------------------------------------------------------- bridge signals
    def _on_tokens(self, request_id: str, events: list) -> None:
        if request_id != self.request_id:
            return
        self.output.append_tokens(events)
        if self.stop_button.isEnabled():
            self.stats.setText(f"Generating…  {self.output.token_count} tokens")

    def _on_finished(self, request_id: str, final: FinishEvent) -> None:
        if request_id != self.request_id:
            return
        self.output.append_text(final.tail)
        self.request_id = None
        self.last_final = final
        text = format_stats(final.stats.to_dict(), final.finish_reason, self._speculative)
        if final.finish_reason == "error":
            text += f" — {final.error}"
            self.message.emit("error", f"Generation failed: {final.error}")
        self.stats.setText(text)
        self._set_running(False)

    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.stop_button.setEnabled(running)
        self.running_changed.emit(running)

    def set_has_draft(self, has_draft: bool) -> None:
        self.form.set_has_draft(has_draft)

    def save(self) -> None:
        self.form.save(self.settings, "generate")
        self.settings.set("generate/prompt", self.prompt.toPlainText()[:20000])
