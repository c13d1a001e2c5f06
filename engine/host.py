"""Holds the current engine and swaps in a new model pair without interrupting it.

The app and the server both talk to an ``EngineHost``: ``state`` is loading / ready /
failed (with ``reason``); ``load()`` builds a new engine on a background thread and swaps
it in only when it is ready, so the current pair keeps serving while another loads and
stays in place if the new one fails.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from engine.config import EngineConfig
from engine.errors import EngineStopped, HelixError
from engine.worker import EngineWorker

logger = logging.getLogger(__name__)


class EngineHost:
    def __init__(self):
        self.worker: EngineWorker | None = None
        self.config: EngineConfig | None = None
        self.state = "empty"  # empty | loading | ready | failed
        self.reason: str | None = None
        self.last_error: str | None = None
        self.progress: tuple[str, float] = ("", 0.0)
        self.listeners: list[Callable[[str, str | None], None]] = []  # (state, reason) on change
        self._lock = threading.Lock()
        self._load_thread: threading.Thread | None = None
        self._closed = False

    # the worker's engine, for whoever needs direct facts (model names, tokenizer)
    @property
    def engine(self):
        return self.worker.engine if self.worker is not None else None

    def require_worker(self) -> EngineWorker:
        w = self.worker
        if w is None:
            raise EngineStopped(f"models are not loaded ({self.state}{': ' + self.reason if self.reason else ''})")
        return w

    def _set_state(self, state: str, reason: str | None = None) -> None:
        self.state, self.reason = state, reason
        for cb in list(self.listeners):
            try:
                cb(state, reason)
            except Exception:
                logger.exception("host listener failed")

    def load(self, config: EngineConfig, progress: Callable[[str, float], None] | None = None,
             wait: bool = False, builder=None) -> None:
        """Load ``config`` in the background (or inline with ``wait``); swap in when ready."""
        from engine.factory import build_engine

        build = builder or build_engine

        def report(stage: str, frac: float) -> None:
            self.progress = (stage, frac)
            if progress is not None:
                progress(stage, frac)

        self._closed = False

        def job() -> None:
            self._set_state("loading")
            try:
                engine = build(config, report)
            except Exception as exc:  # HelixError carries the fix; anything else must not crash the host either
                if not isinstance(exc, HelixError):
                    logger.exception("model load crashed")
                message = str(exc) if isinstance(exc, HelixError) else f"{type(exc).__name__}: {exc}"
                logger.error("model load failed: %s", message)
                self.last_error = message
                if self.worker is not None:  # the current pair stays in service
                    self._set_state("ready", f"last load failed: {message}")
                else:
                    self._set_state("failed", message)
                return
            if self._closed:  # the app quit while this load ran: drop the new engine quietly
                return
            new = EngineWorker(engine)
            with self._lock:
                old, self.worker, self.config = self.worker, new, config
            if old is not None:
                old.shutdown()
            self._set_state("ready")

        if wait:
            job()
        else:
            self._load_thread = threading.Thread(target=job, name="helix-loader", daemon=True)
            self._load_thread.start()

    def adopt(self, engine, config: EngineConfig | None = None) -> None:
        """Use an engine built elsewhere (tests, the CLI)."""
        old, self.worker, self.config = self.worker, EngineWorker(engine), config
        if old is not None:
            old.shutdown()
        self._set_state("ready")

    def wait_loaded(self, timeout: float | None = None) -> bool:
        t = self._load_thread
        if t is not None:
            t.join(timeout)
            return not t.is_alive()
        return True

    def shutdown(self) -> None:
        """Stop the engine now; a load still running is discarded when it finishes (not waited for)."""
        self._closed = True
        w, self.worker = self.worker, None
        if w is not None:
            w.shutdown()
        self._set_state("empty")
