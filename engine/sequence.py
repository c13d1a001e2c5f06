"""A request's state as it moves waiting -> running -> finished, and the events it emits."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.adaptive import AdaptiveState, sampling_class
from engine.config import SamplingParams
from engine.detokenizer import IncrementalDetokenizer
from engine.rng import new_seed
from engine.stats import RequestStats


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class TokenEvent:
    """One generated token. ``source``: draft (accepted draft token), target (plain step or
    correction at a rejection) or bonus (extra token after a fully accepted draft)."""

    request_id: str
    token_id: int
    text: str
    index: int
    source: str
    t_s: float
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass(frozen=True)
class FinishEvent:
    request_id: str
    finish_reason: str  # length | stop | eos | cancelled | error
    text: str
    token_ids: list[int]
    stats: RequestStats
    error: str | None = None
    tail: str = ""  # text held back (a partial stop string) that streams must still show


Event = TokenEvent | FinishEvent
EventSink = Callable[[Event], None]


@dataclass(eq=False)
class Request:
    request_id: str
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    detok: IncrementalDetokenizer
    sink: EventSink | None = None
    use_draft: bool = False
    eager: str | None = None  # the proposer that reads an adaptive request's prompt in its prefill ("": none; decided
    # at its first chunk, ``LLMEngine._eager``)
    use_eagle: bool = False  # may draft with the EAGLE-3 head: its verify and prefill rows return the target's features
    features: bool = True  # a use_eagle row's verification returns them this step (``StepPlanner.features``)
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    stats: RequestStats = field(default_factory=RequestStats)
    adaptive: AdaptiveState = field(default_factory=AdaptiveState)
    arrival: float = field(default_factory=time.perf_counter)
    prefilled: bool = False  # the whole prompt (or, after a preemption, all but the last token) is cached
    seed: int = 0  # keys every random draw of this request (engine.rng); the user's seed or a fresh one
    cancel_requested: bool = False
    methods: tuple[SamplingParams, list[str]] | None = None  # the proposers it may use, listed for these params
    # (``StepPlanner.methods``)

    def __post_init__(self) -> None:
        self.seed = new_seed() if self.params.seed is None else self.params.seed & ((1 << 63) - 1)
        self.adaptive.sampling = sampling_class(self.params.temperature, self.params.top_p, self.params.top_k)
        self.stats.num_prompt_tokens = len(self.prompt_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def prefill_ids(self) -> list[int]:
        """What a (re-)admitted request runs through the models: the prompt, or after a
        preemption everything but the last token, which stays pending as in any decode step."""
        return self.all_ids[:-1] if self.output_ids else self.prompt_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def remaining(self) -> int:
        return self.params.max_new_tokens - len(self.output_ids)

    def emit(self, event: Event) -> None:
        if self.sink is not None:
            self.sink(event)
