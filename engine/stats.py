"""Speculative-decoding and request statistics: data only; the API, UI and bench read them.

Names follow vLLM / llama.cpp: acceptance rate = accepted / drafted, mean acceptance
length = 1 + accepted / drafts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import MAX_DRAFT_TOKENS


@dataclass
class SpecDecodingStats:
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=lambda: [0] * MAX_DRAFT_TOKENS)
    drafts_per_position: list[int] = field(default_factory=lambda: [0] * MAX_DRAFT_TOKENS)
    draft_time_s: float = 0.0
    target_time_s: float = 0.0

    def observe_draft(self, num_draft_tokens: int, num_accepted_tokens: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted_tokens
        for pos in range(num_draft_tokens):
            self.drafts_per_position[pos] += 1
        for pos in range(num_accepted_tokens):
            self.accepted_per_position[pos] += 1

    def merge(self, other: "SpecDecodingStats") -> None:
        self.num_drafts += other.num_drafts
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        for i in range(MAX_DRAFT_TOKENS):
            self.accepted_per_position[i] += other.accepted_per_position[i]
            self.drafts_per_position[i] += other.drafts_per_position[i]
        self.draft_time_s += other.draft_time_s
        self.target_time_s += other.target_time_s

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    @property
    def acceptance_per_position(self) -> list[float]:
        """Share of drafts that reached position i and had it accepted."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_position, self.drafts_per_position)]


@dataclass
class MethodStats(SpecDecodingStats):
    """One drafting method's share of decoding ("plain" for rows that drafted nothing): its drafts, and what
    the row-steps that used it produced and cost. A step's wall time is split evenly between its rows, so at
    batch 1 ``tokens_per_second`` is the decode speed of that method alone."""

    num_steps: int = 0  # row-steps decoded with this method, misses included
    num_misses: int = 0  # row-steps planned for it in which it proposed nothing (n-gram: no match)
    num_tokens: int = 0  # tokens those row-steps produced
    decode_time_s: float = 0.0  # their share of the steps' wall time

    def observe_step(self, num_draft_tokens: int, num_accepted_tokens: int, tokens: int, seconds: float,
                     miss: bool = False) -> None:
        if num_draft_tokens:
            self.observe_draft(num_draft_tokens, num_accepted_tokens)
        self.num_steps += 1
        self.num_misses += miss
        self.num_tokens += tokens
        self.decode_time_s += seconds

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.decode_time_s if self.decode_time_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "num_steps": self.num_steps, "num_misses": self.num_misses, "num_tokens": self.num_tokens,
            "decode_time_s": round(self.decode_time_s, 6), "tokens_per_second": round(self.tokens_per_second, 3),
            "num_drafts": self.num_drafts, "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens, "acceptance_rate": round(self.acceptance_rate, 4),
            "mean_acceptance_length": round(self.mean_acceptance_length, 4),
        }


@dataclass
class RequestStats(SpecDecodingStats):
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    ttft_s: float | None = None
    total_s: float = 0.0
    num_preemptions: int = 0
    # drafting method -> [drafts, draft tokens, accepted tokens] (auto requests may use several)
    by_method: dict[str, list[int]] = field(default_factory=dict)

    def observe_draft(self, num_draft_tokens: int, num_accepted_tokens: int, method: str | None = None) -> None:
        super().observe_draft(num_draft_tokens, num_accepted_tokens)
        if method:
            counts = self.by_method.setdefault(method, [0, 0, 0])
            counts[0] += 1
            counts[1] += num_draft_tokens
            counts[2] += num_accepted_tokens

    def merge(self, other: SpecDecodingStats) -> None:
        super().merge(other)
        for method, counts in getattr(other, "by_method", {}).items():
            mine = self.by_method.setdefault(method, [0, 0, 0])
            for i, c in enumerate(counts):
                mine[i] += c

    @property
    def tokens_per_second(self) -> float:
        return self.num_generated_tokens / self.total_s if self.total_s > 0 else 0.0

    def to_dict(self) -> dict:
        """The shape the API, UI and bench share."""
        used = max((i + 1 for i, d in enumerate(self.drafts_per_position) if d), default=0)
        return {
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_generated_tokens": self.num_generated_tokens,
            "num_drafts": self.num_drafts,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "mean_acceptance_length": round(self.mean_acceptance_length, 4),
            "accepted_per_position": self.accepted_per_position[:used],
            "ttft_s": None if self.ttft_s is None else round(self.ttft_s, 6),
            "total_s": round(self.total_s, 6),
            "tokens_per_second": round(self.tokens_per_second, 3),
            "draft_time_s": round(self.draft_time_s, 6),
            "target_time_s": round(self.target_time_s, 6),
            "by_method": {m: {"num_drafts": d, "num_draft_tokens": n, "num_accepted_tokens": a,
                              "acceptance_rate": round(a / n, 4) if n else 0.0}
                          for m, (d, n, a) in sorted(self.by_method.items())},
        }
