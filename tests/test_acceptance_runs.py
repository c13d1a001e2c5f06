"""The runs of accepted draft tokens (``engine.acceptance_runs``): expected tokens per step at every K from one K's
drafts, on texts whose right and wrong positions are fixed (as the draft model's are, greedy or seeded)."""

import random

import pytest

from engine.acceptance_runs import RunLengths, RunSums, expected_from_runs, geometric_sums, run_steps
from engine.adaptive import GREEDY, PROBE_FIRST, AdaptiveState, Policy, expected_tokens, survival
from engine.stats import SpecDecodingStats


def _bursty_text(n: int, seed: int) -> list[bool]:
    """Right (True) / wrong positions in stretches: easy spans where the draft is nearly always right, hard ones where
    it is right half the time."""
    rng, out, easy = random.Random(seed), [], True
    while len(out) < n:
        if rng.random() < 0.05:
            easy = not easy
        out.append(rng.random() < (0.97 if easy else 0.5))
    return out


def _walk(text: list[bool], k: int, start: int = 0, stop: int | None = None) -> list[tuple[int, int, int]]:
    """The steps of fixed K over ``text`` from ``start``: (position, K drafted, accepted)."""
    stop = len(text) if stop is None else stop
    x, out = start, []
    while x < stop - k - 1:
        a = 0
        while a < k and text[x + a]:
            a += 1
        out.append((x, k, a))
        x += a + 1
    return out


def _timed_policy(per_token: dict[str, float], plain: float = 1.0) -> Policy:
    """A policy whose step times at batch 1 are plain + per_token x K for each method, each K timed three times."""
    policy = Policy()
    policy.times.observe("", 1, 0, plain)
    for method, cost in per_token.items():
        for k in range(1, 9):
            for _ in range(3):
                policy.times.observe(method, 1, k, plain + cost * k)
    return policy


def _request(policy: Policy, text: list[bool], length: int, methods: dict[str, float]) -> float:
    """One request of ``length`` tokens over ``text`` (True where the draft model's token is accepted; every other
    proposer's drafts are rejected), decided by ``policy`` as the engine does (the draft model's runs cut at steps
    that did not draft with it and at the end); the share of its steps that drafted with the draft model."""
    state, x, drafting, steps = AdaptiveState(), 0, 0, 0
    while x < length:
        policy.tick()
        d = policy.choose(state, methods, 1, alpha=0.1)
        steps += 1
        if d.k and d.method == "model":
            a = 0
            while a < d.k and text[x + a]:
                a += 1
            policy.observe("model", d.k, a, state, at=x)
            state.observe("model", d.k, a)
            x, drafting = x + a + 1, drafting + 1
            continue
        if d.k:
            policy.observe(d.method, d.k, 0, state)
            state.observe(d.method, d.k, 0)
        policy.cut_runs(state)
        x += 1
    policy.cut_runs(state)
    return drafting / steps


def _realized(text: list[bool], k: int) -> float:
    steps = _walk(text, k)
    return sum(a + 1 for _, _, a in steps) / len(steps)


def test_run_steps_and_the_geometric_prior():
    assert run_steps(0) == (1,) * 8  # a miss at the first position: one step at every K
    assert run_steps(5)[:3] == (3, 2, 2)  # 6 positions: K = 1 takes 3 steps, K = 2 and 3 take 2
    for alpha in (0.3, 0.8):
        pos, steps = geometric_sums(alpha)
        for k in range(1, 9):
            assert pos / steps[k - 1] == pytest.approx(expected_tokens(alpha, k))
        own = RunSums()  # the same distribution as weighted runs: the same expected tokens
        for length in range(400):
            own.add(length, (1 - alpha) * alpha ** length)
        got = expected_from_runs(own, None, 0.5, 8.0, 0.0, 16.0)
        assert got[0] == 1.0
        assert all(got[k] == pytest.approx(expected_tokens(alpha, k), rel=1e-6) for k in range(1, 9))


@pytest.mark.parametrize("source", [8, 4, 2])
def test_one_ks_drafts_predict_every_ks_tokens_per_step(source):
    """From the drafts of one K, the runs predict what every K realizes on the same text; per-position acceptance of
    the same drafts (``survival``) does not where acceptance comes in stretches (it assumes where a draft starts does
    not matter). Fails if bonus positions are taken as misses or the runs are read per draft."""
    text = _bursty_text(20000, 1)
    runs, stats = RunLengths(), SpecDecodingStats()
    for x, k, a in _walk(text, source):
        p = runs.rate(0.5)
        runs.observe(k, a, x, p)
        stats.observe_draft(k, a)
    got = expected_from_runs(runs, None, 0.5, 8.0, 0.0, 16.0)
    per_position = [1.0]
    for s in survival(stats, [0.0] * 8, 0.0):
        per_position.append(per_position[-1] + s)
    worst_runs = worst_survival = 0.0
    for k in range(1, 9):
        truth = _realized(text, k)
        worst_runs = max(worst_runs, abs(got[k] / truth - 1))
        if k <= source:
            worst_survival = max(worst_survival, abs(per_position[k] / truth - 1))
    assert worst_runs < (0.03 if source >= 4 else 0.06), worst_runs
    if source == 8:
        assert worst_survival > 2 * worst_runs, (worst_survival, worst_runs)


def test_a_request_that_drafts_in_probes_keeps_what_its_probes_accepted():
    """Plain steps between drafts leave positions unknown: the open run goes on past them at the conditional
    acceptance. Dropped, every probe accepted in full was lost and the others kept (and cut as if a miss followed, K =
    4's expected tokens came out at 0.83x the truth): the estimate fell far below the truth."""
    rng = random.Random(3)
    text = [rng.random() < 0.8 for _ in range(40000)]
    runs = RunLengths()
    x = 0
    while x < len(text) - 20:
        a = 0
        while a < 4 and text[x + a]:
            a += 1
        runs.observe(4, a, x, runs.rate(0.5))
        x += a + 1 + 12  # then 12 plain steps
    got = expected_from_runs(runs, None, 0.5, 8.0, 0.0, 16.0)
    assert got[4] == pytest.approx(expected_tokens(0.8, 4), rel=0.06)
    assert got[2] == pytest.approx(expected_tokens(0.8, 2), rel=0.06)


def test_shared_runs_forget_and_a_request_leans_on_them_before_its_own():
    shared = RunSums()
    for _ in range(500):  # an old workload: every draft rejected at once
        shared.count(4, 0, 0.98)
        shared.add(0, 1.0)
    assert shared.runs < 60  # forgotten by the draft
    for _ in range(500):  # the new one: runs of 7
        shared.count(4, 4, 0.98)
        shared.add(7, 0.5)
        shared.count(4, 3, 0.98)
        shared.add(0, 0.5)
    new = expected_from_runs(None, shared, 0.5, 8.0, 2.0, 16.0)
    assert new[4] > 2.5  # the old workload's runs no longer weigh
    own = RunLengths()
    for x in range(0, 400, 8):  # this request's own text: a miss after every 3 accepted tokens
        own.observe(4, 3, x, 0.5)
    mine = expected_from_runs(own, shared, 0.5, 8.0, 2.0, 16.0)
    assert mine[4] == pytest.approx(4.0, rel=0.1) and mine[8] < new[8]


def test_the_policy_picks_the_k_the_runs_say_realizes_most():
    """Adaptive K on a text whose stretches make a middle K the fastest by the runs, where per-position acceptance of
    the same drafts favours the longest K: the policy's expected tokens for the draft model are the runs'."""
    text = _bursty_text(20000, 1)
    plain, per_token = 1.0, 0.12
    policy = _timed_policy({"model": per_token}, plain)
    state = AdaptiveState()
    for x, k, a in _walk(text, 8, stop=6000):
        policy.observe("model", k, a, state, at=x)
        state.observe("model", k, a)
    d = policy.choose(state, {"model": per_token}, 1, alpha=0.5)
    rates = {k: _realized(text, k) / (plain + per_token * k) for k in range(1, 9)}
    best = max(rates, key=rates.get)
    assert rates[d.k] >= 0.98 * rates[best], (d.k, best, rates)
    assert policy.expected(state, "model", 0.5)[best] == pytest.approx(_realized(text, best), rel=0.05)
    assert ("model", GREEDY) in policy.shared_runs and not policy.calibration


def test_after_a_useless_drafts_phase_probes_bring_drafting_back():
    """Requests after a phase where nothing was accepted decode plain and probe; on a text the draft now predicts
    well, their probes' runs (cut where plain steps follow them) win drafting back."""
    per_token = 0.1
    policy = _timed_policy({"model": per_token})
    rng = random.Random(5)
    useless = AdaptiveState()
    for x in range(0, 3000, 5):  # the old phase: every draft rejected at once
        policy.tick()
        policy.observe("model", 4, 0, useless, at=x)
        useless.observe("model", 4, 0)
    # requests of 256 tokens on a text accepted at 0.7
    drafted = [_request(policy, [rng.random() < 0.7 for _ in range(300)], 256, {"model": per_token}) for _ in range(4)]
    assert drafted[-1] > 0.8, drafted


def test_after_short_requests_failed_their_probes_drafting_comes_back():
    """Requests of 128 steps with a useless draft probe and fail (the engine-wide floor rises); when the draft pays
    again (acceptance 0.7) drafting comes back within a few requests. With every failed probe doubling the floor up to
    PROBE_MAX (tried: it halved the useless phase's probes), one probe per 512 steps never outweighed the shared runs
    of the useless phase: the last of eight good requests drafted in a third of its steps."""
    shares = []
    for seed in range(3):
        policy, rng = _timed_policy({"model": 0.1}), random.Random(seed)
        useless = [_request(policy, [False] * 150, 128, {"model": 0.1}) for _ in range(24)]
        assert max(useless[1:]) < 0.05  # after the first request (the prior), probes only
        assert policy.probe_floor["model"] >= 4 * PROBE_FIRST
        shares.append([_request(policy, [rng.random() < 0.7 for _ in range(150)], 128, {"model": 0.1}) for _ in range(8)])
    assert min(s[-1] for s in shares) > 0.8, shares
    assert sum(sum(s[-4:]) for s in shares) / 12 > 0.7, shares


def test_a_proposer_an_old_phase_wrote_off_is_probed_again_beside_a_better_predicted_one():
    """From plain decoding, probes go to the method probed longest ago that could beat plain, not always to the best
    predicted: n-gram's crumbs of prior acceptance (a step of 1.02 tokens) beside the draft model's runs of nothing
    from an old phase kept every probe for n-gram on an H100, and the draft model, now accepted at ~0.5, was never
    drafted again."""
    policy = _timed_policy({"model": 0.1, "ngram": 0.02})
    old = AdaptiveState()
    for x in range(0, 3000, 5):  # the old phase: neither proposer's drafts accepted
        policy.tick()
        policy.observe("model", 4, 0, old, at=x)
        policy.observe("ngram", 2, 0, old)
    rng = random.Random(7)
    # requests of 256 tokens on a text the draft model now predicts at 0.7; n-gram finds nothing
    drafted = [_request(policy, [rng.random() < 0.7 for _ in range(300)], 256, {"model": 0.1, "ngram": 0.02})
               for _ in range(6)]
    assert max(drafted[-2:]) > 0.8, drafted
