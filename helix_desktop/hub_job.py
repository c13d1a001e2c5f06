"""Runs one hub call (search, details, download) on a worker thread and reports back as queued Qt signals."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from PySide6.QtCore import QObject, Signal

from engine.errors import HelixError
from engine.hub import DownloadCancelled

logger = logging.getLogger(__name__)

PROGRESS_EVERY_S = 0.05  # a fast download would otherwise emit thousands of signals a second


class HubJob(QObject):
    """``start(fn)`` runs ``fn(progress, cancel)`` off the UI thread; ``fn`` gets a throttled progress
    callback ``(done, total, name)`` and a ``threading.Event`` to check. One run at a time."""

    progress = Signal(int, int, str)  # bytes done, bytes total, file name
    done = Signal(object)  # fn's result
    failed = Signal(str, bool)  # message, cancelled

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self.cancel_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._busy = False  # cleared before the result is emitted, so a slot may start the next run at once
        self._closed = False

    @property
    def running(self) -> bool:
        return self._busy

    def start(self, fn: Callable[[Callable[[int, int, str], None], threading.Event], object]) -> bool:
        if self.running:
            return False
        self.cancel_event = threading.Event()
        cancel = self.cancel_event
        self._busy = True
        last = [0.0]

        def report(done: int, total: int, name: str) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY_S or done >= total:
                last[0] = now
                self._emit(self.progress, int(done), int(total), name)

        def run() -> None:
            try:
                result = fn(report, cancel)
            except DownloadCancelled as exc:
                self._busy = False
                self._emit(self.failed, str(exc), True)
            except HelixError as exc:
                self._busy = False
                self._emit(self.failed, str(exc), False)
            except Exception as exc:  # a bug or an unexpected library error must not kill the thread silently
                logger.exception("hub job failed")
                self._busy = False
                self._emit(self.failed, f"{type(exc).__name__}: {exc}", False)
            else:
                self._busy = False
                self._emit(self.done, result)

        self._thread = threading.Thread(target=run, name="helix-hub", daemon=True)
        self._thread.start()
        return True

    def cancel(self) -> None:
        self.cancel_event.set()

    def stop(self, timeout: float = 2.0) -> None:
        """Cancel and stop reporting (the window is closing)."""
        self.cancel_event.set()
        self._closed = True
        if self._thread is not None:
            self._thread.join(timeout)

    def _emit(self, signal, *args) -> None:
        if self._closed:
            return
        try:
            signal.emit(*args)
        except RuntimeError:  # the panel was deleted while the thread finished
            pass
