"""The main window: lays out the tabs, the message banner and the status bar; owns shutdown."""

from __future__ import annotations

import logging

from PySide6.QtGui import QCloseEvent, QGuiApplication
from PySide6.QtWidgets import QMainWindow, QTabWidget, QVBoxLayout, QWidget

from engine.config import EngineConfig
from engine.errors import HelixError
from engine.host import EngineHost
from helix_desktop import APP_NAME
from helix_desktop.bridge import EngineBridge
from helix_desktop.charts_tab import ChartsTab
from helix_desktop.chat_tab import ChatTab, has_chat_template
from helix_desktop.compare_tab import CompareTab
from helix_desktop.connection_bar import ConnectionBar
from helix_desktop.connections import Connection, ConnectionStore
from helix_desktop.generate_tab import GenerateTab
from helix_desktop.kv_view import KVTab
from helix_desktop.metrics import LiveMetrics
from helix_desktop.model_catalog import demo_pair_present, is_demo
from helix_desktop.models_tab import ModelsTab
from helix_desktop.remote_bridge import EngineSwitch
from helix_desktop.remote_watch import MetricsWatcher
from helix_desktop.server_control import ServerController
from helix_desktop.server_tab import ServerTab
from helix_desktop.settings import AppSettings
from helix_desktop.status_bar import HelixStatusBar, pair_text
from helix_desktop.theme import app_icon
from helix_desktop.widgets import Banner

logger = logging.getLogger(__name__)

DEFAULT_SIZE = (1280, 800)


class MainWindow(QMainWindow):
    def __init__(self, host: EngineHost, settings: AppSettings, own_host: bool = True):
        super().__init__()
        self.host = host
        self.settings = settings
        self.own_host = own_host
        self._shut_down = False
        self.setWindowTitle(APP_NAME)
        self.setWindowIcon(app_icon())
        self.setMinimumSize(900, 560)

        self.bridge = EngineBridge(host, self)
        self.metrics = LiveMetrics()
        self.server = ServerController(host, self)

        # Generate, Chat and Compare talk to the switch: this PC's engine or the chosen remote
        self.switch = EngineSwitch(self.bridge, self)
        self.connections = ConnectionStore(settings)
        self.banner = Banner()
        self.generate_tab = GenerateTab(self.switch, settings)
        self.chat_tab = ChatTab(self.switch, settings)
        self.compare_tab = CompareTab(self.switch, settings)
        self.charts_tab = ChartsTab(host, self.metrics)
        self.kv_tab = KVTab(host)
        self.server_tab = ServerTab(self.server, settings)
        self.models_tab = ModelsTab(self.bridge, settings)
        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        for widget, title in ((self.generate_tab, "Generate"), (self.chat_tab, "Chat"), (self.compare_tab, "Compare"),
                              (self.charts_tab, "Live charts"), (self.kv_tab, "KV cache"),
                              (self.server_tab, "Server"), (self.models_tab, "Models")):
            self.tabs.addTab(widget, title)
            if hasattr(widget, "message"):
                widget.message.connect(self.show_message)

        central = QWidget()
        layout = QVBoxLayout(central)
        layout.setContentsMargins(8, 8, 8, 4)
        self.connection_bar = ConnectionBar(self.connections)
        self.connection_bar.message.connect(self.show_message)
        self.connection_bar.connections_changed.connect(self.compare_tab.set_connections)
        self.connection_bar.chosen.connect(self.use_connection)
        self.compare_tab.set_connections(self.connections.all)
        layout.addWidget(self.connection_bar)
        layout.addWidget(self.banner)
        layout.addWidget(self.tabs, 1)
        self.setCentralWidget(central)

        self.status = HelixStatusBar(host)
        self.setStatusBar(self.status)
        self.server.started.connect(self.status.set_server)
        self.server.stopped.connect(lambda: self.status.set_server(None))

        self.bridge.state_changed.connect(self._on_state)

        hints = QGuiApplication.styleHints()
        if hints is not None:
            hints.colorSchemeChanged.connect(self._on_scheme_changed)
        self._restore_geometry()
        self.tabs.setCurrentIndex(settings.get_int("window/tab", 0, 0, self.tabs.count() - 1))
        if settings.reset_message:
            self.show_message("warning", settings.reset_message)
        self._on_state(host.state, host.reason or "")
        if not self.connections.current.is_local:
            self.use_connection(self.connections.current)

    # ---------------------------------------------------------------- messages and state
    def show_message(self, level: str, text: str) -> None:
        self.banner.show_message(level, text)

    def load_models(self, config: EngineConfig) -> None:
        """Load a pair in the background, or explain why it can't be (missing demo models)."""
        self.models_tab.show_config(config)
        if is_demo(config.target) and not demo_pair_present():
            self.show_message("warning", "The demo models are not installed in this copy of Helix yet "
                              "(resources/models/demo-target is missing). Choose a model on the Models tab: "
                              "a local folder, a Hugging Face hub id, or one from your local cache.")
            self.tabs.setCurrentWidget(self.models_tab)
            return
        self.bridge.load(config)

    def use_connection(self, connection: Connection) -> None:
        """Point Generate, Chat and the live charts at ``connection`` (Compare picks its own two engines)."""
        try:
            self.switch.use(connection)
        except HelixError as exc:  # a saved URL that no longer validates
            self.show_message("error", f"Remote engine '{connection.name}': {exc}")
            return
        remote = None if connection.is_local else MetricsWatcher(self.switch.current.client).start()
        self.charts_tab.set_remote(remote)
        self._offer_methods()

    def _offer_methods(self) -> None:
        """Generate and Chat offer speculation whenever something can draft (n-gram lookup always can) and mark the
        drafting methods this PC has not loaded; a remote decides its own decoding (Helix remotes take the
        speculative flag, so it stays on offer)."""
        engine = self.host.engine
        remote = self.switch.is_remote
        methods = None if remote else (engine.info()["draft_methods"] if engine is not None else [])
        for tab in (self.generate_tab, self.chat_tab):
            tab.set_has_draft(remote or engine is not None)
            tab.form.set_methods(methods)

    def _on_state(self, state: str, reason: str) -> None:
        engine = self.host.engine
        self._offer_methods()
        if state == "ready":
            self._place_chat_tab(has_chat_template(engine))
        if engine is not None:
            self.compare_tab.set_methods(engine.info()["draft_methods"])
        self.models_tab.refresh_info()
        self.setWindowTitle(f"{APP_NAME} — {pair_text(self.host.engine)}" if engine is not None else APP_NAME)
        if state == "loading":
            self.statusBar().showMessage("Loading models…")
        elif state == "ready" and reason:
            self.statusBar().clearMessage()
            self.show_message("error", f"Could not load the new models: {self.host.last_error or reason}  "
                              f"Still using {pair_text(self.host.engine)}.")
        elif state == "ready":
            self.statusBar().showMessage(f"Models ready: {pair_text(self.host.engine)}", 5000)
            if self.banner.level == "error":
                self.banner.dismiss()
            if self.host.config is not None:  # an adopted in-memory engine (tests) has nothing to remember
                self.settings.remember_models(self.host.config)
        elif state == "failed":
            self.statusBar().clearMessage()
            self.show_message("error", f"Could not load models: {reason}  Choose other models on the Models tab.")
            self.tabs.setCurrentWidget(self.models_tab)
        self.status.refresh()

    def _place_chat_tab(self, instruct: bool) -> None:
        """Chat is the first tab (and shown) for an instruct model; otherwise it follows Generate."""
        bar, at = self.tabs.tabBar(), self.tabs.indexOf(self.chat_tab)
        if instruct and at != 0:
            bar.moveTab(at, 0)
            self.tabs.setCurrentWidget(self.chat_tab)
        elif not instruct and at == 0:
            bar.moveTab(at, self.tabs.indexOf(self.generate_tab))

    def _on_scheme_changed(self, _scheme) -> None:
        """Re-colour streamed text and legends for the new light/dark palette."""
        for view in (self.generate_tab.output, self.chat_tab.transcript,
                     *(p.view for p in self.compare_tab.panes.values())):
            view.set_colouring(view.colouring)
        for legend in (self.generate_tab.legend, self.chat_tab.legend, self.compare_tab.legend):
            legend.refresh()

    # ---------------------------------------------------------------- geometry and shutdown
    def _restore_geometry(self) -> None:
        geometry = self.settings.get_bytes("window/geometry")
        if geometry is None or not self.restoreGeometry(geometry):
            screen = QGuiApplication.primaryScreen()
            width, height = DEFAULT_SIZE
            if screen is not None:
                avail = screen.availableGeometry()
                width, height = min(width, avail.width()), min(height, avail.height() - 40)
            self.resize(width, height)

    def save_settings(self) -> None:
        self.settings.set("window/geometry", self.saveGeometry())
        self.settings.set("window/tab", self.tabs.currentIndex())
        for tab in (self.generate_tab, self.chat_tab, self.compare_tab, self.server_tab):
            tab.save()
        self.settings.sync()

    def shutdown(self) -> None:
        """Stop timers, the server and the engine; safe to call twice."""
        if self._shut_down:
            return
        self._shut_down = True
        try:
            self.save_settings()
        except Exception:
            logger.exception("could not save settings")
        for timer_owner in (self.charts_tab, self.kv_tab):
            timer_owner.stop()
        self.charts_tab.set_remote(None)
        self.switch.shutdown()
        self.status.stop()
        if self.compare_tab.session.running:
            self.compare_tab.session.stop()
        self.server.shutdown()
        self.models_tab.doctor.stop()
        self.models_tab.downloads.stop()
        self.bridge.shutdown()
        self.chat_tab.shutdown()
        if self.own_host:
            if self.host.state == "loading":
                self.host.wait_loaded(5.0)
            self.host.shutdown()

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802
        self.shutdown()
        super().closeEvent(event)
