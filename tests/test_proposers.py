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
    (res,), _ = decode_step(eng.target, eng.proposers, {req: (4, "ngram")}, {req: 3})
    assert (res.method, res.k) == ("model", 3)  # at most the K the target made room for
    assert res.tokens[-1] == int(res.logits[res.accepted].argmax())  # greedy: the correction is the argmax
    assert eng.draft.cached_len(req.seq_id) == n + 2  # the draft read the context and its first two drafts
    eng.abort(req.request_id)
    eng.step()
    for runner in (eng.target, eng.draft):
        assert runner.blocks.num_free == runner.blocks.num_blocks
