"""Speculative decoding: greedy exactness, distribution exactness, provenance, scheduling, faults."""

import random

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.config import DEMO_DRAFT, DEMO_TARGET
from engine.sampler import probs_from_logits
from engine.sequence import FinishEvent, TokenEvent
from tests.tiny import random_eagle_head, tiny_engine, tiny_llama, tiny_pair_engine, tiny_tokenizer, word_tokenizer

PROMPTS = ["Once", "The cat sat on the mat and looked at", "Tom found a red ball under the big tree. They",
           "Lily loved to play"]


def _greedy(k, speculative=True, n=40, method="auto"):
    return SamplingParams(max_new_tokens=n, temperature=0, speculative=speculative, num_draft_tokens=k,
                          ignore_eos=True, draft_method=method)


def _run_all(eng: LLMEngine, prompts, params) -> list[FinishEvent]:
    done: dict[int, FinishEvent] = {}
    for i, p in enumerate(prompts):
        eng.add_request(p, params, sink=lambda ev, i=i: done.__setitem__(i, ev) if isinstance(ev, FinishEvent) else None)
    while eng.has_work():
        eng.step()
    return [done[i] for i in range(len(prompts))]


def _assert_all_free(eng):
    eagle = eng.proposers.get("eagle")
    for blocks in [r.blocks for r in filter(None, (eng.target, eng.draft))] + ([eagle.blocks] if eagle else []):
        blocks.check_invariants()
        assert blocks.num_free == blocks.num_blocks, "KV blocks leaked"
    assert eagle is None or not eagle._waiting, "EAGLE features kept for finished requests"
    assert eng.num_running == 0 and eng.num_waiting == 0


@pytest.fixture(scope="module")
def pair():
    return tiny_pair_engine(eagle=True)


@pytest.fixture(scope="module")
def plain_reference(pair):
    return [pair.generate(p, _greedy(None, speculative=False)).token_ids for p in PROMPTS]


@pytest.mark.parametrize("method", ["model", "ngram", "eagle", "auto"])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6, 7, 8, None])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_speculative_equals_plain(pair, plain_reference, k, batch, method):
    results = _run_all(pair, PROMPTS[:batch], _greedy(k, method=method))
    for res, ref in zip(results, plain_reference):
        assert res.token_ids == ref
    if k is not None:
        assert all(res.stats.num_drafts > 0 for res in results)
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


@pytest.mark.parametrize("window", [None, 8])
@pytest.mark.parametrize("method", ["model", "ngram", "auto"])
def test_greedy_exact_on_a_longrope_phi3_pair_past_its_switch(method, window):
    """Phi-3.5 / Phi-4-mini's shape on the lean forward (fused QKV and gate/up, a partial rotary factor, LongRoPE):
    greedy speculation equals plain decoding as the rows cross the pretraining context, where the rope table
    changes, and verification forwards straddle it; with a sliding window on every layer (Phi-3-mini-4k's kind,
    8 positions here) far past the window too (the lean forward's window against transformers' own logits:
    test_paged_cache)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    from tests.tiny import truncated_draft

    tok = tiny_tokenizer()
    torch.manual_seed(11)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "short_factor": [1.0, 1.2, 1.5, 2.0, 2.5, 3.0], "long_factor": [2.0, 3.0, 4.0, 6.0, 8.0, 12.0]}
    target = Phi3ForCausalLM(Phi3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=256, original_max_position_embeddings=24,
                                        rope_parameters=rope, partial_rotary_factor=0.75, pad_token_id=2,
                                        bos_token_id=0, eos_token_id=0, sliding_window=window)).eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(8.0)
        for layer in target.model.layers[1:]:  # so the 1-layer draft agrees often enough to draft deep
            layer.mlp.down_proj.weight.mul_(0.3)
            layer.self_attn.o_proj.weight.mul_(0.3)
    eng = LLMEngine(target, tok, truncated_draft(target), EngineConfig(target="phi", draft="phi-1",
                                                                       kv_cache_tokens=2048), max_context=256)
    assert eng.target.forward_path == eng.draft.forward_path == "lean" and eng.target.lean.window == window
    plain = _run_all(eng, PROMPTS, _greedy(None, speculative=False, n=48))
    spec = _run_all(eng, PROMPTS, _greedy(4 if method != "auto" else None, n=48, method=method))
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    assert method == "ngram" or all(r.stats.num_accepted_tokens > 0 for r in spec)
    _assert_all_free(eng)


@pytest.mark.parametrize("method", ["model", "ngram", "auto"])
@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
def test_greedy_exact_on_a_sliding_window_gemma_pair_past_its_window(family, method):
    """Gemma 3 and Gemma 2 (soft-capped) on the lean forward: their sliding layers see the last 8 positions here, the
    full layer all of them; greedy speculation equals plain decoding far past the window (every drafting method), and
    the model serves its whole context."""
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig

    from engine.loader import max_context_of
    from tests.tiny import truncated_draft

    tok = tiny_tokenizer()
    torch.manual_seed(13)
    kw = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=8,
              layer_types=["sliding_attention", "full_attention", "sliding_attention"], pad_token_id=2,
              bos_token_id=0, eos_token_id=0)
    cfg = Gemma3TextConfig(**kw) if family == "gemma3" else Gemma2Config(**kw, attn_logit_softcapping=2.0)
    target = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager" if family == "gemma2" else "sdpa").eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(8.0)
    assert max_context_of(cfg) == 256
    eng = LLMEngine(target, tok, truncated_draft(target), EngineConfig(target="gemma", draft="gemma-1",
                                                                       kv_cache_tokens=2048), max_context=256)
    assert eng.target.forward_path == eng.draft.forward_path == "lean" and eng.target.lean.window == 8
    plain = _run_all(eng, PROMPTS, _greedy(None, speculative=False, n=48))
    spec = _run_all(eng, PROMPTS, _greedy(4 if method != "auto" else None, n=48, method=method))
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    assert method == "ngram" or all(r.stats.num_accepted_tokens > 0 for r in spec)
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
VOCAB = 6
DIST_PROMPT = [1, 2, 3, 1, 2]  # repeats, so the n-gram proposer drafts too
N_SAMPLES = 3000
K_DIST = 4


def _dist_engine() -> LLMEngine:
    tok = word_tokenizer(VOCAB)
    target = tiny_llama(VOCAB, layers=2, hidden=32, heads=2, kv_heads=1, seed=11)
    draft = tiny_llama(VOCAB, layers=1, hidden=32, heads=2, kv_heads=1, seed=12)  # deliberately different
    with torch.no_grad():  # milder than tiny_llama's sharpening: every token keeps some mass
        target.lm_head.weight.mul_(0.6)
        draft.lm_head.weight.mul_(0.6)
    head = random_eagle_head(target, draft_vocab_size=VOCAB - 2, seed=13, scale=4.0)  # q is 0 on two tokens
    return LLMEngine(target, tok, draft, EngineConfig(target="t", draft="d", kv_cache_tokens=65536, max_running=256,
                                                      max_waiting=N_SAMPLES), max_context=64, eagle_head=head)


@torch.inference_mode()
def _exact_joint(model, params: SamplingParams) -> torch.Tensor:
    """[V, V] joint distribution of the first two generated tokens under the target alone."""
    first = probs_from_logits(model(input_ids=torch.tensor([DIST_PROMPT])).logits[0, -1], params).double()
    ids = torch.tensor([DIST_PROMPT + [t] for t in range(VOCAB)])
    second = probs_from_logits(model(input_ids=ids).logits[:, -1], params).double()  # [V, V]
    return first[:, None] * second


def _speculative_tv(eng: LLMEngine, params: SamplingParams, seeded: bool) -> float:
    """Total-variation distance between the sampled and exact joint law of the first two tokens."""
    counts = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)

    def sink(ev):
        if isinstance(ev, FinishEvent):
            counts[ev.token_ids[0], ev.token_ids[1]] += 1

    for i in range(N_SAMPLES):
        eng.add_request(DIST_PROMPT, SamplingParams(**{**params.__dict__, "seed": i if seeded else None}), sink=sink)
    while eng.has_work():
        eng.step()
    assert eng.spec_stats.drafts_per_position[K_DIST - 1] > 0, "K=4 never drafted 4 tokens"
    exact = _exact_joint(eng.target.model, params)
    return 0.5 * float((counts / N_SAMPLES - exact).abs().sum())


# E[TV] <= 0.5 * sqrt(cells / N) (Cauchy-Schwarz); 2.5x that is far out in the tail.
TV_BOUND = 2.5 * 0.5 * (VOCAB * VOCAB / N_SAMPLES) ** 0.5


def _dist_params(temperature, top_p, method):
    return SamplingParams(max_new_tokens=K_DIST + 2, temperature=temperature, top_p=top_p, num_draft_tokens=K_DIST,
                          ignore_eos=True, draft_method=method)


DIST_CASES = [pytest.param(t, tp, m, seeded, id=f"{m}-t{t}-topp{tp}-{'seeded' if seeded else 'unseeded'}",
                           marks=() if (m, t, seeded) in {("model", 1.0, False), ("ngram", 0.8, True),
                                                          ("eagle", 0.8, False)} else pytest.mark.slow)
              for m in ("model", "ngram", "eagle") for t, tp in ((1.0, 1.0), (0.8, 0.9)) for seeded in (False, True)]


@pytest.mark.parametrize("temperature,top_p,method,seeded", DIST_CASES)
def test_speculative_sampling_has_the_target_joint_distribution(temperature, top_p, method, seeded):
    tv = _speculative_tv(_dist_engine(), _dist_params(temperature, top_p, method), seeded)
    assert tv < TV_BOUND, f"total variation {tv:.4f} exceeds {TV_BOUND:.4f}"


@pytest.mark.parametrize("method", ["model", pytest.param("eagle", marks=pytest.mark.slow)])
def test_drafts_cut_to_their_likeliest_tokens_keep_the_target_distribution(monkeypatch, method):
    """Drafts sample from their distribution cut to its DRAFT_TOP likeliest tokens (engine.sampler.draft_draw); here
    cut to 2 of the 6 tokens, so most of q's mass moves: rejection sampling over the q drawn from stays exact."""
    import engine.sampler as sampler

    monkeypatch.setattr(sampler, "DRAFT_TOP", 2)
    tv = _speculative_tv(_dist_engine(), _dist_params(1.0, 1.0, method), seeded=False)
    assert tv < TV_BOUND, f"total variation {tv:.4f} exceeds {TV_BOUND:.4f}"


def test_distribution_test_catches_a_residual_drawn_from_q(monkeypatch):
    import engine.rejection as rejection

    def residual_from_q(p_at, q_at, tok_at, rejected):  # a broken rule: after a rejection, draw from q
        return p_at if q_at is None else torch.where(rejected[:, None], q_at, p_at)

    monkeypatch.setattr(rejection, "next_token_dist", residual_from_q)
    tv = _speculative_tv(_dist_engine(), _dist_params(1.0, 1.0, "model"), seeded=False)
    assert tv > TV_BOUND, f"a broken sampler went unnoticed (TV {tv:.4f} <= {TV_BOUND:.4f})"


def test_seeded_requests_reproduce_across_k_methods_and_load(pair):
    params = [SamplingParams(max_new_tokens=40, temperature=0.8, top_p=0.9, seed=s, ignore_eos=True,
                             speculative=False) for s in (7, 8)]
    alone = [pair.generate(PROMPTS[1], p).token_ids for p in params]
    for method in ("model", "ngram", "eagle", "auto"):
        for k in (1, 4, 8, None):
            for seed_i, p in enumerate(params):
                spec = SamplingParams(**{**p.__dict__, "speculative": True, "num_draft_tokens": k,
                                         "draft_method": method})
                assert pair.generate(PROMPTS[1], spec).token_ids == alone[seed_i], (method, k)
    # under concurrent load: unseeded and seeded neighbours with other K, prompts and temperatures
    done = {}
    for i in range(6):
        p = SamplingParams(max_new_tokens=30 + i, temperature=0.5 + 0.1 * i, num_draft_tokens=[None, 2, 6][i % 3],
                           seed=None if i % 2 else 100 + i)
        pair.add_request(PROMPTS[i % 4], p, sink=lambda ev: None)
    for seed_i, p in enumerate(params):
        spec = SamplingParams(**{**p.__dict__, "speculative": True, "num_draft_tokens": [3, None][seed_i]})
        pair.add_request(PROMPTS[1], spec, sink=lambda ev, i=seed_i: done.__setitem__(i, ev)
                         if isinstance(ev, FinishEvent) else None)
    while pair.has_work():
        pair.step()
    assert [done[i].token_ids for i in range(2)] == alone
    _assert_all_free(pair)


@pytest.mark.parametrize("method", ["model", "eagle"])
def test_drafts_left_on_the_device_verify_as_drafts_on_the_host(pair, plain_reference, monkeypatch, method):
    """A proposer's draft still on the device (``Proposal.drafted``: a CUDA chain's, whose host copy would stall the
    step) reaches the verification there: the target reads it as the tail of its input and the host gets it with the
    verification's one copy. Over that path on the CPU (every proposal holding each row's own K handed over on the
    device, padded to one width), greedy output is the plain output, seeded sampling repeats its output without
    drafting, and the drafts accepted are the host path's; it fails when the target's forward ignores the tail or a
    verification reads the placeholders."""
    from engine.proposers.base import Proposal

    prop = pair.proposers[method]
    real = type(prop).propose
    tails = []

    def on_device(self, rows):
        out = real(self, rows)
        lists = out.lists()
        if all(len(t) == k for t, k in zip(lists, rows.ks)):  # every row's own K (padded to the longest: unread)
            width = max(rows.ks)
            return Proposal(None, out.probs, drafted=torch.tensor([t + [0] * (width - len(t)) for t in lists]))
        return out

    forward = type(pair.target).forward

    def spy(self, rows, sync=True, tail=None):
        tails.append(tail is not None)
        return forward(self, rows, sync, tail)

    sampled = [SamplingParams(max_new_tokens=30, temperature=t, top_p=tp, seed=s, ignore_eos=True,
                              num_draft_tokens=4, draft_method=method) for s, t, tp in ((7, 0.8, 0.9), (8, 1.0, 1.0))]
    alone = [pair.generate(PROMPTS[1], SamplingParams(**{**p.__dict__, "speculative": False})).token_ids
             for p in sampled]

    def run():  # rows ending at other steps: steps where some rows draft fewer than 4 tokens, or none
        done = {}
        for i, p in enumerate(PROMPTS):
            pair.add_request(p, _greedy(4, n=40 - 3 * i, method=method),
                             sink=lambda ev, i=i: done.__setitem__(i, ev) if isinstance(ev, FinishEvent) else None)
        while pair.has_work():
            pair.step()
        greedy = [done[i] for i in range(len(PROMPTS))]
        done = {}
        for i, p in enumerate(sampled):
            pair.add_request(PROMPTS[1], p, sink=lambda ev, i=i: done.__setitem__(i, ev)
                             if isinstance(ev, FinishEvent) else None)
        while pair.has_work():
            pair.step()
        return greedy + [done[i] for i in range(len(sampled))]

    host = run()
    monkeypatch.setattr(type(prop), "propose", on_device)
    monkeypatch.setattr(type(pair.target), "forward", spy)
    results = run()
    assert all(r.error is None for r in results)
    assert [r.token_ids for r in results] == [t[: 40 - 3 * i] for i, t in enumerate(plain_reference)] + alone
    assert sum(tails) > 10, "no verification read a draft left on the device"
    # the same drafts accepted as on the host (placeholders verified instead would still give the same tokens)
    assert [(r.stats.num_drafts, r.stats.acceptance_rate) for r in results] == \
        [(r.stats.num_drafts, r.stats.acceptance_rate) for r in host]
    _assert_all_free(pair)


def test_rejection_rule_on_crafted_logits():
    from engine.rejection import verify
    from engine.sampler import RowParams

    logits = torch.tensor([[[0.0, 9.0, 0.0], [0.0, 0.0, 9.0], [9.0, 0.0, 0.0]]]).repeat(2, 1, 1)  # argmax 1, 2, 0
    rp = RowParams.build([SamplingParams(temperature=0)] * 2, "cpu")
    keys, k = torch.zeros(2, 3, dtype=torch.long), torch.tensor([2, 2])
    accepted, tokens = verify(logits, torch.tensor([[1, 2], [1, 0]]), k, None, rp, keys, None)
    assert accepted.tolist() == [2, 1]  # all accepted + bonus; early mismatch at position 1
    assert tokens.tolist() == [[1, 2, 0], [1, 2, 0]]


# ----------------------------------------------------------------------------- scheduling and faults
def test_two_hundred_random_requests_with_cancellations_leave_nothing_behind():
    eng = tiny_pair_engine(kv_tokens=512, max_running=8, max_waiting=256, eagle=True)  # small pool: waiting/preemption
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
    eng = tiny_pair_engine(kv_tokens=160, max_running=4, eagle=True)
    for method in ("model", "eagle"):
        alone = [eng.generate(p, _greedy(4, n=50, method=method)).token_ids for p in PROMPTS]
        results = _run_all(eng, PROMPTS, _greedy(4, n=50, method=method))
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


def test_plain_only_engine_and_speculation_switched_off():
    eng = tiny_engine(draft=False)
    assert eng.generate("Once", _greedy(4, speculative=False)).stats.num_drafts == 0
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
