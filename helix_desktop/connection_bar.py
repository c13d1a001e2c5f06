"""The engine selector above the tabs: "This PC" or a saved remote (name, URL, API key), with a dialog to
add one; choosing a remote checks it on a helper thread and says which model it serves or why it can't."""

from __future__ import annotations

import threading

from PySide6.QtCore import QObject, Signal
from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from engine.errors import HelixError
from engine.remote import RemoteClient
from helix_desktop.connections import Connection, ConnectionStore, make_remote


class RemoteDialog(QDialog):
    """Name, URL and API key of a remote engine; OK only closes on values that pass validation."""

    def __init__(self, parent: QWidget | None = None, connection: Connection | None = None):
        super().__init__(parent)
        self.setWindowTitle("Remote engine")
        self.name = QLineEdit(connection.name if connection else "")
        self.name.setPlaceholderText("GPU box")
        self.url = QLineEdit(connection.url if connection else "")
        self.url.setPlaceholderText("http://gpu-box:8000 (vLLM, Helix or another OpenAI-compatible server)")
        self.api_key = QLineEdit(connection.api_key if connection else "")
        self.api_key.setEchoMode(QLineEdit.EchoMode.Password)
        self.api_key.setPlaceholderText("the server's --api-key (empty if it has none)")
        self.error = QLabel("")
        self.error.setObjectName("error")
        self.error.setWordWrap(True)
        self.error.setStyleSheet("color: #dc2626;")
        form = QFormLayout()
        form.addRow("Name", self.name)
        form.addRow("URL", self.url)
        form.addRow("API key", self.api_key)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.error)
        layout.addWidget(buttons)
        self.result_connection: Connection | None = None

    def accept(self) -> None:
        try:
            self.result_connection = make_remote(self.name.text(), self.url.text(), self.api_key.text())
        except (ValueError, HelixError) as exc:
            self.error.setText(str(exc))
            return
        super().accept()


class _Probe(QObject):
    done = Signal(object, str, str)  # connection, served model ("" on failure), error ("" on success)


class ConnectionBar(QWidget):
    """``chosen(Connection)`` when the user picks another engine; ``message(level, text)`` for the banner."""

    chosen = Signal(object)
    connections_changed = Signal(list)
    message = Signal(str, str)

    def __init__(self, store: ConnectionStore, parent: QWidget | None = None):
        super().__init__(parent)
        self.store = store
        self.combo = QComboBox()
        self.combo.setMinimumWidth(220)
        self.combo.setToolTip("Where Generate, Chat, Compare and the live charts run: this PC's engine or a "
                              "remote OpenAI-compatible server (vLLM, Helix)")
        self.add_button = QPushButton("Add remote…")
        self.add_button.clicked.connect(self.add_remote)
        self.remove_button = QPushButton("Remove")
        self.remove_button.clicked.connect(self.remove_current)
        self.status = QLabel("")
        self.status.setObjectName("hint")
        self._probe = _Probe(self)
        self._probe.done.connect(self._on_probe)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 4)
        layout.addWidget(QLabel("Engine:"))
        layout.addWidget(self.combo)
        layout.addWidget(self.add_button)
        layout.addWidget(self.remove_button)
        layout.addWidget(self.status, 1)
        self._fill(store.current.name)
        self.combo.currentIndexChanged.connect(self._on_index)

    @property
    def current(self) -> Connection:
        return self.combo.currentData() or self.store.current

    def _fill(self, select: str) -> None:
        self.combo.blockSignals(True)
        self.combo.clear()
        for c in self.store.all:
            self.combo.addItem(c.name if c.is_local else f"{c.name} — {c.url}", c)
        names = [c.name for c in self.store.all]
        self.combo.setCurrentIndex(names.index(select) if select in names else 0)
        self.combo.blockSignals(False)
        self.remove_button.setEnabled(not self.current.is_local)
        self.connections_changed.emit(self.store.all)

    def add_remote(self, connection: Connection | None = None) -> None:
        """Open the dialog (or, from tests and scripts, add ``connection`` directly) and switch to it."""
        if connection is None:
            dialog = RemoteDialog(self)
            if dialog.exec() != QDialog.DialogCode.Accepted:
                return
            connection = dialog.result_connection
        self.store.add(connection)
        self._fill(connection.name)
        self._choose(connection)

    def remove_current(self) -> None:
        current = self.current
        if current.is_local:
            return
        self.store.remove(current.name)
        self._fill(self.store.current.name)
        self._choose(self.current)

    def _on_index(self, _index: int) -> None:
        self.remove_button.setEnabled(not self.current.is_local)
        self._choose(self.current)

    def _choose(self, connection: Connection) -> None:
        self.store.current = connection
        self.chosen.emit(connection)
        if connection.is_local:
            self.status.setText("")
            return
        self.status.setText(f"Connecting to {connection.url}…")
        threading.Thread(target=self._check, args=(connection,), daemon=True, name="helix-probe").start()

    def _check(self, connection: Connection) -> None:
        """Helper thread: ask the remote which model it serves (a refused connection fails in seconds)."""
        try:
            with RemoteClient(connection.endpoint()) as client:
                info = client.info()
            result = (f"{info.model} ({'Helix' if info.kind == 'helix' else 'OpenAI-compatible'})", "")
        except Exception as exc:  # RemoteError names the cause; anything else still reaches the banner
            result = ("", str(exc) if isinstance(exc, HelixError) else repr(exc))
        try:
            self._probe.done.emit(connection, *result)
        except RuntimeError:  # the window closed while the remote answered
            pass

    def _on_probe(self, connection: Connection, model: str, error: str) -> None:
        if connection != self.current:
            return  # the user has moved on
        if error:
            self.status.setText("not reachable")
            self.message.emit("error", f"Remote engine '{connection.name}': {error}")
        else:
            self.status.setText(f"serving {model}")
