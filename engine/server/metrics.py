"""Engine metrics as JSON and as Prometheus text, both read from the worker's latest snapshot.

Prometheus names follow vLLM / llama.cpp (``helix:`` prefix). Each app owns its own
``CollectorRegistry`` so several apps can live in one process (the desktop app restarts its server).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engine.host import EngineHost

KV_KEYS = ("total", "used", "free", "shared", "usage", "block_size")
SPEC_KEYS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "acceptance_rate", "mean_acceptance_length")


def metrics_json(snapshot: dict) -> dict:
    spec, kv = snapshot["spec"], snapshot["kv"]
    used = max((i + 1 for i, d in enumerate(spec.get("drafts_per_position", ())) if d), default=0)
    return {
        "requests_served": snapshot["requests_served"],
        "requests_running": snapshot["requests_running"],
        "requests_waiting": snapshot["requests_waiting"],
        "tokens_generated": snapshot["tokens_generated"],
        "tokens_per_second_1m": snapshot["tokens_per_second_1m"],
        "spec": {**{k: spec[k] for k in SPEC_KEYS}, "accepted_per_position": spec["accepted_per_position"][:used]},
        "kv": {k: kv[k] for k in KV_KEYS},
    }


class EngineCollector(Collector):
    """Builds the metric families at scrape time from whichever engine the host serves now."""

    def __init__(self, host: EngineHost):
        self.host = host

    def collect(self):
        ready = GaugeMetricFamily("helix:engine_ready", "1 when models are loaded and serving")
        worker = self.host.worker
        ready.add_metric([], 1.0 if worker is not None else 0.0)
        yield ready
        if worker is None:
            return
        s = worker.snapshot()
        spec, kv = s["spec"], s["kv"]
        for name, value, doc in (
            ("spec_decode_num_drafts", spec["num_drafts"], "Speculative steps verified by the target"),
            ("spec_decode_num_draft_tokens", spec["num_draft_tokens"], "Draft tokens proposed"),
            ("spec_decode_num_accepted_tokens", spec["num_accepted_tokens"], "Draft tokens accepted"),
            ("generation_tokens", s["tokens_generated"], "Tokens generated"),
            ("request_success", s["requests_served"], "Requests finished (any finish reason)"),
        ):
            yield CounterMetricFamily(f"helix:{name}", doc, value=value)
        per_pos = CounterMetricFamily("helix:spec_decode_num_accepted_tokens_per_pos",
                                      "Draft tokens accepted at each draft position", labels=["position"])
        for pos, count in enumerate(spec["accepted_per_position"]):
            per_pos.add_metric([str(pos)], count)
        yield per_pos
        for name, value, doc in (
            ("kv_cache_usage_perc", kv["usage"], "KV cache usage, 0..1 (1 = full)"),
            ("num_requests_running", s["requests_running"], "Requests in the running batch"),
            ("num_requests_waiting", s["requests_waiting"], "Requests waiting to be scheduled"),
            ("tokens_per_second_1m", s["tokens_per_second_1m"], "Generated tokens per second over the last minute"),
        ):
            yield GaugeMetricFamily(f"helix:{name}", doc, value=value)
        blocks = GaugeMetricFamily("helix:kv_cache_blocks", "KV blocks in the target's pool by state", labels=["state"])
        for state in ("total", "used", "free", "shared"):
            blocks.add_metric([state], kv[state])
        yield blocks


def make_registry(host: EngineHost) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(host))
    return registry


def prometheus_text(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
