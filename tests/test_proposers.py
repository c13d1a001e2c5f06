"""Proposers: n-gram prompt lookup (unit), an engine with no draft model drafting by n-gram, and the
draft_method field over the API. Exactness per proposer is in test_speculative.py."""

import httpx
import pytest

from engine import SamplingParams
from engine.errors import InvalidRequest
from engine.proposers.ngram import lookup
from tests.tiny import tiny_engine


def test_lookup_takes_the_longest_most_recent_match():
    ids = [1, 2, 3, 9, 1, 2, 3, 4, 5, 6, 7, 1, 2, 3]
    assert lookup(ids, 3) == [4, 5, 6]  # "1 2 3" last seen before 4 5 6 (not before 9)
    assert lookup([5, 6, 7, 8, 9, 6, 7], 2) == [8, 9]  # n = 2 beats n = 1 ("7" alone also matches)
    assert lookup([1, 2, 3, 4], 3) == []  # nothing repeats
    assert lookup([7], 3) == []


def test_lookup_continues_a_repeating_pattern_past_the_end():
    assert lookup([1, 2, 1, 2, 1], 5) == [2, 1, 2, 1, 2]  # period 2, carried on


def test_ngram_drafts_only_the_positions_that_pay_for_their_match_order():
    """Acceptance is counted per match order (in ``rollback``, from what was verified). With a verified position
    costing ``position_cost`` plain steps, a match of an order whose second draft is rarely accepted drafts one
    token where adaptive planned four; a reliable order drafts all four; a fixed K is drafted as asked; with no
    cost set (a batch) nothing is cut."""
    from types import SimpleNamespace

    from engine.proposers.base import StepRows
    from engine.proposers.ngram import NgramProposer

    prop = NgramProposer()

    def row(ids, seq_id, fixed=None):
        return SimpleNamespace(all_ids=ids, seq_id=seq_id, num_tokens=len(ids),
                               adaptive=SimpleNamespace(sampling="greedy"), params=SimpleNamespace(num_draft_tokens=fixed))

    weak, strong = row([5, 1, 2, 3, 4, 9, 8, 7, 1], 1), row([1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4], 2)
    for _ in range(40):  # order 1: first draft accepted 1 in 4, second never; order 4: all four accepted
        prop.propose(StepRows([weak, strong], [4, 4], None))
        prop.rollback(weak, weak.num_tokens + 1 * (_ % 4 == 0))
        prop.rollback(strong, strong.num_tokens + 4)
    assert prop.by_order[1].accepted_per_position[1] == 0 and prop.by_order[4].acceptance_rate == 1.0
    prop.position_cost = 0.15
    out = prop.propose(StepRows([weak, strong, row(weak.all_ids, 3, fixed=4)], [4, 4, 4], None)).lists()
    assert out == [[2], [5, 6, 7, 8], [2, 3, 4, 9]]
    prop.position_cost = 0.0
    assert prop.propose(StepRows([weak], [4], None)).lists() == [[2, 3, 4, 9]]
    prop.rollback(weak, weak.num_tokens)
    # a first position that costs more than the order's first draft returns (weak: ~1 in 4) drafts nothing, but for
    # one match in EXPLORE_CUT (evidence for that order); a reliable order and a fixed K are not cut
    from engine.proposers.ngram import EXPLORE_CUT

    prop.position_cost, prop.first_cost = 0.15, 0.4
    drafted = []
    for _ in range(2 * EXPLORE_CUT):
        out = prop.propose(StepRows([weak, strong, row(weak.all_ids, 3, fixed=4)], [4, 4, 4], None)).lists()
        assert out[1:] == [[5, 6, 7, 8], [2, 3, 4, 9]]
        drafted.append(out[0])
        for r in (weak, strong):
            prop.rollback(r, r.num_tokens)
    assert drafted.count([]) == 2 * EXPLORE_CUT - 2 and drafted.count([2]) == 2, drafted
    prop.first_cost = 0.2  # cheaper than the weak order's first draft: it drafts again
    assert prop.propose(StepRows([weak], [4], None)).lists() == [[2]]
    prop.release(weak)
    assert weak.seq_id not in prop._drafted


def test_ngram_expected_tokens_follow_the_match_found_now():
    """What adaptive K reads for n-gram (``NgramProposer.expected``): nothing matches, 1 token at every K; after a
    match, the acceptance that drafts after a match of that order realized for the request's sampling class, cut
    where the engine's position cost says a draft stops. Each fails if misses or another order's drafts leak in."""
    from types import SimpleNamespace

    from engine.proposers.base import StepRows
    from engine.proposers.ngram import NgramProposer

    prop = NgramProposer()

    def row(ids, seq_id, sampling="greedy"):
        return SimpleNamespace(all_ids=ids, seq_id=seq_id, num_tokens=len(ids),
                               adaptive=SimpleNamespace(sampling=sampling), params=SimpleNamespace(num_draft_tokens=None))

    none, strong, weak = row([1, 2, 3, 4, 5], 1), row([1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4], 2), \
        row([5, 1, 2, 3, 4, 9, 8, 7, 1], 3)
    assert prop.expected(none) == [1.0] * 9
    for _ in range(60):  # order 4 (strong): all 8 accepted; order 1 (weak): nothing
        prop.propose(StepRows([strong, weak], [8, 8], None))
        prop.rollback(strong, strong.num_tokens + 8)
        prop.rollback(weak, weak.num_tokens)
    e4, e1 = prop.expected(strong), prop.expected(weak)
    assert e4[8] > 7.0 and e1[1] < 1.1, (e4, e1)  # the prior (0.5 a position) alone: 2.0
    assert prop.expected(row(strong.all_ids, 4, sampling="T0.8")) == pytest.approx(
        [1.0] + [1.0 + sum(0.5 ** (j + 1) for j in range(i + 1)) for i in range(8)])  # another class: the prior
    prop.position_cost = 0.5  # positions past the first whose survival is at most 0.5 are not drafted
    assert prop.expected(strong) == e4  # all pay
    prop.first_cost = 0.2
    assert prop.expected(weak) == [1.0] * 9  # its first position does not pay: no draft


def test_the_first_verified_positions_cost_comes_from_measured_forwards():
    """At batch 1 a two-token verification costs more than a plain step by much more than the per-token cost of
    longer ones (the one-row GEMV path ends there): the engine keeps moving averages of the target's forward by tokens
    verified and gives n-gram the difference, in plain steps, never below the per-token cost."""
    eng = tiny_engine(draft=False)
    eng._verify_s, eng._plain_s, eng.verify_cost = {}, None, 0.05
    eng.observe_verify(1, 0.010, 0.011)
    eng.observe_verify(2, 0.015)
    assert abs(eng.first_cost - 0.005 / 0.011) < 1e-9
    for _ in range(50):  # the two cost the same from now on: the average converges, one stall moves it little
        eng.observe_verify(2, 0.010)
    eng.observe_verify(2, 1.0)
    assert eng.first_cost == eng.verify_cost
    assert eng._verify_s[2] < 0.0115


def test_engine_without_a_draft_model_drafts_by_ngram_exactly():
    eng = tiny_engine(draft=False)
    prompt = "The cat sat on the mat and looked at the moon. The cat sat on the mat and"
    plain = eng.generate(prompt, SamplingParams(max_new_tokens=60, temperature=0, speculative=False,
                                                ignore_eos=True))
    for method, k in (("ngram", 4), ("ngram", None), ("auto", None)):
        res = eng.generate(prompt, SamplingParams(max_new_tokens=60, temperature=0, num_draft_tokens=k,
                                                  draft_method=method, ignore_eos=True))
        assert res.token_ids == plain.token_ids, (method, k)
    fixed = eng.generate(prompt, SamplingParams(max_new_tokens=60, temperature=0, num_draft_tokens=4,
                                                draft_method="ngram", ignore_eos=True))
    assert fixed.stats.num_drafts > 0 and fixed.stats.num_accepted_tokens > 0
    model_only = eng.generate(prompt, SamplingParams(max_new_tokens=10, temperature=0, draft_method="model"))
    assert model_only.stats.num_drafts == 0  # no draft model: plain, never an error
    eagle_only = eng.generate(prompt, SamplingParams(max_new_tokens=10, temperature=0, draft_method="eagle"))
    assert eagle_only.stats.num_drafts == 0  # no EAGLE head loaded: plain, never an error
    with pytest.raises(InvalidRequest, match="draft_method must be one of"):
        SamplingParams(draft_method="medusa")


def test_draft_method_over_the_api():
    from engine.host import EngineHost
    from engine.server import ServerRunner

    host = EngineHost()
    host.adopt(tiny_engine(draft=False))
    runner = ServerRunner(host, port=0)
    runner.start()
    try:
        body = {"prompt": "Once upon a time. Once upon a time. Once upon", "max_new_tokens": 24, "temperature": 0,
                "ignore_eos": True, "num_draft_tokens": 3}
        plain = httpx.post(f"{runner.url}/generate", json={**body, "speculative": False}, timeout=30).json()
        ngram = httpx.post(f"{runner.url}/generate", json={**body, "draft_method": "ngram"}, timeout=30).json()
        assert ngram["token_ids"] == plain["token_ids"] and ngram["stats"]["num_drafts"] > 0
        bad = httpx.post(f"{runner.url}/generate", json={**body, "draft_method": "medusa"}, timeout=30)
        assert bad.status_code == 422 and "draft_method" in bad.text
        chat = httpx.post(f"{runner.url}/v1/completions", json={"prompt": body["prompt"], "max_tokens": 8,
                                                                "temperature": 0, "draft_method": "ngram"}, timeout=30)
        assert chat.status_code == 200
    finally:
        runner.stop()
        host.shutdown()


def test_auto_drafts_with_the_model_where_ngram_finds_no_match():
    from engine.spec_decode import decode_step
    from tests.tiny import tiny_pair_engine

    eng = tiny_pair_engine()
    req = eng.add_request([5, 9, 17, 33, 65, 129], SamplingParams(max_new_tokens=20, temperature=0))  # no repeats
    while not req.prefilled:
        eng.step()
    n = req.num_tokens
    (res,), _ = decode_step(eng.target, eng.proposers, {req: (4, "ngram")}, {req: (3, "model")})
    assert (res.method, res.k) == ("model", 3)  # at most the K the target made room for
    assert res.tokens[-1] == int(res.logits[res.accepted].argmax())  # greedy: the correction is the argmax
    assert eng.draft.cached_len(req.seq_id) == n + 2  # the draft read the context and its first two drafts
    eng.abort(req.request_id)
    eng.step()
    for runner in (eng.target, eng.draft):
        assert runner.blocks.num_free == runner.blocks.num_blocks


def test_auto_drafts_with_the_eagle_head_where_ngram_finds_no_match(monkeypatch):
    from engine.proposers.base import Proposal
    from engine.proposers.ngram import NgramProposer
    from engine.spec_decode import decode_step
    from tests.tiny import tiny_pair_engine

    # a sampled first token may repeat a prompt token (then the lookup matches): make every lookup miss
    monkeypatch.setattr(NgramProposer, "propose", lambda self, rows: Proposal([[] for _ in rows.reqs]))
    eng = tiny_pair_engine(eagle=True)
    prop = eng.proposers["eagle"]
    for temperature in (0.0, 0.9):
        # ignore_eos: a sampled first token may be the EOS (1 run in ~40), and the request would end at its prefill
        req = eng.add_request([5, 9, 17, 33, 65, 129], SamplingParams(max_new_tokens=20, temperature=temperature,
                                                                      ignore_eos=True))
        while not req.prefilled:
            eng.step()
        n = req.num_tokens
        (res,), _ = decode_step(eng.target, eng.proposers, {req: (4, "ngram")}, {req: (2, "eagle")})
        assert (res.method, res.k) == ("eagle", 2)
        if temperature == 0:
            assert res.tokens[-1] == int(res.logits[res.accepted].argmax())
        assert prop._cached(req.seq_id) == n - 1  # real pairs only: the draft's chain left the head's cache
        eng.abort(req.request_id)
        eng.step()
    assert prop.blocks.num_free == prop.blocks.num_blocks and not prop._waiting


def test_ngram_rows_fall_back_to_the_method_adaptive_predicts_faster(monkeypatch):
    """An adaptive auto row planned for n-gram falls back to the EAGLE head when adaptive predicts the head
    faster than the draft model and plain, to the model when the model is faster, to nothing when neither pays;
    greedy output stays the plain output throughout."""
    import engine.llm_engine as llm
    from tests.tiny import tiny_pair_engine

    eng = tiny_pair_engine(eagle=True)
    prompt = [5, 9, 17, 33, 65, 129, 7, 11]
    plain = eng.generate(prompt, SamplingParams(max_new_tokens=24, temperature=0, speculative=False,
                                                ignore_eos=True))
    real_step = llm.decode_step
    for faster, expect in (("eagle", "eagle"), ("model", "model"), (None, None)):
        seen = []

        def gains(state, method, batch, alpha, slope, faster=faster):
            g = {k: 0.5 for k in range(9)} | {0: 1.0}
            if method == faster:
                g[3] = 1.5
            return g

        def step(target, proposers, plan, fallback=None, threads=None, seen=seen, **kw):
            seen.append(dict(fallback or {}))
            return real_step(target, proposers, plan, fallback, threads, **kw)

        # every step planned for n-gram (K within the room left)
        monkeypatch.setattr(eng, "_choose", lambda req, batch: (max(0, min(4, req.remaining - 1)), "ngram"))
        monkeypatch.setattr(eng.policy, "gains", gains)
        monkeypatch.setattr(llm, "decode_step", step)
        out = eng.generate(prompt, SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True))
        assert out.token_ids == plain.token_ids
        chosen = {m for f in seen for (_, m) in f.values()}
        assert chosen == ({expect} if expect else set()), (faster, seen)
        if expect:
            assert out.stats.by_method.get(expect, [0])[0] > 0  # it drafted where n-gram found nothing
        monkeypatch.undo()


@pytest.mark.parametrize("seeded", [False, True])
def test_rows_falling_back_from_ngram_to_eagle_keep_the_target_distribution(monkeypatch, seeded):
    """Steps mixing rows that draft by n-gram and rows that fell back to the EAGLE head (every other row's
    lookup is made to miss) still sample the target's joint law of the first two tokens."""
    from engine.proposers.base import Proposal
    from engine.proposers.ngram import NgramProposer
    from tests.test_speculative import K_DIST, TV_BOUND, _dist_engine, _dist_params, _speculative_tv

    eng = _dist_engine()
    real = NgramProposer.propose

    def every_other_row_misses(self, rows):
        prop = real(self, rows)
        return Proposal([t if r.seq_id % 2 else [] for r, t in zip(rows.reqs, prop.lists())], prop.probs)

    monkeypatch.setattr(NgramProposer, "propose", every_other_row_misses)
    monkeypatch.setattr(eng, "_choose", lambda req, batch: (max(0, min(K_DIST, req.remaining - 1)), "ngram"))
    monkeypatch.setattr(eng, "_fallbacks", lambda plan, batch: {r: (K_DIST, "eagle") for r, (k, _) in plan.items() if k})
    tv = _speculative_tv(eng, _dist_params(0.8, 0.9, "auto"), seeded)
    assert tv < TV_BOUND, f"total variation {tv:.4f} exceeds {TV_BOUND:.4f}"
    assert eng.method_stats["eagle"].num_drafts > 0 and eng.method_stats["ngram"].num_drafts > 0


@pytest.mark.parametrize("method", ["model", "eagle"])
def test_rows_of_different_k_draft_to_one_k_where_the_proposer_chains(monkeypatch, method):
    """Where a proposer drafts steps 2..K as one CUDA graph (``chains``), rows that planned different K draft the
    largest (one chain, not step by step) and each keeps its own K of it: the step verifies and returns what it
    would have without the padding. Where it does not chain (the CPU), each row drafts its own K."""
    from engine.proposers.draft_model import DraftModelProposer
    from engine.proposers.eagle import EagleProposer
    from engine.spec_decode import decode_step
    from tests.tiny import tiny_pair_engine

    cls = DraftModelProposer if method == "model" else EagleProposer
    asked = []
    real = cls.propose

    def spy(self, rows):
        asked.append(list(rows.ks))
        return real(self, rows)

    monkeypatch.setattr(cls, "propose", spy)
    results = {}
    for chains in (False, True):
        monkeypatch.setattr(cls, "chains", property(lambda self, c=chains: c))
        eng = tiny_pair_engine(eagle=method == "eagle")
        reqs = [eng.add_request(p, SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True))
                for p in ("Once", "The cat sat on the mat", "Tom found a red ball")]
        while not all(r.prefilled for r in reqs):
            eng.step()
        asked.clear()
        res, _ = decode_step(eng.target, eng.proposers, dict(zip(reqs, [(4, method), (2, method), (3, method)])))
        assert asked == [[4, 4, 4] if chains else [4, 2, 3]]
        assert [r.k for r in res] == [4, 2, 3]  # each row verified its own K
        results[chains] = [(r.accepted, r.tokens) for r in res]
        for r in reqs:  # the padded drafts are rolled back with the rejected ones
            n = r.num_tokens
            eng.target.truncate(r.seq_id, n)
            for p in eng.proposers.values():
                p.rollback(r, n)
            eng.abort(r.request_id)
        eng.step()
        for runner in (eng.target, eng.draft):
            assert runner.blocks.num_free == runner.blocks.num_blocks
    assert results[True] == results[False]
