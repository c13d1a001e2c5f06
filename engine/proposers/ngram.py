"""N-gram prompt lookup: propose what followed the last occurrence of the context's last n tokens.

No model, no memory beyond a per-request index and engine-wide acceptance counts per match order; proposals are
deterministic (q one-hot).

Draft length per match order. Adaptive K plans K before the lookup, from the request's acceptance pooled over all
its matches. A match of one token predicts far less than a match of four: on plain greedy text of the bench's story
openings the first draft after a 4-, 3-, 2- and 1-token match was accepted 41%, 39%, 38% and 21% of the time, and
the second after a 1-token match about 10%. Where the engine sets ``position_cost`` (what verifying one more
position costs, in plain steps: at batch 1 the measured ``verify_cost``), a draft stops before the first position
whose survival for that match order is below it. The first position has a cost of its own, ``first_cost``: a step
that verifies two tokens instead of one leaves the one-row GEMV path for a GEMM of two rows and a masked attention
(on the 2-core CPU, demo target: 1.19x a plain step with two threads, 1.46x with one; each further position
~0.05). An order whose first draft is accepted less often than that drafts nothing: the row decodes plain, or drafts
with its fallback (an ``auto`` row: the draft model or the EAGLE head). Every ``EXPLORE_CUT``-th such match still
drafts one token, the evidence that keeps that order's counts current (they forget only with its own drafts).
Positions past a cut are never drafted again only while they would not pay: survival past the last drafted
position follows its measured ratio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.adaptive import RecentAcceptance, survival
from engine.config import MAX_DRAFT_TOKENS
from engine.proposers.base import Proposal, StepRows

if TYPE_CHECKING:
    from engine.sequence import Request

MAX_N, MIN_N = 4, 1
ORDER_PRIOR = [0.5 ** (i + 1) for i in range(MAX_DRAFT_TOKENS)]  # survival before a match order has drafted
ORDER_PRIOR_WEIGHT = 8.0  # pseudo-drafts of that prior: with 2, one fully accepted draft after a match of an order put
# the next one's expected tokens at 3.3-3.9 of 7-8 drafted (its ratio carried past the positions drafted), and adaptive
# K at batch 1 took n-gram over the draft model there for ~7% of the steps, most of them drafts of which nothing was
# accepted (CPU emulation at an H100's step times, greedy, ten seeds: the default 0.974x fixed K = 5 with 2, 0.984x with
# 8; the repeat prompts, six seeds: 1.80x / 1.91x; T = 0.8 unchanged)
EXPLORE_CUT = 8  # of the matches of an order whose first position does not pay, this share still drafts one token


class _Index:
    """n-gram (as a tuple) -> position of its last token, for n-grams ending before ``upto``."""

    def __init__(self) -> None:
        self.last: dict[tuple[int, ...], int] = {}
        self.upto = 0

    def extend(self, ids: list[int], end: int) -> None:
        for i in range(self.upto, end):
            for n in range(MIN_N, MAX_N + 1):
                if i - n + 1 >= 0:
                    self.last[tuple(ids[i - n + 1: i + 1])] = i
        self.upto = max(self.upto, end)


def find(ids: list[int], index: _Index | None = None) -> tuple[int, int]:
    """(n, end): the longest suffix of ``ids`` (n = 4..1) that occurred before, and where its last occurrence ends;
    (0, -1) when none did."""
    if len(ids) < 2:
        return 0, -1
    index = index or _Index()
    index.extend(ids, len(ids) - 1)  # n-grams ending before the last token: the suffix never matches itself
    for n in range(min(MAX_N, len(ids) - 1), MIN_N - 1, -1):
        end = index.last.get(tuple(ids[-n:]))
        if end is not None:
            return n, end
    return 0, -1


def follow(ids: list[int], end: int, k: int) -> list[int]:
    """``k`` tokens that followed position ``end``; where they run into the end, the text repeats with this period."""
    period = len(ids) - 1 - end
    return [ids[len(ids) - period + i % period] for i in range(k)]


def lookup(ids: list[int], k: int, index: _Index | None = None) -> list[int]:
    """``k`` tokens that followed the most recent earlier match of the longest suffix (n = 4..1), or none."""
    if k <= 0:
        return []
    n, end = find(ids, index)
    return follow(ids, end, k) if n else []


class NgramProposer:
    name = "ngram"
    backlog = 0  # its index grows with the emitted tokens, never in a burst worth leaving out of step timings

    def __init__(self) -> None:
        self._index: dict[int, _Index] = {}
        self.by_order = {n: RecentAcceptance() for n in range(MIN_N, MAX_N + 1)}  # engine-wide, per match order
        self._drafted: dict[int, tuple[int, int, int]] = {}  # seq_id -> (its tokens then, order, drafted) this step
        self.position_cost = 0.0  # set by the engine per step; 0: draft every position the plan asked for
        self.first_cost = 0.0  # ... and of the first position (0: it always drafts)
        self._cuts = {n: 0 for n in range(MIN_N, MAX_N + 1)}  # per match order: matches whose first position did not pay
        self.by_class: dict[tuple[str, int], RecentAcceptance] = {}  # per (sampling class, match order): ``expected``

    def length(self, order: int, k: int) -> int:
        """How many of the ``k`` planned positions a match of ``order`` tokens drafts (0: none pays, see the module)."""
        if self.position_cost <= 0 or k <= 0:
            return k
        first, reach = self._positions(order)
        if not first:
            self._cuts[order] += 1
            if self._cuts[order] % EXPLORE_CUT:
                return 0
        return min(k, reach)

    def _positions(self, order: int) -> tuple[bool, int]:
        """For a match of ``order``: whether its first position pays (``first_cost``), and how many positions from the
        first on a draft keeps (up to the first past it whose survival is at most ``position_cost``)."""
        s = survival(self.by_order[order], ORDER_PRIOR, ORDER_PRIOR_WEIGHT)
        j = 1
        while j < MAX_DRAFT_TOKENS and s[j] > self.position_cost:
            j += 1
        return s[0] > self.first_cost, j

    def expected(self, req: Request) -> list[float]:
        """Expected tokens of a step of ``req`` at K = 0..MAX_DRAFT_TOKENS drafted by lookup now: 1 at every K where
        nothing matches; after a match, what the drafts after a match of that order realized on this engine for the
        request's sampling class. Adaptive K decides n-gram by it at batch 1 (``AdaptiveState.ngram_now``, set at
        each full decision there): n-gram's use is local and all or nothing (text that repeats the prompt drafts 8
        accepted tokens, then a new passage none), and a request's or the engine's acceptance pooled over whole
        requests, misses counted as drafts, put a request's first drafts where the repetition pays at 0.2 a position:
        on the bench's repeat prompts adaptive drafted with the draft model at 0.77x what n-gram alone ran."""
        n, _ = find(req.all_ids, self._index.setdefault(req.seq_id, _Index()))
        reach = self._pays(n) if n else 0
        out = [1.0]
        for i, s in enumerate(survival(self.by_class.get((req.adaptive.sampling, n)), ORDER_PRIOR, ORDER_PRIOR_WEIGHT)):
            out.append(out[-1] + (s if i < reach else 0.0))
        return out

    def _pays(self, order: int) -> int:
        """Positions a draft after a match of ``order`` would have (``length`` without its explore share): all of them
        where the engine set no position cost."""
        if self.position_cost <= 0:
            return MAX_DRAFT_TOKENS
        first, reach = self._positions(order)
        return reach if first else 0

    def propose(self, rows: StepRows) -> Proposal:
        out = []
        for req, k in zip(rows.reqs, rows.ks):
            ids = req.all_ids
            n, end = find(ids, self._index.setdefault(req.seq_id, _Index())) if k > 0 else (0, -1)
            if not n:
                out.append([])
                continue
            if req.params.num_draft_tokens is None:  # a fixed K is the user's: drafted as asked
                k = self.length(n, k)
                if not k:
                    out.append([])
                    continue
            self._drafted[req.seq_id] = (req.num_tokens, n, k)
            out.append(follow(ids, end, k))
        return Proposal(out, None)

    def fits(self, plan: dict[Request, int]) -> bool:
        return True

    def behind(self, req: Request) -> int:
        return 0  # its index grows with every emitted token

    def rollback(self, req: Request, num_tokens: int) -> None:
        """After verification (``num_tokens``: the verified ones): count this step's draft for its match order. The
        index holds only emitted tokens, which are never taken back."""
        got = self._drafted.pop(req.seq_id, None)
        if got is not None:
            start, order, drafted = got
            accepted = max(0, min(drafted, num_tokens - start))
            self.by_order[order].observe_draft(drafted, accepted)
            key = (req.adaptive.sampling, order)
            stats = self.by_class.get(key)
            if stats is None:
                stats = self.by_class[key] = RecentAcceptance()
            stats.observe_draft(drafted, accepted)

    def release(self, req: Request) -> None:
        self._index.pop(req.seq_id, None)
        self._drafted.pop(req.seq_id, None)
