"""Compare: two engines (this PC plain or with a drafting method, or a remote) on one prompt and seed, side by
side, with speed-up, acceptance per method and a verdict; B may run every drafting method in turn."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from engine.errors import HelixError
from engine.sequence import FinishEvent
from helix_desktop.compare_session import (
    DEFAULT_SIDES,
    EVERY,
    METHOD_NAMES,
    SLOTS,
    CompareSession,
    RunResult,
    Side,
    median_speedup,
    speedups_by_side,
)
from helix_desktop.connections import Connection
from helix_desktop.formatting import format_stats
from helix_desktop.params_form import ParamsForm
from helix_desktop.settings import AppSettings
from helix_desktop.theme import token_colours
from helix_desktop.widgets import Legend, TokenView, caption, monospace_font

COLUMNS = ("Run", "B", "A tok/s", "B tok/s", "Speed-up (B ÷ A)", "A TTFT", "B TTFT", "B acceptance", "Same output")


class ComparePane(QGroupBox):
    def __init__(self, slot: str, parent: QWidget | None = None):
        super().__init__(f"{slot.upper()}: {DEFAULT_SIDES[slot].label}", parent)
        self.view = TokenView()
        self.stats = QLabel("–")
        self.stats.setObjectName("statsLine")
        self.stats.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.addWidget(self.view, 1)
        layout.addWidget(self.stats)


class CompareTab(QWidget):
    message = Signal(str, str)

    def __init__(self, bridge, settings: AppSettings, parent: QWidget | None = None):
        """``bridge``: the window's EngineSwitch, so either side can be any connection."""
        super().__init__(parent)
        self.settings = settings
        self.session = CompareSession(bridge, self)
        self.side_boxes = {slot: QComboBox() for slot in SLOTS}
        for slot, box in self.side_boxes.items():
            box.setToolTip(f"Engine {slot.upper()}: this PC plain or with a drafting method"
                           + (" (or every method in turn)" if slot == "b" else "") + ", or a remote connection")
        self._bad = False  # a B side's output differed from A's in this comparison
        self._connections = [DEFAULT_SIDES["a"].connection]
        self._methods = ["auto", "model", "ngram"]  # this PC's drafting methods, until an engine says
        self.set_connections(self._connections)
        self.prompt = QPlainTextEdit()
        self.prompt.setFont(monospace_font())
        self.prompt.setPlainText(settings.get_str("compare/prompt", "The little girl named Lily"))
        self.prompt.setMaximumHeight(90)
        self.form = ParamsForm(with_speculative=False, with_method=False)  # each side names its method
        self.form.load(settings, "compare")
        if settings.qsettings.value("compare/temperature") is None:
            self.form.temperature.setValue(0.0)  # identical-output check by default
        self.runs = QSpinBox()
        self.runs.setRange(1, 50)
        self.runs.setValue(settings.get_int("compare/runs", 3, 1, 50))
        self.runs.setPrefix("Runs: ")
        self.run_button = QPushButton("Compare")
        self.run_button.setObjectName("primary")
        self.run_button.setToolTip("Run engine A then engine B (Ctrl+Enter)")
        self.run_button.clicked.connect(self.run)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self.stop)

        self.panes = {slot: ComparePane(slot) for slot in SLOTS}
        self.speedup = QLabel("Speed-up –")
        self.speedup.setObjectName("bigNumber")
        self.speedup.setWordWrap(True)  # one median per drafting method when B runs every method
        self.verdict = QLabel("Run a comparison: temperature 0 checks that both outputs are identical.")
        self.verdict.setWordWrap(True)
        self.verdict.setObjectName("verdict")
        self.progress = QLabel("")
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.verticalHeader().hide()
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        row = self.fontMetrics().height() + 8
        self.table.verticalHeader().setDefaultSectionSize(row)
        self.table.setMinimumHeight(self.table.horizontalHeader().sizeHint().height() + 5 * row + 6)  # 5 runs

        top = QHBoxLayout()
        prompt_col = QVBoxLayout()
        prompt_col.addWidget(caption("Prompt (same prompt and seed for both runs)"))
        prompt_col.addWidget(self.prompt)
        sides = QHBoxLayout()
        for slot, box in self.side_boxes.items():
            sides.addWidget(QLabel(f"{slot.upper()}:"))
            sides.addWidget(box, 1)
        prompt_col.addLayout(sides)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.stop_button)
        buttons.addWidget(self.runs)
        buttons.addWidget(self.progress, 1)
        prompt_col.addLayout(buttons)
        prompt_col.addStretch(1)
        top.addLayout(prompt_col, 3)
        params_box = QGroupBox("Parameters")
        QVBoxLayout(params_box).addWidget(self.form)
        params_box.setMaximumWidth(360)
        top.addWidget(params_box, 2)

        panes = QSplitter(Qt.Orientation.Horizontal)
        for pane in self.panes.values():
            panes.addWidget(pane)
        panes.setChildrenCollapsible(False)

        summary = QHBoxLayout()
        summary.addWidget(self.speedup, 3)
        summary.addWidget(self.verdict, 2)
        self.legend = Legend()
        self.legend.toggled.connect(lambda on: [p.view.set_colouring(on) for p in self.panes.values()])

        results = QWidget()
        rl = QVBoxLayout(results)
        rl.setContentsMargins(0, 0, 0, 0)
        rl.addWidget(panes, 1)
        rl.addWidget(self.legend)
        body = QSplitter(Qt.Orientation.Vertical)
        body.addWidget(results)
        body.addWidget(self.table)
        body.setStretchFactor(0, 5)
        body.setStretchFactor(1, 2)
        body.setChildrenCollapsible(False)

        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addLayout(summary)
        layout.addWidget(body, 1)

        for keys in ("Ctrl+Return", "Ctrl+Enter"):
            QShortcut(QKeySequence(keys), self, self.run, context=Qt.ShortcutContext.WidgetWithChildrenShortcut)
        QShortcut(QKeySequence("Escape"), self, self.stop, context=Qt.ShortcutContext.WidgetWithChildrenShortcut)

        self.session.run_started.connect(self._on_run_started)
        self.session.tokens.connect(lambda mode, events: self.panes[mode].view.append_tokens(events))
        self.session.mode_finished.connect(self._on_mode_finished)
        self.session.run_finished.connect(self._on_run_finished)
        self.session.done.connect(self._on_done)
        self.session.failed.connect(lambda text: self.message.emit("error", f"Compare failed: {text}"))

    # ---------------------------------------------------------------- actions
    def run(self) -> None:
        if self.session.running:
            return
        try:
            params = self.form.params(seed=self.form.concrete_seed())
            self.table.setRowCount(0)
            self.speedup.setText("Speed-up –")
            self.verdict.setText("Running…")
            self._set_verdict_style("")
            self._greedy = params.greedy
            sides = {slot: box.currentData() or DEFAULT_SIDES[slot] for slot, box in self.side_boxes.items()}
            for slot, side in sides.items():
                self.panes[slot].setTitle(f"{slot.upper()}: {side.label}")
            self._bad = False
            self.session.start(self.prompt.toPlainText(), params, self.runs.value(), sides, self._methods)
        except HelixError as exc:
            self.verdict.setText("")
            self.message.emit("error", str(exc))
            return
        self._set_running(True)

    def stop(self) -> None:
        if self.session.running:
            self.session.stop()
            self.stop_button.setEnabled(False)

    # ---------------------------------------------------------------- session signals
    def _on_run_started(self, run: int, mode: str) -> None:
        side = self.session.current_side
        if mode == "a":
            for pane in self.panes.values():
                pane.view.reset()
                pane.stats.setText("waiting…")
        else:
            self.panes["b"].view.reset()
            self.panes["b"].setTitle(f"B: {side.label}")
        self.panes[mode].stats.setText("generating…")
        self.progress.setText(f"Run {run + 1} of {self.session.runs}: {side.label}")

    def _on_mode_finished(self, run: int, mode: str, final: FinishEvent) -> None:
        pane = self.panes[mode]
        pane.view.append_text(final.tail)
        side = self.session.current_side
        stats = final.stats.to_dict()
        text = format_stats(stats, final.finish_reason, side.speculative or not side.connection.is_local)
        if len(stats.get("by_method") or {}) > 1:  # auto drafted with several methods: each one's share
            text += "  ·  " + by_method_text(stats["by_method"])
        pane.stats.setText(text)

    def _on_run_finished(self, result: RunResult) -> None:
        results = self.session.results
        row = self.table.rowCount()
        self.table.insertRow(row)
        p, s = result.a.stats, result.b.stats
        unit = "token" if result.by_token else "character"
        same = "–" if not self._greedy else ("yes" if result.first_difference is None else
                                             f"no ({unit} {result.first_difference})")
        stats = s.to_dict()
        rate = stats["acceptance_rate"]
        acceptance = "not reported" if rate is None else ("–" if not stats["num_drafts"] else f"{rate * 100:.0f}%")
        if len(stats.get("by_method") or {}) > 1:
            acceptance += f" ({by_method_text(stats['by_method'])})"
        cells = (str(result.index + 1), result.b_side.method_name, f"{p.tokens_per_second:.1f}",
                 f"{s.tokens_per_second:.1f}", f"{result.speedup:.2f}×", _ms(p.ttft_s), _ms(s.ttft_s), acceptance, same)
        for col, text in enumerate(cells):
            item = QTableWidgetItem(text)
            item.setToolTip(text)
            item.setTextAlignment(Qt.AlignmentFlag.AlignCenter)
            self.table.setItem(row, col, item)
        self.table.scrollToBottom()
        by_side = speedups_by_side(results)
        if len(by_side) > 1:
            runs = max(sum(1 for r in results if r.b_side == side) for side in by_side)
            self.speedup.setText("Speed-up " + ", ".join(f"{side.method_name} {v:.2f}×" for side, v in by_side.items())
                                 + (f" (median of {runs} runs)" if runs > 1 else ""))
        elif len(results) > 1:
            self.speedup.setText(f"Speed-up {median_speedup(results):.2f}× (median of {len(results)} runs)")
        else:
            self.speedup.setText(f"Speed-up {result.speedup:.2f}×")
        self._show_verdict(result)

    def _show_verdict(self, result: RunResult) -> None:
        if not self._greedy:
            self.verdict.setText("Temperature > 0: both runs sample with the same seed but take different random "
                                 "paths, so the texts may differ; both follow the target model's distribution.")
            self._set_verdict_style("")
            return
        diff = result.first_difference
        sides = {"a": self.session.sides["a"], "b": result.b_side}
        if diff is None:
            if self._bad:  # an earlier B side differed: that verdict stays
                return
            n = f"{len(result.a.token_ids)} tokens" if result.by_token else "text"
            b = "every drafting method so far" if len(self.session.b_sides) > 1 else sides["b"].label
            self.verdict.setText(f"✔ Identical outputs: {b} produced exactly the same {n} as {sides['a'].label}.")
            self._set_verdict_style("ok")
        elif not result.by_token:  # a server that sends no token ids: compare the text
            self._bad = True
            a, b = result.a.text, result.b.text
            self.verdict.setText(f"✘ Outputs differ first at character {diff}: A {a[diff:diff + 12]!r} vs "
                                 f"B {b[diff:diff + 12]!r} (the servers sent no token ids).")
            self._set_verdict_style("bad")
        else:
            self._bad = True
            engine = self.session.bridge.host.engine
            local = all(side.connection.is_local for side in sides.values())
            tok = engine.tokenizer if engine is not None and local else None
            a, b = result.a.token_ids, result.b.token_ids

            def show(ids: list[int]) -> str:
                if diff >= len(ids):
                    return "(end)"
                return repr(tok.decode([ids[diff]])) if tok is not None else str(ids[diff])

            self.verdict.setText(f"✘ Outputs differ first at token {diff} (highlighted): A {show(a)} vs "
                                 f"B ({result.b_side.method_name}) {show(b)}.")
            self._set_verdict_style("bad")
            for pane in self.panes.values():
                pane.view.mark_token(diff)

    def _set_verdict_style(self, kind: str) -> None:
        colours = token_colours()
        colour = {"ok": colours.draft, "bad": "#dc2626"}.get(kind)
        self.verdict.setStyleSheet(f"color: {colour}; font-weight: 600;" if colour else "")

    def _on_done(self, results: list) -> None:
        self._set_running(False)
        if len(results) < self.session.runs:
            self.progress.setText(f"Stopped after {len(results)} of {self.session.runs} runs")
            if not results:
                self.verdict.setText("Stopped.")
        else:
            self.progress.setText(f"Done: {len(results)} run{'s' if len(results) != 1 else ''}")

    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.stop_button.setEnabled(running)

    def set_methods(self, methods: list[str]) -> None:
        """This PC's drafting methods (the engine's draft_methods: auto, then what is loaded)."""
        if methods and methods != self._methods:
            self._methods = list(methods)
            self.set_connections(self._connections)

    def set_connections(self, connections: list[Connection]) -> None:
        """Offer this PC (plain and each drafting method; on B also every method in turn) and each remote on both
        sides, keeping the choices that remain."""
        self._connections = list(connections)
        local = [m for m in self._methods if m in METHOD_NAMES]
        sides = [s for c in connections
                 for s in ([Side(c, False), *(Side(c, True, m) for m in local)] if c.is_local else [Side(c, True)])]
        for slot, box in self.side_boxes.items():
            chosen = box.currentText() or self.settings.get_str(f"compare/side_{slot}", DEFAULT_SIDES[slot].label)
            box.clear()
            for side in sides:
                box.addItem(side.label, side)
            here = next((c for c in connections if c.is_local), None)
            if slot == "b" and here is not None and len(local) > 2:  # auto and at least two methods
                every = Side(here, True, EVERY)
                box.addItem(every.label, every)
            at = box.findText(chosen)
            box.setCurrentIndex(at if at >= 0 else box.findText(DEFAULT_SIDES[slot].label))

    def save(self) -> None:
        for slot, box in self.side_boxes.items():
            self.settings.set(f"compare/side_{slot}", box.currentText())
        self.form.save(self.settings, "compare")
        self.settings.set("compare/runs", self.runs.value())
        self.settings.set("compare/prompt", self.prompt.toPlainText()[:20000])


def by_method_text(by_method: dict) -> str:
    """Acceptance of each method a request drafted with: 'n-gram lookup 80%, draft model 65%'."""
    return ", ".join(f"{METHOD_NAMES.get(m, m)} {d['acceptance_rate'] * 100:.0f}%" for m, d in by_method.items()
                     if d.get("num_draft_tokens"))


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1000:.0f} ms"
