"""The engine worker's request handles: events reach an asyncio consumer in order, and a lazy handle (a
non-streaming HTTP request) wakes the event loop once, when the request finishes, not once per step."""

import asyncio

from engine import SamplingParams
from engine.sequence import FinishEvent
from engine.worker import EngineWorker
from tests.tiny import tiny_engine


def _run(lazy: bool) -> tuple[list, int]:
    worker = EngineWorker(tiny_engine())
    loop = asyncio.new_event_loop()
    wakes = 0
    real = loop.call_soon_threadsafe

    def counting(*args, **kwargs):
        nonlocal wakes
        wakes += 1
        return real(*args, **kwargs)

    loop.call_soon_threadsafe = counting

    async def consume():
        handle = worker.submit("Once upon a time", SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True),
                               loop=loop, lazy=lazy)
        return [ev async for ev in handle.aiter()]

    try:
        events = loop.run_until_complete(consume())
    finally:
        worker.shutdown()
        loop.close()
    return events, wakes


def test_lazy_handle_wakes_the_loop_once_and_loses_nothing():
    eager_events, eager_wakes = _run(lazy=False)
    lazy_events, lazy_wakes = _run(lazy=True)
    for events in (eager_events, lazy_events):
        assert isinstance(events[-1], FinishEvent) and events[-1].finish_reason == "length"
        assert [e.token_id for e in events[:-1]] == events[-1].token_ids
    assert lazy_events[-1].token_ids == eager_events[-1].token_ids
    assert lazy_wakes == 1 < eager_wakes


def test_leaving_idle_waits_for_a_burst_of_arrivals(monkeypatch):
    """A burst of requests is gathered before the first step (one prefill, one batch from the start): the worker
    keeps waiting while requests keep arriving, stops once none came for a quiet period, and never waits longer
    than ARRIVAL_MAX_S."""
    import engine.worker as w

    class FakeEngine:
        def __init__(self):
            self._inbox = []

    worker = object.__new__(EngineWorker)
    worker.engine = FakeEngine()
    clock = [0.0]
    arrivals = iter([1, 1, 1, 0, 1])  # requests arriving during each quiet period

    def fake_sleep(seconds):
        clock[0] += seconds
        worker.engine._inbox.extend([object()] * next(arrivals, 0))

    monkeypatch.setattr(w.time, "sleep", fake_sleep)
    monkeypatch.setattr(w.time, "perf_counter", lambda: clock[0])
    worker._gather_arrivals()
    assert len(worker.engine._inbox) == 3  # waited through three arrivals, stopped at the first quiet period
    assert clock[0] == 4 * w.ARRIVAL_QUIET_S

    worker.engine._inbox.clear()
    clock[0] = 0.0
    arrivals = iter([1] * 100)  # requests never stop coming: the wait is capped
    worker._gather_arrivals()
    assert clock[0] <= w.ARRIVAL_MAX_S + w.ARRIVAL_QUIET_S
