"""The server's request log as a Qt table model (newest last, capped)."""

from __future__ import annotations

import time

from PySide6.QtCore import QAbstractTableModel, QModelIndex, Qt

COLUMNS = ("Time", "Method", "Route", "Status", "Tokens", "Duration")
MAX_ROWS = 1000


class RequestLogModel(QAbstractTableModel):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.entries: list[dict] = []

    def rowCount(self, parent=QModelIndex()) -> int:  # noqa: N802
        return 0 if parent.isValid() else len(self.entries)

    def columnCount(self, parent=QModelIndex()) -> int:  # noqa: N802
        return len(COLUMNS)

    def headerData(self, section, orientation, role=Qt.ItemDataRole.DisplayRole):  # noqa: N802
        if role == Qt.ItemDataRole.DisplayRole and orientation == Qt.Orientation.Horizontal:
            return COLUMNS[section]
        return None

    def data(self, index, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        entry = self.entries[index.row()]
        col = index.column()
        if role == Qt.ItemDataRole.DisplayRole:
            if col == 0:
                return time.strftime("%H:%M:%S", time.localtime(entry.get("time", time.time())))
            if col == 1:
                return entry.get("method", "")
            if col == 2:
                return entry.get("path", "")
            if col == 3:
                return str(entry.get("status", ""))
            if col == 4:
                tokens = entry.get("tokens")
                return "" if tokens is None else str(tokens)
            if col == 5:
                duration = entry.get("duration_s")
                return "" if duration is None else f"{duration * 1000:.0f} ms"
        if role == Qt.ItemDataRole.TextAlignmentRole and col in (3, 4, 5):
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        if role == Qt.ItemDataRole.ForegroundRole and col == 3:
            from PySide6.QtGui import QColor

            status = int(entry.get("status") or 0)
            return QColor("#dc2626") if status >= 500 else QColor("#d97706") if status >= 400 else None
        return None

    def append(self, entry: dict) -> None:
        if len(self.entries) >= MAX_ROWS:
            self.beginRemoveRows(QModelIndex(), 0, 0)
            self.entries.pop(0)
            self.endRemoveRows()
        row = len(self.entries)
        self.beginInsertRows(QModelIndex(), row, row)
        self.entries.append(entry)
        self.endInsertRows()
