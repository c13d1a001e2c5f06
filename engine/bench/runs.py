"""One timed pass of one method over the bench prompts: Helix (plain, fixed K, adaptive) or
Hugging Face ``generate()`` (plain or assisted), same token ids, same dtype and device.

Both sides produce exactly ``max_new_tokens`` tokens: Helix with ``ignore_eos``, HF with
``eos_token_id=[]`` (no stop token). Helix streams text through its detokenizer as the app
does; HF does not detokenize. Timings include everything each side does per request.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from engine.config import SamplingParams
from engine.cuda_graphs import GraphRunner
from engine.sequence import FinishEvent


@dataclass(frozen=True)
class Method:
    """What to run. ``k`` None with ``speculative`` means adaptive K; ``assist`` is HF's schedule."""

    name: str
    backend: str  # "helix" | "hf"
    speculative: bool = False
    k: int | None = None
    assist: str | None = None  # hf: None (plain) | "default" | "constant"
    draft_method: str | None = None  # helix: None (the engine's default) | "model" | "ngram" | "eagle" | "auto"

    @property
    def label(self) -> str:
        return self.name


@dataclass
class PassResult:
    """One pass over the prompts."""

    tokens: int = 0
    seconds: float = 0.0
    ttft_s: list[float] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    drafts_per_position: list[int] = field(default_factory=list)
    draft_time_s: float = 0.0
    graph_captures: int = 0  # CUDA graphs captured inside the pass (the shape bench's, the concurrency passes')
    drafts_by_method: dict[str, int] = field(default_factory=dict)  # an adaptive pass's drafts by proposer
    passes: list[float] | None = None  # the shape bench's median pass: every pass's tok/s, in round order
    target_time_s: float = 0.0
    target_calls: int = 0  # HF: target forward passes (iterations of assisted generation)
    draft_calls: int = 0  # HF: assistant forward passes (one drafted token each)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def merge(self, other: "PassResult") -> None:
        """Add another pass (over other prompts) to this one."""
        self.tokens += other.tokens
        self.seconds += other.seconds
        self.ttft_s += other.ttft_s
        self.outputs += other.outputs
        self.add_stats(other)
        self.target_calls += other.target_calls
        self.draft_calls += other.draft_calls
        self.graph_captures += other.graph_captures
        for name, drafts in other.drafts_by_method.items():
            self.drafts_by_method[name] = self.drafts_by_method.get(name, 0) + drafts

    def add_stats(self, stats) -> None:
        self.num_drafts += stats.num_drafts
        self.num_draft_tokens += stats.num_draft_tokens
        self.num_accepted_tokens += stats.num_accepted_tokens
        for name in ("accepted_per_position", "drafts_per_position"):
            mine, theirs = getattr(self, name), getattr(stats, name)
            mine.extend([0] * (len(theirs) - len(mine)))
            for i, v in enumerate(theirs):
                mine[i] += v
        self.draft_time_s += stats.draft_time_s
        self.target_time_s += stats.target_time_s
        for name, counts in getattr(stats, "by_method", {}).items():  # a request's: [drafts, drafted, accepted]
            self.drafts_by_method[name] = self.drafts_by_method.get(name, 0) + counts[0]


def supports_draft_method() -> bool:
    """Whether this engine's SamplingParams takes ``draft_method`` (model | ngram | auto)."""
    import dataclasses

    return any(f.name == "draft_method" for f in dataclasses.fields(SamplingParams))


def sampling_params(method: Method, temperature: float, max_new_tokens: int, seed: int) -> SamplingParams:
    extra = {"draft_method": method.draft_method} if method.draft_method and supports_draft_method() else {}
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0, top_k=0, seed=seed,
                          speculative=method.speculative, num_draft_tokens=method.k if method.speculative else None,
                          ignore_eos=True, **extra)


# --------------------------------------------------------------------------- Helix
def helix_pass(engine, prompts: list[list[int]], method: Method, temperature: float, max_new_tokens: int,
               seed: int = 0, adaptive_state: dict | None = None) -> PassResult:
    """Requests one after another (batch 1). ``adaptive_state`` resets the engine's adaptive-K model
    (alpha_prior, draft_cost, verify_cost, t_target1) before each request, so every adaptive run
    starts from the same point (the doctor's calibration)."""
    res = PassResult()
    for i, ids in enumerate(prompts):
        if adaptive_state:
            for key, value in adaptive_state.items():
                setattr(engine, key, value)
        params = sampling_params(method, temperature, max_new_tokens, seed + i)
        t0 = time.perf_counter()
        final = engine.generate(ids, params)
        dt = time.perf_counter() - t0
        _check(final)
        res.seconds += dt
        res.tokens += len(final.token_ids)
        res.ttft_s.append(final.stats.ttft_s or dt)
        res.outputs.append(list(final.token_ids))
        res.add_stats(final.stats)
    return res


def helix_concurrent(engine, prompts: list[list[int]], n: int, speculative: bool, temperature: float,
                     max_new_tokens: int, seed: int = 0, on_step=None, k: int | None = None,
                     requests: int | None = None, draft_method: str | None = None) -> PassResult:
    """``n`` clients, stepped together through the scheduler (``k`` None: adaptive): ``requests`` (default ``n``)
    requests in all, prompts cycled, at most ``n`` in flight; a client sends its next request as soon as its last
    one finishes (vLLM's ``benchmark_serving --max-concurrency``). One request each measures a closed batch,
    whose time is set by its slowest row: under speculation rows finish steps apart, and the last steps run a few
    rows at a fraction of the batch's speed."""
    res = PassResult()
    done: list[FinishEvent] = []
    captured = GraphRunner.captures
    method = Method("concurrent", "helix", speculative=speculative, k=k if speculative else None,
                    draft_method=draft_method)
    total = n if requests is None else max(n, requests)
    sent = 0

    def send() -> None:
        nonlocal sent
        while sent < total and sent - len(done) < n:
            params = sampling_params(method, temperature, max_new_tokens, seed + sent)
            engine.add_request(prompts[sent % len(prompts)], params,
                               sink=lambda ev: done.append(ev) if isinstance(ev, FinishEvent) else None)
            sent += 1

    t0 = time.perf_counter()
    send()
    while engine.has_work():
        engine.step()
        send()
        if on_step is not None:
            on_step(engine)
    res.seconds = time.perf_counter() - t0
    res.graph_captures = GraphRunner.captures - captured
    for final in done:
        _check(final)
        res.tokens += len(final.token_ids)
        res.ttft_s.append(final.stats.ttft_s or 0.0)
        res.add_stats(final.stats)
    return res


def _check(final: FinishEvent) -> None:
    if final.finish_reason == "error":
        raise RuntimeError(f"bench request failed: {final.error}")


# --------------------------------------------------------------------------- Hugging Face
class _FirstTokenClock:
    """A generate() streamer that notes when the first new token arrives (the first put is the prompt)."""

    def __init__(self):
        self.calls = 0
        self.first: float | None = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def _counting_hook(counter: dict, key: str):
    def hook(_module, _inputs, _output):
        counter[key] += 1
    return hook


def hf_pass(engine, prompts: list[list[int]], method: Method, temperature: float, max_new_tokens: int,
            seed: int = 0, constant_k: int | None = None, extra: dict | None = None) -> PassResult:
    """HF ``generate()`` on the engine's own target (and draft) modules.

    ``assist="default"`` keeps the assistant's generation config as shipped (transformers 5:
    20 tokens, constant schedule, dynamic stop at confidence 0.4); ``"constant"`` drafts exactly
    ``constant_k`` tokens (num_assistant_tokens_schedule="constant", confidence stop off).
    ``extra`` goes to ``generate()`` as is (e.g. ``cache_implementation="static"``).
    """
    from transformers.generation.streamers import BaseStreamer
    from transformers.utils import logging as hf_logging

    target = engine.target.model
    draft = engine.draft.model if (method.assist and engine.draft is not None) else None
    device = engine.target.device
    pad = engine.tokenizer.pad_token_id
    pad = pad if pad is not None else min(engine.eos_ids, default=0)
    res = PassResult()
    counts = {"target": 0, "draft": 0}
    hooks = [target.register_forward_hook(_counting_hook(counts, "target"))]
    saved_config = None
    if draft is not None:
        hooks.append(draft.register_forward_hook(_counting_hook(counts, "draft")))
        saved_config = copy.deepcopy(draft.generation_config)
        if method.assist == "constant":
            draft.generation_config.num_assistant_tokens_schedule = "constant"
            draft.generation_config.num_assistant_tokens = int(constant_k or 4)
            draft.generation_config.assistant_confidence_threshold = 0.0

    class Clock(_FirstTokenClock, BaseStreamer):
        pass

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # assisted generation warns about its own internal arguments
    try:
        for i, ids in enumerate(prompts):
            input_ids = torch.tensor([ids], dtype=torch.long, device=device)
            kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=[], pad_token_id=pad,
                          attention_mask=torch.ones_like(input_ids), do_sample=temperature > 0)
            if temperature > 0:
                kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
                torch.manual_seed(seed + i)
            if draft is not None:
                kwargs["assistant_model"] = draft
            kwargs.update(extra or {})
            clock = Clock()
            before = dict(counts)
            _sync(device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = target.generate(input_ids, streamer=clock, **kwargs)
            _sync(device)
            dt = time.perf_counter() - t0
            new = out[0, input_ids.shape[1]:].tolist()
            res.seconds += dt
            res.tokens += len(new)
            res.ttft_s.append((clock.first - t0) if clock.first else dt)
            res.outputs.append(new)
            res.target_calls += counts["target"] - before["target"]
            res.draft_calls += counts["draft"] - before["draft"]
    finally:
        hf_logging.set_verbosity(verbosity)
        for h in hooks:
            h.remove()
        if saved_config is not None:
            draft.generation_config = saved_config
    if draft is not None:
        # each target pass of assisted generation keeps its accepted draft tokens + one of its own
        res.num_drafts = res.target_calls
        res.num_draft_tokens = res.draft_calls
        res.num_accepted_tokens = max(0, res.tokens - res.target_calls)
    return res


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
