"""Compare runs: the same prompt and seed through two engines (A then B), N times. By default A is this
PC's plain decoding and B its speculative decoding (draft method auto); on this PC either side may use any
loaded drafting method, B may run every method in turn, and either side may be a remote connection.

Runs go one after the other (never concurrently) so timings are fair. This is the
state machine only; the widgets live in ``compare_tab``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

from PySide6.QtCore import QObject, Signal

from engine.config import SamplingParams
from engine.errors import HelixError
from engine.sequence import FinishEvent
from helix_desktop.connections import LOCAL, Connection
from helix_desktop.remote_bridge import EngineSwitch

SLOTS = ("a", "b")
METHOD_NAMES = {"auto": "auto", "model": "draft model", "ngram": "n-gram lookup", "eagle": "EAGLE head"}
EVERY = "every"  # B only: each drafting method this PC has loaded, in turn


@dataclass(frozen=True)
class Side:
    """One engine of a comparison: a connection and, on this PC, plain decoding or speculative decoding with a
    drafting method (a remote Helix server gets the speculative flag; other servers decode as they were started)."""

    connection: Connection = LOCAL
    speculative: bool = True
    draft_method: str = "auto"  # model | ngram | eagle | auto, or EVERY

    @property
    def label(self) -> str:
        if not self.connection.is_local:
            return f"{self.connection.name} (remote)"
        if self.draft_method == EVERY:
            return "This PC, every drafting method in turn"
        return f"This PC, {f'speculative: {self.method_name}' if self.speculative else 'plain decoding'}"

    @property
    def method_name(self) -> str:
        """Short name for tables: plain, auto, draft model, n-gram lookup, EAGLE head, or the remote's name."""
        if not self.connection.is_local:
            return self.connection.name
        return METHOD_NAMES.get(self.draft_method, self.draft_method) if self.speculative else "plain"

    def expand(self, methods: list[str]) -> list[Side]:
        """The sides this one runs: itself, or for EVERY one per loaded method (auto last)."""
        if self.draft_method != EVERY:
            return [self]
        return [Side(self.connection, True, m) for m in [*(m for m in methods if m != "auto"), "auto"]]


DEFAULT_SIDES = {"a": Side(LOCAL, False), "b": Side(LOCAL, True, "auto")}


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token, or None when the sequences are identical."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@dataclass
class RunResult:
    index: int
    a: FinishEvent
    b: FinishEvent
    b_side: Side = DEFAULT_SIDES["b"]

    @property
    def speedup(self) -> float:
        """B's tokens/s over A's."""
        p = self.a.stats.tokens_per_second
        return self.b.stats.tokens_per_second / p if p > 0 else 0.0

    @property
    def by_token(self) -> bool:
        """Both sides sent token ids (servers that don't send them are compared by text)."""
        return bool(self.a.token_ids) and bool(self.b.token_ids)

    @property
    def first_difference(self) -> int | None:
        """The first differing token (or character, when a side sent no token ids); None if identical."""
        if self.by_token or not (self.a.text or self.b.text):
            return first_difference(self.a.token_ids, self.b.token_ids)
        return first_difference(list(self.a.text), list(self.b.text))


def median_speedup(results: list[RunResult]) -> float:
    return statistics.median(r.speedup for r in results) if results else 0.0


def speedups_by_side(results: list[RunResult]) -> dict[Side, float]:
    """Median speed-up of each B side, in the order the sides first ran."""
    sides = list(dict.fromkeys(r.b_side for r in results))
    return {side: median_speedup([r for r in results if r.b_side == side]) for side in sides}


class CompareSession(QObject):
    run_started = Signal(int, str)  # run index (0-based), slot (a or b)
    tokens = Signal(str, list)  # slot, [TokenEvent]
    mode_finished = Signal(int, str, object)  # run index, slot, FinishEvent
    run_finished = Signal(object)  # RunResult
    done = Signal(list)  # [RunResult] (fewer than asked if stopped or failed)
    failed = Signal(str)

    def __init__(self, bridge: EngineSwitch, parent: QObject | None = None):
        super().__init__(parent)
        self.bridge = bridge
        self.results: list[RunResult] = []
        self.runs = 0
        self.greedy = False
        self._queue: list[tuple[int, str, Side]] = []
        self._params = SamplingParams()
        self.sides: dict[str, Side] = dict(DEFAULT_SIDES)
        self.b_sides: list[Side] = [DEFAULT_SIDES["b"]]
        self.current_side: Side | None = None
        self._prompt = ""
        self._current: tuple[int, str, str] | None = None  # run, mode, request id
        self._pending_a: FinishEvent | None = None
        bridge.token_batch.connect(self._on_tokens)
        bridge.finished.connect(self._on_finished)

    @property
    def running(self) -> bool:
        return self._current is not None

    def start(self, prompt: str, params: SamplingParams, runs: int, sides: dict[str, Side] | None = None,
              methods: list[str] | None = None) -> None:
        """Queue ``runs`` x (A, then each B side); ``methods``: this PC's drafting methods (for B = EVERY).
        Raises HelixError if the first request is refused."""
        self.results, self.runs, self.greedy = [], runs, params.greedy
        self.sides = dict(sides or DEFAULT_SIDES)
        self.b_sides = self.sides["b"].expand(methods or ["auto"])
        self._prompt = prompt
        self._params = params
        self._queue = [(i, slot, side) for i in range(runs)
                       for slot, side in [("a", self.sides["a"]), *(("b", b) for b in self.b_sides)]]
        self._next()

    def stop(self) -> None:
        self._queue.clear()
        if self._current is not None:
            self.bridge.cancel(self._current[2])

    def _next(self) -> None:
        if not self._queue:
            self._current = None
            self.done.emit(self.results)
            return
        run, mode, side = self._queue.pop(0)
        self.current_side = side
        params = replace(self._params, speculative=side.speculative)
        if side.connection.is_local and side.speculative:
            params = replace(params, draft_method=side.draft_method)
        try:
            request_id = self.bridge.submit(self._prompt, params, connection=side.connection)
        except HelixError as exc:
            self._queue.clear()
            self._current = None
            if run == 0 and mode == "a":
                raise
            self.failed.emit(str(exc))
            self.done.emit(self.results)
            return
        self._current = (run, mode, request_id)
        self.run_started.emit(run, mode)

    def _on_tokens(self, request_id: str, events: list) -> None:
        if self._current is not None and request_id == self._current[2]:
            self.tokens.emit(self._current[1], events)

    def _on_finished(self, request_id: str, final: FinishEvent) -> None:
        if self._current is None or request_id != self._current[2]:
            return
        run, mode, _ = self._current
        self.mode_finished.emit(run, mode, final)
        if final.finish_reason in ("cancelled", "error"):
            self._queue.clear()
            if final.finish_reason == "error":
                self.failed.emit(final.error or "the run failed")
        elif mode == "a":
            self._pending_a = final
        else:
            result = RunResult(run, self._pending_a, final, self.current_side)
            self.results.append(result)
            self.run_finished.emit(result)
        self._next()
