"""Live metrics sampled from engine snapshots into ring buffers (no Qt): the charts read these.

Sampling is separate from drawing: :meth:`LiveMetrics.sample` runs from a timer and
turns cumulative counters into rates over a short window, so requests from any source
(the window, the API server, other tools) show up alike.
"""

from __future__ import annotations

import math
from collections import deque

RATE_WINDOW_S = 1.0
ACCEPT_WINDOW_S = 3.0
METHOD_ORDER = ("model", "ngram", "eagle", "plain")  # the engine's per-method counters (snapshot "methods")


class LiveMetrics:
    def __init__(self, capacity: int = 1300):  # ~65 s at 20 Hz: the charts show the last 60 s
        self.t: deque[float] = deque(maxlen=capacity)
        self.tokens_per_s: deque[float] = deque(maxlen=capacity)
        self.acceptance: deque[float] = deque(maxlen=capacity)  # NaN where nothing was drafted
        self.kv_used: deque[float] = deque(maxlen=capacity)
        self.kv_total: deque[float] = deque(maxlen=capacity)
        self._window: deque[tuple[float, int, int, int]] = deque()  # (t, tokens, drafted, accepted)
        self._last_tokens: int | None = None
        self.tokens_seen = 0  # tokens generated while we watched, from any client
        self.accepted_per_position: list[float] = []
        self.drafts_at_position: list[int] = []
        self.latest: dict | None = None
        self._t0: float | None = None
        # per drafting method (and plain): recent acceptance and decode tok/s of the row-steps that used it
        self.method_acceptance: dict[str, deque[float]] = {}
        self.method_tokens_per_s: dict[str, deque[float]] = {}
        self._method_window: deque[tuple[float, dict[str, tuple[int, float, int, int]]]] = deque()

    def sample(self, snapshot: dict | None, now: float) -> None:
        if snapshot is None:
            return
        if self._t0 is None:
            self._t0 = now
        tokens = int(snapshot.get("tokens_generated", 0))
        spec = snapshot.get("spec", {})
        drafted, accepted = int(spec.get("num_draft_tokens", 0)), int(spec.get("num_accepted_tokens", 0))
        if self._last_tokens is not None and tokens < self._last_tokens:  # a new engine: counters restarted
            self._window.clear()
            self._method_window.clear()
            self._last_tokens = 0
        if self._last_tokens is not None:
            self.tokens_seen += tokens - self._last_tokens
        self._last_tokens = tokens
        self._window.append((now, tokens, drafted, accepted))
        while len(self._window) > 1 and self._window[0][0] < now - ACCEPT_WINDOW_S:
            self._window.popleft()

        rate_base = next((w for w in self._window if w[0] >= now - RATE_WINDOW_S), self._window[0])
        dt = now - rate_base[0]
        tps = (tokens - rate_base[1]) / dt if dt > 0 else 0.0
        base = self._window[0]
        d_drafted, d_accepted = drafted - base[2], accepted - base[3]
        acc = d_accepted / d_drafted if d_drafted > 0 else math.nan

        kv = snapshot.get("kv", {})
        self.t.append(now - self._t0)
        self.tokens_per_s.append(max(0.0, tps))
        self.acceptance.append(acc)
        self.kv_used.append(float(kv.get("used", 0)))
        self.kv_total.append(float(kv.get("total", 0)))
        drafts = list(spec.get("drafts_per_position", []))
        accepted_pos = list(spec.get("accepted_per_position", []))
        used = max((i + 1 for i, d in enumerate(drafts) if d), default=0)
        self.drafts_at_position = drafts[:used]
        self.accepted_per_position = [a / d if d else 0.0 for a, d in zip(accepted_pos[:used], drafts[:used], strict=False)]
        self._sample_methods(snapshot.get("methods") or {}, now)
        self.latest = snapshot

    def _sample_methods(self, methods: dict, now: float) -> None:
        """Per method, over the last ACCEPT_WINDOW_S: accepted / drafted, and tokens / seconds of its row-steps
        (NaN where the method was not used); buffers of methods seen late start with NaN."""
        counters = {m: (int(s.get("num_tokens", 0)), float(s.get("decode_time_s", 0.0)),
                        int(s.get("num_draft_tokens", 0)), int(s.get("num_accepted_tokens", 0)))
                    for m, s in methods.items()}
        self._method_window.append((now, counters))
        while len(self._method_window) > 1 and self._method_window[0][0] < now - ACCEPT_WINDOW_S:
            self._method_window.popleft()
        base = self._method_window[0][1]
        for m in sorted(set(counters) | set(self.method_acceptance), key=method_rank):
            if m not in self.method_acceptance:
                self.method_acceptance[m] = deque([math.nan] * (len(self.t) - 1), maxlen=self.t.maxlen)
                self.method_tokens_per_s[m] = deque([math.nan] * (len(self.t) - 1), maxlen=self.t.maxlen)
            tokens, seconds, drafted, accepted = counters.get(m, (0, 0.0, 0, 0))
            b_tokens, b_seconds, b_drafted, b_accepted = base.get(m, (0, 0.0, 0, 0))
            d_drafted, d_seconds = drafted - b_drafted, seconds - b_seconds
            self.method_acceptance[m].append((accepted - b_accepted) / d_drafted if d_drafted > 0 else math.nan)
            self.method_tokens_per_s[m].append((tokens - b_tokens) / d_seconds if d_seconds > 0 else math.nan)

    def method_rows(self) -> list[dict]:
        """One row per method for the table: recent values (NaN when unused lately) and since-load totals."""
        methods = (self.latest or {}).get("methods") or {}
        rows = []
        for m in sorted(methods, key=method_rank):
            s = methods[m]
            rows.append({"method": m, "acceptance_recent": self.method_acceptance[m][-1],
                         "tokens_per_s_recent": self.method_tokens_per_s[m][-1], **s})
        return rows

    @property
    def peak_tokens_per_s(self) -> float:
        return max(self.tokens_per_s, default=0.0)


def method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)
