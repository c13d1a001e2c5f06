"""The EAGLE-3 head and proposer: the target's aux states, the head's paged drafting against its training
unroll, exact rollback, the published folder formats and their errors, and greedy identity on the
transformers fallback. Greedy identity, the distribution and seeded reproducibility for every proposer,
eagle included, are in test_speculative.py."""

import json

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.block_manager import BlockManager
from engine.eagle import EagleConfig, EagleHead, default_aux_layers, is_eagle_folder, load_head, save_head
from engine.errors import ModelLoadError
from engine.kv_pool import KVPool, KVShape
from engine.model_runner import ModelRunner, RowInput
from engine.models import packed
from engine.proposers.eagle import EagleProposer, _Features
from tests.tiny import random_eagle_head, tiny_llama, tiny_pair_engine, tiny_tokenizer, word_tokenizer

V = 320


@pytest.fixture(scope="module")
def target():
    return tiny_llama(V, layers=6, seed=3)


def _runner(model, lean: bool, vocab: int = V) -> ModelRunner:
    pool = KVPool(64, 16, KVShape.from_config(model.config), torch.float32, torch.device("cpu"))
    return ModelRunner(model, pool, BlockManager(64, 16), vocab, lean=lean)


def _hidden(model, ids: torch.Tensor) -> tuple:
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states


def test_default_aux_layers_follow_eagle3_and_fit_small_targets():
    assert default_aux_layers(32) == (2, 16, 29)  # Llama-3.1-8B: the inputs of layers 2, L/2, L-3
    assert default_aux_layers(12) == (2, 6, 9)  # the demo target
    assert default_aux_layers(2) == (0, 1, 1)
    assert all(0 <= i < n for n in range(1, 8) for i in default_aux_layers(n))


@pytest.mark.parametrize("lean", [True, False])
def test_target_hands_its_aux_states_to_the_sink_only_for_rows_that_ask(target, lean):
    """Both forward paths give HF's hidden_states[i] (the input of layer i) for every new token of a row
    that asks, across chunks and ragged batches; rows that do not ask get nothing and cost nothing."""
    x = torch.randint(3, V, (1, 30), generator=torch.Generator().manual_seed(1))
    layers = default_aux_layers(6)
    want = torch.cat([_hidden(target, x)[i] for i in layers], -1)[0]
    runner = _runner(target, lean)
    got: dict[int, list] = {}
    runner.forward([RowInput(0, x[0, :5].tolist(), 1, True)])  # no sink yet: ignored
    runner.truncate(0, 0)
    runner.aux_layers = layers
    runner.aux_sink = lambda seq, start, aux: got.setdefault(seq, []).append((start, aux.clone()))
    runner.forward([RowInput(0, x[0, :20].tolist(), 1, True), RowInput(1, x[0, :7].tolist(), 1, True)])
    runner.forward([RowInput(0, x[0, 20:].tolist(), 3, True), RowInput(1, x[0, 7:9].tolist(), 1, False)])
    assert [(s, a.shape[0]) for s, a in got[0]] == [(0, 20), (20, 10)]
    assert torch.allclose(torch.cat([a for _, a in got[0]]), want, atol=1e-5)
    assert len(got[1]) == 1 and torch.allclose(got[1][0][1], want[:7], atol=1e-5)


@pytest.mark.parametrize("pack", [False, True], ids=["mkl", "packed"])
def test_paged_drafting_matches_the_training_unroll(target, pack, monkeypatch):
    """What the head drafts from its paged cache, step by step, is what forward_train's training-time-test
    unroll computes at the same position: training and inference see the same pairs, positions and keys.
    ``packed``: every weight of the head gets its oneDNN copy (multi-row GEMMs on the CPU)."""
    if pack:
        monkeypatch.setattr(packed, "MIN_ELEMENTS", 0)
        monkeypatch.delenv("HELIX_PACKED_GEMM", raising=False)
        monkeypatch.setattr(packed, "_force_small", True)  # multi-row GEMMs packed, whatever this CPU prefers
    x = torch.randint(3, V, (1, 30), generator=torch.Generator().manual_seed(2))
    head = random_eagle_head(target, draft_vocab_size=100, seed=4)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.3)
    aux = torch.cat([_hidden(target, x)[i] for i in head.layer_ids(6)], -1)
    with torch.no_grad():
        unroll = head.forward_train(aux, x, steps=4)
    prop = EagleProposer(head, _runner(target, True))
    assert (head._fused.fc_p is not None) == pack, head._fused.packing
    for t in (0, 5, 12, 25):
        out = prop._forward([(100 + t, x[0, 1: t + 2].tolist(), aux[0, : t + 1])])  # real pairs 0..t
        assert torch.allclose(head.logits(out)[0], unroll[0][0, t], atol=1e-4)
        chain = prop._chain([0], [100 + t], [t + 1], [2])
        for s in (1, 2):  # the chain: the head's own output, the next true token
            out = prop._chain_forward(chain, [0], (out, [int(x[0, t + s + 1])]), s)
            assert torch.allclose(head.logits(out)[0], unroll[s][0, t], atol=1e-4)
    mask = head.train_mask(torch.ones(1, 30, dtype=torch.bool), 2)
    assert mask[0, :26].all() and not mask[0, 26:].any()
    # the drafting chain as propose runs it: rows of different lengths read their real pairs in one forward, then
    # chain steps with room and key slots reserved up front (a ragged batch: masked), rows leaving the chain early
    ts, steps = [3, 17, 25], [3, 1, 2]
    sids = [200 + t for t in ts]
    feed = [(sid, x[0, 1: t + 2].tolist(), aux[0, : t + 1]) for sid, t in zip(sids, ts)]
    out = prop._forward(feed)
    chain = prop._chain([0, 1, 2], sids, [t + 1 for t in ts], steps)
    active = [0, 1, 2]
    for s in (1, 2, 3):
        active_next = [i for i in active if steps[i] >= s]
        keep = [active.index(i) for i in active_next]
        out = prop._chain_forward(chain, active_next, (out[keep], [int(x[0, ts[i] + s + 1]) for i in active_next]), s)
        for n, i in enumerate(active_next):
            assert torch.allclose(head.logits(out)[n], unroll[s][0, ts[i]], atol=1e-4), (s, i)
        active = active_next
    for sid, t in zip(sids, ts):
        prop._truncate(sid, t + 1)
        table = prop.blocks.tables[sid]
        assert table.num_tokens == t + 1 and len(table.blocks) == prop.blocks.blocks_needed(t + 1)


def test_last_only_forward_writes_every_pairs_keys_and_gives_the_last_output(target):
    """Reading real pairs, the proposer runs attention and the MLP for each row's last pair only: the K/V written for
    every pair and the last output are those of the full forward (rows of different lengths: the last query's mask)."""
    from engine.attention import AttnBatch, causal_mask

    head = random_eagle_head(target, seed=6)
    d, n, t = head.cfg.hidden_size, 5, 9
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, V, (2, n), generator=gen)
    feats = torch.randn(2, n, d, generator=gen)
    pos = torch.tensor([[2, 3, 4, 5, 6], [4, 5, 6, 7, 8]])  # row 0 ends two keys before row 1
    slots = (pos + torch.tensor([[0], [16]])).reshape(-1)
    gather = (torch.arange(t)[None] + torch.tensor([[0], [16]])).reshape(-1)
    outs, pools = [], []
    for last_only in (False, True):
        kp, vp = (torch.randn(40, head.cfg.num_key_value_heads, head.cfg.head_dim, generator=torch.Generator()
                              .manual_seed(7)) for _ in range(2))
        mask = causal_mask(pos[:, -1:] if last_only else pos, t)
        with torch.no_grad():
            outs.append(head.forward_paged(ids, feats, pos, AttnBatch(slots, gather, mask, t), kp, vp, last_only))
        pools.append((kp, vp))
    full, last = outs
    assert last.shape == (2, 1, d)
    assert torch.allclose(last[:, 0], full[:, -1], atol=1e-5)
    assert torch.equal(pools[0][0], pools[1][0]) and torch.equal(pools[0][1], pools[1][1])


def _word_engine(head_seed: int = 0) -> LLMEngine:
    tok = word_tokenizer(8)
    target = tiny_llama(8, layers=4, hidden=32, heads=2, kv_heads=1, seed=21)
    head = random_eagle_head(target, seed=head_seed, scale=3.0)
    return LLMEngine(target, tok, None, EngineConfig(target="t", draft=None, kv_cache_tokens=2048), max_context=128,
                     eagle_head=head)


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_state_after_verified_steps_equals_a_fresh_read(steps):
    """After any mix of accepted and rejected drafts (small vocabulary: both happen), the head's cache and
    waiting features give the next draft exactly what a head reading the verified sequence from scratch gives."""
    eng = _word_engine()
    prop = eng.proposers["eagle"]
    req = eng.add_request([1, 2, 3, 4, 5, 6, 7, 1, 3], SamplingParams(max_new_tokens=60, temperature=1.0, seed=steps,
                                                                        num_draft_tokens=3, draft_method="eagle",
                                                                        ignore_eos=True))
    while not req.prefilled:
        eng.step()
    for _ in range(steps):
        eng.step()
    assert req.stats.num_drafts == steps
    assert steps < 8 or 0 < req.stats.num_accepted_tokens < 3 * steps  # both outcomes happened
    tokens, _ = prop._inputs_many([(req, None, None)])[0]
    assert prop._cached(req.seq_id) + len(tokens) == req.num_tokens - 1
    assert torch.allclose(_next_logits(eng, req), _fresh_logits(eng, req), atol=1e-4)
    eng.abort(req.request_id)
    eng.step()
    assert prop.blocks.num_free == prop.blocks.num_blocks and not prop._waiting


def _fresh_logits(eng: LLMEngine, req) -> torch.Tensor:
    """What a head that reads the request's verified tokens from scratch predicts after them."""
    ids = torch.tensor([req.all_ids])
    prop = eng.proposers["eagle"]
    layers = prop.head.layer_ids(eng.target.model.config.num_hidden_layers)
    aux = torch.cat([_hidden(eng.target.model, ids)[i] for i in layers], -1)
    with torch.no_grad():
        return prop.head.forward_train(aux, ids, steps=1)[0][0, ids.shape[1] - 2]


def _next_logits(eng: LLMEngine, req) -> torch.Tensor:
    prop = eng.proposers["eagle"]
    tokens, feats = prop._inputs_many([(req, None, None)])[0]
    return prop.head.logits(prop._forward([(req.seq_id, tokens, feats)]))[0]


def test_requests_sharing_a_prompt_share_the_heads_prompt_blocks():
    eng = _word_engine()
    prop = eng.proposers["eagle"]
    common = [(i * 5 + i // 7) % 7 + 1 for i in range(40)]
    params = SamplingParams(max_new_tokens=30, temperature=0, num_draft_tokens=2, draft_method="eagle",
                            ignore_eos=True)
    first = eng.add_request(common + [1, 2, 3], params)
    for _ in range(4):
        eng.step()
    second = eng.add_request(common + [4, 5, 6, 7], params)
    while not second.prefilled:
        eng.step()
    assert second.stats.num_cached_prompt_tokens == 32  # the target's two full prompt blocks
    eng.step()
    assert prop.blocks.num_shared == 2 and second.stats.num_drafts == 1
    assert torch.allclose(_next_logits(eng, second), _fresh_logits(eng, second), atol=1e-4)
    # a prompt the target knows but the head does not (read by a request that drafted with the model): the
    # head reads zero features there; output stays exact
    other = [(i * 3 + i // 5) % 7 + 1 for i in range(40)]
    eng.generate(other + [3, 3], SamplingParams(max_new_tokens=4, temperature=0, draft_method="ngram"))
    spec = eng.generate(other + [2, 2], SamplingParams(**{**params.__dict__, "max_new_tokens": 20}))
    assert spec.stats.num_cached_prompt_tokens == 32 and spec.stats.num_drafts > 0
    plain = eng.generate(other + [2, 2], SamplingParams(max_new_tokens=20, temperature=0, speculative=False,
                                                        ignore_eos=True))
    assert spec.token_ids == plain.token_ids
    for r in (first, second):
        eng.abort(r.request_id)
    eng.step()
    assert prop.blocks.num_free == prop.blocks.num_blocks and not prop._waiting


def test_rows_ask_for_features_only_while_the_head_is_in_play(monkeypatch):
    """A row drafting with the draft model, and a fixed-K row drafting with the model, ask the target for no features,
    also where the row's decision lists the head among the proposers it may probe (its ``others``: on an H100 the
    features cost such rows' steps +9.5% while the head drafted for none); a row that decodes plain does (a probe may
    pick the head). When the head then drafts for a row that asked for none, the target first computes the features it
    skipped from its cache: the head drafts in that step, and the output stays the target's greedy output."""
    from engine.adaptive import Decision

    eng = tiny_pair_engine(eagle=True)
    prop = eng.proposers["eagle"]
    got: list[int] = []
    real_receive = prop.receive
    monkeypatch.setattr(eng.target, "aux_sink", lambda sid, start, aux: (got.append(sid), real_receive(sid, start, aux)))
    computed: list[tuple[int, int, int]] = []
    real_cached = eng.target.cached_features
    monkeypatch.setattr(eng.target, "cached_features", lambda rows: (
        computed.extend((sid, start, len(ids)) for sid, start, ids in rows), real_cached(rows))[1])
    plan = {"eagle": None}
    monkeypatch.setattr(eng, "_choose", lambda r, b: (min(2, max(0, r.remaining - 1)),
                                                      "eagle" if r is plan["eagle"] else "model"))
    prompt = "Lily loved to play in the park"
    params = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    req = eng.add_request(prompt, params)
    fixed = eng.add_request(prompt, SamplingParams(**{**params.__dict__, "num_draft_tokens": 2}))
    while not (req.prefilled and fixed.prefilled):
        eng.step()
    req.adaptive.last = Decision(2, "model", "drafting with the draft model", {0: 1.0, 2: 1.5})
    got.clear()
    for _ in range(4):
        eng.step()
    assert not req.features and not fixed.features and not got
    assert set(req.stats.by_method) == {"model"}
    req.adaptive.last = Decision(2, "model", "drafting with the draft model", {0: 1.0, 2: 1.5}, others={"eagle": 2})
    eng.step()
    assert not req.features and not got  # the head may be probed: its catch-up then
    assert eng.planner._head_in_play(req) is False
    req.adaptive.last = Decision(0, "model", "plain: best is model K=2", {0: 1.0, 2: 0.9})
    assert eng.planner._head_in_play(req)  # plain: a probe may pick the head
    req.adaptive.last = Decision(2, "model", "drafting with the draft model", {0: 1.0, 2: 1.5})
    eng.step()  # the head out of play
    assert not computed
    plan["eagle"] = req
    n = req.num_tokens
    eng.step()  # the head drafts at once, over the features the target computes again
    assert req.stats.by_method["eagle"][0] == 1
    assert computed and computed[0][0] == req.seq_id and computed[-1][1] + computed[-1][2] == n - 1
    while eng.has_work():
        eng.step()
    plain = eng.generate(prompt, SamplingParams(max_new_tokens=40, temperature=0, speculative=False, ignore_eos=True))
    assert req.output_ids == plain.token_ids == fixed.output_ids
    assert prop.blocks.num_free == prop.blocks.num_blocks and not prop._waiting


def test_rows_coming_back_to_the_head_have_their_features_computed_in_one_forward(monkeypatch):
    """Rows that drafted with the draft model without features and then draft with the head in one step have the
    skipped features computed again in one target forward for all of them; the output stays the target's greedy one."""
    from engine.adaptive import Decision

    eng = tiny_pair_engine(eagle=True)
    calls: list[int] = []
    real_cached = eng.target.cached_features
    monkeypatch.setattr(eng.target, "cached_features", lambda rows: (calls.append(len(rows)), real_cached(rows))[1])
    method = {"name": "model"}
    monkeypatch.setattr(eng, "_choose", lambda r, b: (min(2, max(0, r.remaining - 1)), method["name"]))
    params = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    prompts = ["Lily loved to play in the park", "Tom saw a big red ball"]
    reqs = [eng.add_request(p, params) for p in prompts]
    while not all(r.prefilled for r in reqs):
        eng.step()
    for r in reqs:
        r.adaptive.last = Decision(2, "model", "drafting with the draft model", {0: 1.0, 2: 1.5})
    for _ in range(3):
        eng.step()
    assert not any(r.features for r in reqs) and not calls
    method["name"] = "eagle"
    eng.step()
    assert calls == [2] and all(r.stats.by_method["eagle"][0] == 1 for r in reqs)
    while eng.has_work():
        eng.step()
    for p, r in zip(prompts, reqs):
        plain = eng.generate(p, SamplingParams(max_new_tokens=30, temperature=0, speculative=False, ignore_eos=True))
        assert r.output_ids == plain.token_ids


def test_the_features_computed_again_from_the_cache_are_those_the_forward_handed_over():
    """``ModelRunner.cached_features`` on tokens forwards read with aux outputs returns what they handed over, for rows
    of different lengths and positions in one call, on the lean forward and on transformers' modeling code alike,
    and writes nothing to the cache."""
    for lean in (True, False):
        eng = tiny_pair_engine(eagle=True)
        runner = eng.target
        if not lean:
            runner.lean = None
        handed: dict[tuple[int, int], torch.Tensor] = {}
        runner.aux_sink = lambda sid, start, aux, handed=handed: handed.__setitem__((sid, start), aux.clone())
        ids = list(range(5, 45))
        other = [(i * 5) % 60 + 3 for i in range(23)]
        runner.forward([RowInput(7, ids[:30], 1, True), RowInput(8, other[:9], 1, True)])
        runner.forward([RowInput(7, ids[30:], 3, True), RowInput(8, other[9:], 1, True)])
        want7 = torch.cat([handed[7, 0], handed[7, 30]])
        want8 = torch.cat([handed[8, 0], handed[8, 9]])
        before = [t.clone() for t in runner.pool.keys]
        got7, got8, alone = runner.cached_features([(7, 12, ids[12:40]), (8, 20, other[20:23]), (8, 0, other[:5])])
        assert got7.shape[0] == 28 and got8.shape[0] == 3 and alone.shape[0] == 5
        assert torch.allclose(got7, want7[12:40], atol=1e-4), lean
        assert torch.allclose(got8, want8[20:23], atol=1e-4), lean
        assert torch.allclose(alone, want8[:5], atol=1e-4), lean
        keep = torch.ones(before[0].shape[0], dtype=torch.bool)
        keep[runner.pool.scratch_slot] = False  # where a forward's padding and discarded K/V go
        assert all(torch.equal(a[keep], b[keep]) for a, b in zip(before, runner.pool.keys))
        with pytest.raises(ValueError, match="holds 40 tokens"):
            runner.cached_features([(7, 35, ids[35:] + [1])])


def test_a_prompt_prefix_the_target_cached_reaches_the_head_with_its_real_features():
    """A request whose prompt prefix the target found in its prefix cache (read before by a request that drafted with
    the draft model, whose rows asked for no features) drafts with the head exactly as on an engine that read the
    whole prompt: the head reads the prefix's features computed again, not zeros."""
    common = [(i * 7 + 3) % 50 + 5 for i in range(40)]
    params = SamplingParams(max_new_tokens=30, temperature=0, draft_method="eagle", num_draft_tokens=3, ignore_eos=True)
    fresh = tiny_pair_engine(eagle=True).generate(common + [9, 8], params)
    eng = tiny_pair_engine(eagle=True)
    eng.generate(common + [4], SamplingParams(max_new_tokens=3, temperature=0, draft_method="model"))
    again = eng.generate(common + [9, 8], params)
    assert again.stats.num_cached_prompt_tokens == 32 and fresh.stats.num_cached_prompt_tokens == 0
    assert again.token_ids == fresh.token_ids
    assert again.stats.by_method["eagle"] == fresh.stats.by_method["eagle"]


@pytest.mark.parametrize("overlap", [False, True])
def test_features_of_a_request_drafting_otherwise_are_read_as_they_pile_up(monkeypatch, overlap):
    """An adaptive request the draft model drafts for, while the head is in play for it (here: it has no decision of
    its own yet), still collects the target's features for the head; past MAX_WAITING of them the head reads them
    between steps (with ``overlap``, as deferred work while the next step verifies), so they never pile up for the
    whole request."""
    import engine.proposers.eagle as eagle_proposer

    monkeypatch.setattr(eagle_proposer, "MAX_WAITING", 16)
    eng = tiny_pair_engine(eagle=True)
    eng.overlap = overlap
    monkeypatch.setattr(eng, "_choose", lambda r, b: (min(3, max(0, r.remaining - 1)), "model"))
    prop = eng.proposers["eagle"]
    req = eng.add_request("Lily loved to play in the park", SamplingParams(max_new_tokens=90, temperature=0,
                                                                          ignore_eos=True))
    while req.num_tokens < 80:
        eng.step()
        assert req.features
    assert req.stats.num_drafts > 0 and prop._cached(req.seq_id) >= req.num_tokens - 1 - 16 - 9
    assert prop._waiting[req.seq_id].n <= 16 + 9
    assert torch.allclose(_next_logits(eng, req), _fresh_logits(eng, req), atol=1e-4)
    eng.abort(req.request_id)
    eng.step()
    assert prop.blocks.num_free == prop.blocks.num_blocks and not prop._waiting


@pytest.mark.parametrize("lean", ["1", "0"])
def test_greedy_eagle_equals_plain_on_both_forward_paths(monkeypatch, lean):
    monkeypatch.setenv("HELIX_LEAN", lean)
    tok = tiny_tokenizer()
    target = tiny_llama(len(tok), layers=4, seed=5)
    head = random_eagle_head(target, draft_vocab_size=200, seed=6, scale=8.0)
    eng = LLMEngine(target, tok, None, EngineConfig(target="t", draft=None, kv_cache_tokens=4096), max_context=256,
                    eagle_head=head)
    assert eng.target.forward_path == ("lean" if lean == "1" else "transformers")
    for prompt in ("The cat sat on the mat and looked at", "Once upon a time there was"):
        plain = eng.generate(prompt, SamplingParams(max_new_tokens=40, temperature=0, speculative=False,
                                                    ignore_eos=True))
        for k in (1, 4, None):
            spec = eng.generate(prompt, SamplingParams(max_new_tokens=40, temperature=0, num_draft_tokens=k,
                                                       draft_method="eagle", ignore_eos=True))
            assert spec.token_ids == plain.token_ids, (prompt, k)
            assert k is None or spec.stats.num_drafts > 0
    prop = eng.proposers["eagle"]
    assert prop.blocks.num_free == prop.blocks.num_blocks and not prop._waiting


# ----------------------------------------------------------------------------- folders
def _eagle_layout_config(target, draft_vocab: int) -> dict:
    """config.json as EAGLE's own heads publish it (SpecForge's configs/qwen3-4b-eagle3.json, the fields
    and their spelling), shaped for ``target``."""
    c = target.config
    return {"architectures": ["LlamaForCausalLMEagle3"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": 0, "eos_token_id": 0, "head_dim": 16, "hidden_act": "silu", "hidden_size": c.hidden_size,
            "initializer_range": 0.02, "intermediate_size": 96, "max_position_embeddings": 256,
            "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 1, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": True,
            "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": c.vocab_size, "draft_vocab_size": draft_vocab}


def _write_random_head(folder, config: dict, seed: int = 0, speculators: bool = False) -> EagleHead:
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    cfg = EagleConfig.from_dict(config)
    head = EagleHead(cfg)
    if cfg.draft_vocab_size < cfg.vocab_size:
        head.set_vocab_map(torch.randperm(cfg.vocab_size)[: cfg.draft_vocab_size].sort().values)
    state = {k: v.contiguous() for k, v in head.state_dict().items()}
    if speculators:  # vLLM speculators name the layer layers.0 and leave t2d out
        state = {k.replace("midlayer.", "layers.0."): v for k, v in state.items() if k != "t2d"}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return head


def test_published_layouts_load_and_draft(tmp_path, target):
    tok_vocab = target.config.vocab_size
    eagle_cfg = _eagle_layout_config(target, draft_vocab=128)
    written = _write_random_head(tmp_path / "eagle", eagle_cfg)
    spec_cfg = {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3", "draft_vocab_size": 128,
                "norm_before_residual": True, "target_hidden_size": 64, "eagle_aux_hidden_state_layer_ids": [1, 3, 4],
                "transformer_layer_config": {k: v for k, v in eagle_cfg.items() if k != "draft_vocab_size"}}
    _write_random_head(tmp_path / "speculators", spec_cfg, seed=1, speculators=True)
    for name in ("eagle", "speculators"):
        assert is_eagle_folder(tmp_path / name)
        head = load_head(tmp_path / name, target)
        assert head.cfg.draft_vocab_size == 128 and int(head.t2d.sum()) == 128
    assert head.cfg.norm_before_residual and head.layer_ids(6) == (1, 3, 4)
    loaded = load_head(tmp_path / "eagle", target)
    assert torch.equal(loaded.draft_to_target, written.draft_to_target)
    assert not is_eagle_folder(tmp_path) and not is_eagle_folder(tmp_path / "missing")
    # drafting through an engine: greedy output is the plain output, drafts stay inside the draft vocabulary
    tok = tiny_tokenizer()
    assert len(tok) == tok_vocab
    eng = LLMEngine(target, tok, None, EngineConfig(target="t", draft=None, kv_cache_tokens=2048), max_context=256,
                    eagle_head=loaded)
    seen: list[int] = []
    orig = eng.proposers["eagle"].propose

    def spy(rows):
        proposal = orig(rows)
        seen.extend(t for ts in proposal.lists() for t in ts)
        return proposal

    eng.proposers["eagle"].propose = spy
    plain = eng.generate("Once upon a time", SamplingParams(max_new_tokens=24, temperature=0, speculative=False))
    spec = eng.generate("Once upon a time", SamplingParams(max_new_tokens=24, temperature=0, num_draft_tokens=3,
                                                           draft_method="eagle"))
    assert spec.token_ids == plain.token_ids and seen and all(loaded.t2d[t] for t in seen)
    # save_head writes the EAGLE layout back; it loads again to the same weights
    save_head(loaded, tmp_path / "again", dtype=None)
    again = load_head(tmp_path / "again", target)
    assert torch.equal(again.lm_head.weight, loaded.lm_head.weight) and torch.equal(again.d2t, loaded.d2t)


def test_a_head_for_another_target_is_a_clear_error(tmp_path, target):
    cfg = _eagle_layout_config(target, draft_vocab=128)
    _write_random_head(tmp_path / "wide", {**cfg, "hidden_size": 96, "head_dim": 24})
    with pytest.raises(ModelLoadError, match="target's hidden size is 64"):
        load_head(tmp_path / "wide", target)
    _write_random_head(tmp_path / "vocab", {**cfg, "vocab_size": 400})
    with pytest.raises(ModelLoadError, match="vocabulary is 400 tokens, the target's 320"):
        load_head(tmp_path / "vocab", target)
    _write_random_head(tmp_path / "deep", {**cfg, "eagle_config": {"eagle_aux_hidden_state_layer_ids": [2, 16, 29]}})
    with pytest.raises(ModelLoadError, match="target has 6 layers"):
        load_head(tmp_path / "deep", target)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ModelLoadError, match="not an EAGLE-3 head"):
        load_head(tmp_path / "plain", target)
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_head(tmp_path / "nowhere", target)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="has no weights"):
        load_head(tmp_path / "empty", target)


def test_engine_loads_a_head_named_by_the_setting_or_inside_the_target_folder(tmp_path):
    from engine.factory import build_engine

    tok = tiny_tokenizer()
    target = tiny_llama(len(tok), layers=4, seed=7)
    target.save_pretrained(tmp_path / "target")
    tok.save_pretrained(tmp_path / "target")
    save_head(random_eagle_head(target, draft_vocab_size=160), tmp_path / "head")
    eng = build_engine(EngineConfig(target=str(tmp_path / "target"), draft=None, eagle=str(tmp_path / "head"),
                                    device="cpu", kv_cache_tokens=2048), warmup=True)
    assert "eagle" in eng.proposers and eng.info()["eagle"] == "head" and "eagle" in eng.info()["draft_methods"]
    assert 0 < eng.eagle_cost < 5  # measured by the warm-up, in target steps
    res = eng.generate("Once upon a time", SamplingParams(max_new_tokens=12, temperature=0, draft_method="eagle",
                                                          num_draft_tokens=2))
    assert res.stats.num_drafts > 0
    save_head(random_eagle_head(target), tmp_path / "target" / "eagle3")
    assert "eagle" in build_engine(EngineConfig(target=str(tmp_path / "target"), draft=None, device="cpu",
                                                kv_cache_tokens=2048), warmup=False).proposers
    assert "eagle" not in build_engine(EngineConfig(target=str(tmp_path / "target"), draft=None, eagle="",
                                                    device="cpu", kv_cache_tokens=2048), warmup=False).proposers


@pytest.mark.slow
def test_published_qwen3_head_shape_loads_and_drafts(tmp_path):
    """SpecForge's configs/qwen3-4b-eagle3.json as published (hidden 2560, 32/8 heads of 80, intermediate 9728,
    vocabulary 151936, draft vocabulary 32000), random weights, against a one-layer random Qwen3-4B-shaped
    target in bfloat16 (~1.5 GB of memory, ~1 min on a 2-core CPU)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = {"architectures": ["LlamaForCausalLMEagle3"], "attention_bias": False, "attention_dropout": 0.0,
           "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 80, "hidden_act": "silu", "hidden_size": 2560,
           "initializer_range": 0.02, "intermediate_size": 9728, "max_position_embeddings": 40960,
           "max_window_layers": 36, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 1,
           "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
           "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
           "use_sliding_window": False, "vocab_size": 151936, "draft_vocab_size": 32000}
    with torch.device("cpu"):
        torch.set_default_dtype(torch.bfloat16)
        try:
            _write_random_head(tmp_path / "head", cfg)
            target = Qwen3ForCausalLM(Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                                                  num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=8,
                                                  head_dim=128, max_position_embeddings=40960,
                                                  tie_word_embeddings=True)).eval()
        finally:
            torch.set_default_dtype(torch.float32)
    head = load_head(tmp_path / "head", target)
    assert head.fc.weight.shape == (2560, 3 * 2560) and head.lm_head.weight.shape == (32000, 2560)
    assert head.fc.weight.dtype == torch.bfloat16
    runner = ModelRunner(target, KVPool(16, 16, KVShape.from_config(target.config), torch.bfloat16,
                                        torch.device("cpu")), BlockManager(16, 16), 151936)
    prop = EagleProposer(head, runner)
    got = {}
    runner.aux_sink = lambda seq, start, aux: (prop.receive(seq, start, aux), got.setdefault(seq, aux))
    runner.forward([RowInput(0, list(range(100, 120)), 1, True)])
    assert got[0].shape == (20, 3 * 2560)
    assert prop.time_step(8) > 0


def test_waiting_features_keep_what_a_concatenation_kept():
    """A request's waiting features (``_Features``: the verifications' tensors, joined when read) hold, after any
    sequence of appends (a verification overwriting rejected positions), truncations (rollback) and reads (drops),
    the rows the old ``torch.cat`` of the waiting rows and the new ones held; they keep no more than COMPACT_PARTS
    tensors, and not a prompt's features once it was read."""
    from engine.proposers.eagle import COMPACT_PARTS

    gen = torch.Generator().manual_seed(0)
    feats, first = torch.randn(40, 6, generator=gen), 0
    buf = _Features(first, feats.clone())
    for step in range(400):
        n = feats.shape[0]
        op = int(torch.randint(0, 3, (), generator=gen))
        if op == 0:  # a verification from some position within what waits (or just past it)
            start = first + int(torch.randint(0, n + 1, (), generator=gen))
            new = torch.randn(int(torch.randint(1, 10, (), generator=gen)), 6, generator=gen)
            feats = torch.cat([feats[: start - first], new])
            buf.put(start, new)
        elif op == 1:  # rollback: rejected positions go
            keep = int(torch.randint(0, n + 1, (), generator=gen))
            feats = feats[:keep]
            buf.n = min(buf.n, keep)
        else:  # the head read some
            cut = int(torch.randint(0, n + 1, (), generator=gen))
            feats, first = feats[cut:], first + cut
            buf.drop(cut)
        assert buf.first == first and buf.n == feats.shape[0] and len(buf.parts) <= COMPACT_PARTS, step
        assert buf.size == sum(p.shape[0] for p in buf.parts), step  # the rows it tracks (``_keep``'s shortcut)
        held = torch.cat(buf.parts)[buf.skip: buf.skip + buf.n]  # what it holds, every step, without joining it
        assert torch.equal(held, feats), step
        if step % 7 == 0 or int(torch.randint(0, 4, (), generator=gen)) == 0:  # read now and then: parts pile up
            assert torch.equal(buf.rows(), feats), step
    buf.put(buf.first, torch.randn(2000, 6))  # a prompt's features ...
    buf.drop(1998)
    buf.put(buf.first + 2, torch.randn(3, 6))  # ... read; then a step's
    assert buf.n == 5 and sum(p.shape[0] for p in buf.parts) <= 64
