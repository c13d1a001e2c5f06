"""Timers around the engine's phases, installed on one engine for the length of a measurement.

The engine is not edited: bound methods are shadowed by instance attributes (and a few
module-level functions the engine calls are swapped) inside a ``with Instrument(engine):``
block, then restored. Timers cost about a microsecond each; on CUDA the forward timers
synchronise so a forward's time is its own, which also changes what they time: the host work a step overlaps with
its verification (adaptive K's decisions, the bookkeeping deferred to it) then waits for the forward instead. Passes
whose speed is reported run with ``forwards=False`` (drafts counted, nothing timed or synchronised); the forwards'
times come from passes of their own.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from engine import llm_engine, model_runner, spec_decode
from engine.models import llama as lean_llama

# phases of a step, as reported by the profile (seconds)
PHASES = ("draft_forward", "target_forward", "paged_cache", "batch_prep", "sampling", "scheduling", "emit",
          "python_other")


@dataclass
class ForwardLog:
    """Forward-pass times keyed by (role, stage, rows, tokens per row)."""

    times: dict[tuple[str, str, int, int], list[float]] = field(default_factory=lambda: defaultdict(list))

    def add(self, role: str, stage: str, rows: int, tokens: int, seconds: float) -> None:
        self.times[(role, stage, rows, tokens)].append(seconds)

    def select(self, role: str, stage: str = "decode", rows: int = 1, tokens: int | None = None,
               min_tokens: int = 1) -> list[float]:
        return [t for (r, s, b, n), ts in self.times.items() if r == role and s == stage and b == rows
                and (tokens is None or n == tokens) and n >= min_tokens for t in ts]

    def mean(self, role: str, stage: str = "decode", rows: int = 1, tokens: int | None = None,
             min_tokens: int = 1) -> float | None:
        """Mean forward time: what the run actually spent, stalls included."""
        vals = self.select(role, stage, rows, tokens, min_tokens)
        return sum(vals) / len(vals) if vals else None

    def median(self, role: str, stage: str = "decode", rows: int = 1, tokens: int | None = None,
               min_tokens: int = 1) -> float | None:
        """Median forward time: robust to the stalls a shared machine adds to a few steps."""
        vals = self.select(role, stage, rows, tokens, min_tokens)
        return statistics.median(vals) if vals else None

    def count(self, role: str, stage: str = "decode") -> int:
        return sum(len(ts) for (r, s, _b, _n), ts in self.times.items() if r == role and s == stage)


class Instrument:
    """Context manager that times one engine's forwards, verifications and (``profile=True``) every phase.

    ``forwards``  per-shape forward times (for the cost model of the predicted speed-up);
    ``drafts``    (K, accepted) of every verification (for the geometric estimate of α);
    ``raw``       (``profile=True``) seconds inside steps, forwards, model calls, paged-cache updates,
                  sampling/verification, scheduling and emitting; :meth:`phase_seconds` splits them.
    """

    def __init__(self, engine, profile: bool = False, forwards: bool = True):
        self.engine = engine
        self.profile = profile
        self.timed = forwards or profile  # False: only the drafts are logged (no timers, no device synchronisation)
        self.forwards = ForwardLog()
        self.drafts: list[tuple[int, int]] = []
        # raw accumulators (seconds); phase_seconds() turns them into the PHASES split
        self.raw: dict[str, float] = defaultdict(float)
        self.steps = 0
        self._stage = "decode"
        self._role = "target"
        self._saved_attrs: list[tuple[object, str, object]] = []
        self._saved_globals: list[tuple[object, str, object]] = []
        self._cuda = engine.target.device.type == "cuda"

    # ------------------------------------------------------------------ install / remove
    def _shadow(self, obj, name: str, wrapper) -> None:
        """An instance attribute over the class's method, removed on exit (another timer, e.g. the doctor's
        ProposerClock, may shadow the same method inside this one and remove its own first)."""
        self._saved_attrs.append((obj, name, vars(obj).get(name)))
        setattr(obj, name, wrapper)

    def _swap(self, module, name: str, wrapper) -> None:
        self._saved_globals.append((module, name, getattr(module, name)))
        setattr(module, name, wrapper)

    def __enter__(self) -> "Instrument":
        eng = self.engine
        runners = [("target", eng.target)] + ([("draft", eng.draft)] if eng.draft is not None else [])
        self._swap(llm_engine, "decode_step", self._logged_step(llm_engine.decode_step))
        if not self.timed:
            return self
        for role, runner in runners:
            self._shadow(runner, "forward", self._timed_forward(role, runner.forward))
        if eng.draft is not None:  # on CUDA the draft's forwards 2..K run as one graph (``draft_chain``)
            self._shadow(eng.draft, "draft_chain", self._timed_chain(eng.draft.draft_chain))
        eagle = getattr(eng, "proposers", {}).get("eagle")
        if eagle is not None:  # the head is no ModelRunner: time its whole proposal (K head steps) instead
            self._shadow(eagle, "propose", self._timed_proposal("eagle", eagle.propose))
        self._shadow(eng, "_prefill", self._staged("prefill", eng._prefill))
        self._shadow(eng, "_decode", self._staged("decode", eng._decode))
        if self.profile:
            self._shadow(eng, "step", self._phase("step", eng.step))
            for role, runner in runners:
                self._shadow(runner.cache, "update", self._phase(f"cache_{role}", runner.cache.update))
                if runner.lean is not None:  # the engine's lean forward: its attention reads the pool in place
                    self._shadow(runner.lean, "forward", self._model_call(runner.lean.forward))
            self._swap(model_runner, "forward_with_cache", self._model_call(model_runner.forward_with_cache))
            self._swap(lean_llama, "paged_attention", self._phase("cache_{role}", lean_llama.paged_attention))
            self._swap(llm_engine, "top_logprobs", self._phase("sampling", llm_engine.top_logprobs))
            self._swap(spec_decode, "verify", self._phase("sampling", spec_decode.verify))
            for name in ("_make_room", "_choose", "_fail_unfittable"):
                self._shadow(eng, name, self._phase("scheduling", getattr(eng, name)))
            self._shadow(eng.scheduler, "admit", self._phase("scheduling", eng.scheduler.admit))
            self._shadow(eng, "_emit", self._phase("emit", eng._emit))
        return self

    def __exit__(self, *exc) -> None:
        for obj, name, before in reversed(self._saved_attrs):
            if before is not None:
                setattr(obj, name, before)
            elif name in vars(obj):
                delattr(obj, name)
        for module, name, original in reversed(self._saved_globals):
            setattr(module, name, original)
        self._saved_attrs.clear()
        self._saved_globals.clear()

    # ------------------------------------------------------------------ wrappers
    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()

    def _timed_forward(self, role: str, fn):
        """A model runner's ``forward``, keyed by its rows and their most new tokens; books phases to ``role``."""
        return self._timed(role, fn, lambda rows: (len(rows), max(len(r.token_ids) for r in rows)), runs_model=True)

    def _timed_chain(self, fn):
        """The draft's chain (its draws and forwards 2..K in one graph replay), as role "draft_chain", keyed by its
        rows and steps."""
        return self._timed("draft_chain", fn, lambda seq_ids, first, steps, *_: (len(seq_ids), steps),
                           runs_model=False)

    def _timed_proposal(self, role: str, fn):
        """A proposer's ``propose`` as one entry per step, keyed by its rows and the most tokens asked of a row."""
        return self._timed(role, fn, lambda rows: (len(rows.reqs), max(rows.ks, default=0)), runs_model=False)

    def _timed(self, role: str, fn, shape, runs_model: bool):
        """``fn`` timed (the device synchronised around it) and logged under ``shape`` of its arguments; a call that
        returns None ran nothing (a chain whose shape has no graph yet) and is not logged."""
        def timed(*args, **kwargs):  # the profile syncs around every call (a forward's ``sync`` aside)
            if runs_model:
                self._role = role
            self._sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self._sync()
            if out is not None:
                dt = time.perf_counter() - t0
                self.forwards.add(role, self._stage, *shape(*args), dt)
                self.raw[f"forward_{role}"] += dt
            return out
        return timed

    def _staged(self, stage: str, fn):
        def run(reqs):
            self._stage = stage
            try:
                return fn(reqs)
            finally:
                self._stage = "decode"
        return run

    def _logged_step(self, fn):
        def step(*args, **kwargs):
            results, timing = fn(*args, **kwargs)
            self.drafts.extend((r.k, r.accepted) for r in results if r.k)
            return results, timing
        return step

    def _phase(self, key: str, fn):
        """Time ``fn`` into ``raw[key]``; ``{role}`` in the key books it to the model whose forward is running."""
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.raw[key.format(role=self._role)] += time.perf_counter() - t0
                if key == "step":
                    self.steps += 1
        return timed

    def _model_call(self, fn):
        """The model's own forward: what remains of ModelRunner.forward is batch preparation."""
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self._sync()
            self.raw[f"model_{self._role}"] += time.perf_counter() - t0
            return out
        return call

    # ------------------------------------------------------------------ results
    def alpha(self) -> float | None:
        """Geometric maximum-likelihood α: accepted / (accepted + rejections), as engine.adaptive uses."""
        accepted = sum(a for _k, a in self.drafts)
        rejections = sum(1 for k, a in self.drafts if a < k)
        return accepted / (accepted + rejections) if accepted + rejections else None

    def phase_seconds(self) -> dict[str, float]:
        """Seconds per phase of :data:`PHASES` (profile mode); they add up to the steps' wall time.

        A forward is batch preparation (block tables, index tensors, mask) + the model call;
        the model call holds the paged-cache scatter/gather, reported apart as ``paged_cache`` (on the lean
        forward: the whole paged attention, i.e. write, gather and attention over the pool).
        """
        r = self.raw
        out = dict.fromkeys(PHASES, 0.0)
        for role in ("draft", "target"):
            out[f"{role}_forward"] = r[f"model_{role}"] - r[f"cache_{role}"]
            out["paged_cache"] += r[f"cache_{role}"]
            out["batch_prep"] += r[f"forward_{role}"] - r[f"model_{role}"]
        out["draft_forward"] += r["forward_eagle"]  # an EAGLE head's proposals: drafting compute, as a draft model's
        out["sampling"] = r["sampling"]
        out["scheduling"] = r["scheduling"]
        out["emit"] = r["emit"]
        out["python_other"] = max(0.0, r["step"] - r["forward_draft"] - r["forward_eagle"] - r["forward_target"]
                                  - r["sampling"] - r["scheduling"] - r["emit"])
        return out
