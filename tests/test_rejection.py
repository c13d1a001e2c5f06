"""Model-free tests of the rejection rule: 10^5 draws per case on crafted p and q, and proof
that the test fails under each of three classic broken rules."""

import pytest
import torch

from engine import rng
from engine.config import SamplingParams
from engine.rejection import next_token_dist, row_settings, verify, verify_rows, verify_sampled
from engine.sampler import RowParams, draw, probs_batch, race

N = 100_000
K = 2


def _case_overlapping() -> tuple[torch.Tensor, torch.Tensor]:
    """p [K+1, V] with zeros, q [K, V] overlapping it, different per position."""
    p = torch.tensor([[0.30, 0.00, 0.25, 0.20, 0.25, 0.00],
                      [0.05, 0.40, 0.00, 0.15, 0.10, 0.30],
                      [0.10, 0.10, 0.30, 0.00, 0.20, 0.30]])
    q = torch.tensor([[0.10, 0.30, 0.30, 0.10, 0.10, 0.10],
                      [0.25, 0.15, 0.20, 0.15, 0.25, 0.00]])
    return p, q


def _case_truncated() -> tuple[torch.Tensor, torch.Tensor]:
    """p and q from logits under top-k 4 and top-p 0.8 (truncation zeros in both, not the same ones)."""
    g = torch.Generator().manual_seed(3)
    logits_p = torch.randn(K + 1, 8, generator=g) * 1.5
    logits_q = logits_p[:K] + torch.randn(K, 8, generator=g)
    params = SamplingParams(temperature=0.9, top_k=4, top_p=0.8)
    rp = lambda n: RowParams.build([params] * n, "cpu")  # noqa: E731
    return probs_batch(logits_p, rp(K + 1)), probs_batch(logits_q, rp(K))


def _case_one_hot() -> tuple[torch.Tensor, None]:
    """A deterministic proposer (n-gram): q one-hot on the proposed token."""
    p, _ = _case_overlapping()
    return p, None


def _keys(stream: int, n: int) -> torch.Tensor:
    """[N, n] keys: row i is request seed i at positions 40.. (the engine's keying, in bulk)."""
    return torch.tensor([[rng.key(i, 40 + j, stream) for j in range(n)] for i in range(N)], dtype=torch.int64)


KEYS = {}


def _run(p: torch.Tensor, q: torch.Tensor | None, rule=None) -> tuple[list[torch.Tensor], list[int]]:
    """Empirical law of the emitted token at each position j, among rows that reached j."""
    if not KEYS:
        KEYS.update(draft=_keys(rng.DRAFT, K), sample=_keys(rng.SAMPLE, K + 1), accept=_keys(rng.ACCEPT, K))
    if q is None:
        draft = torch.tensor([[0, 3]]).repeat(N, 1)  # fixed proposals; 3 has p = 0.15 at position 1
        q_b = None
    else:
        q_b = q[None].expand(N, K, q.shape[-1])
        draft = draw(q_b, KEYS["draft"])  # [N, K]
    p_b = p[None].expand(N, K + 1, p.shape[-1])
    accepted, nxt = verify_sampled(draft, torch.full((N,), K), q_b, p_b, KEYS["sample"], KEYS["accept"], rule)
    out = torch.cat([draft, torch.zeros(N, 1, dtype=torch.long)], 1)
    out[torch.arange(N), accepted] = nxt
    laws = []
    for j in range(K + 1):
        reached = accepted >= j
        laws.append(torch.bincount(out[reached, j], minlength=p.shape[-1]).double() / int(reached.sum()))
    return laws, [int((accepted >= j).sum()) for j in range(K + 1)]


def _worst_excess(p: torch.Tensor, q: torch.Tensor | None, rule=None) -> float:
    """Largest TV(empirical_j, p_j) over positions, in units of a generous sampling bound."""
    laws, counts = _run(p, q, rule)
    v = p.shape[-1]
    return max(0.5 * float((law - p[j].double()).abs().sum()) / (4 * 0.5 * (v / n) ** 0.5)
               for j, (law, n) in enumerate(zip(laws, counts)))


CASES = {"overlapping": _case_overlapping, "truncated": _case_truncated, "one_hot": _case_one_hot}


@pytest.mark.parametrize("case", list(CASES))
def test_verify_sampled_keeps_the_target_law_at_every_position(case):
    p, q = CASES[case]()
    assert _worst_excess(p, q) < 1.0


# --- three classic mistakes, kept here only to prove the test above would catch them
def residual_not_normalised(p_at, q_at, tok_at, rejected):
    """Inverse-CDF draw over max(0, p - q) without normalising: the missing mass lands on the last id."""
    right = next_token_dist(p_at, q_at, tok_at, rejected)
    unnormalised = right.clone()
    unnormalised[:, -1] += 1.0 - right.sum(-1)
    return torch.where(rejected[:, None], unnormalised, right)


def residual_from_q(p_at, q_at, tok_at, rejected):
    q_at = torch.zeros_like(p_at).scatter_(-1, tok_at[:, None], 1.0) if q_at is None else q_at
    return torch.where(rejected[:, None], q_at, p_at)


def bonus_from_q(p_at, q_at, tok_at, rejected):
    q_at = torch.zeros_like(p_at).scatter_(-1, tok_at[:, None], 1.0) if q_at is None else q_at
    return torch.where(rejected[:, None], next_token_dist(p_at, q_at, tok_at, rejected), q_at)


@pytest.mark.parametrize("rule", [residual_not_normalised, residual_from_q, bonus_from_q], ids=lambda f: f.__name__)
@pytest.mark.parametrize("case", list(CASES))
def test_the_test_catches_a_broken_rule(case, rule):
    p, q = CASES[case]()
    assert _worst_excess(p, q, rule) > 1.0, f"{rule.__name__} went unnoticed"


def test_strict_acceptance_never_keeps_a_token_the_target_rules_out():
    p = torch.tensor([[0.0, 1.0], [0.5, 0.5]])[None].expand(N, 2, 2)
    q = torch.tensor([[1.0, 0.0]])[None].expand(N, 1, 2)
    keys = torch.arange(2 * N).view(N, 2) * 0x9E3779B97F4A7C1  # any keys: u > 0 everywhere matters here
    accepted, nxt = verify_sampled(torch.zeros(N, 1, dtype=torch.long), torch.ones(N, dtype=torch.long), q, p,
                                   keys, keys[:, :1] + 1)
    assert int(accepted.sum()) == 0 and bool((nxt == 1).all())


def test_uniforms_never_reach_0_or_1():
    """The extreme hash values give uniforms strictly inside (0, 1): an exponential of 0 or inf would let a token win
    or lose the race whatever its probability."""
    extremes = torch.tensor([-(1 << 63), (1 << 63) - 1, -1, 0], dtype=torch.int64)
    u = rng.uniform(extremes)
    assert 0 < float(u.min()) and float(u.max()) < 1, u.tolist()
    e = -u.log()
    assert bool(torch.isfinite(e).all()) and float(e.min()) > 0


def test_uniforms_are_keyed_not_sequenced():
    k = rng.keys([5, 5, 6], [[10], [10], [10]], rng.SAMPLE)
    u = rng.uniform(k, 1000)
    assert torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert 0 < float(u.min()) and float(u.max()) < 1
    big = rng.uniform(rng.keys([1], [list(range(200_000))], rng.ACCEPT))
    assert abs(float(big.mean()) - 0.5) < 0.005 and abs(float(big.var()) - 1 / 12) < 0.002
    per_token = rng.uniform(rng.keys([3], [list(range(500))], rng.SAMPLE), 400)  # [1, 500, 400]
    assert abs(float(per_token.mean()) - 0.5) < 0.005
    assert rng.key(5, 10, rng.SAMPLE) != rng.key(5, 10, rng.DRAFT) != rng.key(5, 11, rng.DRAFT)


@pytest.mark.parametrize("k", [0, 1, 4])
@pytest.mark.parametrize("with_q", [False, True])
def test_verify_rows_gives_what_verify_gives_row_by_row_rule(k, with_q):
    """The graph-ready verification (every rule computed for every row, chosen per row on the device) returns
    ``verify``'s accepted counts and tokens on mixed batches: greedy, seeded and unseeded sampled rows, with and
    without top-p / top-k cuts, rows that drafted fewer tokens or none. Drafts are the target's likely tokens, so
    acceptances, rejections and bonus tokens all happen."""
    if with_q and k == 0:
        pytest.skip("a plain step has no draft distributions")
    v = 40
    kinds = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, seed=3),
             SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.9, top_k=12, seed=4),
             SamplingParams(temperature=1.2, top_k=6), SamplingParams(temperature=0, top_p=0.5)]
    gen = torch.Generator().manual_seed(17 + k)
    outcomes = set()
    for trial in range(12):
        params = [kinds[(trial + i) % len(kinds)] for i in range(7)] if trial % 3 else kinds[1:3] * 2
        b = len(params)
        logits = torch.randn(b, k + 1, v, generator=gen) * 2.5
        gumbel = -torch.log(-torch.log(torch.rand(b, k, v, generator=gen).clamp_min(1e-9)))
        likely = (logits[:, :k] * 1.5 + gumbel).argmax(-1)  # a draw from a sharpened target: often accepted
        num = torch.randint(0, k + 1, (b,), generator=gen) if trial % 2 else torch.full((b,), k)
        draft = torch.where(torch.arange(k)[None, :] < num[:, None], likely, -1)
        q = torch.softmax(logits[:, :k] + torch.randn(b, k, v, generator=gen), -1) if with_q else None
        seeds = [p.seed if p.seed is not None else 1000 + trial * 10 + i for i, p in enumerate(params)]
        sample_keys = rng.keys(seeds, [[50 + j for j in range(k + 1)]] * b, rng.SAMPLE)
        accept_keys = rng.keys(seeds, [[50 + j for j in range(k)]] * b, rng.ACCEPT) if k else None
        accepted, tokens = verify(logits, draft, num, q, RowParams.build(params, "cpu"), sample_keys, accept_keys)
        settings, truncate = row_settings(params, v)
        out = verify_rows(logits, draft, num, q, torch.tensor(settings), sample_keys,
                          accept_keys if accept_keys is not None else sample_keys[:, :k], truncate)
        assert torch.equal(out[:, 0], accepted) and torch.equal(out[:, 1:], tokens), (trial, out, accepted, tokens)
        outcomes |= {("all" if a == n else "rejected" if a < n else "?") for a, n in zip(accepted.tolist(), num.tolist())
                     if n > 0}
    assert outcomes == ({"all", "rejected"} if k else set()), outcomes


def test_a_race_over_a_cut_vocabulary_hashes_only_what_can_win_and_draws_the_same_token():
    """``draw(..., cut=True)`` on the CPU races only the tokens within reach of each row's likeliest (the others' p / E
    stays below it whatever their noise): the same token as the full race, row for row, on distributions cut by top-p
    and top-k, spread like an EAGLE head's (zeros outside its vocabulary), peaked, with one token, at the bound's edge;
    flat ones fall back to the full race."""
    from engine import sampler

    v = sampler.PRUNE_MIN_VOCAB + 1234
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(6, 3, v, generator=gen) * 2.5
    cases = {
        "top-p / top-k": probs_batch(logits, RowParams.build([SamplingParams(temperature=0.8, top_p=0.9),
                                                              SamplingParams(temperature=1.0, top_k=50)] * 3, "cpu")),
        "a head's vocabulary": probs_batch(logits, RowParams.build([SamplingParams(temperature=0.7)] * 6, "cpu"))
        * (torch.arange(v) % 5 == 0),
        "peaked": torch.softmax(logits * 12, -1),
    }
    one = torch.zeros(6, 3, v)
    one[..., 7] = 1.0
    cases["one token"] = one
    edge = torch.zeros(6, 3, v)  # tokens just inside and just outside the bound, beside the likeliest
    edge[..., 0] = 1.0
    edge[..., 1:200] = sampler.PRUNE * 1.0001
    edge[..., 200:400] = sampler.PRUNE * 0.9999
    cases["at the bound"] = edge
    for name, p in cases.items():
        keys = torch.randint(-(1 << 62), 1 << 62, (6, 3), generator=gen)
        want = race(p, rng.exponentials(keys, v))
        assert sampler._draw_pruned(p, keys) is not None, name
        assert torch.equal(draw(p, keys, cut=True), want), name
        assert torch.equal(draw(p[:, 0], keys[:, 0], cut=True), want[:, 0]), name  # 2-D
    flat = torch.softmax(logits, -1)
    keys = torch.randint(-(1 << 62), 1 << 62, (6, 3), generator=gen)
    assert sampler._draw_pruned(flat, keys) is None  # most tokens within reach: the full race
    assert torch.equal(draw(flat, keys, cut=True), race(flat, rng.exponentials(keys, v)))
    # the noise of chosen tokens is the whole vocabulary's at those tokens
    rows, cols = torch.tensor([0, 2, 5]), torch.tensor([3, v - 1, 0])
    assert torch.equal(rng.uniform_at(keys[rows, 1], cols), rng.uniform(keys[:, 1], v)[rows, cols])


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.9), SamplingParams(temperature=1.2, top_p=0.95)],
                         ids=["T 0.9", "T 1.2, top-p 0.95"])
def test_a_draft_draws_from_the_distribution_it_reports(params):
    """A draft's draws (``sampler.draft_draw``: the row's distribution cut to its DRAFT_TOP likeliest tokens) follow the
    q it reports, which rejection sampling divides by (10^5 draws over 64 tokens, where the cut drops 10-17% of the
    mass): q is the row's distribution on its likeliest tokens renormalised, and a head's own ids map onto the
    target's vocabulary."""
    from engine import sampler

    v = 64
    logits = torch.randn(v, generator=torch.Generator().manual_seed(5))
    rp = RowParams.build([params] * N, "cpu")
    keys = _keys(rng.DRAFT, 1)[:, 0]
    drawn, q = sampler.draft_draw(logits[None].expand(N, v), rp, keys, rp.truncates(v))
    full = probs_batch(logits[None], rp.select([0]))[0]
    top = full.topk(sampler.DRAFT_TOP).indices
    want = torch.zeros(v).index_copy_(0, top, full[top] / full[top].sum())
    assert 0.09 < float(full.sum() - full[top].sum()) and torch.allclose(q, want[None].expand(N, v), atol=1e-6)
    law = torch.bincount(drawn, minlength=v).double() / N
    assert 0.5 * float((law - want.double()).abs().sum()) < 4 * 0.5 * (v / N) ** 0.5
    # a head's vocabulary: its entry i is target token ids[i] (the draws, keyed by target ids, and q over the target's
    # 3v tokens)
    ids = torch.randperm(3 * v, generator=torch.Generator().manual_seed(6))[:v]
    got, q_ids = sampler.draft_draw(logits[None].expand(N, v), rp, keys, rp.truncates(v), ids, 3 * v)
    assert torch.equal(q_ids[:, ids], q) and float(q_ids.sum(-1).sub(1).abs().max()) < 1e-6
    law = torch.bincount(got, minlength=3 * v).double()[ids] / N
    assert 0.5 * float((law - want.double()).abs().sum()) < 4 * 0.5 * (v / N) ** 0.5


def test_selecting_rows_of_sampling_settings_keeps_each_rows_own():
    """``RowParams.select`` gives the chosen rows' settings in the chosen order; every row in order is the same
    settings (no copy)."""
    params = [SamplingParams(temperature=t, top_p=p, top_k=k) for t, p, k in ((0.5, 1.0, 0), (0.8, 0.9, 0), (1.0, 1.0, 7))]
    rp = RowParams.build(params, "cpu")
    assert rp.select([0, 1, 2]) is rp
    for rows in ([2, 0], [1], [0, 1], [2, 1, 0]):
        sub = rp.select(rows)
        assert sub.host == [params[i] for i in rows]
        assert sub.temperature.tolist() == pytest.approx([params[i].temperature for i in rows])
        assert sub.top_p.tolist() == pytest.approx([params[i].top_p for i in rows])
        assert sub.top_k.tolist() == [params[i].top_k for i in rows]
