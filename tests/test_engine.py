"""Plain decoding through the engine: exactness against transformers, streaming, errors, cleanup."""

import pytest
import torch

from engine import EngineConfig, SamplingParams
from engine.errors import DeviceUnavailable, InvalidRequest, ModelLoadError, PromptTooLong, TokenizerMismatch
from engine.sequence import FinishEvent, TokenEvent
from tests.tiny import tiny_engine, tiny_tokenizer, word_tokenizer

GREEDY = SamplingParams(max_new_tokens=48, temperature=0, speculative=False, ignore_eos=True)


@pytest.fixture(scope="module")
def engine():
    return tiny_engine(draft=False)


def _assert_all_free(eng):
    for runner in filter(None, (eng.target, eng.draft)):
        runner.blocks.check_invariants()
        assert runner.blocks.num_free == runner.blocks.num_blocks
    assert eng.num_running == 0 and eng.num_waiting == 0


def test_greedy_plain_equals_transformers_generate(engine):
    prompt = "Once upon a time there was"
    ids = engine.tokenizer(prompt)["input_ids"]
    out = engine.generate(prompt, GREEDY)
    ref = engine.target.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=48, min_new_tokens=48,
                                       pad_token_id=2)
    assert out.token_ids == ref[0, len(ids):].tolist()
    assert out.finish_reason == "length"
    _assert_all_free(engine)


def test_batched_requests_of_different_lengths_match_running_alone(engine):
    prompts = ["Once", "The cat sat on the mat and looked", "Tom found a red ball", "Lily"]
    alone = [engine.generate(p, GREEDY).token_ids for p in prompts]
    results = {}
    for p in prompts:
        engine.add_request(p, GREEDY, sink=lambda ev, p=p: results.__setitem__(p, ev) if isinstance(ev, FinishEvent) else None)
    while engine.has_work():
        engine.step()
    assert [results[p].token_ids for p in prompts] == alone
    _assert_all_free(engine)


def test_stream_events_carry_text_source_and_time(engine):
    events = []
    # speculative=False: without it, n-gram lookup may draft even with no draft model loaded
    engine.add_request("Héllo wörld", SamplingParams(max_new_tokens=30, temperature=0.9, seed=3, speculative=False),
                       sink=events.append)
    while engine.has_work():
        engine.step()
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    final = events[-1]
    assert isinstance(final, FinishEvent)
    assert [t.index for t in tokens] == list(range(len(tokens)))
    assert {t.source for t in tokens} == {"target"}
    assert all(b.t_s >= a.t_s for a, b in zip(tokens, tokens[1:]))
    streamed = "".join(t.text for t in tokens) + final.tail
    assert streamed == final.text == engine.tokenizer.decode(final.token_ids, skip_special_tokens=True)
    assert final.stats.num_generated_tokens == len(tokens)
    assert final.stats.ttft_s is not None and final.stats.tokens_per_second > 0


def test_same_seed_same_output_and_other_seed_differs(engine):
    p = dict(max_new_tokens=40, temperature=1.0, top_k=50, top_p=0.95, ignore_eos=True)
    a = engine.generate("Once upon", SamplingParams(seed=7, **p)).token_ids
    b = engine.generate("Once upon", SamplingParams(seed=7, **p)).token_ids
    c = engine.generate("Once upon", SamplingParams(seed=8, **p)).token_ids
    assert a == b and a != c


def test_stop_string_ends_the_request_and_is_not_returned(engine):
    full = engine.generate("Once upon a", GREEDY).text
    stop = full[10:14]
    out = engine.generate("Once upon a", SamplingParams(max_new_tokens=48, temperature=0, stop=[stop], ignore_eos=True))
    assert out.finish_reason == "stop"
    assert out.text == full[: full.index(stop)]
    _assert_all_free(engine)


def test_eos_finishes_with_reason_eos():
    eng = tiny_engine(draft=False)
    first = eng.generate("Once", SamplingParams(max_new_tokens=1, temperature=0)).token_ids[0]
    eng.eos_ids = {first}
    out = eng.generate("Once", SamplingParams(max_new_tokens=10, temperature=0))
    assert out.finish_reason == "eos" and out.token_ids == [first] and out.text == ""


def test_cancel_frees_blocks_immediately(engine):
    events = []
    req = engine.add_request("Once upon a time", SamplingParams(max_new_tokens=200, temperature=0), sink=events.append)
    for _ in range(5):
        engine.step()
    assert engine.target.blocks.num_free < engine.target.blocks.num_blocks
    engine.abort(req.request_id)
    engine.step()
    assert isinstance(events[-1], FinishEvent) and events[-1].finish_reason == "cancelled"
    _assert_all_free(engine)


def test_shared_prompt_prefix_shares_blocks(engine):
    prompt = "Once upon a time there was a little girl named Lily. She loved to play in the park with her dog."
    seen = []
    reqs = [engine.add_request(prompt, SamplingParams(max_new_tokens=8, temperature=0), sink=seen.append)
            for _ in range(2)]
    engine.step()  # first admits and prefills both
    engine.step()
    assert engine.snapshot()["kv"]["shared"] == 0  # same prefill batch: no block was cached yet
    while engine.has_work():
        engine.step()
    r3 = engine.add_request(prompt, SamplingParams(max_new_tokens=8, temperature=0))
    engine.step()
    assert r3.stats.num_cached_prompt_tokens >= 16  # a later request reuses the cached prefix blocks
    while engine.has_work():
        engine.step()
    finished = [e.token_ids for e in seen if isinstance(e, FinishEvent)]
    assert finished == [r3.output_ids] * 2 and [r.output_ids for r in reqs] == finished  # greedy: all three agree
    assert [r.stats.num_cached_prompt_tokens for r in reqs] == [0, 0]  # prefilled together: nothing cached yet
    _assert_all_free(engine)


def test_concurrent_shared_prefix_blocks_are_refcounted(engine):
    prompt = "The cat sat on the mat and looked at the moon. They were happy and laughed together."
    engine.generate(prompt, SamplingParams(max_new_tokens=2, temperature=0))  # caches the prefix blocks
    for _ in range(3):
        engine.add_request(prompt, SamplingParams(max_new_tokens=20, temperature=0))
    engine.step()
    kv = engine.snapshot()["kv"]
    assert kv["shared"] >= 1 and any(len(o) == 3 for o in kv["owners"].values())
    while engine.has_work():
        engine.step()
    _assert_all_free(engine)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=-3), "max_new_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(num_draft_tokens=9), "num_draft_tokens"),
    ],
)
def test_bad_sampling_params_are_clear_errors(kwargs, match):
    with pytest.raises(InvalidRequest, match=match):
        SamplingParams(**kwargs)


def test_bad_prompts_are_clear_errors(engine):
    with pytest.raises(InvalidRequest, match="non-empty"):
        engine.add_request("   ")
    with pytest.raises(PromptTooLong, match="context is 256 tokens"):
        engine.add_request(list(range(10)) * 30)
    _assert_all_free(engine)


def test_missing_model_folder_is_a_clear_error(tmp_path):
    from engine.factory import build_engine

    with pytest.raises(ModelLoadError, match="does not exist"):
        build_engine(EngineConfig(target=str(tmp_path / "nope" / "model"), draft=None, device="cpu"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        build_engine(EngineConfig(target=str(tmp_path / "empty"), draft=None, device="cpu"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="unreadable"):
        build_engine(EngineConfig(target=str(tmp_path / "bad"), draft=None, device="cpu"))


def test_uncached_hub_id_offline_names_the_id_and_the_fix(monkeypatch):
    from engine.factory import build_engine

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"helix-nonexistent/model.*hf download"):
        build_engine(EngineConfig(target="helix-nonexistent/model", draft=None, device="cpu"))


def test_corrupt_weights_and_non_causal_models_are_clear_errors(tmp_path):
    from transformers import BertConfig, T5Config

    from engine.factory import build_engine
    from tests.tiny import tiny_llama

    tok = tiny_tokenizer()
    good = tmp_path / "llama"
    tiny_llama(len(tok)).save_pretrained(good)
    tok.save_pretrained(good)
    (good / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(ModelLoadError, match="could not be loaded"):
        build_engine(EngineConfig(target=str(good), draft=None, device="cpu"))
    bert = tmp_path / "bert"
    bert.mkdir()
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    cfg.architectures = ["BertForMaskedLM"]
    cfg.save_pretrained(bert)
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        build_engine(EngineConfig(target=str(bert), draft=None, device="cpu"))
    t5 = tmp_path / "t5"
    T5Config(vocab_size=50, d_model=16, num_layers=1, num_heads=2).save_pretrained(t5)
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        build_engine(EngineConfig(target=str(t5), draft=None, device="cpu"))


def test_incompatible_tokenizers_say_what_differs():
    from engine.loader import check_tokenizers_compatible

    with pytest.raises(TokenizerMismatch, match="vocabulary size"):
        check_tokenizers_compatible(tiny_tokenizer(), word_tokenizer(8))
    check_tokenizers_compatible(tiny_tokenizer(), tiny_tokenizer())


def test_unavailable_device_is_a_clear_error():
    from engine.devices import _PROBES, resolve_device

    available = {name: probe() is not None for name, probe in _PROBES.items()}
    for name in (n for n, ok in available.items() if not ok):  # whichever this machine lacks
        with pytest.raises(DeviceUnavailable, match="not available"):
            resolve_device(name)
    with pytest.raises(InvalidRequest, match="unknown device"):
        resolve_device("tpu")
    # auto takes the first device present in DirectML, CUDA, MPS order, and the CPU only without any
    expected = next((name for name in ("directml", "cuda", "mps") if available[name]), "cpu")
    assert resolve_device("auto").kind == expected


def test_loaded_model_folder_runs_end_to_end(tmp_path):
    """A saved HF folder (tokenizer + weights) loads through the factory and generates."""
    from engine.factory import build_engine
    from tests.tiny import tiny_llama

    tok = tiny_tokenizer()
    for name, layers in (("t", 2), ("d", 1)):
        tiny_llama(len(tok), layers=layers).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    stages = []
    eng = build_engine(EngineConfig(target=str(tmp_path / "t"), draft=str(tmp_path / "d"), device="cpu",
                                    kv_cache_tokens=1024), progress=lambda s, f: stages.append((s, f)))
    assert stages[-1] == ("ready", 1.0) and all(b[1] >= a[1] for a, b in zip(stages, stages[1:]))
    out = eng.generate("Once upon", SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))
    assert out.stats.num_generated_tokens == 12 and eng.info()["has_draft"] and out.stats.num_drafts > 0
    plain = eng.generate("Once upon", SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True,
                                                     speculative=False))
    assert plain.token_ids == out.token_ids  # greedy speculative decoding reproduces the plain target exactly


def test_extreme_sampling_values_stay_valid_distributions():
    from engine.sampler import probs_from_logits

    logits = torch.randn(3, 50) * 30
    for params in (SamplingParams(temperature=1e-30), SamplingParams(temperature=1e-6, top_p=1e-45),
                   SamplingParams(temperature=2.0, top_k=1), SamplingParams(temperature=0.5, top_p=1e-30, top_k=3)):
        probs = probs_from_logits(logits, params)
        assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(3))
        assert (probs.argmax(-1) == logits.argmax(-1)).all()


def _events_of(eng, specs, abort_after: int | None = None):
    """Run ``specs`` [(prompt, params)] together; per request its events. ``abort_after``: the first request is
    aborted after that many steps. Also: the most deferred work seen waiting after a step."""
    events = [[] for _ in specs]
    reqs = [eng.add_request(p, params, sink=events[i].append) for i, (p, params) in enumerate(specs)]
    steps = waited = 0
    while eng.has_work():
        eng.step()
        steps += 1
        waited = max(waited, len(eng._later))
        if steps == abort_after:
            eng.abort(reqs[0].request_id)
    return events, waited


def _check_stream(events):
    """TokenEvents indexed 0..n-1, then one FinishEvent whose ids and text are what they streamed."""
    *tokens, final = events
    assert isinstance(final, FinishEvent) and all(isinstance(t, TokenEvent) for t in tokens)
    assert [t.index for t in tokens] == list(range(len(tokens)))
    assert [t.token_id for t in tokens] == final.token_ids
    assert "".join(t.text for t in tokens) + final.tail == final.text
    return [(t.token_id, t.text, t.index, t.source) for t in tokens], (final.finish_reason, final.text)


def test_host_overlap_defers_events_and_statistics_without_changing_them():
    """With ``overlap`` (on for CUDA; here forced on the CPU, where the deferred work runs after each verification
    forward) a step's token events and statistics run during the next step: the same streams, finishes and counts as
    without it, events in order and before their request's FinishEvent, for fixed K, plain, adaptive, stop strings,
    logprobs, EOS and a request aborted mid-way."""
    from tests.tiny import tiny_pair_engine

    eng = tiny_pair_engine(eagle=True)
    fixed = SamplingParams(max_new_tokens=40, temperature=0, num_draft_tokens=3, draft_method="model", ignore_eos=True)
    specs = [
        ("Once upon a time", fixed),
        ("The cat sat", SamplingParams(max_new_tokens=36, temperature=0.8, seed=11, num_draft_tokens=2,
                                       draft_method="eagle", ignore_eos=True)),
        ("Tom found a red", SamplingParams(max_new_tokens=30, temperature=0, speculative=False, ignore_eos=True)),
        ("Lily and", SamplingParams(max_new_tokens=33, temperature=0.7, seed=5, top_p=0.9)),  # adaptive; EOS may end it
        ("A dog", SamplingParams(max_new_tokens=20, temperature=0, num_draft_tokens=2, logprobs=2, ignore_eos=True)),
    ]
    stop_text = eng.generate("Once upon a time", fixed).text[8:14]
    specs.append(("Once upon a time", SamplingParams(max_new_tokens=40, temperature=0, num_draft_tokens=3,
                                                     draft_method="model", ignore_eos=True, stop=[stop_text])))

    def run(overlap, abort_after=None):
        eng.overlap = overlap
        before = {m: s.num_accepted_tokens for m, s in eng.method_stats.items()}
        events, waited = _events_of(eng, specs, abort_after)
        accepted = [e[-1].stats.num_accepted_tokens for e in events]
        # the engine-wide counts (deferred too) add up to the requests' own
        assert sum(s.num_accepted_tokens - before.get(m, 0) for m, s in eng.method_stats.items()) == sum(accepted)
        return [_check_stream(e) for e in events], accepted, waited

    try:
        ref_streams, ref_accepted, ref_waited = run(False)
        streams, accepted, waited = run(True)
    finally:
        eng.overlap = False
    assert ref_waited == 0 and waited > 0  # the work did wait: at least one step's events ran during the next
    assert ref_streams[5][1][0] == "stop"
    for i in (0, 1, 2, 4, 5):  # fixed K and plain: tokens, text and sources alike
        assert streams[i] == ref_streams[i]
        assert accepted[i] == ref_accepted[i]
    assert [t[:3] for t in streams[3][0]] == [t[:3] for t in ref_streams[3][0]]  # adaptive, seeded: same tokens
    assert streams[3][1] == ref_streams[3][1]

    # a request aborted mid-way: its streamed tokens, then its FinishEvent; the others run on
    streams, *_ = run(True, abort_after=6)
    assert streams[0][1][0] == "cancelled" and 0 < len(streams[0][0]) < 40
    assert streams[0][0] == ref_streams[0][0][: len(streams[0][0])]
    assert streams[2] == ref_streams[2]
    assert not eng._later
    _assert_all_free(eng)
