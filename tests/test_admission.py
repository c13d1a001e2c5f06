"""Admission and long prompts: a request that cannot fit the KV cache alone is refused up front
(4xx naming the limit); long prompts are prefilled in chunks between other requests' decode steps;
under KV pressure the others keep running; no block is leaked."""

import httpx
import pytest

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.errors import PromptTooLong
from engine.prefill import CHUNK
from engine.sequence import FinishEvent, TokenEvent
from tests.tiny import tiny_engine, tiny_llama, tiny_tokenizer, truncated_draft


def _assert_all_free(eng):
    for runner in filter(None, (eng.target, eng.draft)):
        runner.blocks.check_invariants()
        assert runner.blocks.num_free == runner.blocks.num_blocks, "KV blocks leaked"
    assert eng.num_running == 0 and eng.num_waiting == 0


def _long_context_engine(kv_tokens: int = 8192, **cfg) -> LLMEngine:
    tok = tiny_tokenizer()
    target = tiny_llama(len(tok), layers=2, seed=3, max_pos=4096)
    config = EngineConfig(target="t", draft="d", kv_cache_tokens=kv_tokens, **cfg)
    return LLMEngine(target, tok, truncated_draft(target), config, max_context=4096)


def test_a_request_that_cannot_fit_alone_is_refused_up_front_naming_the_limit():
    eng = tiny_engine(kv_tokens=256)
    with pytest.raises(PromptTooLong) as err:
        eng.add_request("Once upon a time", SamplingParams(max_new_tokens=400))
    msg = str(err.value)
    assert "holds 256 tokens" in msg and "lower max_new_tokens to at most" in msg and "--kv-cache-tokens" in msg
    limit = int(msg.split("at most ")[1].split(",")[0])
    ok = eng.generate("Once upon a time", SamplingParams(max_new_tokens=limit, temperature=0, ignore_eos=True))
    assert ok.finish_reason == "length" and len(ok.token_ids) == limit  # the limit it names really fits
    with pytest.raises(PromptTooLong, match="shorten the prompt"):
        eng.add_request(list(range(3, 253)), SamplingParams(max_new_tokens=1))
    _assert_all_free(eng)


def test_long_prompt_is_prefilled_in_chunks_between_other_requests_decode_steps():
    eng = _long_context_engine()
    long_prompt = [3 + (i * 7) % 300 for i in range(3 * CHUNK + 100)]
    params = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
    alone = _long_context_engine().generate(long_prompt, params).token_ids  # same weights, cold prefix cache
    widths = []
    forward = eng.target.forward
    eng.target.forward = lambda rows, **kw: widths.append(max(len(r.token_ids) for r in rows)) or forward(rows, **kw)
    order = []
    done = {}

    def sink(name):
        def on(ev):
            if isinstance(ev, TokenEvent):
                order.append(name)
            elif isinstance(ev, FinishEvent):
                done[name] = ev
        return on

    eng.add_request("Once upon a time", SamplingParams(max_new_tokens=60, temperature=0, ignore_eos=True),
                    sink=sink("short"))
    eng.step()  # the short request is decoding ...
    eng.step()
    eng.add_request(long_prompt, params, sink=sink("long"))  # ... when the long prompt arrives
    while eng.has_work():
        eng.step()
    del eng.target.forward
    assert max(widths) <= CHUNK
    first_long = order.index("long")
    assert order[:first_long].count("short") >= 4  # the short one kept decoding during the 4 chunks
    assert done["long"].token_ids == alone and done["short"].finish_reason == "length"
    _assert_all_free(eng)


def test_kv_pressure_keeps_the_others_running_and_leaks_nothing():
    eng = _long_context_engine(kv_tokens=512, max_running=6)
    params = SamplingParams(max_new_tokens=120, temperature=0.8, seed=5, ignore_eos=True)
    alone = eng.generate(list(range(3, 200)), params).token_ids
    done = {}
    for i in range(6):
        prompt = list(range(3, 200)) if i == 0 else list(range(10 + i, 60 + i))
        eng.add_request(prompt, params, sink=lambda ev, i=i: done.__setitem__(i, ev) if isinstance(ev, FinishEvent)
                        else None)
    while eng.has_work():
        eng.step()
    assert all(done[i].finish_reason == "length" and len(done[i].token_ids) == 120 for i in range(6))
    assert sum(done[i].stats.num_preemptions for i in range(6)) > 0
    assert done[0].token_ids == alone  # seeded: preempted and resumed, the same tokens
    _assert_all_free(eng)


def test_server_refuses_an_unfittable_request_with_a_4xx_that_names_the_limit():
    from engine.host import EngineHost
    from engine.server import ServerRunner

    host = EngineHost()
    host.adopt(tiny_engine(kv_tokens=256))
    runner = ServerRunner(host, port=0)
    runner.start()
    try:
        r = httpx.post(f"{runner.url}/generate", json={"prompt": "Once upon a time", "max_new_tokens": 1000},
                       timeout=30)
        assert 400 <= r.status_code < 500
        assert "max_new_tokens" in r.text and "256 tokens" in r.text
        ok = httpx.post(f"{runner.url}/generate", json={"prompt": "Once", "max_new_tokens": 8}, timeout=30)
        assert ok.status_code == 200
    finally:
        runner.stop()
        host.shutdown()


def test_a_draft_that_sat_out_catches_up_in_bounded_chunks():
    from engine.proposers.draft_model import CATCH_UP

    eng = _long_context_engine()
    prompt = [3 + (i * 11) % 300 for i in range(3 * CATCH_UP + 40)]
    req = eng.add_request(prompt, SamplingParams(max_new_tokens=8, temperature=0, draft_method="ngram"))
    while not req.prefilled:
        eng.step()
    assert eng.draft.cached_len(req.seq_id) == 0  # n-gram only: the draft model never read it
    widths = []
    forward = eng.draft.forward
    eng.draft.forward = lambda rows, **kw: widths.append(max(len(r.token_ids) for r in rows)) or forward(rows, **kw)
    eng.proposers["model"]._catch_up([req])
    del eng.draft.forward
    assert widths and max(widths) <= CATCH_UP
    assert 0 < len(req.all_ids) - eng.draft.cached_len(req.seq_id) <= CATCH_UP  # the rest: the first draft step
    while eng.has_work():
        eng.step()
    _assert_all_free(eng)
