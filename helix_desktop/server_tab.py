"""Server: switch the embedded API server on and off, its address and key, and a live request log."""

from __future__ import annotations

import secrets

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from helix_desktop.request_log import RequestLogModel
from helix_desktop.server_control import ServerController, is_loopback
from helix_desktop.settings import AppSettings
from helix_desktop.widgets import caption


class ServerTab(QWidget):
    message = Signal(str, str)

    def __init__(self, controller: ServerController, settings: AppSettings, parent: QWidget | None = None):
        super().__init__(parent)
        self.controller = controller
        self.settings = settings

        self.switch = QPushButton("Start server")
        self.switch.setObjectName("serverSwitch")
        self.switch.setCheckable(True)
        self.switch.clicked.connect(self._on_switch)
        self.state_label = QLabel("The API server is off.")
        self.state_label.setObjectName("statsLine")

        self.host = QComboBox()
        self.host.setEditable(True)
        self.host.addItems(["127.0.0.1", "localhost", "0.0.0.0"])
        self.host.setCurrentText(settings.get_str("server/host", "127.0.0.1"))
        self.host.currentTextChanged.connect(self._update_warning)
        self.port = QSpinBox()
        self.port.setRange(1, 65535)
        self.port.setValue(settings.get_int("server/port", 8000, 1, 65535))
        self.api_key = QLineEdit()
        self.api_key.setEchoMode(QLineEdit.EchoMode.PasswordEchoOnEdit)
        self.api_key.setPlaceholderText("optional on 127.0.0.1; required beyond it")
        self.new_key = QPushButton("New key")
        self.new_key.setToolTip("Fill in a random API key; clients send it as 'Authorization: Bearer <key>'")
        self.new_key.clicked.connect(lambda: self.api_key.setText(secrets.token_urlsafe(24)))
        self.warning = QLabel()
        self.warning.setObjectName("warning")
        self.warning.setWordWrap(True)

        self.url = QLineEdit()
        self.url.setReadOnly(True)
        self.url.setPlaceholderText("not running")
        self.copy_button = QPushButton("Copy")
        self.copy_button.setToolTip("Copy the server URL")
        self.copy_button.clicked.connect(self._copy_url)
        self.docs_link = QLabel()
        self.docs_link.setOpenExternalLinks(True)
        self.docs_link.setTextInteractionFlags(Qt.TextInteractionFlag.TextBrowserInteraction)
        self.example = QLabel()
        self.example.setObjectName("hint")
        self.example.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.example.setWordWrap(True)

        settings_box = QGroupBox("Address")
        form = QFormLayout(settings_box)
        form.addRow("Host", self.host)
        form.addRow("Port", self.port)
        key_row = QHBoxLayout()
        key_row.addWidget(self.api_key, 1)
        key_row.addWidget(self.new_key)
        form.addRow("API key", key_row)
        form.addRow(self.warning)

        url_box = QGroupBox("Endpoint")
        ul = QVBoxLayout(url_box)
        url_row = QHBoxLayout()
        url_row.addWidget(self.url, 1)
        url_row.addWidget(self.copy_button)
        ul.addLayout(url_row)
        ul.addWidget(self.docs_link)
        ul.addWidget(self.example)
        ul.addStretch(1)

        switch_row = QHBoxLayout()
        switch_row.addWidget(self.switch)
        switch_row.addWidget(self.state_label, 1)

        boxes = QHBoxLayout()
        boxes.addWidget(settings_box, 1)
        boxes.addWidget(url_box, 1)

        self.log_model = RequestLogModel(self)
        self.log = QTableView()
        self.log.setModel(self.log_model)
        self.log.verticalHeader().hide()
        self.log.setAlternatingRowColors(True)
        self.log.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.log.horizontalHeader().setSectionResizeMode(2, QHeaderView.ResizeMode.Stretch)
        self.log.setSelectionBehavior(QTableView.SelectionBehavior.SelectRows)

        layout = QVBoxLayout(self)
        layout.addLayout(switch_row)
        layout.addLayout(boxes)
        layout.addWidget(caption("Requests (from any tool, served by the same engine as this window)"))
        layout.addWidget(self.log, 1)

        controller.started.connect(self._on_started)
        controller.stopped.connect(self._on_stopped)
        controller.failed.connect(self._on_failed)
        controller.request_logged.connect(self._on_request)
        self._update_warning()
        self._set_running(False)

    # ---------------------------------------------------------------- actions
    def _on_switch(self, checked: bool) -> None:
        self.switch.setEnabled(False)
        if checked:
            self.state_label.setText("Starting…")
            self.controller.start(self.host.currentText().strip(), self.port.value(), self.api_key.text().strip())
        else:
            self.state_label.setText("Stopping…")
            self.controller.stop()

    def _copy_url(self) -> None:
        if self.url.text():
            QGuiApplication.clipboard().setText(self.url.text())
            self.state_label.setText(f"Copied {self.url.text()}")

    def _update_warning(self) -> None:
        host = self.host.currentText().strip()
        exposed = bool(host) and not is_loopback(host)
        self.warning.setObjectName("warning" if exposed else "hint")
        self.warning.setText(
            f"⚠ Binding to {host} makes the API reachable from other machines on your network. "
            "Set an API key, and only do this on a network you trust." if exposed
            else "Only programs on this PC can reach the server.")
        self.warning.style().unpolish(self.warning)
        self.warning.style().polish(self.warning)

    # ---------------------------------------------------------------- controller signals
    def _on_started(self, url: str) -> None:
        self._set_running(True)
        self.url.setText(url)
        local = url.replace("://0.0.0.0", "://127.0.0.1").replace("://[::]", "://[::1]")  # browsers can't open 0.0.0.0
        self.docs_link.setText(f'<a href="{local}/docs">Open the API docs ({local}/docs)</a>')
        auth = " -H 'Authorization: Bearer <key>'" if self.api_key.text().strip() else ""
        self.example.setText(f"curl {local}/generate -H 'Content-Type: application/json'{auth} "
                             "-d '{\"prompt\": \"Once upon a time\", \"max_new_tokens\": 32}'")
        where = "on this PC only" if is_loopback(self.host.currentText()) else "ON YOUR NETWORK"
        self.state_label.setText(f"Serving at {url} ({where}).")
        if not is_loopback(self.host.currentText()):
            self.message.emit("warning", f"The API server is reachable from other machines at {url}.")

    def _on_stopped(self) -> None:
        self._set_running(False)
        self.state_label.setText("The API server is off.")

    def _on_failed(self, text: str) -> None:
        self._set_running(self.controller.running)
        self.state_label.setText("The API server is off." if not self.controller.running else self.state_label.text())
        self.message.emit("error", text)

    def _on_request(self, entry: dict) -> None:
        self.log_model.append(entry)
        self.log.scrollToBottom()

    def _set_running(self, running: bool) -> None:
        self.switch.setChecked(running)
        self.switch.setEnabled(True)
        self.switch.setText("Stop server" if running else "Start server")
        for w in (self.host, self.port, self.api_key, self.new_key):
            w.setEnabled(not running)
        self.copy_button.setEnabled(running)
        if not running:
            self.url.clear()
            self.docs_link.setText("The API docs (/docs) are linked here while the server runs.")
            self.example.setText("Routes: POST /generate, /generate/stream, /v1/chat/completions; GET /health, /docs.")

    def save(self) -> None:
        self.settings.set("server/host", self.host.currentText().strip())
        self.settings.set("server/port", self.port.value())
