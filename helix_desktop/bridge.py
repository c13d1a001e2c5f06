"""The Qt face of an :class:`EngineHost`: engine-thread callbacks in, queued Qt signals out.

The engine calls back on its own thread; we only touch plain Python there (append to a
locked buffer). A ~30 ms QTimer on the UI thread flushes the buffer, so a fast stream
costs one signal per repaint, tokens arrive in order, and ``finished`` always follows a
request's last ``token_batch``. Host state and load progress come from the loader thread
as signals, which Qt queues to the UI thread.
"""

from __future__ import annotations

import logging
import threading

from PySide6.QtCore import QObject, QTimer, Signal

from engine.config import EngineConfig, SamplingParams
from engine.errors import EngineStopped
from engine.host import EngineHost
from engine.sequence import FinishEvent, TokenEvent
from engine.worker import RequestHandle

logger = logging.getLogger(__name__)

FLUSH_MS = 33


class EngineBridge(QObject):
    started = Signal(str)  # request id
    token_batch = Signal(str, list)  # request id, [TokenEvent, ...] in order
    finished = Signal(str, object)  # request id, FinishEvent (any finish reason)
    errored = Signal(str, str)  # request id ("" for model loading), message
    progress = Signal(str, float)  # model loading: stage, fraction 0..1
    state_changed = Signal(str, str)  # host state (empty|loading|ready|failed), reason ("" if none)

    def __init__(self, host: EngineHost, parent: QObject | None = None):
        super().__init__(parent)
        self.host = host
        self._lock = threading.Lock()
        self._tokens: dict[str, list[TokenEvent]] = {}
        self._finals: dict[str, FinishEvent] = {}
        self._handles: dict[str, RequestHandle] = {}
        self._closed = False
        self._timer = QTimer(self)
        self._timer.setInterval(FLUSH_MS)
        self._timer.timeout.connect(self._flush)
        host.listeners.append(self._on_host_state)

    # ---------------------------------------------------------------- requests (UI thread)
    def submit(self, prompt: str, params: SamplingParams) -> str:
        """Queue a request and return its id. Raises HelixError (bad input, no models) synchronously."""
        if self.host.worker is None:
            if self.host.state == "loading":
                raise EngineStopped("The models are still loading; try again in a moment.")
            raise EngineStopped("No models are loaded. Choose a target (and a draft) on the Models tab and press "
                                "Load models.")
        worker = self.host.require_worker()
        handle = worker.submit(prompt, params, on_event=self._on_event)
        self._handles[handle.request_id] = handle
        self.started.emit(handle.request_id)
        if not self._timer.isActive():
            self._timer.start()
        return handle.request_id

    def cancel(self, request_id: str) -> None:
        """Stop a request at the engine's next step; ``finished`` follows with reason ``cancelled``."""
        handle = self._handles.get(request_id)
        if handle is not None:
            handle.cancel()

    @property
    def active(self) -> list[str]:
        return list(self._handles)

    def load(self, config: EngineConfig, builder=None) -> None:
        """Load a model pair in the background; progress and state arrive as signals."""
        self.host.load(config, progress=self._on_progress, builder=builder)

    # ---------------------------------------------------------------- engine / loader threads
    def _on_event(self, event) -> None:
        with self._lock:
            if isinstance(event, FinishEvent):
                self._finals[event.request_id] = event
            else:
                self._tokens.setdefault(event.request_id, []).append(event)

    def _on_progress(self, stage: str, frac: float) -> None:
        self._emit_safely(self.progress, stage, float(frac))

    def _on_host_state(self, state: str, reason: str | None) -> None:
        self._emit_safely(self.state_changed, state, reason or "")

    def _emit_safely(self, signal, *args) -> None:
        if self._closed:
            return
        try:
            signal.emit(*args)
        except RuntimeError:  # the window went away while a loader was finishing
            pass

    # ---------------------------------------------------------------- UI thread
    def _flush(self) -> None:
        with self._lock:
            tokens, self._tokens = self._tokens, {}
            finals, self._finals = self._finals, {}
        for request_id, batch in tokens.items():
            self.token_batch.emit(request_id, batch)
        for request_id, final in finals.items():
            self._handles.pop(request_id, None)
            if final.finish_reason == "error":
                self.errored.emit(request_id, final.error or "the request failed")
            self.finished.emit(request_id, final)
        if not self._handles:
            self._timer.stop()

    def flush_now(self) -> None:
        self._flush()

    def shutdown(self) -> None:
        """Cancel what is running and stop listening; the host itself is shut down by its owner."""
        self._closed = True
        self._timer.stop()
        if self._on_host_state in self.host.listeners:
            self.host.listeners.remove(self._on_host_state)
        for handle in list(self._handles.values()):
            try:
                handle.cancel()
            except Exception:  # the engine may already be gone
                pass
        self._handles.clear()
