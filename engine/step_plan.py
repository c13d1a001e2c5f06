"""What each running request does in the next decode step: its drafting method and K, decided per request by
adaptive K (engine.adaptive), then made to fit the batch: rows of one method share one K, n-gram rows beside a
model's drafts take the model where it expects more of them, a batch whose rows planned different K is capped at what
pays for all of them, and n-gram rows get the method that drafts where the lookup finds no match. A plan maps each
request to (K, method); K 0 is a plain step."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from engine.adaptive import SWITCH_MARGIN, Decision, best_drafting_k, bucket, keep_settled
from engine.proposers.draft_model import NORMAL_BEHIND
from engine.sequence import Status

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine
    from engine.sequence import Request

Plan = dict["Request", tuple[int, str]]
LIFT_MIN = 0.2  # expected accepted tokens a plain row needs to draft beside a step's model drafts
# (``plain_beside_drafts``): its share of the proposer's forwards, one row more of a batch
MODEL_METHODS = ("model", "eagle")  # proposers that run a forward pass to draft

FALLBACK_RECHECK = 8  # decode steps between re-evaluations of an n-gram row's fallback (model or EAGLE head)


def _model_drafts(plan: Plan, batch: int) -> tuple[int, str] | None:
    """(K, method) of a step's drafts with a model (the draft model or the EAGLE head; the largest K), or None at batch 1
    and where no row drafts with a model: what rows beside them may draft too (``StepPlanner.ngram_beside_model``,
    ``plain_beside_drafts``)."""
    if batch < 2:
        return None
    return max(((k, m) for k, m in plan.values() if k and m in MODEL_METHODS), default=None)


class StepPlanner:
    """Reads the engine's policy, proposers and measured cost ratios; holds only the fallback memo."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._fallback_memo: weakref.WeakKeyDictionary[Request, tuple[int, tuple[int, str]]] = \
            weakref.WeakKeyDictionary()  # n-gram row -> (clock, its fallback), while it runs
        self._drafted = ""  # the model method adaptive rows drafted with in the last step that drafted with one
        self._shared_k: dict[str, int] = {}  # per method: the K its adaptive rows last shared (``one_k_per_method``)
        self._summed_memo: dict[str, tuple[list, int]] = {}  # per method: (the rows' decisions, the K they shared)
        self._ahead: list[tuple[Request, int]] = []  # (row, batch): decided while this step computes (``decide_ahead``)
        self._recent: dict[tuple[str, str, int], Decision] = {}  # (draft_method, sampling class, batch bucket): the
        # last decision that stood a step (``_join``)

    def methods(self, req: Request) -> list[str]:
        """Proposers this request may use, by its draft_method and what is loaded (listed once per request and
        params: this runs for every row of every step)."""
        hit = req.methods
        if hit is not None and hit[0] is req.params:
            return hit[1]
        m, loaded = req.params.draft_method, self.engine.proposers
        if not req.params.speculative:
            out = []
        elif m == "auto":
            out = [name for name in loaded if name != "model" or req.use_draft]
        else:
            out = [m] if m in loaded and (m != "model" or req.use_draft) else []
        req.methods = (req.params, out)
        return out

    def slope(self, method: str) -> float:
        """A drafted token's cost in target steps (verification plus drafting), as measured so far."""
        e = self.engine
        return e.verify_cost + {"model": e.draft_cost, "eagle": e.eagle_cost}.get(method, 0.0)

    def catch_up(self, req: Request, methods: list[str]) -> dict[str, float]:
        """Seconds each proposer would spend reading what it skipped of ``req`` before drafting, by its measured
        per-token catch-up (methods not yet measured are left out)."""
        per = self.engine.policy.catch_up_s
        return {m: per[m] * self.engine.proposers[m].behind(req) for m in methods if m in per}

    def room(self, req: Request) -> int:
        return max(0, min(req.remaining - 1, self.engine.max_context - req.num_tokens - 1))

    def choose(self, req: Request, batch: int) -> tuple[int, str]:
        """(K, method) for this request's next step; K 0 = plain."""
        if req.params.num_draft_tokens is None:  # as decided: checked before the request's methods are listed
            policy = self.engine.policy
            d = policy.standing(req.adaptive, batch) or policy.hold_plain(req.adaptive, batch)
            if d is not None:
                return (min(d.k, self.room(req)), d.method) if d.k else (0, d.method)
        methods = self.methods(req)
        if not methods:
            return 0, ""
        if req.params.num_draft_tokens is not None:
            return min(req.params.num_draft_tokens, self.room(req)), methods[0]
        policy = self.engine.policy
        d = policy.reuse(req.adaptive, methods, batch)
        if d is not None and self.engine.overlap:
            if policy.expires_next(req.adaptive):
                self._ahead.append((req, batch))
            if d.k and not d.forced:  # a decision that stood: what a new row of its kind drafts first (``_join``)
                self._recent[req.params.draft_method, req.adaptive.sampling, req.adaptive.bucket] = d
        if d is None:
            d = self._carry(req, methods, batch) or self._join(req, methods, batch) or self._decide(req, methods, batch)
        req.adaptive.fallback_k = d.fallback_k if "model" in methods else 0
        # plain for now: the draft keeps its cache, so a later probe only catches up the tokens since
        # (a released cache would make every probe re-read the whole context)
        return min(d.k, self.room(req)), d.method

    def _carry(self, req: Request, methods: list[str], batch: int) -> Decision | None:
        """A speculating row's standing decision for one step more where the batch moved to another bucket (rows
        finished or joined; the engine's ``overlap``): its full decision at the new bucket is made while that step
        computes (``decide_ahead``). Every row of a batch re-decides at a new bucket, and on the step's path that was
        a row's ~0.1-0.3 ms of host time each, at every wave's first and last steps. None where the decision is not one
        to draft on as decided (plain, forced, resumed), or its proposer would catch up first."""
        state, policy = req.adaptive, self.engine.policy
        last = state.last
        if not self.engine.overlap or last is None or not last.k or last.forced or state.resume is not None \
                or last.method not in methods or bucket(batch) == state.bucket or self._behind(req, last.method):
            return None
        state.spec_steps, state.stands = 0, None  # no standing at the new bucket: where the decision ahead is none (to
        # measure, to decode plain), the next step decides in full (``Policy.reuse`` re-decides at a multiple of
        # ``spec_recheck``), also where the batch is back at its old size (``Policy.standing``)
        policy.decision = last
        self._ahead.append((req, batch))
        return last

    def _join(self, req: Request, methods: list[str], batch: int) -> Decision | None:
        """A new adaptive row's first step (the engine's ``overlap``): the standing decision of a row of the batch of
        its draft_method and sampling class (``AdaptiveState.stands``; at another bucket that row drafts it this step
        too, ``_carry``), else the last decision of its kind that stood a step at this batch bucket (a request before
        it), where the row may draft with its method without a catch-up first. The row's own full decision is made
        while that step computes (``decide_ahead``) and stands from the next step (None from it: the next step decides
        in full). The batch shares one K per method anyway (``one_k_per_method``); a new row's full decision on the
        step's path cost ~0.3 ms of host time at 8 clients on the 2-core CPU (CUDA's settings), in one step of ten,
        and a batch that starts together decided every row there. None: nothing of its kind stood yet."""
        state = req.adaptive
        if not self.engine.overlap or state.last is not None:
            return None
        key = (req.params.draft_method, state.sampling)
        join = self._recent.get((*key, bucket(batch))) if batch > 1 else None
        for r in self.engine.scheduler.running:
            a = r.adaptive
            d = a.stands
            if d is not None and d is a.last and r is not req and d.method in methods \
                    and r.params.num_draft_tokens is None and (r.params.draft_method, a.sampling) == key:
                join = d
                break
        if join is None or join.method not in methods or self._behind(req, join.method):
            return None
        state.last = join
        self._ahead.append((req, batch))
        return join

    def _match(self, req: Request, methods: list[str], batch: int) -> None:
        """Before a full decision at batch 1: what n-gram's lookup would draft for ``req`` now
        (``NgramProposer.expected``). In a batch the request's pooled estimate stays (``ngram_now`` None): decisions
        stand a few steps there, a row's n-gram K makes the whole batch's step a K-step, and an order's prior (0.5 a
        position) before its first drafts at a sampling class had rows of 8 clients on the CPU at T = 0.8 draft n-gram
        beside the draft model's K = 1 at 0.86x plain's speed."""
        if "ngram" in methods:
            req.adaptive.ngram_now = self.engine.proposers["ngram"].expected(req) if batch == 1 else None

    def drop_ahead(self) -> None:
        self._ahead.clear()

    def decide_ahead(self) -> None:
        """The full decisions of the rows whose standing decision ends at the next step, made while this step computes
        on the device (``Policy.choose``'s ``ahead``; the engine's ``overlap``); a row finished meanwhile is skipped."""
        rows, self._ahead = self._ahead, []
        for req, batch in rows:
            if req.prefilled and req.status is Status.RUNNING:
                self._decide(req, self.methods(req), batch, ahead=True)

    def _decide(self, req: Request, methods: list[str], batch: int, ahead: bool = False) -> Decision | None:
        """A full decision of adaptive K for ``req`` (``Policy.choose``) from the planner's view: the methods' cost
        slopes, their catch-ups and n-gram's match now."""
        self._match(req, methods, batch)
        return self.engine.policy.choose(req.adaptive, {m: self.slope(m) for m in methods}, batch,
                                         self.engine.alpha_prior, self.catch_up(req, methods), ahead=ahead)

    def one_drafting_model(self, plan: Plan, batch: int) -> Plan:
        """Adaptive rows that draft with a model (the draft model or the EAGLE head) draft with one of them per step.
        Each row decides as if the step cost what a step of its method costs, and step times are kept (and only
        taken) per method; a step with both runs both drafting chains one after the other, a cost no row's
        decision weighed and no timing ever shows (at 8 concurrent default requests on the demo pair, a third of
        the steps mixed them). The method whose best K gives those rows the highest summed predicted gain wins (a
        row that must measure, probe or explore decides it); a row that chose the other takes the winner's best K
        for it, or decodes plain where that predicts no gain; a row whose request named its method keeps it. n-gram
        rows are left alone: their lookup costs no forward, and rows where it finds nothing draft with their fallback
        in the same step."""
        rows = [r for r, (k, m) in plan.items() if k and m in MODEL_METHODS and r.params.num_draft_tokens is None
                and r.adaptive.last is not None]
        methods = {plan[r][1] for r in rows}
        if len(methods) < 2:
            self._drafted = next(iter(methods), self._drafted)
            return plan
        policy, alpha = self.engine.policy, self.engine.alpha_prior
        forced = [plan[r][1] for r in rows if r.adaptive.last.forced]
        allowed = {r: self.methods(r) for r in rows}
        gains = {m: {r: policy.gains(r.adaptive, m, batch, alpha, self.slope(m)) for r in rows if m in allowed[r]}
                 for m in methods}
        # a row whose request named its method keeps it (and its gain) where another wins
        summed = {m: sum(_best(gains[m][r] if r in gains[m] else gains[plan[r][1]][r])[1] for r in rows)
                  for m in sorted(methods)}
        win = forced[0] if forced else max(summed, key=summed.get)
        if not forced and self._drafted in summed and summed[win] < SWITCH_MARGIN * summed[self._drafted]:
            win = self._drafted  # the method that drafted last step stays unless the other clearly wins (catch-up)
        for r in rows:
            if plan[r][1] == win or r not in gains[win]:
                continue
            k, g = _best(gains[win][r])
            k = k if g > 1.0 else 0
            plan[r] = (min(k, self.room(r)), win)
            r.adaptive.last = Decision(k, win, f"{win} K={k}: one drafting model per step at batch {batch} "
                                               f"(predicted {g:.2f}x plain)", gains[win][r])
        self._drafted = win
        return plan

    def ngram_beside_model(self, plan: Plan, batch: int) -> Plan:
        """In a step that drafts with a model (the draft model or the EAGLE head) at K, an adaptive n-gram row that may
        draft with that model takes it where the model's K expects more tokens of the row than its n-gram draft: the
        step costs the model's K-step whatever the row drafts, so the row's choice is only which draft gives it more
        tokens (its decision, which weighed n-gram at n-gram's own step time, did not see that). At 8 clients on the
        CPU at T = 0.8, rows drafting n-gram beside the draft model's K = 2 were 10-20% of adaptive's steps. A row
        that must measure, probe or explore, or whose model would first catch up, keeps its plan."""
        drafts = _model_drafts(plan, batch)
        if drafts is None:
            return plan
        step_k, method = drafts
        policy, alpha = self.engine.policy, self.engine.alpha_prior
        for r, (k, m) in plan.items():
            d = r.adaptive.last
            if m != "ngram" or not k or not self._may_join(r, d, method):
                continue
            k_model = min(step_k, self.room(r))
            mine = policy.expected(r.adaptive, "ngram", alpha)[k]
            theirs = policy.expected(r.adaptive, method, alpha)[k_model]
            if theirs > mine:
                gains = policy.gains(r.adaptive, method, batch, alpha, self.slope(method))
                plan[r] = (k_model, method)
                r.adaptive.last = Decision(k_model, method, f"{method} K={k_model} beside the step's {method} drafts "
                                                            f"({theirs:.2f} tokens expected, n-gram K={k} {mine:.2f})",
                                           gains)
        return plan

    def _may_join(self, r: Request, d: Decision | None, method: str) -> bool:
        """Whether adaptive row ``r`` (its last decision ``d``) may draft with a step's ``method`` in place of its own
        plan: not a fixed-K request, not a decision that must measure, probe or explore, a method the row may use, and
        no catch-up of that proposer first (``ngram_beside_model``, ``plain_beside_drafts``)."""
        return r.params.num_draft_tokens is None and d is not None and not d.forced and method in self.methods(r) \
            and not self._behind(r, method)

    def plain_beside_drafts(self, plan: Plan, batch: int) -> Plan:
        """In a step that drafts with a model (the draft model or the EAGLE head) at K, an adaptive row that decided to
        decode plain drafts that K too, where its own expected tokens there exceed one by LIFT_MIN: every row of the
        step is verified at K + 1 positions anyway (the runner pads the rows to the longest, on the CPU as in CUDA
        graphs), so the row's drafts cost only its share of the proposer's batched forwards. Its decision was weighed
        as if its K made the whole step's cost, and rows that decided plain beside drafting ones took a drafting step's
        time for one token each: at 8 clients at T = 0.8 on the CPU such steps emitted 12 tokens in 16 ms, below plain
        decoding's rate. Not a row held plain by the speed guard (planned without a method), one that must measure or
        time plain (forced, or decided without predictions), a fixed-K or plain request, nor one whose proposer would
        first catch up on tokens it skipped."""
        drafts = _model_drafts(plan, batch)
        if drafts is None:
            return plan
        step_k, method = drafts
        policy, alpha = self.engine.policy, self.engine.alpha_prior
        for r, (k, m) in plan.items():
            d = r.adaptive.last
            if k or not m or d is None or not d.gains or not self._may_join(r, d, method):
                continue
            k_row = min(step_k, self.room(r))
            if k_row > 0 and policy.expected(r.adaptive, method, alpha)[k_row] >= 1.0 + LIFT_MIN:
                plan[r] = (k_row, method)
        return plan

    def one_k_per_method(self, plan: Plan) -> Plan:
        """Adaptive rows of one method share the K with the highest summed predicted gain: a step costs
        what its longest row costs, and step times are measured (and keyed) that way."""
        # every row plain: the batch shares no K (grouping its rows, as below, cost adaptive's all-plain steps at 8
        # clients on the CPU 8 us more than plain's)
        if not any(k for k, _m in plan.values()):
            self._shared_k.clear()
            return plan
        groups: dict[str, list[Request]] = {}
        alike: dict[str, int | None] = {}  # per method: the K all its rows decided, unforced (None: they differ)
        for r, (_k, m) in plan.items():
            d = r.adaptive.last
            if m and d is not None and d.gains and r.params.num_draft_tokens is None:
                rows = groups.get(d.method)
                if rows is None:
                    groups[d.method], alike[d.method] = [r], None if d.forced else d.k
                else:
                    rows.append(r)
                    if alike[d.method] != d.k or d.forced:
                        alike[d.method] = None
        for method, rows in groups.items():
            if len(rows) < 2 or alike[method] is not None:
                self._shared_k[method] = rows[0].adaptive.last.k
                continue  # one row, or all chose the same K: it maximises their summed gain too
            forced = [r.adaptive.last.k for r in rows if r.adaptive.last.forced]
            # a row that must measure, probe or explore sets the K: the batch pays for that step anyway, and
            # every row's draft in it is evidence (a prediction must not veto the measurement it waits for)
            if forced:
                k = max(forced)
            else:
                decisions = [r.adaptive.last for r in rows]
                memo = self._summed_memo.get(method)
                if memo is not None and len(memo[0]) == len(decisions) and all(
                        a is b for a, b in zip(memo[0], decisions)) and self._shared_k.get(method) == memo[1]:
                    k = memo[1]  # the rows' decisions stand (on CUDA at 8 clients a row re-decides ~once in 256
                    # steps): the sum below, over 8 rows and 9 K every step, was about a tenth of adaptive's extra host
                    # time there (cProfile, H100)
                else:
                    summed = {kk: sum(d.gains.get(kk, 0.0) for d in decisions) for kk in decisions[0].gains}
                    # the K the batch shared last stands unless another clearly beats it (as a row's, Policy.choose)
                    k = self._shared_k[method] = keep_settled(summed, max(summed, key=summed.get),
                                                              self._shared_k.get(method, 0), self.engine.policy.k_margin)
                    self._summed_memo[method] = (decisions, k)
            for r in rows:
                plan[r] = (min(k, self.room(r)), method)
        return plan

    def cap_batch(self, plan: Plan) -> Plan:
        """Where adaptive rows planned different K (some plain, some drafting), cap K at what pays for the
        whole batch (Policy.step_cap). Steps with a fixed-K row or a row that must measure, probe or explore
        keep their plan, and so do steps whose rows all planned one K (each row's gain then holds for all), rows
        cut to their room (a request's last tokens) aside: such a row changes no other row's step. At 8 clients most
        such steps were a row near its end beside the others' shared K, and the batch's predictions cost ~30 us a
        step on the 2-core CPU for a cap that stood."""
        ks = {k for k, _ in plan.values()}
        if len(plan) < 2 or len(ks) < 2:
            return plan
        if len({k for r, (k, _m) in plan.items() if k < self.room(r)}) < 2:
            return plan
        rows, others = [], 0
        for r, (k, m) in plan.items():
            d = r.adaptive.last
            if r.params.num_draft_tokens is not None or (d is not None and d.forced):
                return plan
            if m and d is not None:
                rows.append((r.adaptive, m, k, self.slope(m)))
            else:
                others += 1
        cap = self.engine.policy.step_cap(rows, others, len(plan), self.engine.alpha_prior)
        if cap is None or cap >= max(ks):
            return plan
        return {r: (min(k, cap), m) for r, (k, m) in plan.items()}

    def refresh_plain(self, plan: Plan, batch: int) -> Plan:
        """Every row plain for this step where plain decoding's time at this batch size is stale and the drafting rows
        were predicted a marginal gain (``Policy.plain_refresh_below``): nothing else times plain while a batch drafts.
        Not where a drafting row has a fixed K or must measure, probe or explore."""
        policy = self.engine.policy
        below = policy.plain_refresh_below(batch)
        if not below:
            return plan  # the check below, per row and step, for a refresh due every PLAIN_STALE steps at most
        best = -1.0
        for r, (k, _m) in plan.items():
            if not k:
                continue
            d = r.adaptive.last
            if r.params.num_draft_tokens is not None or d is None or d.forced:
                return plan
            gain = d.gains.get(k, 0.0)
            if gain >= below:  # no refresh whatever the other rows (a stale plain time, a clear gain: most steps)
                return plan
            best = max(best, gain)
        if best < 0:
            return plan
        policy.decision = Decision(0, policy.decision.method, f"timing plain decoding again at batch {batch}: its "
                                   f"time is {policy.times.plain_age(batch)} steps old and drafting was predicted "
                                   f"{best:.2f}x plain at most", forced=True)
        return {r: (0, m) for r, (_k, m) in plan.items()}

    def fallbacks(self, plan: Plan, batch: int) -> Plan:
        """(K, method) for adaptive n-gram rows where the lookup finds no match: the draft model or the EAGLE head,
        whichever adaptive predicts fastest, and only where it predicts a gain over plain decoding and needs no
        catch-up. A proposer that sat out steps first reads every token since, in a step planned and predicted as an
        n-gram step: on an H200 at 8 clients (demo pair, T = 0.8) steps of n-gram rows whose misses fell back to the
        EAGLE head, behind after plain steps, took 7-8.5 ms against plain's 2.2 for 13 tokens against 8, the batch's
        speed guard saw drafting lose and held every row plain, where fixed K = 4 beat plain."""
        out = {}
        clock = self.engine.policy.clock
        for r, (k, m) in plan.items():
            if m != "ngram" or not k or r.params.num_draft_tokens is not None:
                continue
            methods = [name for name in self.methods(r) if not self._behind(r, name)]
            if "eagle" not in methods:  # the draft model alone: adaptive chose its K with the n-gram decision
                choice = (r.adaptive.fallback_k, "model") if "model" in methods else (0, "")
            else:  # re-evaluated every few steps only (~16 us a row)
                memo = self._fallback_memo.get(r)
                if memo is None or clock - memo[0] >= FALLBACK_RECHECK:
                    memo = self._fallback_memo[r] = (clock, self._best_fallback(r, methods, batch))
                choice = memo[1]
            if choice[0] and choice[1] in methods:
                out[r] = choice
        return out

    def features(self, plan: Plan, fallback: Plan) -> None:
        """Which rows that may draft with the EAGLE head ask the target for its features this step (``Request.features``):
        those that draft with the head now or may soon, not those drafting with another proposer. The features cost the
        target's forward a graph with the aux outputs and their hand-over to the head: on an H100 at 8 clients (demo
        pair, fp16) the default's K = 4 steps with the draft model took 2.41 ms against fixed K = 4's 2.20, the rows
        asking for features the head never read. Where the head drafts again for such a row (a probe of it, a switch),
        the target first computes the features it skipped from its cache (the head's catch-up,
        ``EagleProposer._inputs_many``), which a probe weighs (``Policy._others``)."""
        if "eagle" not in self.engine.proposers:
            return
        for r, (_k, m) in plan.items():
            if r.use_eagle:
                back = fallback.get(r)
                r.features = m == "eagle" or (back is not None and back[1] == "eagle") or self._head_in_play(r)

    @staticmethod
    def _head_in_play(r: Request) -> bool:
        """Whether an adaptive row not drafting with the EAGLE head this step may draft with it soon: it is still
        deciding, decodes plain (a probe may pick the head) or measures. Not a row drafting with another proposer, even
        where the head could gain (``Decision.others``, which it may probe): at 8 clients on an H100 (demo pair, fp16)
        such rows' features cost their steps +9.5% (the fifty-third round); in g157 the head drafted in none of four of
        the default's five greedy repeats there, and the default ran 0.81x fixed K = 6 (0.71x K = 4 in g147). A fixed-K
        row drafts with its own."""
        if r.params.num_draft_tokens is not None:
            return False
        state = r.adaptive
        d = state.last
        if d is not None and d.forced and state.resume is not None:
            d = state.resume  # an explore step: the decision it interrupted
        return d is None or not d.k or d.forced or d.method == "eagle"

    def _behind(self, r: Request, method: str) -> bool:
        """Whether ``method``'s proposer would first catch up on ``r`` (more unread tokens than a verification
        leaves)."""
        p = self.engine.proposers.get(method)
        return p is not None and p.behind(r) > NORMAL_BEHIND

    def _best_fallback(self, r: Request, methods: list[str], batch: int) -> tuple[int, str]:
        best = (1.0, 0, "")
        for name in ("model", "eagle"):
            if name in methods:
                k, g = _best(self.engine.policy.gains(r.adaptive, name, batch, self.engine.alpha_prior,
                                                      self.slope(name)))
                if k and g > best[0]:
                    best = (g, k, name)
        return best[1], best[2]


def _best(gains: dict[int, float]) -> tuple[int, float]:
    """The drafting K (> 0) with the highest predicted gain, and that gain ((0, 0.0) when none is predicted)."""
    k = best_drafting_k(gains)
    return k, gains.get(k, 0.0)
