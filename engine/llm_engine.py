"""The engine: requests in, token events out, one ``step()`` at a time.

A step either prefills the newly admitted requests (one batched forward per model) or
advances every running request by one decode step: plain rows take one target token,
speculative rows take K draft proposals (batched across rows) and one batched target
verification. Rows of both kinds share the same target forward pass.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable

import torch

from engine import cleanup, observe, prefill
from engine.adaptive import (
    GUARD_WINDOW,
    REPLAYED,
    Decision,
    Policy,
    best_k,
    clamped_ema,
)
from engine.block_manager import BlockManager
from engine.config import EngineConfig, SamplingParams
from engine.cuda_graphs import GraphRunner
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import EngineStopped, InvalidRequest, KVCacheExhausted, PromptTooLong, QueueFull
from engine.kv_pool import KVPool, KVShape, num_blocks_for
from engine.model_runner import ModelRunner
from engine.proposers import DraftModelProposer, NgramProposer
from engine.sampler import top_logprobs
from engine.scheduler import Scheduler
from engine.sequence import FinishEvent, Request, Status, TokenEvent
from engine.spec_decode import StepTiming, decode_step, first_token
from engine.stats import MethodStats, SpecDecodingStats
from engine.step_plan import StepPlanner
from engine.threads import StepThreads
from engine.warmup import warmup

logger = logging.getLogger(__name__)

EMA = 0.9
SHARED_LATER_FROM = 4  # the batch from which the engine-wide acceptance estimates are updated as deferred work
# (``_learn_row``; where the engine overlaps host work with the device)
EAGER_KEEP = 0.9  # per decode step, the weight of the past in ``method_share`` (~10 steps) ...
EAGER_SHARE = 0.5  # ... above which a new adaptive request's prompt is read by that proposer in its prefill
EAGER_METHODS = ("model", "eagle")  # the proposers that can read a prompt in its prefill


def _planned_key(plan, results, methods: set[str]) -> tuple[int, str] | None:
    """(K, method) a step is timed as: the one every row planned, where every row drafted with that method or found
    nothing to draft (an n-gram miss) and no fallback drafted in its place; else the K every row drafted (one method);
    None for a mixed step (methods, or K where planned K differed). A step planned for n-gram is timed as what its
    longest draft made it (the rows are verified padded to it), a plain step where no row found a match: timed as
    planned, such steps made n-gram's times bimodal (a plain step's cost or a K-step's), the clamp on slow observations
    (STALL_CLAMP) held the average near the cheap ones, and at 8 clients on the CPU (T = 0.8) n-gram at K = 1 was
    predicted at 1.10x plain's time where its steps took 1.27x: the batch drafted with it at 0.86x plain's speed."""
    planned = set(plan.values())
    if len(planned) == 1:
        k, m = next(iter(planned))
        if not k:
            return 0, ""
        if methods <= {m}:
            if m == "ngram":
                drafted = max((r.k for r in results), default=0)
                return (drafted, m) if drafted else (0, "")
            return k, m
    kmax = max((r.k for r in results), default=0)
    if len(methods) <= 1 and all(r.k == kmax for r in results):
        return kmax, next(iter(methods), "")
    return None


class LLMEngine:
    """Synchronous core. Thread-safe entry points: ``add_request`` and ``abort``."""

    def __init__(self, target_model, tokenizer, draft_model=None, config: EngineConfig | None = None,
                 max_context: int | None = None, device_kind: str = "cpu", names: tuple[str, str | None] = ("target", None),
                 eagle_head=None, eagle_name: str | None = None):
        self.config = config or EngineConfig(target="<in-memory>", draft=None)
        self.tokenizer = tokenizer
        self.device_kind = device_kind
        self.target_name, self.draft_name = names
        self.max_context = max_context or getattr(target_model.config, "max_position_embeddings", 2048)
        self.vocab_size = len(tokenizer)
        self.eos_ids = self._eos_ids(target_model)
        self.target = self._runner(target_model)
        self.draft = self._runner(draft_model) if draft_model is not None else None
        self.scheduler = Scheduler(self.target, self.draft, self.config.max_running, self.config.max_waiting,
                                   lookahead=8)
        self.proposers = {"ngram": NgramProposer()}
        if self.draft is not None:
            self.proposers = {"model": DraftModelProposer(self.draft), **self.proposers}
        self.eagle_name = eagle_name if eagle_head is not None else None
        if eagle_head is not None:  # an EAGLE-3 head drafting from the target's own hidden states
            from engine.proposers.eagle import EagleProposer

            self.proposers["eagle"] = EagleProposer(eagle_head, self.target)
        cuda = self.target.device.type == "cuda"
        self.policy = Policy.for_device(cuda)
        # on a device that computes asynchronously (CUDA, ROCm): what the next step needs of a step is done at once
        # (tokens appended, caches rolled back, finishes decided); its token events with their text and its statistics
        # wait in ``_later`` and run while the next step's verification computes on the device (``_run_later``).
        # On an H200 at 8 clients they were 0.2-0.45 ms of host time after each step's last copy, with the device
        # idle (1.3-1.7 ms plain steps, 3-4 ms K = 4 steps of the demo pair). On a CPU nothing would overlap them
        self.overlap = cuda
        self._later: list[tuple[Request, Callable[[], None]]] = []
        self.threads = StepThreads.for_device(self.target.device, config.big_step_threads)
        self.planner = StepPlanner(self)
        self.spec_stats = SpecDecodingStats()
        self.method_stats: dict[str, MethodStats] = {}  # per drafting method, and "plain" (the charts, Compare)
        self.requests_served = 0
        self.tokens_generated = 0
        self._recent_tokens: deque[tuple[float, int]] = deque()  # (time, tokens emitted) over the last minute
        self._recent_sum = 0  # their token total: the rate is O(1) per snapshot (the worker takes one per step)
        self._seq_ids = itertools.count()
        self._lock = threading.Lock()
        self._inbox: deque[Request] = deque()
        self._aborts: set[str] = set()
        self._live: dict[str, Request] = {}
        self.fault_hook = None  # tests inject device faults here: callable(stage, rows)
        # step-time model for adaptive K (single target step = 1): measured by warm-up and each step
        self.t_target1 = 0.0
        self.draft_cost = 0.1
        self.eagle_cost = self.proposers["eagle"].cost_prior if "eagle" in self.proposers else 0.1
        self.verify_cost = 0.1
        # batch 1: the first verified position's extra cost, in plain steps (a two-token verification leaves the
        # one-row GEMV path), from moving averages of the target's forward by tokens verified (warm-up, then steps)
        self.first_cost = 0.1
        self._verify_s: dict[int, float] = {}  # tokens verified (1, 2) -> seconds of the target's forward
        self._plain_s: float | None = None  # seconds of a whole plain step
        self.alpha_prior = 0.6
        self.warmup_stats: dict | None = None  # set by warmup(): its seconds and the CUDA graphs it captured
        self.stopped = False
        self._prefilled_last = False
        # draft_method -> proposer -> the share of that draft_method's adaptive rows drafting with it, moving over steps
        self.method_share: dict[str, dict[str, float]] = {}
        self._first_logits: dict[Request, torch.Tensor] = {}  # prompt's last logits until the draft catches up
        self.device_name = device_kind
        self.dtype_name = str(next(target_model.parameters()).dtype).removeprefix("torch.")

    # ------------------------------------------------------------------ setup
    def _eos_ids(self, model) -> set[int]:
        ids = set()
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        for e in (eos if isinstance(eos, list) else [eos]):
            if e is not None:
                ids.add(int(e))
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    def _runner(self, model) -> ModelRunner:
        param = next(model.parameters())
        shape = KVShape.from_config(model.config)
        n_blocks = num_blocks_for(shape, param.dtype, param.device, self.config.block_size,
                                  self.config.kv_cache_tokens, self.config.kv_cache_memory_fraction)
        pool = KVPool(n_blocks, self.config.block_size, shape, param.dtype, param.device)
        return ModelRunner(model, pool, BlockManager(n_blocks, self.config.block_size), self.vocab_size)

    @property
    def has_draft(self) -> bool:
        return self.draft is not None

    def warmup(self, context: int = 128, reps: int = 5) -> None:
        """Load kernels and measure the step costs adaptive K starts from (engine.warmup)."""
        warmup(self, context, reps)

    def recommended_k(self) -> tuple[int, float]:
        return best_k(self.alpha_prior, self.draft_cost, self.verify_cost)

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, sink=None) -> Request:
        """Queue a request. Raises InvalidRequest / PromptTooLong / QueueFull / EngineStopped."""
        if self.stopped:
            raise EngineStopped("the engine is shutting down")
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InvalidRequest("prompt must be a non-empty string")
            prompt_ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        else:
            prompt_ids = [int(t) for t in prompt]
        if not prompt_ids:
            raise InvalidRequest("prompt must contain at least one token")
        if any(not 0 <= t < self.vocab_size for t in prompt_ids):
            raise InvalidRequest(f"prompt token ids must be in 0..{self.vocab_size - 1}")
        if len(prompt_ids) >= self.max_context:
            raise PromptTooLong(
                f"prompt is {len(prompt_ids)} tokens; this model's context is {self.max_context} tokens "
                f"(prompt + generated). Shorten the prompt to under {self.max_context} tokens."
            )
        req = Request(
            request_id=request_id or uuid.uuid4().hex[:12],
            seq_id=next(self._seq_ids),
            prompt_ids=prompt_ids,
            params=params,
            detok=IncrementalDetokenizer(self.tokenizer, prompt_ids, params.stop),
            sink=sink,
            use_draft=self.draft is not None and params.speculative and params.draft_method in ("model", "auto"),
            use_eagle="eagle" in self.proposers and params.speculative and params.draft_method in ("eagle", "auto"),
        )
        self.scheduler.refuse_unfittable(req, self.max_context)
        with self._lock:
            if len(self.scheduler.waiting) + len(self._inbox) >= self.config.max_waiting:
                raise QueueFull(f"the queue is full ({self.config.max_waiting} waiting requests); retry shortly")
            self._inbox.append(req)
            self._live[req.request_id] = req
        logger.debug("[%s] queued: %d prompt tokens, %s", req.request_id, len(prompt_ids), params)
        return req

    def abort(self, request_id: str) -> None:
        """Cancel a request; it finishes with reason ``cancelled`` at the next step."""
        with self._lock:
            self._aborts.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._inbox or self._aborts or len(self.scheduler))

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self._inbox)

    # ------------------------------------------------------------------ stepping
    def step(self) -> None:
        """Advance: cancellations, admission, then a prefill chunk or a decode step (alternating)."""
        with self._lock:
            while self._inbox:
                self.scheduler.waiting.append(self._inbox.popleft())
            aborts, self._aborts = self._aborts, set()
        for rid in aborts:
            req = self._live.get(rid)
            if req is not None and req.status is not Status.FINISHED:
                self._finish(req, "cancelled")
        self._fail_unfittable()
        for req in self.scheduler.admit():
            req.prefilled = False
        prefilling = [r for r in self.scheduler.running if not r.prefilled]
        decoding = [r for r in self.scheduler.running if r.prefilled]
        # prefill chunks and decode steps alternate, so a long prompt never stalls the others
        if prefilling and (not decoding or not self._prefilled_last):
            self._prefilled_last = True
            self._guarded(prefilling, self._prefill)
            self._run_later()  # a prefill overlaps nothing: the work waiting runs now
        elif decoding:
            self._prefilled_last = False
            self._guarded(decoding, self._decode)  # its verification runs the work waiting (``_run_later``)
        else:
            self._run_later()

    def _defer(self, req: Request | None, work: Callable[[], None]) -> None:
        """``req``'s bookkeeping that the next step does not need (None: no request's): run it while that step computes
        (``overlap``)."""
        if self.overlap:
            self._later.append((req, work))
        else:
            work()

    def _while_device(self) -> None:
        """Host work that overlaps a decode step's verification (``overlap``): the step before's deferred bookkeeping,
        then the decisions adaptive K makes a step ahead (``StepPlanner.decide_ahead``)."""
        self._run_later()
        self.planner.decide_ahead()

    def _run_later(self, req: Request | None = None) -> None:
        """The deferred work (``_defer``), in order: all of it, or ``req``'s (before its FinishEvent)."""
        if not self._later:
            return
        if req is None:
            work, self._later = self._later, []
        else:
            work = [w for w in self._later if w[0] is req]
            if not work:
                return
            self._later = [w for w in self._later if w[0] is not req]
        for _, fn in work:
            fn()

    def _fail_unfittable(self) -> None:
        if not self.scheduler.running and self.scheduler.waiting:
            head = self.scheduler.waiting[0]
            if not self.scheduler.fits_alone(head):
                self._finish(head, "error", "the request no longer fits the KV cache; raise the KV budget")

    def _guarded(self, reqs: list[Request], fn) -> None:
        """Run a step; a device OOM or unexpected error fails only these requests."""
        try:
            fn(reqs)
        except Exception as exc:
            oom = cleanup.is_out_of_memory(exc)
            logger.error("step failed for %s: %s", [r.request_id for r in reqs], exc, exc_info=not oom)
            cleanup.cleanup_memory(self.target.device)
            msg = f"internal error: {type(exc).__name__}: {exc}"
            if oom and fn == self._prefill:
                msg = (f"device out of memory while reading the prompt (up to {prefill.CHUNK} tokens a step): "
                       "lower the KV budget (--kv-cache-tokens) or use a smaller model or dtype")
            elif oom:
                msg = (f"device out of memory decoding {len(reqs)} requests at once: send fewer at a time, "
                       "lower max_new_tokens, or use a smaller model or dtype")
            for req in reqs:
                if req.status is not Status.FINISHED:
                    self._finish(req, "error", msg)

    def _prefills_draft(self, req: Request) -> bool:
        """Whether the draft model reads ``req``'s prompt in the prefill: with a fixed K, or where it is the proposer
        an adaptive request will likely draft with (``_eager``)."""
        return req.use_draft and self.draft is not None and (req.params.num_draft_tokens is not None
                                                             or self._eager(req) == "model")

    def _eager(self, req: Request) -> str:
        """The proposer that reads an adaptive request's prompt in its prefill: the one most adaptive rows of its
        draft_method drafted with lately, where over EAGER_SHARE of them did (``method_share``) and the request may use it
        (``StepPlanner.methods``); "" for none. Decided at the request's first prefill chunk."""
        if req.eager is None:
            shares = self.method_share.get(req.params.draft_method, {})
            share, method = max(((shares[m], m) for m in self.planner.methods(req) if m in shares), default=(0.0, ""))
            req.eager = method if req.params.num_draft_tokens is None and share > EAGER_SHARE else ""
        return req.eager

    def _fault(self, stage: str, reqs: list[Request]) -> None:
        if self.fault_hook is not None:
            self.fault_hook(stage, reqs)

    def _prefill(self, reqs: list[Request]) -> None:
        """One chunk of every prefilling request (oldest first, CHUNK tokens per model); a request whose
        prompt is complete gets its first token, drawn as a decode step would draw it."""
        self._fault("prefill", reqs)
        # the draft model reads a prompt here for requests that draft with it from their first step (a fixed K) or
        # are likely to (adaptive, while the adaptive rows draft with it: ``_eager``). Otherwise an adaptive
        # request's draft reads it when the request first drafts with it (its catch-up, which a probe weighs):
        # adaptive may never use it (plain, the EAGLE head, n-gram), and on an H200 with 1536-token prompts the
        # draft's prefill alone made adaptive requests that stayed plain 4-10% slower than plain ones. Read in the
        # decode step instead, a prompt's catch-up cost its whole batch: on an H100 at 8 clients (demo pair, fp16) a
        # fifth of the default's steps caught up on a new request's prompt, at 4.1 ms against 3.1 ms (the EAGLE head,
        # likewise, reads the prompt's features at the end of the prefill)
        drafting = [r for r in reqs if self._prefills_draft(r)]
        plans = [(self.target, prefill.plan_chunks(self.target, reqs, record_cached=True)),
                 (self.draft, prefill.plan_chunks(self.draft, drafting) if drafting else {})]
        while any(prefill.blocks_needed(runner, plan) > runner.blocks.num_free for runner, plan in plans if plan):
            victim = self.scheduler.preempt_newest()
            if victim is None:
                raise KVCacheExhausted("the KV cache cannot hold this prompt; raise the KV budget (--kv-cache-tokens)")
            self._release_proposers(victim)
            self._first_logits.pop(victim, None)
            for _, plan in plans:
                plan.pop(victim, None)
        tokens = sum(plans[0][1].values())
        threads = self.threads.choose(tokens, len(plans[0][1]))
        t0 = time.perf_counter()
        self._first_logits.update(prefill.run_chunks(self.target, plans[0][1]))
        if plans[1][1]:
            prefill.run_chunks(self.draft, plans[1][1])
        self.threads.observe(threads, tokens, time.perf_counter() - t0, len(plans[0][1]))
        done = []
        for req in reqs:
            if req.status is Status.RUNNING and prefill.complete(self.target, req) and \
                    (not self._prefills_draft(req) or prefill.complete(self.draft, req)):
                req.prefilled = True
                done.append(req)
                logits = self._first_logits.pop(req, None)
                if not req.output_ids and logits is not None:  # fresh request: its first token
                    self._emit(req, [first_token(req, logits)], logits[-1:], "target")
        eager = [r for r in done if r.status is Status.RUNNING and self._eager(r) == "eagle"]
        if eager:
            self.proposers["eagle"].read_prompts(eager)

    # the plan of a decode step (engine.step_plan); tests replace these two to force a plan
    def _choose(self, req: Request, batch: int) -> tuple[int, str]:
        return self.planner.choose(req, batch)

    def _fallbacks(self, plan: dict[Request, tuple[int, str]], batch: int) -> dict[Request, tuple[int, str]]:
        return self.planner.fallbacks(plan, batch)

    def _make_room(self, plan: dict[Request, tuple[int, str]]) -> dict[Request, tuple[int, str]]:
        """Preempt newest requests until this step's writes fit the KV pools."""
        while True:
            need = sum(self.target.blocks_for(r.seq_id, r.num_tokens - self.target.cached_len(r.seq_id) + k)
                       for r, (k, _) in plan.items())
            fits = need <= self.target.blocks.num_free and all(
                p.fits({r: k for r, (k, m) in plan.items() if m == name}) for name, p in self.proposers.items())
            if fits:
                return plan
            victim = self.scheduler.preempt_newest()
            if victim is None:
                raise KVCacheExhausted("the KV cache is full even for this request alone; raise the KV budget "
                                       "(--kv-cache-tokens) or lower max_new_tokens")
            self._release_proposers(victim)
            logger.info("[%s] preempted: KV cache full", victim.request_id)
            plan.pop(victim, None)

    def _release_proposers(self, req: Request) -> None:
        for p in self.proposers.values():
            p.release(req)

    def _decode(self, reqs: list[Request]) -> None:
        t_start = time.perf_counter()  # adaptive K times the whole step: planning and bookkeeping are per step too
        self.planner.drop_ahead()  # rows listed by a step that failed before its verification
        self.policy.tick(max(r.num_tokens for r in reqs), sampled=any(not r.params.greedy for r in reqs))
        any_adaptive = any(r.params.speculative and r.params.num_draft_tokens is None for r in reqs)
        held = self.policy.guard_holds(len(reqs)) if any_adaptive else None
        if held is None:
            planned = {r: self._choose(r, len(reqs)) for r in reqs}
        else:  # drafting lost to plain decoding as realized at this batch size: adaptive rows decode plain a while
            planned = {r: self._choose(r, len(reqs)) if r.params.num_draft_tokens is not None else (0, "") for r in reqs}
            self.policy.decision = Decision(
                0, "", f"plain at batch {len(reqs)}, {held.left} more steps after this: drafting "
                f"realized {held.ratio:.2f}x plain decoding's speed in its last window of up to {GUARD_WINDOW} steps here")
        planned = self.planner.one_k_per_method(self.planner.ngram_beside_model(
            self.planner.one_drafting_model(planned, len(reqs)), len(reqs)))
        plan = self._make_room(self.planner.refresh_plain(
            self.planner.plain_beside_drafts(self.planner.cap_batch(planned), len(reqs)), len(reqs)))
        self._fault("decode", list(plan))
        one_offs = GraphRunner.one_offs
        for p in self.proposers.values():
            p.backlog = 0
        # batch 1: the first verified position costs first_cost plain steps, each further one verify_cost, and n-gram
        # drafts only the positions that pay for it; in a batch a row's extra position costs the whole step (not
        # measured per position: left uncut)
        ngram = self.proposers["ngram"]
        ngram.position_cost, ngram.first_cost = (self.verify_cost, self.first_cost) if len(plan) == 1 else (0.0, 0.0)
        fallback = self._fallbacks(plan, len(reqs))
        self.planner.features(plan, fallback)
        results, timing = decode_step(self.target, self.proposers, plan, fallback, self.threads,
                                      while_device=self._while_device if self.overlap else None)
        kmax = max(r.k for r in results)
        methods = {r.method for r in results if r.k}
        adaptive_rows = [res for res in results if res.req.params.speculative and res.req.params.num_draft_tokens is None]
        if adaptive_rows:  # read by the next new request's prefill (``_eager``): it may read it a step late
            self._defer(None, functools.partial(self._count_methods, adaptive_rows))
        # a step that paid a one-off is no timing for adaptive K: a CUDA graph captured (or a shape run eagerly before
        # its capture), a draft catching up on tokens it skipped while plain (a probe at batch 8 after 100 plain steps
        # read 800 tokens: 60 ms for a ~6 ms step, kept as that K's time until it was drafted again), or a thread
        # count tried rather than preferred
        if one_offs == GraphRunner.one_offs and not any(p.backlog for p in self.proposers.values()) \
                and not timing.explored:
            # a step mixing methods times neither. A step is timed as the K every row planned: for n-gram that is what
            # a decision to plan K costs, rows without a match included (adaptive counts those as drafts of which
            # nothing was accepted). Timed only where all rows drafted K, n-gram at batch 8 on the CPU kept no time
            # at all (some row nearly always lacks a match), and the prior slope measured at batch 1 predicted K = 1
            # at 1.06x plain's time where it took 1.25x: the batch drafted at 0.8x plain's speed with a useless draft
            timed = _planned_key(plan, results, methods)  # observed below, with the step's whole wall time
            self._observe_times(kmax, timing, methods, len(results))
        else:
            timed = None
        self.policy.settle_tries(len(results), mixed=len({m for k, m in plan.values() if k}) > 1)
        lagging = [p for p in self.proposers.values() if p.backlog]
        catching_up = lagging[0] if len(lagging) == 1 and one_offs == GraphRunner.one_offs else None
        share = 1.0 / max(1, len(results))
        drafting = sum(1 for res in results if res.k or plan[res.req][0])  # the step's drafts (the shared estimates
        # forget by the step)
        # from SHARED_LATER_FROM rows, the engine-wide estimates' updates run as deferred work (``_learn_row``)
        later = functools.partial(self._defer, None) if self.overlap and len(results) >= SHARED_LATER_FROM else None
        for res in results:
            r, k, accepted = res.req, res.k, res.accepted
            n = r.num_tokens
            self._learn_row(res, plan[r], drafting, later)  # what the next step's decisions read: now
            self._defer(r, lambda res=res, planned=plan[r]: self._observe_row(res, planned, timing, share))
            self.target.truncate(r.seq_id, n + accepted)
            for p in self.proposers.values():
                p.rollback(r, n + accepted)
            sources = ["draft"] * accepted + ["target" if accepted < k else ("bonus" if k else "target")]
            self._emit(r, res.tokens, res.logits, sources)
        eagle = self.proposers.get("eagle")
        if eagle is not None and eagle.reads_waiting:  # features piled up for rows drafting otherwise: read later
            self._defer(None, eagle.read_waiting)
        self.spec_stats.draft_time_s += timing.propose_s
        self.spec_stats.target_time_s += timing.target_s
        # the step's time as adaptive K weighs it: from planning to the last row's tokens emitted. The host's share of a
        # step is about the same at every K (0.4-0.6 ms of a 6 ms step at 8 clients on an H200, 0.6-0.9 ms of ~25 ms on
        # the 2-core CPU), so leaving it out made each extra step look cheaper than it is and favoured short K
        wall = time.perf_counter() - t_start
        if timed is not None:
            deferred = functools.partial(self._defer, None) if self.overlap else None
            self.policy.times.observe(timed[1], len(results), timed[0], wall, later=deferred)
            if timed == (0, ""):
                self.policy.observe_plain(len(results), wall)
        predicted = None
        if catching_up is not None:
            # what reading skipped tokens costs a proposer: a probe waits until its catch-up is amortised (a step
            # that tried a CPU thread count counts too: the catch-up dominates it, and it may be the only one)
            name = catching_up.name
            predicted = self.policy.times.predict(name, len(results), kmax, self.planner.slope(name))
            if predicted:
                self.policy.observe_catch_up(name, wall - predicted, catching_up.backlog)
        # adaptive rows drafted: was it worth it? (a graph captured or a thread count tried is no drafting cost)
        if kmax and one_offs == GraphRunner.one_offs and not timing.explored \
                and all(r.params.num_draft_tokens is None for r in plan):
            # a proposer that read tokens it skipped (what the batch decoded plain, a new request's prompt) counts at
            # its step's predicted time: the catch-up is the cost of having decoded plain, paid once. Charged to the
            # window, it held the batch plain for good: on an H200 at 8 clients (demo pair, T = 0.8) the first 8
            # steps after a hold, one or two of them the rows' catch-up, realized 0.49-0.64x plain decoding's speed
            # (0.77-0.79x without it), each such early verdict doubled the hold, and so the next catch-up, to 256 steps
            # (adaptive 0.86-0.93x plain where fixed K = 4 ran 1.09x). A step that also mixed methods is not judged
            if not lagging:
                charged = wall
            elif predicted and len(methods) == 1:
                charged = min(wall, predicted)
            else:
                charged = None
            if charged is not None:  # a hold it starts may start a step late: deferred where the device overlaps
                self._defer(None, functools.partial(self.policy.guard_observe, len(results),
                                                    sum(len(res.tokens) for res in results), charged))

    def _count_methods(self, rows) -> None:
        """``method_share`` after a step, by the rows' draft_method: a request held to one proposer says nothing of what
        an "auto" request will draft. Pooled, the bench's n-gram and EAGLE passes (run between the default's requests,
        one prompt at a time) had every default request's prompt read by the head in its prefill, and on an H100 (demo
        pair, fp16) the default then drafted with the draft model, which read the prompt in its first decode steps:
        its drafting steps took 6-20% longer than fixed K's at its mean K (g100-g107)."""
        rows_of: dict[str, int] = {}
        drafted: dict[tuple[str, str], int] = {}
        for res in rows:  # one pass: this runs at every step
            key = res.req.params.draft_method
            rows_of[key] = rows_of.get(key, 0) + 1
            if res.k:
                drafted[key, res.method] = drafted.get((key, res.method), 0) + 1
        for key, n in rows_of.items():
            shares = self.method_share.setdefault(key, dict.fromkeys(EAGER_METHODS, 0.0))
            for m, share in shares.items():
                shares[m] = EAGER_KEEP * share + (1 - EAGER_KEEP) * drafted.get((key, m), 0) / n

    def _learn_row(self, res, plan: tuple[int, str], rows: int = 1,
                   later: Callable[[Callable[[], None]], None] | None = None) -> None:
        """A row's acceptance evidence for adaptive K after a decode step (kept in step: the next step decides from it;
        deferred, the drafts of each step reached the decisions a step late, and the first steps of a request measured
        methods twice as often). From batch SHARED_LATER_FROM on, where the engine overlaps host work with the device,
        the engine-wide estimates' updates are handed to ``later`` (``_defer``; ``Policy.observe``): there a row re-decides once
        in many steps, and at 8 clients on an H100 (demo pair, fp16) adaptive's host work outside the device's step
        ran 0.08-0.15 ms over fixed K's, on steps of 2.2-3 ms."""
        r, k, accepted = res.req, res.k, res.accepted
        planned_k, planned = plan
        if planned_k and planned and (not k or res.method != planned) and r.params.num_draft_tokens is None:
            # planned to draft but the proposer found nothing (n-gram: no match): for adaptive K that is a
            # draft of which nothing was accepted, since the step cost what a drafting step costs (or the
            # fallback drafted instead: then the fallback's evidence is its own, below)
            self.policy.observe(planned, planned_k, 0, r.adaptive, rows=rows, later=later)
            r.adaptive.observe(planned, planned_k, 0)
        if k:
            adaptive = r.params.num_draft_tokens is None  # a fixed K's drafts check no prediction
            # the draft model's runs are the request's whatever its K (``Policy.observe``)
            self.policy.observe(res.method, k, accepted, r.adaptive if adaptive or res.method in REPLAYED else None,
                                r.adaptive.sampling, rows, later, at=r.num_tokens)
            r.adaptive.observe(res.method, k, accepted)
            if adaptive:
                self.alpha_prior = EMA * self.alpha_prior + (1 - EMA) * (accepted / k)
        runs = r.adaptive.runs
        if runs is not None and runs.pending and not (k and res.method in REPLAYED):
            self.policy.cut_runs(r.adaptive, later)  # it stopped drafting with the model: its open run ends unseen

    def _observe_row(self, res, plan: tuple[int, str], timing: StepTiming, share: float) -> None:
        """A row's statistics after a decode step (deferred, ``_defer``): its method's, the request's, the engine's."""
        r, k, accepted = res.req, res.k, res.accepted
        planned_k, planned = plan
        method = res.method if k else (planned if planned_k and planned else "plain")
        self.method_stats.setdefault(method, MethodStats()).observe_step(
            k, accepted, len(res.tokens), timing.total_s * share, miss=not k and method != "plain")
        if k:
            r.stats.observe_draft(k, accepted, res.method)
            r.stats.draft_time_s += timing.propose_s * share
            r.stats.target_time_s += timing.target_s * share
            self.spec_stats.observe_draft(k, accepted)

    def _observe_times(self, kmax: int, timing: StepTiming, methods: set[str], batch: int) -> None:
        """Track the single-step target time and the draft/target cost ratios (the doctor's model) of the
        draft model and the EAGLE head, each from steps that drafted with it alone; at batch 1 also the first
        verified position's cost (``first_cost``)."""
        if not timing.split:  # the draft's work ran within target_s: neither phase's time is known apart
            return
        t1 = timing.target_s / (1.0 + self.verify_cost * kmax)
        self.t_target1 = EMA * self.t_target1 + (1 - EMA) * t1 if self.t_target1 else t1
        if batch == 1 and kmax <= 1:
            self.observe_verify(kmax + 1, timing.target_s, timing.total_s if kmax == 0 else None)
        if kmax > 0 and timing.propose_s > 0 and methods in ({"model"}, {"eagle"}):
            cost = timing.propose_s / kmax / self.t_target1
            if methods == {"model"}:
                self.draft_cost = EMA * self.draft_cost + (1 - EMA) * cost
            else:
                self.eagle_cost = EMA * self.eagle_cost + (1 - EMA) * cost

    def observe_verify(self, tokens: int, forward_s: float, plain_step_s: float | None = None) -> None:
        """A batch-1 target forward over ``tokens`` (1 or 2) took ``forward_s`` (and a plain step, all of it,
        ``plain_step_s``): update the moving averages ``first_cost`` comes from (``adaptive.clamped_ema``)."""
        self._verify_s[tokens] = clamped_ema(self._verify_s.get(tokens), forward_s, EMA)
        if plain_step_s is not None:
            self._plain_s = clamped_ema(self._plain_s, plain_step_s, EMA)
        one, two = self._verify_s.get(1), self._verify_s.get(2)
        if one and two and self._plain_s:
            self.first_cost = max(self.verify_cost, (two - one) / self._plain_s)

    # ------------------------------------------------------------------ output
    def _emit(self, req: Request, tokens: list[int], logits: torch.Tensor, sources) -> None:
        """Append a step's tokens to the request and decide whether it finishes; their TokenEvents (with the text) are
        sent now, or deferred (``_defer``) where nothing this step decides needs the text (no stop strings) and no
        logprobs read the step's logits (a CUDA graph's output buffer, overwritten by the next step)."""
        if isinstance(sources, str):
            sources = [sources] * len(tokens)
        now = time.perf_counter()
        want_logprobs = req.params.logprobs is not None  # only then a row of logits is read (iterating the tensor
        # would make a view per token: ~4 us of a ~15 us emit)
        later = self.overlap and not want_logprobs and not req.detok.stop
        held: list[tuple[int, str, int, bool]] = []
        reason, emitted = None, 0
        for i, (tok, source) in enumerate(zip(tokens, sources)):
            if req.status is Status.FINISHED:
                break
            req.output_ids.append(tok)
            req.stats.num_generated_tokens += 1
            self.tokens_generated += 1
            emitted += 1
            if req.stats.ttft_s is None:
                req.stats.ttft_s = now - req.arrival
            is_eos = tok in self.eos_ids and not req.params.ignore_eos
            if later:
                held.append((tok, source, len(req.output_ids) - 1, is_eos))
            else:
                text = "" if is_eos else req.detok.add(tok)
                lp = top = None
                if want_logprobs:
                    lp, top = top_logprobs(logits[i], tok, req.params.logprobs)
                req.emit(TokenEvent(req.request_id, tok, text, len(req.output_ids) - 1, source, now - req.arrival,
                                    lp, top))
            if is_eos:
                reason = "eos"
            elif req.detok.stopped:
                reason = "stop"
            elif req.remaining <= 0 or req.num_tokens >= self.max_context:
                reason = "length"
            if reason:
                break
        if held:
            self._defer(req, lambda: self._token_events(req, held, now))
        if emitted:
            self._count_recent(now, emitted)  # the recent-rate window: one entry per step and row, not per token
        if reason:
            self._finish(req, reason)

    @staticmethod
    def _token_events(req: Request, held: list[tuple[int, str, int, bool]], now: float) -> None:
        """Deferred TokenEvents of one step (``_emit``): the text of each token, then its event."""
        t_s = now - req.arrival
        for tok, source, index, is_eos in held:
            req.emit(TokenEvent(req.request_id, tok, "" if is_eos else req.detok.add(tok), index, source, t_s))

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        self._run_later(req)  # its deferred token events and statistics come first
        # the draft model's open run of accepted tokens ends unseen; deferred as the step's other updates of the shared
        # estimates are (``_learn_row``: the step's rows are the running ones), so they keep their order
        self.policy.cut_runs(req.adaptive, functools.partial(self._defer, None)
                             if self.overlap and len(self.scheduler.running) >= SHARED_LATER_FROM else None)
        self.scheduler.remove(req)
        self._release_proposers(req)
        self._first_logits.pop(req, None)
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.error = error
        req.stats.total_s = time.perf_counter() - req.arrival
        tail = req.detok.flush() if reason != "stop" else ""
        self._live.pop(req.request_id, None)
        self.requests_served += 1
        if error:
            logger.warning("[%s] finished with error: %s", req.request_id, error)
        else:
            logger.info("[%s] finished (%s): %d tokens, %.1f tok/s, acceptance %.2f", req.request_id, reason,
                        req.stats.num_generated_tokens, req.stats.tokens_per_second, req.stats.acceptance_rate)
        req.emit(FinishEvent(req.request_id, reason, req.detok.text, list(req.output_ids), req.stats, error, tail))

    # ------------------------------------------------------------------ sync helpers
    def generate(self, prompt: str | list[int], params: SamplingParams | None = None, on_event=None) -> FinishEvent:
        """Run one request to completion on the calling thread (tests, CLI, bench); ``on_event``
        sees every event as it happens."""
        done: list[FinishEvent] = []

        def sink(ev) -> None:
            if on_event is not None:
                on_event(ev)
            if isinstance(ev, FinishEvent):
                done.append(ev)

        req = self.add_request(prompt, params, sink=sink)
        while not done:
            self.step()
        assert req.status is Status.FINISHED
        return done[0]

    RECENT_WINDOW_S = 60.0

    def _count_recent(self, now: float, n: int) -> None:
        self._recent_tokens.append((now, n))
        self._recent_sum += n
        self._forget_recent(now, self.RECENT_WINDOW_S)

    def _forget_recent(self, now: float, window_s: float) -> None:
        while self._recent_tokens and self._recent_tokens[0][0] < now - window_s:
            self._recent_sum -= self._recent_tokens.popleft()[1]

    def tokens_per_second_recent(self) -> float:
        """Tokens per second emitted over the last RECENT_WINDOW_S (or since the first of them, if later)."""
        now = time.perf_counter()
        self._forget_recent(now, self.RECENT_WINDOW_S)
        if not self._recent_tokens:
            return 0.0
        span = max(1.0, now - self._recent_tokens[0][0]) if len(self._recent_tokens) > 1 else self.RECENT_WINDOW_S
        return self._recent_sum / min(self.RECENT_WINDOW_S, span)

    # ------------------------------------------------------------------ observation
    def info(self) -> dict:
        return observe.engine_info(self)

    def snapshot(self) -> dict:
        """Everything the API, UI and charts show, as plain data. Call on the engine thread."""
        return observe.engine_snapshot(self)
