"""Speculative decoding: greedy exactness, distribution exactness, provenance, scheduling, faults."""

import random

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.config import DEMO_DRAFT, DEMO_TARGET
from engine.sampler import probs_from_logits
from engine.sequence import FinishEvent, TokenEvent
from tests.tiny import tiny_engine, tiny_llama, tiny_pair_engine, tiny_tokenizer, word_tokenizer

PROMPTS = ["Once", "The cat sat on the mat and looked at", "Tom found a red ball under the big tree. They",
           "Lily loved to play"]


def _greedy(k, speculative=True, n=40):
    return SamplingParams(max_new_tokens=n, temperature=0, speculative=speculative, num_draft_tokens=k,
                          ignore_eos=True)


def _run_all(eng: LLMEngine, prompts, params) -> list[FinishEvent]:
    done: dict[int, FinishEvent] = {}
    for i, p in enumerate(prompts):
        eng.add_request(p, params, sink=lambda ev, i=i: done.__setitem__(i, ev) if isinstance(ev, FinishEvent) else None)
    while eng.has_work():
        eng.step()
    return [done[i] for i in range(len(prompts))]


def _assert_all_free(eng):
    for runner in filter(None, (eng.target, eng.draft)):
        runner.blocks.check_invariants()
        assert runner.blocks.num_free == runner.blocks.num_blocks, "KV blocks leaked"
    assert eng.num_running == 0 and eng.num_waiting == 0


@pytest.fixture(scope="module")
def pair():
    return tiny_pair_engine()


@pytest.fixture(scope="module")
def plain_reference(pair):
    return [pair.generate(p, _greedy(None, speculative=False)).token_ids for p in PROMPTS]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6, 7, 8, None])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_speculative_equals_plain(pair, plain_reference, k, batch):
    results = _run_all(pair, PROMPTS[:batch], _greedy(k))
    for res, ref in zip(results, plain_reference):
        assert res.token_ids == ref
        assert res.stats.num_drafts > 0
    _assert_all_free(pair)


@pytest.mark.parametrize("batch", [2, 3])
def test_greedy_batches_mixing_k_and_plain_rows(pair, plain_reference, batch):
    params = [_greedy(3), _greedy(None, speculative=False), _greedy(8)]
    done = {}
    for i in range(batch):
        pair.add_request(PROMPTS[i], params[i % 3], sink=lambda ev, i=i: done.__setitem__(i, ev)
                         if isinstance(ev, FinishEvent) else None)
    while pair.has_work():
        pair.step()
    assert [done[i].token_ids for i in range(batch)] == plain_reference[:batch]
    _assert_all_free(pair)


def test_greedy_exact_across_architectures():
    """A 1-layer Llama drafting for a Qwen2 target with the same tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(5)
    target = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                          max_position_embeddings=256)).eval()
    draft = tiny_llama(len(tok), layers=1, seed=9)
    eng = LLMEngine(target, tok, draft, EngineConfig(target="q", draft="l", kv_cache_tokens=2048), max_context=256)
    spec = _run_all(eng, PROMPTS, _greedy(4))
    plain = _run_all(eng, PROMPTS, _greedy(None, speculative=False))
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    _assert_all_free(eng)


def test_provenance_counts_agree_with_stats(pair):
    events = []
    pair.add_request(PROMPTS[1], SamplingParams(max_new_tokens=60, temperature=0.8, seed=1, num_draft_tokens=4,
                                                ignore_eos=True), sink=events.append)
    while pair.has_work():
        pair.step()
    toks = [e for e in events if isinstance(e, TokenEvent)]
    stats = events[-1].stats
    sources = [t.source for t in toks]
    assert sources.count("draft") == stats.num_accepted_tokens
    assert sources.count("bonus") + sources.count("target") == stats.num_drafts + 1  # +1: the prefill token
    assert sum(stats.accepted_per_position) == stats.num_accepted_tokens
    assert stats.drafts_per_position[0] == stats.num_drafts
    assert all(a <= d for a, d in zip(stats.accepted_per_position, stats.drafts_per_position))
    assert all(stats.accepted_per_position[i] >= stats.accepted_per_position[i + 1] for i in range(7))
    assert stats.num_generated_tokens == len(toks) == 60
    assert stats.acceptance_rate == pytest.approx(stats.num_accepted_tokens / stats.num_draft_tokens)
    assert stats.mean_acceptance_length == pytest.approx(1 + stats.num_accepted_tokens / stats.num_drafts)
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens  # the test exercises both outcomes
    # a bonus token only ever follows a fully accepted draft (K shrinks only near max_new_tokens)
    run = 0
    for index, s in enumerate(sources[1:], start=1):
        if s == "draft":
            run += 1
            assert run <= 4
        else:
            assert s == "target" and run < 4 or s == "bonus" and (run == 4 or index >= 60 - 4)
            run = 0


# ----------------------------------------------------------------------------- distribution exactness
VOCAB = 8
DIST_PROMPT = [1, 2, 3]
N_SAMPLES = 3000


def _dist_engine() -> LLMEngine:
    tok = word_tokenizer(VOCAB)
    target = tiny_llama(VOCAB, layers=2, hidden=32, heads=2, kv_heads=1, seed=11)
    draft = tiny_llama(VOCAB, layers=1, hidden=32, heads=2, kv_heads=1, seed=12)  # deliberately different
    return LLMEngine(target, tok, draft, EngineConfig(target="t", draft="d", kv_cache_tokens=16384, max_running=128,
                                                      max_waiting=N_SAMPLES), max_context=64)


@torch.inference_mode()
def _exact_marginals(model, params: SamplingParams, positions: int) -> list[torch.Tensor]:
    """Marginal distribution of each generated position under the target alone (enumerated)."""
    marginals = []
    prefixes = {(): 1.0}
    for _ in range(positions):
        nxt: dict[tuple, float] = {}
        marginal = torch.zeros(VOCAB, dtype=torch.float64)
        for prefix, weight in prefixes.items():
            logits = model(input_ids=torch.tensor([DIST_PROMPT + list(prefix)])).logits[0, -1]
            probs = probs_from_logits(logits, params).double()
            marginal += weight * probs
            for t in range(VOCAB):
                if probs[t] > 0:
                    nxt[prefix + (t,)] = weight * float(probs[t])
        marginals.append(marginal)
        prefixes = nxt
    return marginals


def _speculative_tv(eng: LLMEngine, params: SamplingParams) -> float:
    """Largest total-variation distance between sampled and exact marginals of positions 2..3."""
    counts = torch.zeros(3, VOCAB, dtype=torch.float64)
    for seed in range(N_SAMPLES):
        p = SamplingParams(**{**params.__dict__, "seed": seed})
        eng.add_request(DIST_PROMPT, p, sink=lambda ev: [counts[i].__setitem__(t, counts[i][t] + 1)
                                                         for i, t in enumerate(ev.token_ids)]
                        if isinstance(ev, FinishEvent) else None)
    while eng.has_work():
        eng.step()
    assert eng.spec_stats.num_drafts > 0
    exact = _exact_marginals(eng.target.model, params, 3)
    empirical = counts / N_SAMPLES
    return max(0.5 * float((empirical[i] - exact[i]).abs().sum()) for i in (1, 2))


# E[TV] <= 0.5 * sqrt(V / N) (Cauchy-Schwarz over V cells); 2.5x that is far out in the tail.
TV_BOUND = 2.5 * 0.5 * (VOCAB / N_SAMPLES) ** 0.5

DIST_PARAMS = [
    SamplingParams(max_new_tokens=3, temperature=1.0, num_draft_tokens=2, ignore_eos=True),
    SamplingParams(max_new_tokens=3, temperature=0.7, top_k=5, top_p=0.9, num_draft_tokens=2, ignore_eos=True),
]


@pytest.mark.parametrize("params", DIST_PARAMS, ids=["t1.0", "t0.7-topk5-topp0.9"])
def test_speculative_sampling_has_the_target_distribution(params):
    tv = _speculative_tv(_dist_engine(), params)
    assert tv < TV_BOUND, f"total variation {tv:.4f} exceeds {TV_BOUND:.4f}"


def test_distribution_test_catches_an_always_accept_sampler(monkeypatch):
    import engine.llm_engine as llm
    from engine.rejection import verify_always_accept

    monkeypatch.setattr(llm, "verify_sampled", verify_always_accept)
    tv = _speculative_tv(_dist_engine(), DIST_PARAMS[0])
    assert tv > TV_BOUND, f"a broken sampler went unnoticed (TV {tv:.4f} <= {TV_BOUND:.4f})"


def test_rejection_rule_on_crafted_distributions():
    from engine.rejection import verify_greedy, verify_sampled

    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    q_same = p[:2].clone()
    assert verify_sampled([1, 2], q_same, p, g) == (2, 0)  # all accepted, bonus from the last row
    q_wrong = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert verify_sampled([0, 2], q_wrong, p, g) == (0, 1)  # early mismatch: residual is the target's choice
    logits = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0]])
    assert verify_greedy([1, 0], logits) == (1, 2)
    assert verify_greedy([1, 2], logits) == (2, 0)


# ----------------------------------------------------------------------------- scheduling and faults
def test_two_hundred_random_requests_with_cancellations_leave_nothing_behind():
    eng = tiny_pair_engine(kv_tokens=512, max_running=8, max_waiting=256)  # small pool: forces waiting/preemption
    rng = random.Random(0)
    finished: dict[str, FinishEvent] = {}
    ids = []
    for i in range(200):
        params = SamplingParams(max_new_tokens=rng.randint(1, 40), temperature=rng.choice([0, 0.8]),
                                seed=i, num_draft_tokens=rng.choice([None, 1, 4, 8]),
                                speculative=rng.random() < 0.8)
        prompt = rng.choice(PROMPTS) * rng.randint(1, 3)
        req = eng.add_request(prompt, params, sink=lambda ev: finished.__setitem__(ev.request_id, ev)
                              if isinstance(ev, FinishEvent) else None)
        ids.append(req.request_id)
        if rng.random() < 0.3:
            eng.step()
        if rng.random() < 0.25:
            eng.abort(rng.choice(ids))
    for _ in range(20000):
        if not eng.has_work():
            break
        if rng.random() < 0.02:
            eng.abort(rng.choice(ids))
        eng.step()
    assert not eng.has_work(), "requests left hanging"
    assert set(finished) == set(ids)
    reasons = {ev.finish_reason for ev in finished.values()}
    assert "cancelled" in reasons and reasons <= {"length", "eos", "cancelled", "stop"}
    _assert_all_free(eng)


def test_kv_pressure_preempts_and_still_matches_plain():
    eng = tiny_pair_engine(kv_tokens=160, max_running=4)
    alone = [eng.generate(p, _greedy(4, n=50)).token_ids for p in PROMPTS]
    results = _run_all(eng, PROMPTS, _greedy(4, n=50))
    assert [r.token_ids for r in results] == alone
    assert sum(r.stats.num_preemptions for r in results) > 0
    _assert_all_free(eng)


def test_out_of_memory_in_a_step_fails_only_that_step_and_engine_lives_on(pair):
    victims = []

    def fault(stage, reqs):
        if stage == "decode" and any(r.request_id == "doomed" for r in reqs) and not victims:
            victims.extend(r.request_id for r in reqs)
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    pair.fault_hook = fault
    try:
        done = {}
        pair.add_request(PROMPTS[0], _greedy(4), request_id="doomed",
                         sink=lambda ev: done.__setitem__("doomed", ev) if isinstance(ev, FinishEvent) else None)
        while pair.has_work():
            pair.step()
        assert done["doomed"].finish_reason == "error" and "out of memory" in done["doomed"].error
        _assert_all_free(pair)
        ok = pair.generate(PROMPTS[0], _greedy(4))  # the engine keeps serving
        assert ok.finish_reason == "length"
    finally:
        pair.fault_hook = None


def test_adaptive_k_turns_speculation_off_when_it_cannot_pay(pair):
    saved = pair.draft_cost
    pair.draft_cost = 5.0  # a "draft" slower than the target
    try:
        res = pair.generate(PROMPTS[1], _greedy(None, n=40))
        assert res.stats.num_drafts <= 10  # a few drafts to measure, then plain
        assert pair.draft.blocks.num_free == pair.draft.blocks.num_blocks
    finally:
        pair.draft_cost = saved


def test_plain_only_engine_and_speculation_switched_off():
    eng = tiny_engine(draft=False)
    assert eng.generate("Once", _greedy(4)).stats.num_drafts == 0
    pair_eng = tiny_pair_engine()
    assert pair_eng.generate("Once", _greedy(4, speculative=False)).stats.num_drafts == 0


@pytest.mark.skipif(not (DEMO_TARGET / "config.json").exists(), reason="demo models not present")
def test_demo_pair_greedy_speculative_equals_plain():
    from engine.factory import build_engine

    eng = build_engine(EngineConfig(device="cpu", kv_cache_tokens=4096), warmup=False)
    prompts = ["Once upon a time", "Tom and his mom went to the park. Tom saw a big"]
    plain = _run_all(eng, prompts, _greedy(None, speculative=False, n=64))
    for k in (1, 4, 8, None):
        spec = _run_all(eng, prompts, _greedy(k, n=64))
        assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    assert spec[0].stats.acceptance_rate > 0.3
    assert DEMO_DRAFT.exists()
