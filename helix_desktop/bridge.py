"""The Qt face of an :class:`EngineHost`: engine-thread callbacks in, queued Qt signals out.

Prompts are tokenized on a helper thread, never the UI's. The engine calls back on its own
thread; we only touch plain Python there (append to a locked buffer). A ~30 ms QTimer on the
UI thread flushes the buffer, so a fast stream costs one signal per repaint, tokens arrive in
order, and ``finished`` always follows a request's last ``token_batch``. Host state and load progress come from the loader thread
as signals, which Qt queues to the UI thread.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from PySide6.QtCore import QObject, QTimer, Signal

from engine.config import EngineConfig, SamplingParams
from engine.errors import EngineStopped, HelixError, InvalidRequest
from engine.host import EngineHost
from engine.sequence import FinishEvent, TokenEvent
from engine.server.chat import PLAIN_TEMPLATE_STOPS, chat_prompt
from engine.stats import RequestStats
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
        self._live: set[str] = set()  # submitted and not yet finished (maybe still tokenizing)
        self._cancels: set[str] = set()  # cancelled before the engine had them
        self._closed = False
        # a long paste or a chat template must never freeze the window: prompts are tokenized here, in order
        self._prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="helix-tokenize")
        self._timer = QTimer(self)
        self._timer.setInterval(FLUSH_MS)
        self._timer.timeout.connect(self._flush)
        host.listeners.append(self._on_host_state)

    # ---------------------------------------------------------------- requests (UI thread)
    def submit(self, prompt: str | list[int], params: SamplingParams) -> str:
        """Queue a request and return its id at once; the prompt is tokenized off the UI thread.

        Raises HelixError for what is known at once (no models, empty prompt); a failure found
        while tokenizing (prompt too long) arrives as ``errored`` then ``finished`` (reason error).
        """
        if isinstance(prompt, str) and not prompt.strip():
            raise InvalidRequest("prompt must be a non-empty string; write a prompt first")
        return self._submit(lambda engine: (prompt, params))

    def submit_chat(self, messages: Sequence[tuple[str, str]], params: SamplingParams) -> str:
        """Like :meth:`submit` for (role, text) messages, rendered with the model's chat template (or Helix's plain
        one, which also stops at the next ``User:`` turn) off the UI thread. The narrow interface a chat view
        needs: messages + params in, ``token_batch`` / ``finished`` out."""
        if not messages:
            raise InvalidRequest("a conversation needs at least one message")
        frozen = tuple((str(r), str(t)) for r, t in messages)

        def build(engine):
            prompt = chat_prompt(engine.tokenizer, frozen)
            if isinstance(prompt, str):  # the plain template
                stop = tuple(dict.fromkeys(params.stop + PLAIN_TEMPLATE_STOPS))
                return prompt, dataclasses.replace(params, stop=stop if len(stop) <= 16 else params.stop)
            return prompt, params

        return self._submit(build)

    @property
    def model_name(self) -> str:
        """The short id (hub id or folder name) of the model that answers, or "" when none is loaded."""
        return getattr(self.host.engine, "target_name", None) or ""

    def _submit(self, build: Callable[[object], tuple[str | list[int], SamplingParams]]) -> str:
        """``build(engine)`` -> (prompt, params) runs on the tokenizer thread."""
        worker = self._require_worker()
        request_id = uuid.uuid4().hex[:12]
        with self._lock:
            self._live.add(request_id)
        self._prep.submit(self._prepare, worker, request_id, build)
        self.started.emit(request_id)
        if not self._timer.isActive():
            self._timer.start()
        return request_id

    def _require_worker(self):
        if self.host.worker is None:
            if self.host.state == "loading":
                raise EngineStopped("The models are still loading; try again in a moment.")
            raise EngineStopped("No models are loaded. Choose a target (and a draft) on the Models tab and press "
                                "Load models.")
        return self.host.require_worker()

    def cancel(self, request_id: str) -> None:
        """Stop a request at the engine's next step; ``finished`` follows with reason ``cancelled``."""
        with self._lock:
            handle = self._handles.get(request_id)
            if handle is None and request_id in self._live:
                self._cancels.add(request_id)  # still tokenizing: cancelled as soon as the engine has it
        if handle is not None:
            handle.cancel()

    @property
    def active(self) -> list[str]:
        with self._lock:
            return list(self._live)

    def load(self, config: EngineConfig, builder=None) -> None:
        """Load a model pair in the background; progress and state arrive as signals."""
        self.host.load(config, progress=self._on_progress, builder=builder)

    # ---------------------------------------------------------------- tokenizer / engine / loader threads
    def _prepare(self, worker, request_id: str, build) -> None:
        try:
            prompt, params = build(worker.engine)
            handle = worker.submit(prompt, params, request_id=request_id, on_event=self._on_event)
        except Exception as exc:  # HelixError says what to change; anything else must still end the request
            message = str(exc) if isinstance(exc, HelixError) else f"{type(exc).__name__}: {exc}"
            self._on_event(FinishEvent(request_id, "error", "", [], RequestStats(), error=message))
            return
        with self._lock:
            self._handles[request_id] = handle
            cancel = request_id in self._cancels
            self._cancels.discard(request_id)
        if cancel:
            handle.cancel()

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
            with self._lock:
                self._handles.pop(request_id, None)
                self._live.discard(request_id)
            if final.finish_reason == "error":
                self.errored.emit(request_id, final.error or "the request failed")
            self.finished.emit(request_id, final)
        with self._lock:
            idle = not self._live
        if idle:
            self._timer.stop()

    def flush_now(self) -> None:
        self._flush()

    def shutdown(self) -> None:
        """Cancel what is running and stop listening; the host itself is shut down by its owner."""
        self._closed = True
        self._timer.stop()
        self._prep.shutdown(wait=False, cancel_futures=True)
        if self._on_host_state in self.host.listeners:
            self.host.listeners.remove(self._on_host_state)
        for handle in list(self._handles.values()):
            try:
                handle.cancel()
            except Exception:  # the engine may already be gone
                pass
        self._handles.clear()
        self._live.clear()
