"""Runs an :class:`LLMEngine` on a background thread; callers get request handles.

The UI, the server, the CLI and the bench all submit through here. Events are delivered
on the engine thread to each handle, which queues them for a blocking iterator or an
asyncio consumer.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque

from engine.config import SamplingParams
from engine.errors import EngineStopped
from engine.llm_engine import LLMEngine
from engine.sequence import Event, FinishEvent

logger = logging.getLogger(__name__)

LAZY_MAX_PENDING = 1024  # events a lazy handle holds back before it wakes the event loop anyway
ARRIVAL_QUIET_S = 0.002  # leaving idle: a burst of requests is over once none arrived for this long
ARRIVAL_MAX_S = 0.010  # ... or after this long in any case (the first request's added latency at most)


class RequestHandle:
    """A submitted request: iterate its events, wait for the result, or cancel it."""

    def __init__(self, worker: "EngineWorker", request_id: str, loop: asyncio.AbstractEventLoop | None = None,
                 lazy: bool = False):
        self.worker = worker
        self.request_id = request_id
        self._loop = loop
        # lazy: the consumer only needs the whole result (a non-streaming HTTP request), so the event loop is
        # woken when the request finishes, not once per step (each wake-up takes the GIL from the engine thread)
        self._lazy = lazy
        self._queue: queue.Queue[Event] = queue.Queue()
        self._aqueue: asyncio.Queue[Event] | None = asyncio.Queue() if loop is not None else None
        self._pending: deque[Event] = deque()  # engine thread -> event loop, drained in batches
        self._wake_pending = False
        self.final: FinishEvent | None = None
        self.done = threading.Event()
        self.callbacks: list = []

    def _deliver(self, event: Event) -> None:  # engine thread
        if isinstance(event, FinishEvent):
            self.final = event
            self.done.set()  # before the event is queued: whoever reads it sees the handle done
        for cb in self.callbacks:
            cb(event)
        if self._aqueue is not None:
            # one wake-up of the event loop per batch of events, not per token: every wake-up makes the
            # loop's thread take the GIL from the engine's (measured ~10% of the server's decode speed)
            self._pending.append(event)
            if self._lazy and not isinstance(event, FinishEvent) and len(self._pending) < LAZY_MAX_PENDING:
                return
            if not self._wake_pending:
                self._wake_pending = True
                try:
                    self._loop.call_soon_threadsafe(self._drain)
                except RuntimeError:  # the event loop is closed: nobody is listening any more
                    pass
        else:
            self._queue.put(event)

    def _drain(self) -> None:  # event loop thread
        self._wake_pending = False  # first: an event appended from now on schedules another drain
        while self._pending:
            self._aqueue.put_nowait(self._pending.popleft())

    def cancel(self) -> None:
        self.worker.engine.abort(self.request_id)
        self.worker.wake()

    def __iter__(self):
        while True:
            event = self._queue.get()
            yield event
            if isinstance(event, FinishEvent):
                return

    async def aiter(self):
        assert self._aqueue is not None, "submit with loop= to consume asynchronously"
        while True:
            event = await self._aqueue.get()
            yield event
            if isinstance(event, FinishEvent):
                return

    def result(self, timeout: float | None = None) -> FinishEvent:
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish in {timeout} s")
        return self.final


class EngineWorker:
    """Owns the engine thread. ``submit`` is safe from any thread."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="helix-engine", daemon=True)
        self.step_listeners: list = []  # called after every step on the engine thread (charts, metrics)
        self.latest_snapshot: dict = engine.snapshot()  # replaced (never mutated) after each step
        self._thread.start()

    def submit(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
               loop: asyncio.AbstractEventLoop | None = None, on_event=None, lazy: bool = False) -> RequestHandle:
        """Queue a request. With ``loop``, events reach ``handle.aiter()`` on that event loop; ``lazy`` delivers
        them there only when the request finishes (for consumers that wait for the whole result)."""
        if self._stop:
            raise EngineStopped("the engine is shutting down")
        holder: list[RequestHandle] = []
        pending: list[Event] = []

        def sink(event: Event) -> None:
            if holder:
                holder[0]._deliver(event)
            else:  # cannot happen before add_request returns, but keep events in order if it does
                pending.append(event)

        req = self.engine.add_request(prompt, params, request_id=request_id, sink=sink)
        handle = RequestHandle(self, req.request_id, loop, lazy=lazy)
        if on_event is not None:
            handle.callbacks.append(on_event)
        holder.append(handle)
        for ev in pending:
            handle._deliver(ev)
        self.wake()
        return handle

    def wake(self) -> None:
        with self._wake:
            self._wake.notify()

    def _loop(self) -> None:
        while True:
            idle = False
            with self._wake:
                while not self._stop and not self.engine.has_work():
                    idle = True
                    self._wake.wait(timeout=0.5)
                if self._stop:
                    break
            if idle:
                self._gather_arrivals()
            try:
                self.engine.step()
                self.latest_snapshot = self.engine.snapshot()
            except Exception:  # the engine guards its steps; this is a last line of defence
                logger.exception("engine step crashed")
            for listener in list(self.step_listeners):
                try:
                    listener(self.engine)
                except Exception:
                    logger.exception("step listener failed")
        self._drain()

    def _gather_arrivals(self) -> None:
        """Leaving idle, wait while requests keep arriving (ARRIVAL_QUIET_S apart, ARRIVAL_MAX_S at most), so
        a burst (a client sending 8 requests at once) is read in one prefill and decoded as one batch from its
        first step, instead of one prefill per straggler interleaved with the others' decode steps."""
        deadline = time.perf_counter() + ARRIVAL_MAX_S
        seen = len(self.engine._inbox)
        while time.perf_counter() < deadline:
            time.sleep(ARRIVAL_QUIET_S)
            now_seen = len(self.engine._inbox)
            if now_seen == seen:
                return
            seen = now_seen

    def _drain(self) -> None:
        """On shutdown, cancel everything still queued or running so no caller hangs."""
        eng = self.engine
        eng.stopped = True
        with eng._lock:
            pending = list(eng._inbox) + list(eng.scheduler.waiting) + list(eng.scheduler.running)
            eng._inbox.clear()
        for req in pending:
            if req.finish_reason is None:
                eng._finish(req, "cancelled")

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop = True
        self.wake()
        self._thread.join(timeout)

    def snapshot(self) -> dict:
        """The engine's state after its last step; safe to read from any thread."""
        return self.latest_snapshot

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()
