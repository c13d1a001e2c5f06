"""Live charts: acceptance rate and tokens/s (overall and per drafting method), KV blocks used vs total, and
per-position acceptance, with a table of each method's recent and since-load figures.

Curves are created once (a method's when it first drafts); a 50 ms timer samples the engine snapshot into
ring buffers (:class:`LiveMetrics`) and refreshes them with ``setData``.
"""

from __future__ import annotations

import time

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import (
    QAbstractItemView,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from engine.host import EngineHost
from helix_desktop.metrics import LiveMetrics
from helix_desktop.remote_watch import MetricsWatcher, summary
from helix_desktop.theme import ACCENT, is_dark, token_colours

REFRESH_MS = 50
IDLE_REFRESH_S = 1.0
WINDOW_S = 60.0
METHOD_LABELS = {"model": "Draft model", "ngram": "N-gram lookup", "eagle": "EAGLE head", "plain": "Plain"}
METHOD_COLOURS = {"model": "#0ea5e9", "ngram": "#f97316", "eagle": "#db2777", "plain": "#9ca3af"}
METHOD_COLUMNS = ("Method", "Acceptance (3 s)", "Acceptance (since load)", "Mean accepted length",
                  "Decode tok/s (3 s)", "Decode tok/s (since load)", "Steps", "No proposal")


def _plot(title: str, left: str, dark: bool) -> pg.PlotWidget:
    widget = pg.PlotWidget(background="#16181b" if dark else "#ffffff")
    item = widget.getPlotItem()
    fg = "#d0d3d8" if dark else "#33363b"
    item.setTitle(title, color=fg, size="10pt")
    item.setLabel("left", left, color=fg)
    item.showGrid(x=True, y=True, alpha=0.15)
    item.setMenuEnabled(False)
    item.hideButtons()
    widget.setMouseEnabled(x=False, y=False)
    widget.setMinimumHeight(150)
    for axis in ("left", "bottom"):
        item.getAxis(axis).setTextPen(fg)
        item.getAxis(axis).setPen(fg)
    return widget


class ChartsTab(QWidget):
    def __init__(self, host: EngineHost, metrics: LiveMetrics, parent: QWidget | None = None):
        super().__init__(parent)
        self.host = host
        self.metrics = metrics
        dark = is_dark()
        self._fg = "#d0d3d8" if dark else "#33363b"
        colours = token_colours()
        pg.setConfigOptions(antialias=True)

        self.acceptance_plot = _plot("Acceptance rate, all and by method (last 3 s)", "accepted / drafted", dark)
        self.acceptance_plot.setYRange(0, 1.02)
        self.tps_plot = _plot("Tokens per second (all clients; lines: decode speed by method)", "tok/s", dark)
        self.kv_plot = _plot("KV cache blocks", "blocks", dark)
        self.hist_plot = _plot("Acceptance by draft position (since load)", "accepted share", dark)
        self.hist_plot.setYRange(0, 1.02)
        for plot in (self.acceptance_plot, self.tps_plot, self.kv_plot):
            plot.setXRange(-WINDOW_S, 0, padding=0)
            plot.getPlotItem().setLabel("bottom", "seconds ago")
            plot.getPlotItem().setClipToView(True)
            plot.getPlotItem().setDownsampling(auto=True, mode="peak")
        self.hist_plot.getPlotItem().setLabel("bottom", "draft position")
        self.hist_plot.getPlotItem().getAxis("bottom").setTickSpacing(major=1, minor=1)

        for plot in (self.acceptance_plot, self.tps_plot):
            plot.getPlotItem().addLegend(offset=(8, 4), labelTextColor=self._fg, brush=None)  # top left: data arrive at the right
        self.acceptance_curve = self.acceptance_plot.plot(pen=pg.mkPen(colours.draft, width=2), connect="finite",
                                                          name="all")
        self.tps_curve = self.tps_plot.plot(pen=pg.mkPen(ACCENT, width=2), fillLevel=0,
                                            brush=pg.mkBrush(124, 58, 237, 50), name="all")
        self.method_curves: dict[str, tuple[pg.PlotDataItem, pg.PlotDataItem]] = {}  # method -> (acceptance, tok/s)
        self.kv_used_curve = self.kv_plot.plot(pen=pg.mkPen(colours.target, width=2), fillLevel=0,
                                               brush=pg.mkBrush(245, 158, 11, 60), name="used")
        self.kv_total_curve = self.kv_plot.plot(pen=pg.mkPen(colours.bonus, width=2, style=pg.QtCore.Qt.PenStyle.DashLine),
                                                name="total")
        self.bars = pg.BarGraphItem(x=[], height=[], width=0.6, brush=colours.draft)
        self.hist_plot.addItem(self.bars)

        self.now_label = QLabel("Waiting for the engine…")
        self.now_label.setObjectName("statsLine")
        self.adaptive_label = QLabel("")
        self.adaptive_label.setWordWrap(True)
        self.methods_table = QTableWidget(0, len(METHOD_COLUMNS))
        self.methods_table.setHorizontalHeaderLabels(METHOD_COLUMNS)
        self.methods_table.verticalHeader().hide()
        self.methods_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.methods_table.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        self.methods_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.methods_table.setToolTip("Each drafting method's share of decoding on this PC. Decode tok/s: tokens over "
                                      "the time of the steps that used the method (a step's time split between its "
                                      "rows). No proposal: steps it was planned for but proposed nothing (n-gram: "
                                      "no match).")
        row = self.fontMetrics().height() + 8
        self.methods_table.verticalHeader().setDefaultSectionSize(row)
        self.methods_table.setFixedHeight(self.methods_table.horizontalHeader().sizeHint().height() + 4 * row + 6)

        grid = QGridLayout()
        grid.addWidget(self.acceptance_plot, 0, 0)
        grid.addWidget(self.tps_plot, 0, 1)
        grid.addWidget(self.kv_plot, 1, 0)
        grid.addWidget(self.hist_plot, 1, 1)
        header = QHBoxLayout()
        header.addWidget(self.now_label, 1)
        layout = QVBoxLayout(self)
        layout.addLayout(header)
        layout.addWidget(self.adaptive_label)
        layout.addWidget(self.methods_table)
        layout.addLayout(grid, 1)

        self.remote: MetricsWatcher | None = None  # set while a remote connection is chosen
        self._last_activity: tuple | None = None
        self._last_refresh = 0.0
        self.timer = QTimer(self)
        self.timer.setInterval(REFRESH_MS)
        self.timer.timeout.connect(self.tick)
        self.timer.start()

    def set_remote(self, watcher: MetricsWatcher | None) -> None:
        """Chart a remote's Prometheus metrics (None: this PC's engine again); the old curves are cleared."""
        if self.remote is not None:
            self.remote.stop()
        self.remote = watcher
        self.metrics.__init__(self.metrics.t.maxlen)  # another server's counters: start the curves afresh
        remote = watcher is not None
        self.kv_plot.getPlotItem().setTitle("KV cache usage (% of the server's cache)" if remote else
                                            "KV cache blocks", color=self._fg, size="10pt")
        self.kv_plot.getPlotItem().setLabel("left", "%" if remote else "blocks", color=self._fg)
        self.now_label.setText("Waiting for the server's metrics…" if remote else "Waiting for the engine…")
        self.methods_table.setRowCount(0)
        for acc, tps in self.method_curves.values():
            acc.setData([], [])
            tps.setData([], [])
        self._last_activity = None

    def tick(self) -> None:
        if self.remote is not None:
            snapshot = self.remote.snapshot()
            if snapshot is None and self.remote.error:
                self.now_label.setText(f"Cannot read the server's metrics: {self.remote.error}")
        else:
            worker = self.host.worker
            snapshot = worker.snapshot() if worker is not None else None
        now = time.monotonic()
        self.metrics.sample(snapshot, now)
        if not self.isVisible() or snapshot is None:
            return
        # redraw at full rate while tokens flow; once a second when idle (laptop batteries)
        activity = (snapshot.get("tokens_generated"), snapshot.get("requests_running"), snapshot.get("kv", {}).get("used"))
        if activity != self._last_activity or now - self._last_refresh >= IDLE_REFRESH_S:
            self._last_activity, self._last_refresh = activity, now
            self.refresh()

    def refresh(self) -> None:
        m = self.metrics
        if not m.t:
            return
        t = np.fromiter(m.t, dtype=float, count=len(m.t))
        x = t - t[-1]
        self.acceptance_curve.setData(x, np.fromiter(m.acceptance, dtype=float, count=len(t)))
        self.tps_curve.setData(x, np.fromiter(m.tokens_per_s, dtype=float, count=len(t)))
        used = np.fromiter(m.kv_used, dtype=float, count=len(t))
        total = np.fromiter(m.kv_total, dtype=float, count=len(t))
        self.kv_used_curve.setData(x, used)
        self.kv_total_curve.setData(x, total)
        self.kv_plot.setYRange(0, max(1.0, float(total[-1])) * 1.05, padding=0)
        self._refresh_methods(x)
        positions = m.accepted_per_position
        self.bars.setOpts(x=np.arange(1, len(positions) + 1), height=np.array(positions, dtype=float), width=0.6)
        self.hist_plot.setXRange(0.4, max(len(positions), 4) + 0.6, padding=0)

        snap = m.latest or {}
        if snap.get("remote") is not None:
            self.now_label.setText(summary(snap["remote"], m.tokens_per_s[-1]))
            return
        kv = snap.get("kv", {})
        spec = snap.get("spec", {})
        self.now_label.setText(
            f"{m.tokens_per_s[-1]:.1f} tok/s now  ·  {snap.get('tokens_generated', 0)} tokens generated  ·  "
            f"{snap.get('requests_running', 0)} running, {snap.get('requests_waiting', 0)} waiting  ·  "
            f"acceptance {spec.get('acceptance_rate', 0.0) * 100:.0f}% since load  ·  "
            f"KV {kv.get('used', 0)}/{kv.get('total', 0)} blocks")
        adaptive = snap.get("adaptive")
        if adaptive:
            decision = adaptive.get("decision") or {}
            why = f" Last decision: {decision['reason']}." if decision.get("reason") else ""
            by_method = ", ".join(f"{m} {a * 100:.0f}%" for m, a in (adaptive.get("acceptance_by_method") or {}).items())
            verify = adaptive.get("verify_cost", 0)
            pace = ", ".join(f"{b} {p:.2f}x" for b, p in (adaptive.get("pace") or {}).items())
            calibration = "; ".join(f"{m} " + " ".join(f"{r:.2f}" for r in ratios)
                                    for m, ratios in (adaptive.get("calibration") or {}).items())
            self.adaptive_label.setText(
                f"Adaptive draft length: the engine recommends K = {adaptive.get('recommended_k')} "
                f"(acceptance prior α = {adaptive.get('alpha_prior', 0):.2f}, draft cost "
                f"{adaptive.get('draft_cost', 0):.2f} and verify cost {verify:.2f} of a target step per token, "
                f"the first verified token {adaptive.get('first_position_cost', verify):.2f}).{why}"
                + (f" Acceptance by method: {by_method}." if by_method else "")
                + (f" Step times scaled by the machine's pace (now / first timed, per batch size): {pace}." if pace else "")
                + (f" Drafts realized / predicted by position: {calibration}." if calibration else ""))

    def _refresh_methods(self, x: np.ndarray) -> None:
        """A curve pair per method (created when it first appears) and the methods table."""
        m = self.metrics
        n = len(x)
        for method, acceptance in m.method_acceptance.items():
            curves = self.method_curves.get(method)
            if curves is None:
                label = METHOD_LABELS.get(method, method)
                pen = pg.mkPen(METHOD_COLOURS.get(method, self._fg), width=1.5)
                curves = self.method_curves[method] = (
                    self.acceptance_plot.plot(pen=pen, connect="finite", name=label) if method != "plain" else
                    pg.PlotDataItem(),  # plain decoding drafts nothing: no acceptance curve
                    self.tps_plot.plot(pen=pg.mkPen(METHOD_COLOURS.get(method, self._fg), width=1.5,
                                                    style=Qt.PenStyle.DashLine), connect="finite", name=label))
            ys = (np.fromiter(acceptance, dtype=float, count=len(acceptance))[-n:],
                  np.fromiter(m.method_tokens_per_s[method], dtype=float, count=len(acceptance))[-n:])
            for curve, y in zip(curves, ys, strict=True):
                curve.setData(x[-len(y):], y)
        rows = m.method_rows()
        self.methods_table.setRowCount(len(rows))
        for i, r in enumerate(rows):
            drafted = r["method"] != "plain"
            cells = (METHOD_LABELS.get(r["method"], r["method"]),
                     _percent(r["acceptance_recent"]) if drafted else "–",
                     _percent(r["acceptance_rate"]) if drafted and r["num_draft_tokens"] else "–",
                     f"{r['mean_acceptance_length']:.2f}" if drafted and r["num_drafts"] else "–",
                     "–" if np.isnan(r["tokens_per_s_recent"]) else f"{r['tokens_per_s_recent']:.1f}",
                     f"{r['tokens_per_second']:.1f}", str(r["num_steps"]),
                     f"{r['num_misses'] / r['num_steps'] * 100:.0f}%" if drafted and r["num_steps"] else "–")
            for col, text in enumerate(cells):
                item = self.methods_table.item(i, col)
                if item is None:
                    item = QTableWidgetItem()
                    item.setTextAlignment(Qt.AlignmentFlag.AlignCenter)
                    self.methods_table.setItem(i, col, item)
                if item.text() != text:
                    item.setText(text)

    def showEvent(self, event) -> None:  # noqa: N802 (Qt override)
        super().showEvent(event)
        self.refresh()

    def stop(self) -> None:
        self.timer.stop()


def _percent(value: float) -> str:
    return "–" if np.isnan(value) else f"{value * 100:.0f}%"
