"""Submitting HTTP requests to the engine and following them to the end.

Every route goes through here: ``submit`` queues one engine request per prompt (all at once,
so the scheduler batches them); ``follow`` yields their events merged in arrival order and
cancels whatever is unfinished when the consumer stops (the client went away);
``complete`` collects results and cancels if the client disconnects while it waits.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from fastapi import Request

from engine.config import SamplingParams
from engine.sequence import FinishEvent, TokenEvent
from engine.worker import EngineWorker, RequestHandle

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    """One engine request's token events and its finish event."""

    tokens: list[TokenEvent] = field(default_factory=list)
    final: FinishEvent | None = None


def _submit_all(worker: EngineWorker, rid: str, prompts: Sequence[str | list[int]], params: Sequence[SamplingParams],
                loop: asyncio.AbstractEventLoop, lazy: bool) -> list[RequestHandle]:
    handles: list[RequestHandle] = []
    try:
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            engine_id = rid if len(prompts) == 1 else f"{rid}-{i}"
            handles.append(worker.submit(prompt, p, request_id=engine_id, loop=loop, lazy=lazy))
    except BaseException:
        for h in handles:
            h.cancel()
        raise
    return handles


async def submit(request: Request, worker: EngineWorker, prompts: Sequence[str | list[int]],
                 params: Sequence[SamplingParams], stream: bool = True) -> list[RequestHandle]:
    """Queue every prompt or none: a refusal (queue full, prompt too long) cancels those already queued.

    ``stream=False`` (the caller waits for whole results): the engine hands over each request's events when
    it finishes, not step by step, which keeps the event loop from taking the GIL from the engine every step.

    Tokenizing runs on a worker thread (a 1 MiB prompt takes seconds) so other streams keep flowing.
    """
    rid = request.state.request_id
    loop = asyncio.get_running_loop()
    queued = loop.run_in_executor(None, _submit_all, worker, rid, prompts, params, loop, not stream)
    try:
        handles = await asyncio.shield(queued)
    except asyncio.CancelledError:  # the client left while we tokenized: cancel what gets queued
        queued.add_done_callback(lambda f: [h.cancel() for h in f.result()]
                                 if not f.cancelled() and f.exception() is None else None)
        raise
    logger.info("[%s] %s %s: %d engine request(s)", rid, request.method, request.url.path, len(handles))
    return handles


async def follow(handles: Sequence[RequestHandle], request: Request | None = None
                 ) -> AsyncIterator[tuple[int, TokenEvent | FinishEvent]]:
    """Yield ``(handle index, event)`` until every handle finished; cancel the rest on early exit."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, handle: RequestHandle) -> None:
        async for ev in handle.aiter():
            queue.put_nowait((i, ev))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    finished: set[int] = set()
    try:
        while len(finished) < len(handles):
            i, ev = await queue.get()
            if isinstance(ev, FinishEvent):
                finished.add(i)
            elif request is not None:  # counted as delivered, so the request log is right after a disconnect
                request.state.tokens = getattr(request.state, "tokens", 0) + 1
            yield i, ev
    finally:
        unfinished = [h for i, h in enumerate(handles) if i not in finished]
        for h in unfinished:
            h.cancel()
        for t in tasks:
            t.cancel()
        if unfinished and request is not None:
            logger.info("[%s] client went away: cancelled %d engine request(s)", request.state.request_id,
                        len(unfinished))


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def complete(request: Request, handles: Sequence[RequestHandle]) -> list[Outcome]:
    """Wait for every handle; if the client disconnects first, cancel them (freeing their KV blocks)."""
    outcomes = [Outcome() for _ in handles]

    async def collect() -> None:
        async for i, ev in follow(handles, request):
            if isinstance(ev, FinishEvent):
                outcomes[i].final = ev
            else:
                outcomes[i].tokens.append(ev)

    collector = asyncio.create_task(collect())
    watcher = asyncio.create_task(_disconnected(request))
    try:
        await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not collector.done():
            logger.info("[%s] client disconnected while waiting; cancelling", request.state.request_id)
            for h in handles:
                h.cancel()
        await collector
    finally:
        watcher.cancel()
        if not collector.done():  # this handler itself was cancelled
            collector.cancel()
    return outcomes


def sse(data, event: str | None = None) -> str:
    """One server-sent event; ``data`` is JSON-encoded unless it is already a string."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n"
