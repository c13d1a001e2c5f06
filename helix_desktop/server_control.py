"""Starts and stops the embedded API server (``engine.server.runner.ServerRunner``) off the UI thread.

The server submits to the same :class:`EngineHost` as the window. Its request log
callback runs on the server thread and is re-emitted as a queued Qt signal.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time

from PySide6.QtCore import QObject, Signal

from engine.host import EngineHost

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    host = host.strip().lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_available() -> str | None:
    """None if the embedded server can run here, else why not."""
    try:
        from engine.server.runner import ServerRunner  # noqa: F401
    except ImportError as exc:
        return f"the API server is not available in this build ({exc})"
    return None


class ServerController(QObject):
    started = Signal(str)  # url
    stopped = Signal()
    failed = Signal(str)  # message fit for the banner
    request_logged = Signal(dict)  # {method, path, status, tokens, duration_s, request_id, time}

    def __init__(self, host: EngineHost, parent: QObject | None = None):
        super().__init__(parent)
        self.host = host
        self.runner = None
        self.busy = False
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self.runner is not None and bool(getattr(self.runner, "running", False))

    @property
    def url(self) -> str:
        return self.runner.url if self.runner is not None else ""

    def start(self, bind_host: str, port: int, api_key: str | None) -> None:
        if self.busy or self.running:
            return
        problem = server_available()
        if problem:
            self.failed.emit(problem)
            return
        self._run_in_thread(self._start, bind_host, port, api_key or None)

    def stop(self) -> None:
        if self.busy or self.runner is None:
            return
        self._run_in_thread(self._stop)

    def _run_in_thread(self, fn, *args) -> None:
        self.join()
        self.busy = True
        self._thread = threading.Thread(target=fn, args=args, name="helix-server-control", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- control thread
    def _start(self, bind_host: str, port: int, api_key: str | None) -> None:
        from engine.server.runner import ServerRunner

        try:
            runner = ServerRunner(self.host, bind_host=bind_host, port=port, api_key=api_key,
                                  on_request=self._on_request)
            runner.start()
        except Exception as exc:  # port busy, non-loopback without a key, ...
            logger.warning("server failed to start: %s", exc)
            self.busy = False
            self._emit(self.failed, f"Could not start the API server: {exc}")
            return
        self.runner = runner
        self.busy = False
        self._emit(self.started, runner.url)

    def _stop(self) -> None:
        runner, self.runner = self.runner, None
        try:
            if runner is not None:
                runner.stop()
        except Exception as exc:
            logger.warning("server did not stop cleanly: %s", exc)
        self.busy = False
        self._emit(self.stopped)

    def _on_request(self, entry: dict) -> None:
        self._emit(self.request_logged, {**entry, "time": time.time()})

    def _emit(self, signal, *args) -> None:
        if self._closed:
            return
        try:
            signal.emit(*args)
        except RuntimeError:  # the window is gone
            pass

    # ---------------------------------------------------------------- shutdown (UI thread)
    def join(self, timeout: float = 15.0) -> None:
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
        self._thread = None

    def shutdown(self) -> None:
        """Stop the server synchronously (app exit): the port is free when this returns."""
        self._closed = True
        self.join()
        runner, self.runner = self.runner, None
        if runner is not None:
            try:
                runner.stop()
            except Exception as exc:
                logger.warning("server did not stop cleanly: %s", exc)
