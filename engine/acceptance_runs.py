"""Expected tokens per step at every K from the runs of accepted draft tokens a request's text showed.

The draft model proposes a token for a position from the text before it, and that text is the request's own: the target
keeps it whatever K drafted it, greedy or sampled (seeded draws are keyed by position, ``engine.rng``, so a sampled
request's text and acceptance draws are the same at every K). Each position of the text is therefore one the draft gets
right or wrong whatever K is drafted, and a step at K ends at the first wrong position within its K, or after K + 1
tokens (the last one the target's own: the bonus, whose position the draft never proposes). The steps of every K meet at
each wrong position, so a run of L right positions and the wrong one after it takes ceil((L + 1) / (K + 1)) steps at K:
the histogram of run lengths gives the expected tokens per step of every K at once.

Per-position acceptance (``engine.adaptive.survival``) counts the same drafts but assumes that where a draft starts
does not matter. It does: runs are not geometric (text has easy stretches), and where drafts of one K start is not
where another K's would. On the 2-core CPU (demo pair, greedy, the bench's three prompts) the survival of K = 8's drafts
put K = 4..6 at 0.93-0.95x the tokens per step they realized and K = 8 at 0.98x, so adaptive K drafted 7-8 where K = 5-6
was faster; the runs of the same drafts put every K from 2 to 8 within 2.6% of what it realized (at T = 0.8 within
1.7%), and those of K = 4's or K = 2's drafts within 3-5%. The EAGLE head and n-gram lookup are another matter: their
proposal for a position depends on where their draft started (the head chains its own features, n-gram follows one
match), so they keep per-position acceptance.

A bonus position's outcome is unknown: the run forks there, continuing with the request's conditional acceptance
(``RunLengths.observe``'s ``p``) and ending otherwise, each branch weighted. A step that did not draft with the model
(plain, another proposer) or the request's end leaves positions unknown: the run open then goes on past them with
that chance too (``RunLengths.cut``).
"""

from __future__ import annotations

from engine.config import MAX_DRAFT_TOKENS

PRUNE = 0.01  # an open run's branch with less weight than this is dropped ...
OPEN_MAX = 8  # ... and past this many branches the lightest go, their weight to the longest kept (a stretch of drafts
# accepted in full at a conditional acceptance near 1 added a branch a draft: 460 at 0.99, each draft's work growing)
TAIL_MAX = 24  # branches of a run cut at unknown positions (``_tail``); what is left of its weight ends past them
_STEPS: list[tuple[int, ...]] = []  # _STEPS[L]: the steps a run of L right positions and the wrong one take at K = 1..MAX


def run_steps(length: int) -> tuple[int, ...]:
    """Steps at K = 1..MAX_DRAFT_TOKENS of a run of ``length`` accepted positions and the rejected one after it."""
    while len(_STEPS) <= length:
        n = len(_STEPS) + 1
        _STEPS.append(tuple(-(-n // (k + 1)) for k in range(1, MAX_DRAFT_TOKENS + 1)))
    return _STEPS[length]


class RunSums:
    """Closed runs, summed: their weight (``runs``), positions, steps at each K; and the positions drafts reached and
    passed (the conditional acceptance)."""

    __slots__ = ("runs", "positions", "steps", "reached", "passed", "version")

    def __init__(self) -> None:
        self.runs = 0.0
        self.positions = 0.0
        self.steps = [0.0] * MAX_DRAFT_TOKENS
        self.reached = 0.0
        self.passed = 0.0
        self.version = 0

    def add(self, length: int, weight: float) -> None:
        """A run of ``length`` accepted positions and the rejected one after it, with ``weight``."""
        self.runs += weight
        self.positions += weight * (length + 1)
        self.steps = [s + weight * n for s, n in zip(self.steps, run_steps(length))]
        self.version += 1

    def add_runs(self, runs: list[tuple[int, float]]) -> None:
        """Runs as (length, weight) pairs (what ``RunLengths.observe`` and ``cut`` return)."""
        for length, weight in runs:
            self.add(length, weight)

    def count(self, k: int, accepted: int, keep: float = 1.0) -> None:
        """A draft of ``k`` tokens, ``accepted`` of them; the past kept at ``keep`` (a shared estimate forgets)."""
        if keep < 1.0:
            self.runs *= keep
            self.positions *= keep
            self.steps = [s * keep for s in self.steps]
            self.reached *= keep
            self.passed *= keep
        self.reached += accepted + (accepted < k)
        self.passed += accepted
        self.version += 1

    def rate(self, prior: float, weight: float = 2.0) -> float:
        """The conditional acceptance of a drafted position, shrunk towards ``prior`` with ``weight`` pseudo-positions."""
        return (self.passed + weight * prior) / (self.reached + weight)


class RunLengths(RunSums):
    """A request's runs with the draft model: the closed ones' sums, and the open run as branches (length -> weight)."""

    __slots__ = ("open", "next_at", "pending")

    def __init__(self) -> None:
        super().__init__()
        self.open: dict[int, float] = {0: 1.0}
        self.next_at: int | None = None  # the position the next draft starts at if the run goes on
        self.pending = False  # whether the open run holds accepted positions (a draft accepted in full last)

    def cut(self, p: float) -> list[tuple[int, float]]:
        """The request stopped drafting with the model here (plain, another proposer, finished): its open run goes on
        past the unknown positions as the conditional acceptance ``p`` has it (``_tail``; a branch that holds no
        position yet is dropped). Returns the runs closed. Left open (or dropped at the next draft), the runs of a
        request that drafts in probes keep the probes that missed and lose those accepted in full: at acceptance 0.8
        with K = 4 probes 12 plain steps apart, K = 4's expected tokens came out at 0.83x the truth even cut as if a miss
        followed (``tests/test_acceptance_runs.py``)."""
        closed: list[tuple[int, float]] = []
        for length, w in self.open.items():
            if length > 0:
                closed += _tail(length, w, p)
        self.open, self.next_at, self.pending = {0: 1.0}, None, False
        self.add_runs(closed)
        return closed

    def observe(self, k: int, accepted: int, at: int | None, p: float) -> list[tuple[int, float]]:
        """A draft of ``k`` tokens from position ``at`` (None: where the last draft's tokens ended), ``accepted`` of
        them; a bonus continues the run with chance ``p``. Returns the runs it closed, (length, weight): the shared
        estimate takes them too."""
        before: list[tuple[int, float]] = []
        if at is None:
            at = self.next_at or 0
        elif self.next_at != at and self.pending:  # positions since the last draft are unknown (``cut``)
            before = self.cut(p)
        self.next_at = at + accepted + 1
        self.count(k, accepted)
        closed: list[tuple[int, float]] = []
        if accepted < k:
            for length, w in self.open.items():
                closed.append((length + accepted, w))
            self.open, self.pending = {0: 1.0}, False
        else:  # the bonus: right (the run goes on past it) or wrong (a run ends there, a new one starts after it)
            nxt: dict[int, float] = {0: 0.0}
            for length, w in self.open.items():
                closed.append((length + k, w * (1.0 - p)))
                nxt[0] += w * (1.0 - p)
                if w * p >= PRUNE:
                    nxt[length + k + 1] = w * p
            if len(nxt) > OPEN_MAX:
                kept = dict(sorted(nxt.items(), key=lambda lw: lw[1], reverse=True)[:OPEN_MAX])
                kept[max(kept)] += sum(nxt.values()) - sum(kept.values())
                nxt = kept
            self.open, self.pending = nxt, True
        self.add_runs(closed)
        return before + closed


def _tail(length: int, weight: float, p: float) -> list[tuple[int, float]]:
    """A run of ``length`` accepted positions whose next ones are unknown, as runs (length, weight): it goes on past
    each with chance ``p`` (the branches up to where what is left of ``weight`` falls under PRUNE)."""
    out, w = [], weight
    p = min(max(p, 0.0), 0.99)
    while w * p >= PRUNE and len(out) < TAIL_MAX:
        out.append((length, w * (1.0 - p)))
        length, w = length + 1, w * p
    out.append((length, w))
    return out


def geometric_sums(alpha: float) -> tuple[float, list[float]]:
    """Positions and steps at K = 1..MAX per run where every position is accepted with ``alpha`` independently: a run
    ends after m positions with chance (1 - α) α^(m-1), and E[ceil(m / (K + 1))] = 1 / (1 - α^(K+1))."""
    a = min(max(alpha, 0.0), 0.99)
    return 1.0 / (1.0 - a), [1.0 / (1.0 - a ** (k + 1)) for k in range(1, MAX_DRAFT_TOKENS + 1)]


def expected_from_runs(own: RunSums | None, shared: RunSums | None, alpha: float, shared_runs: float,
                       alpha_positions: float, fade: float) -> list[float]:
    """Expected tokens of one step at K = 0..MAX_DRAFT_TOKENS: the request's runs, the shared ones counting as at most
    ``shared_runs`` runs, and geometric runs at ``alpha`` worth ``alpha_positions`` positions (whatever alpha: as runs,
    an optimistic prior's long runs outweighed what the drafts showed), fading to nothing as the runs measured reach
    ``fade``."""
    n_own = own.runs if own is not None else 0.0
    n_shared = shared.runs if shared is not None else 0.0
    w_shared = min(1.0, shared_runs / n_shared) if n_shared > 0 else 0.0
    positions, steps = 0.0, [0.0] * MAX_DRAFT_TOKENS
    fading = max(0.0, 1.0 - (n_own + n_shared) / fade)
    if fading > 0 and alpha_positions > 0:
        pos_a, steps_a = geometric_sums(alpha)
        w_alpha = alpha_positions * fading / pos_a
        positions, steps = w_alpha * pos_a, [w_alpha * s for s in steps_a]
    if n_own > 0:
        positions += own.positions
        steps = [s + o for s, o in zip(steps, own.steps)]
    if w_shared > 0:
        positions += w_shared * shared.positions
        steps = [s + w_shared * o for s, o in zip(steps, shared.steps)]
    if positions <= 0:
        return [1.0] * (MAX_DRAFT_TOKENS + 1)
    return [1.0] + [positions / s if s > 0 else 1.0 for s in steps]
