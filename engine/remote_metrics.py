"""A remote engine's Prometheus ``/metrics`` read into one shape, for vLLM's names and Helix's.

A figure the server does not export stays None (shown as "not reported by this server"), never 0.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

PREFIXES = ("vllm:", "helix:")
# our field -> the metric names (without prefix) that carry it; older vLLM called KV usage gpu_cache_usage_perc
COUNTERS = {
    "num_drafts": ("spec_decode_num_drafts_total",),
    "num_draft_tokens": ("spec_decode_num_draft_tokens_total",),
    "num_accepted_tokens": ("spec_decode_num_accepted_tokens_total",),
    "generation_tokens": ("generation_tokens_total",),
}
GAUGES = {
    "requests_running": ("num_requests_running",),
    "requests_waiting": ("num_requests_waiting",),
}
KV_USAGE = ("kv_cache_usage_perc", "gpu_cache_usage_perc")
PER_POSITION = "spec_decode_num_accepted_tokens_per_pos_total"


@dataclass(frozen=True)
class RemoteMetrics:
    """Cumulative counters and current gauges of one scrape; None = the server does not report it."""

    server: str | None = None  # "vllm" or "helix": whose names the scrape used
    num_drafts: float | None = None
    num_draft_tokens: float | None = None
    num_accepted_tokens: float | None = None
    accepted_per_position: tuple[float, ...] | None = None  # accepted tokens at draft position 0, 1, ...
    generation_tokens: float | None = None
    kv_cache_usage: float | None = None  # 0..1
    requests_running: float | None = None
    requests_waiting: float | None = None

    @property
    def acceptance_rate(self) -> float | None:
        """accepted / drafted since the server started; None when not reported or nothing was drafted yet."""
        if self.num_accepted_tokens is None or not self.num_draft_tokens:
            return None
        return self.num_accepted_tokens / self.num_draft_tokens

    @property
    def mean_acceptance_length(self) -> float | None:
        if self.num_accepted_tokens is None or not self.num_drafts:
            return None
        return 1.0 + self.num_accepted_tokens / self.num_drafts

    @property
    def acceptance_per_position(self) -> list[float] | None:
        """Share of drafts whose token at position i was accepted (every draft reaches position 0)."""
        if self.accepted_per_position is None or not self.num_drafts:
            return None
        return [a / self.num_drafts for a in self.accepted_per_position]


def parse_prometheus(text: str) -> RemoteMetrics:
    """Read vLLM's (``vllm:``) or Helix's (``helix:``) names; samples of one name are summed over their
    labels (vLLM labels by engine and model) except KV usage, which is averaged over engines."""
    values: dict[str, list[float]] = defaultdict(list)
    per_pos: dict[int, float] = defaultdict(float)
    server = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            prefix = next((p for p in PREFIXES if sample.name.startswith(p)), None)
            if prefix is None:
                continue
            name = sample.name[len(prefix):]
            if name == PER_POSITION:
                try:
                    per_pos[int(sample.labels.get("position", ""))] += sample.value
                except ValueError:
                    continue
            else:
                values[name].append(sample.value)
            if server is None and (name in KV_USAGE or name.startswith("spec_decode") or name in GAUGES["requests_running"]):
                server = prefix[:-1]

    def total(names: tuple[str, ...]) -> float | None:
        for name in names:
            if values.get(name):
                return float(sum(values[name]))
        return None

    kv = next((values[n] for n in KV_USAGE if values.get(n)), None)
    positions = tuple(per_pos.get(i, 0.0) for i in range(max(per_pos) + 1)) if per_pos else None
    return RemoteMetrics(
        server=server,
        **{field: total(names) for field, names in {**COUNTERS, **GAUGES}.items()},
        accepted_per_position=positions,
        kv_cache_usage=sum(kv) / len(kv) if kv else None,
    )
