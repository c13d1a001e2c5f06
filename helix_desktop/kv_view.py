"""KV cache view: the target's block pool as a grid, each block coloured by the request that owns it."""

from __future__ import annotations

import math
import zlib

from PySide6.QtCore import QRectF, Qt, QTimer
from PySide6.QtGui import QBrush, QColor, QPainter, QPen
from PySide6.QtWidgets import QHBoxLayout, QLabel, QScrollArea, QSizePolicy, QVBoxLayout, QWidget

from engine.host import EngineHost
from helix_desktop.theme import is_dark

REFRESH_MS = 200
MAX_CELL, MIN_CELL, GAP = 36, 5, 2
# Tableau 10: distinct on light and dark backgrounds
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7", "#9c755f",
           "#bab0ac")
_assigned: dict[str, QColor] = {}


def request_colour(request_id: str) -> QColor:
    """A distinct colour per request: palette colours in order of first sight, then hashed hues."""
    colour = _assigned.get(request_id)
    if colour is None:
        if len(_assigned) > 4096:
            _assigned.clear()
        used = {c.name() for c in _assigned.values()}
        free = [c for c in PALETTE if c not in used]
        if free:
            colour = QColor(free[0])
        else:
            hue = (zlib.crc32(request_id.encode()) * 0.618033988749895) % 1.0
            colour = QColor.fromHsvF(hue, 0.55, 0.85)
        _assigned[request_id] = colour
    return colour


def forget_requests(live: set[str]) -> None:
    """Free the colours of requests that no longer hold blocks, so palette colours get reused."""
    for request_id in [r for r in _assigned if r not in live]:
        del _assigned[request_id]


def cell_size(total: int, width: int, height: int) -> int:
    """The largest cell that fits every block in width x height, clamped to MIN..MAX_CELL."""
    if total <= 0 or width <= 0:
        return MAX_CELL
    size = int(math.sqrt(max(1, width * max(height, 1)) / total))
    while size > MIN_CELL and math.ceil(total / max(1, width // size)) * size > height:
        size -= 1
    return max(MIN_CELL, min(MAX_CELL, size))


class KVGrid(QWidget):
    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.total = 0
        self.owners: dict[int, list[str]] = {}
        self.viewport_height = 300
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)

    def set_data(self, total: int, owners: dict) -> None:
        self.total = total
        self.owners = {int(b): list(o) for b, o in owners.items()}
        self._update_height()
        self.update()

    def _layout(self) -> tuple[int, int]:
        size = cell_size(self.total, self.width(), self.viewport_height)
        return size, max(1, self.width() // size)

    def _update_height(self) -> None:
        size, cols = self._layout()
        self.setMinimumHeight(math.ceil(self.total / cols) * size if self.total else 0)

    def resizeEvent(self, event) -> None:  # noqa: N802
        super().resizeEvent(event)
        self._update_height()

    def paintEvent(self, event) -> None:  # noqa: N802
        if not self.total:
            return
        painter = QPainter(self)
        size, cols = self._layout()
        gap = GAP if size >= 8 else 1
        free = QColor("#2a2d33") if is_dark() else QColor("#e3e5e9")
        hatch = QBrush(QColor(255, 255, 255, 170), Qt.BrushStyle.BDiagPattern)
        outline = QPen(QColor("#ffffff") if is_dark() else QColor("#1c1e21"), max(1.0, size / 12))
        for index in range(self.total):
            row, col = divmod(index, cols)
            rect = QRectF(col * size, row * size, size - gap, size - gap)
            holders = self.owners.get(index)
            if not holders:
                painter.fillRect(rect, free)
                continue
            painter.fillRect(rect, request_colour(holders[0]))
            if len(holders) > 1:  # shared prefix block: hatched and outlined
                painter.fillRect(rect, hatch)
                painter.setPen(outline)
                painter.drawRect(rect.adjusted(0.5, 0.5, -0.5, -0.5))
        painter.end()


class KVTab(QWidget):
    def __init__(self, host: EngineHost, parent: QWidget | None = None):
        super().__init__(parent)
        self.host = host
        self.grid = KVGrid()
        self.counts = QLabel("No models loaded.")
        self.counts.setObjectName("statsLine")
        self.owners_label = QLabel("")
        self.owners_label.setWordWrap(True)
        self.owners_label.setTextFormat(Qt.TextFormat.RichText)
        explain = QLabel("Each square is one KV block (16 tokens by default) of the target model's cache. "
                         "Colour = the request that owns it; hatched, outlined blocks are shared prompt-prefix "
                         "blocks held by several requests. Grey blocks are free.")
        explain.setWordWrap(True)
        explain.setObjectName("hint")
        self.scroll = QScrollArea()
        self.scroll.setWidget(self.grid)
        self.scroll.setWidgetResizable(True)
        layout = QVBoxLayout(self)
        top = QHBoxLayout()
        top.addWidget(self.counts, 1)
        layout.addLayout(top)
        layout.addWidget(explain)
        layout.addWidget(self.scroll, 1)
        layout.addWidget(self.owners_label)
        self.timer = QTimer(self)
        self.timer.setInterval(REFRESH_MS)
        self.timer.timeout.connect(self.refresh)
        self.timer.start()

    def refresh(self) -> None:
        if not self.isVisible():
            return
        worker = self.host.worker
        if worker is None:
            return
        kv = worker.snapshot().get("kv", {})
        owners = kv.get("owners", {})
        self.grid.viewport_height = self.scroll.viewport().height()
        self.grid.set_data(int(kv.get("total", 0)), owners)
        self.counts.setText(
            f"{kv.get('used', 0)} used  ·  {kv.get('free', 0)} free  ·  {kv.get('shared', 0)} shared  ·  "
            f"{kv.get('total', 0)} blocks of {kv.get('block_size', 16)} tokens  ·  "
            f"{kv.get('usage', 0.0) * 100:.1f}% in use")
        requests: dict[str, int] = {}
        for holders in owners.values():
            for rid in holders:
                requests[rid] = requests.get(rid, 0) + 1
        forget_requests(set(requests))
        if requests:
            parts = [f'<span style="color:{request_colour(rid).name()}; font-size:14px">■</span> {rid}: {n} blocks'
                     for rid, n in sorted(requests.items(), key=lambda kv_: -kv_[1])[:12]]
            self.owners_label.setText("&nbsp;&nbsp; ".join(parts))
        else:
            self.owners_label.setText("No request holds blocks right now; start a generation to watch them fill.")

    def showEvent(self, event) -> None:  # noqa: N802
        super().showEvent(event)
        self.refresh()

    def stop(self) -> None:
        self.timer.stop()
