"""Starts the desktop app: QApplication, theme, settings, logging, the window, and the first model load."""

from __future__ import annotations

import logging
import signal
import sys
from logging.handlers import RotatingFileHandler

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication

from engine.config import EngineConfig
from engine.host import EngineHost
from helix_desktop import APP_NAME, ORG_NAME
from helix_desktop.main_window import MainWindow
from helix_desktop.paths import app_data_dir
from helix_desktop.settings import AppSettings
from helix_desktop.theme import app_icon, apply_theme

logger = logging.getLogger(__name__)


def ensure_app(argv: list[str] | None = None) -> QApplication:
    app = QApplication.instance()
    if app is None:
        QApplication.setApplicationName(APP_NAME)
        QApplication.setOrganizationName(ORG_NAME)
        QApplication.setApplicationDisplayName(APP_NAME)
        QApplication.setDesktopFileName("helix-desktop")
        app = QApplication(argv or [sys.argv[0]])
        apply_theme(app)
        app.setWindowIcon(app_icon())
    return app


def create_window(host: EngineHost | None = None, settings: AppSettings | None = None,
                  own_host: bool = True) -> MainWindow:
    """Build the window around ``host`` (tests pass one with tiny models already adopted)."""
    ensure_app()
    return MainWindow(host or EngineHost(), settings or AppSettings(), own_host=own_host)


def initial_config(args, settings: AppSettings) -> EngineConfig:
    """Models from the command line, else the last ones chosen, else the demo pair."""
    from engine.cli import engine_config_from_args

    saved = settings.get_str("models/target")
    if getattr(args, "target", None) or not saved:
        return engine_config_from_args(args)
    draft = None if args.no_draft else (args.draft or settings.get_str("models/draft") or None)
    device = args.device if args.device != "auto" else settings.get_str("models/device", "auto")
    dtype = args.dtype if args.dtype != "auto" else settings.get_str("models/dtype", "auto")
    kv = args.kv_cache_tokens or settings.get_int("models/kv_cache_tokens", 0, 0) or None
    return EngineConfig(target=saved, draft=draft, device=device, dtype=None if dtype == "auto" else dtype,
                        kv_cache_tokens=kv)


def _log_to_file() -> None:
    try:
        folder = app_data_dir() / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        handler = RotatingFileHandler(folder / "helix.log", maxBytes=2_000_000, backupCount=3, encoding="utf-8")
    except OSError:
        return
    from engine.cli import LOG_FORMAT

    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO:
        root.setLevel(logging.INFO)
        for h in root.handlers:
            if h is not handler and h.level == logging.NOTSET:
                h.setLevel(logging.WARNING)  # keep the console as quiet as the user asked


def _windows_taskbar_identity() -> None:
    if sys.platform == "win32":
        try:
            import ctypes

            ctypes.windll.shell32.SetCurrentProcessExplicitAppUserModelID("Helix.HelixDesktop")
        except Exception:
            pass


def _usable_device(config, window):
    """A saved or requested GPU that is gone (driver update, eGPU unplugged) falls back to auto, with a notice."""
    import dataclasses

    from engine.devices import resolve_device
    from engine.errors import DeviceUnavailable

    if config.device in ("auto", "cpu"):
        return config
    try:
        resolve_device(config.device)
    except DeviceUnavailable as exc:
        window.show_message("warning", f"{exc}. Using the best available device instead.")
        return dataclasses.replace(config, device="auto")
    return config


def run_app(args) -> int:
    """``python main.py`` with no subcommand: open the window and load the models."""
    from engine.errors import HelixError

    _windows_taskbar_identity()
    app = ensure_app(sys.argv[:1])
    _log_to_file()
    settings = AppSettings()
    window = MainWindow(EngineHost(), settings)
    app.aboutToQuit.connect(window.shutdown)
    # Ctrl+C in the terminal quits cleanly; the timer lets Python see the signal between Qt events
    signal.signal(signal.SIGINT, lambda *_: app.quit())
    ticker = QTimer()
    ticker.start(250)
    ticker.timeout.connect(lambda: None)
    window.show()
    try:
        config = initial_config(args, settings)
        config = _usable_device(config, window)
    except HelixError as exc:
        window.show_message("error", str(exc))
    else:
        QTimer.singleShot(0, lambda: window.load_models(config))
    code = app.exec()
    window.shutdown()
    logger.info("Helix Desktop closed")
    return code
