"""A remote engine's Prometheus metrics for the live charts: scraped on a helper thread (never the UI's)
and offered as a snapshot shaped like the local worker's, plus a summary line that names what is not reported."""

from __future__ import annotations

import threading

from engine.remote import RemoteClient
from engine.remote_metrics import RemoteMetrics

NOT_REPORTED = "not reported by this server"


def to_snapshot(m: RemoteMetrics) -> dict:
    """The local snapshot's shape (LiveMetrics reads it); KV is in percent of the remote's cache."""
    positions = list(m.accepted_per_position or ())
    return {
        "tokens_generated": int(m.generation_tokens or 0),
        "requests_running": m.requests_running,
        "requests_waiting": m.requests_waiting,
        "spec": {"num_draft_tokens": int(m.num_draft_tokens or 0), "num_accepted_tokens": int(m.num_accepted_tokens or 0),
                 "acceptance_rate": m.acceptance_rate,
                 # every draft has a position 0; accepted at i / drafts is vLLM's per-position acceptance
                 "drafts_per_position": [int(m.num_drafts or 0)] * len(positions),
                 "accepted_per_position": positions},
        "kv": {"used": 100.0 * m.kv_cache_usage if m.kv_cache_usage is not None else 0.0,
               "total": 100.0 if m.kv_cache_usage is not None else 0.0},
        "remote": m,
    }


def summary(m: RemoteMetrics, tokens_per_s: float) -> str:
    """One line for the charts' header; a figure the server does not export says so instead of showing 0."""
    def num(v: float | None) -> str:
        return NOT_REPORTED if v is None else f"{v:.0f}"

    rate = m.acceptance_rate
    acceptance = (f"acceptance {rate * 100:.0f}% since the server started" if rate is not None else
                  "acceptance: no drafts yet" if m.num_draft_tokens == 0 else f"acceptance {NOT_REPORTED}")
    kv = f"KV {m.kv_cache_usage * 100:.1f}% used" if m.kv_cache_usage is not None else f"KV usage {NOT_REPORTED}"
    return (f"{tokens_per_s:.1f} tok/s now  ·  running {num(m.requests_running)}, waiting "
            f"{num(m.requests_waiting)}  ·  {acceptance}  ·  {kv}")


class MetricsWatcher:
    """``start()`` scrapes ``client.metrics()`` every ``interval_s`` until ``stop()``; read ``snapshot()``,
    ``metrics`` and ``error`` from any thread."""

    def __init__(self, client: RemoteClient, interval_s: float = 0.5):
        self.client = client
        self.interval_s = interval_s
        self.metrics: RemoteMetrics | None = None
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="helix-remote-metrics", daemon=True)

    def start(self) -> "MetricsWatcher":
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.metrics, self.error = self.client.metrics(), None
            except Exception as exc:  # shown in the charts' header; the next scrape may succeed
                self.error = str(exc)
            self._stop.wait(self.interval_s)

    def snapshot(self) -> dict | None:
        m = self.metrics
        return to_snapshot(m) if m is not None else None

    def stop(self) -> None:
        self._stop.set()
