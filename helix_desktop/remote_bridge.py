"""Remote engines in the app: ``RemoteBridge`` (the EngineBridge interface over engine.remote) and
``EngineSwitch``, the one bridge the tabs hold, which routes to this PC's engine or the chosen remote.

Streams run on helper threads; like EngineBridge, tokens are buffered under a lock and flushed on a
~30 ms UI timer, so ``finished`` always follows a request's last ``token_batch``.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from PySide6.QtCore import QObject, QTimer, Signal

from engine.config import SamplingParams
from engine.errors import HelixError, InvalidRequest
from engine.remote import RemoteClient, RemoteStats
from engine.sequence import FinishEvent
from helix_desktop.bridge import FLUSH_MS, EngineBridge
from helix_desktop.connections import LOCAL, Connection

MAX_PARALLEL = 8  # concurrent streams per remote (Compare runs one at a time; Chat and Generate one each)


class RemoteBridge(QObject):
    started = Signal(str)
    token_batch = Signal(str, list)
    finished = Signal(str, object)
    errored = Signal(str, str)

    def __init__(self, connection: Connection, parent: QObject | None = None):
        super().__init__(parent)
        self.connection = connection
        self.client = RemoteClient(connection.endpoint())
        self._lock = threading.Lock()
        self._tokens: dict[str, list] = {}
        self._finals: dict[str, FinishEvent] = {}
        self._cancels: dict[str, threading.Event] = {}
        self._pool = ThreadPoolExecutor(max_workers=MAX_PARALLEL, thread_name_prefix="helix-remote")
        self._timer = QTimer(self)
        self._timer.setInterval(FLUSH_MS)
        self._timer.timeout.connect(self._flush)
        self._closed = False

    @property
    def model_name(self) -> str:
        """The remote's served model once it has answered, else ""."""
        return self.client.known_model or ""

    def submit(self, prompt: str, params: SamplingParams) -> str:
        if not prompt.strip():
            raise InvalidRequest("prompt must be a non-empty string; write a prompt first")
        return self._submit(prompt, params)

    def submit_chat(self, messages: Sequence[tuple[str, str]], params: SamplingParams) -> str:
        if not messages:
            raise InvalidRequest("a conversation needs at least one message")
        return self._submit([(str(r), str(t)) for r, t in messages], params)

    def _submit(self, prompt, params: SamplingParams) -> str:
        request_id = uuid.uuid4().hex[:12]
        cancel = threading.Event()
        with self._lock:
            self._cancels[request_id] = cancel
        self._pool.submit(self._run, request_id, prompt, params, cancel)
        self.started.emit(request_id)
        if not self._timer.isActive():
            self._timer.start()
        return request_id

    def cancel(self, request_id: str) -> None:
        with self._lock:
            event = self._cancels.get(request_id)
        if event is not None:
            event.set()

    @property
    def active(self) -> list[str]:
        with self._lock:
            return list(self._cancels)

    def _run(self, request_id: str, prompt, params: SamplingParams, cancel: threading.Event) -> None:
        """Helper thread: every way out ends the request with one FinishEvent."""
        try:
            for ev in self.client.stream(prompt, params, request_id=request_id, cancel=cancel):
                with self._lock:
                    if isinstance(ev, FinishEvent):
                        self._finals[request_id] = ev
                    else:
                        self._tokens.setdefault(request_id, []).append(ev)
        except Exception as exc:  # RemoteError says what to change; anything else must still end the request
            message = str(exc) if isinstance(exc, HelixError) else f"{type(exc).__name__}: {exc}"
            with self._lock:
                self._finals[request_id] = FinishEvent(request_id, "error", "", [], RemoteStats(), error=message)

    def _flush(self) -> None:
        with self._lock:
            tokens, self._tokens = self._tokens, {}
            finals, self._finals = self._finals, {}
        for request_id, batch in tokens.items():
            self.token_batch.emit(request_id, batch)
        for request_id, final in finals.items():
            with self._lock:
                self._cancels.pop(request_id, None)
            if final.finish_reason == "error":
                self.errored.emit(request_id, final.error or "the request failed")
            self.finished.emit(request_id, final)
        with self._lock:
            idle = not self._cancels
        if idle:
            self._timer.stop()

    def flush_now(self) -> None:
        self._flush()

    def shutdown(self) -> None:
        self._closed = True
        self._timer.stop()
        with self._lock:
            for event in self._cancels.values():
                event.set()
            self._cancels.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


class EngineSwitch(QObject):
    """The bridge Generate, Chat and Compare hold: submits go to the current connection (or, for Compare, to a
    named one); every bridge's signals are forwarded, and request ids are unique, so each tab keeps its own."""

    started = Signal(str)
    token_batch = Signal(str, list)
    finished = Signal(str, object)
    errored = Signal(str, str)
    connection_changed = Signal(object)  # Connection

    def __init__(self, local: EngineBridge, parent: QObject | None = None):
        super().__init__(parent)
        self.local = local
        self.connection: Connection = LOCAL
        self._remotes: dict[Connection, RemoteBridge] = {}
        self._owner: dict[str, QObject] = {}  # request id -> the bridge that runs it
        self._forward(local)

    @property
    def host(self):
        return self.local.host

    def _forward(self, bridge) -> None:
        bridge.started.connect(self.started)
        bridge.token_batch.connect(self.token_batch)
        bridge.finished.connect(self._on_finished)
        bridge.errored.connect(self.errored)

    def _on_finished(self, request_id: str, final) -> None:
        self._owner.pop(request_id, None)
        self.finished.emit(request_id, final)

    def bridge_for(self, connection: Connection):
        """This PC's EngineBridge, or the (cached) RemoteBridge of a remote connection."""
        if connection.is_local:
            return self.local
        bridge = self._remotes.get(connection)
        if bridge is None:
            for old in [c for c in self._remotes if c.name == connection.name]:  # edited: URL or key changed
                self._remotes.pop(old).shutdown()
            bridge = self._remotes[connection] = RemoteBridge(connection, self)
            self._forward(bridge)
        return bridge

    def use(self, connection: Connection) -> None:
        """Send new work to ``connection`` (requests already running finish where they are)."""
        self.bridge_for(connection)
        self.connection = connection
        self.connection_changed.emit(connection)

    @property
    def current(self):
        return self.bridge_for(self.connection)

    # ---------------------------------------------------------------- the EngineBridge interface
    def submit(self, prompt, params: SamplingParams, connection: Connection | None = None) -> str:
        bridge = self.bridge_for(connection or self.connection)
        request_id = bridge.submit(prompt, params)
        self._owner[request_id] = bridge
        return request_id

    def submit_chat(self, messages, params: SamplingParams) -> str:
        bridge = self.current
        request_id = bridge.submit_chat(messages, params)
        self._owner[request_id] = bridge
        return request_id

    def cancel(self, request_id: str) -> None:
        bridge = self._owner.get(request_id)
        if bridge is not None:
            bridge.cancel(request_id)

    @property
    def model_name(self) -> str:
        return self.current.model_name

    @property
    def is_remote(self) -> bool:
        return not self.connection.is_local

    def shutdown(self) -> None:
        """Stop remote streams; this PC's bridge is shut down by the window."""
        for bridge in self._remotes.values():
            bridge.shutdown()
        self._remotes.clear()
