"""CUDA graphs replay the lean forward exactly: same logits as eager, same greedy text, no leak.

Runs only where CUDA is available (the lent GPU machine); skipped on CPU-only machines."""

import pytest
import torch

from engine.block_manager import BlockManager
from engine.kv_pool import KVPool, KVShape
from engine.model_runner import ModelRunner, RowInput

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
VOCAB = 101


def _model(dtype, arch: str = "llama"):
    """A tiny Llama; "mistral-window": a window of 24 on every layer; "gemma3": Gemma 3 with a window of 24 on two of
    its three layers (their own rope, q/k norms, the norms around attention and MLP); "gemma2": Gemma 2 (a window on
    every other layer, soft-capped scores and logits)."""
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig

    torch.manual_seed(0)
    kw = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
    cfg = {"llama": lambda: LlamaConfig(**kw), "mistral-window": lambda: MistralConfig(**kw, sliding_window=24),
           "gemma3": lambda: Gemma3TextConfig(**kw, head_dim=16, sliding_window=24,
                                              layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
           "gemma2": lambda: Gemma2Config(**kw, head_dim=16, sliding_window=24, attn_logit_softcapping=5.0,
                                          final_logit_softcapping=3.0)}[arch]()
    attn = "eager" if arch == "gemma2" else "sdpa"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).to("cuda", dtype).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def _runner(model, graphs: bool, monkeypatch, capture_after: int = 0) -> ModelRunner:
    monkeypatch.setenv("HELIX_CUDA_GRAPHS", "1" if graphs else "0")
    monkeypatch.setenv("HELIX_GRAPH_CAPTURE_AFTER", str(capture_after))  # 0: every step of these tests replays
    pool = KVPool(128, 16, KVShape.from_config(model.config), model.dtype, torch.device("cuda"))
    return ModelRunner(model, pool, BlockManager(128, 16), VOCAB, lean=True)


def test_a_shape_is_captured_on_its_second_use(monkeypatch):
    """The first step of a shape runs eagerly (it may never come back); the second captures; then replays."""
    from engine.cuda_graphs import CAPTURE_AFTER, GraphRunner

    model = _model(torch.float32)
    monkeypatch.delenv("HELIX_GRAPH_CAPTURE_AFTER", raising=False)
    eager, graphed = _runner(model, False, monkeypatch), _runner(model, True, monkeypatch, CAPTURE_AFTER)
    assert CAPTURE_AFTER == 1 and graphed.graphs.capture_after == 1
    for r in (eager, graphed):
        r.forward([RowInput(0, list(range(3, 40)), 1)])
    seen = []
    for step in range(4):
        captures, one_offs = GraphRunner.captures, GraphRunner.one_offs
        rows = [RowInput(0, [5 + step, 6, 7], 3)]  # the same shape every step
        a, b = eager.forward(rows), graphed.forward(rows)
        assert (a[0] - b[0]).abs().max().item() <= 1e-4
        seen.append((GraphRunner.captures - captures, GraphRunner.one_offs - one_offs, graphed.graphs.replays))
    assert seen == [(0, 1, 0), (1, 1, 1), (0, 0, 2), (0, 0, 3)], seen


@pytest.mark.parametrize("dtype,arch", [(torch.float32, "llama"), (torch.bfloat16, "llama"),
                                        (torch.float32, "mistral-window"), (torch.float32, "gemma3"),
                                        (torch.float32, "gemma2")])
def test_graph_replay_matches_eager_on_ragged_decode_and_verify(dtype, arch, monkeypatch):
    """Rows of 1-5 new tokens at different lengths (up to ~450 keys), as a speculative batch meets them; also with
    sliding windows (Mistral 7B v0.1's on every layer, Gemma 3's on some; 24 positions here: the graphs mask them as
    eager steps do)."""
    model = _model(dtype, arch)
    eager, graphed = _runner(model, False, monkeypatch), _runner(model, True, monkeypatch)
    assert eager.graphs is None and graphed.graphs is not None
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (40, 7, 300)]
    for r in (eager, graphed):
        r.forward([RowInput(i, p, 1) for i, p in enumerate(prompts)])
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for step in range(30):
        rows = [RowInput(i, torch.randint(3, VOCAB, (1 + (i * step) % 5,), generator=gen).tolist(), 1 + (i * step) % 5)
                for i in range(3)]
        a, b = eager.forward(rows), graphed.forward(rows)
        for i, (x, y) in enumerate(zip(a, b)):
            scale = x.abs().max().item()
            assert (x - y).abs().max().item() <= tol * max(1.0, scale), f"step {step} row {i}"
        if step == 15:
            for r in (eager, graphed):
                r.truncate(2, r.cached_len(2) - 20)
                r.free(1)
    assert graphed.graphs.replays >= 25 and graphed.graphs.failed is None
    for r in (eager, graphed):
        for i in range(3):
            r.free(i)
        r.blocks.check_invariants()
        assert r.blocks.num_free == r.blocks.num_blocks


def test_graph_replay_delivers_the_eagle_features_of_eager():
    """Rows that ask for aux hidden states (an EAGLE-3 head's features) still replay a graph, and get
    the eager forward's features for every new token."""
    model = _model(torch.float32)
    mp = pytest.MonkeyPatch()
    eager, graphed = _runner(model, False, mp), _runner(model, True, mp)
    mp.undo()
    got: dict[str, list] = {"eager": [], "graphed": []}
    for name, r in (("eager", eager), ("graphed", graphed)):
        r.aux_layers = (0, 1, 2)
        r.aux_sink = lambda seq, start, h, name=name: got[name].append((seq, start, h.clone()))
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (20, 9)]
    for r in (eager, graphed):
        r.forward([RowInput(i, p, 1, aux=True) for i, p in enumerate(prompts)])
    for step in range(6):
        rows = [RowInput(i, torch.randint(3, VOCAB, (1 + (i + step) % 3,), generator=gen).tolist(), 1 + (i + step) % 3,
                         aux=i == 0 or step % 2 == 0) for i in range(2)]
        a, b = eager.forward(rows), graphed.forward(rows)
        for x, y in zip(a, b):
            assert (x - y).abs().max().item() <= 1e-4 * max(1.0, x.abs().max().item())
    assert graphed.graphs.replays >= 6 and graphed.graphs.failed is None
    assert [(s, p, h.shape) for s, p, h in got["eager"]] == [(s, p, h.shape) for s, p, h in got["graphed"]]
    for (_, _, x), (_, _, y) in zip(got["eager"], got["graphed"]):
        assert (x - y).abs().max().item() <= 1e-4 * max(1.0, x.abs().max().item())


DEMO = __import__("pathlib").Path(__file__).resolve().parents[1] / "resources" / "models"
PROMPTS = ["Once upon a time, there was a little girl named", "The dog ran to the park and", "Tom and Sue wanted to"]


@pytest.mark.skipif(not (DEMO / "demo-target" / "model.safetensors").exists(), reason="demo models absent")
def test_graphed_engine_greedy_equals_eager_and_plain(monkeypatch):
    """The trained demo pair in fp32 on the GPU: graphs on/off x plain/K=4/adaptive give one text."""
    from engine.config import EngineConfig, SamplingParams
    from engine.factory import build_engine

    outs, sampled = {}, {}
    for graphs in (False, True):
        monkeypatch.setenv("HELIX_CUDA_GRAPHS", "1" if graphs else "0")
        eng = build_engine(EngineConfig(target=str(DEMO / "demo-target"), draft=str(DEMO / "demo-draft"), device="cuda",
                                        dtype="float32"), warmup=False)
        assert (eng.target.graphs is not None) == graphs
        tails = []  # verifications that read a chain's draft on the device (Proposal.drafted)
        forward = eng.target.forward

        def spy(rows, sync=True, tail=None, forward=forward, tails=tails):
            tails.append(tail is not None)
            return forward(rows, sync, tail)

        monkeypatch.setattr(eng.target, "forward", spy)
        for k in (0, 4, None):
            sp = SamplingParams(temperature=0, max_new_tokens=64, ignore_eos=True, speculative=k != 0,
                                num_draft_tokens=k or None)
            outs[(graphs, k)] = [eng.generate(p, sp).token_ids for p in PROMPTS]
        for k in (4, None):  # the EAGLE head, greedy: steps 2..K as one graph too
            sp = SamplingParams(temperature=0, max_new_tokens=64, ignore_eos=True, num_draft_tokens=k,
                                draft_method="eagle")
            outs[(graphs, f"eagle {k}")] = [eng.generate(p, sp).token_ids for p in PROMPTS]
        assert any(tails) == graphs  # only chains leave their drafts on the device
        if graphs:
            assert eng.target.graphs.replays > 0 and eng.draft.graphs.replays > 0
            assert eng.draft.graphs.chain_replays > 0  # K = 4 drafted steps 2..4 in one replay
            assert eng.proposers["eagle"]._graphs.replays > 0 and eng.proposers["eagle"]._graphs.failed is None
        else:
            assert eng.proposers["eagle"]._graphs is None
        # seeded sampling draws from counter-based noise: the sampled drafting chain draws what step by step drew
        replays = eng.draft.graphs.chain_replays if graphs else 0
        for top_p in (1.0, 0.9):
            sp = SamplingParams(temperature=0.8, top_p=top_p, seed=7, max_new_tokens=48, ignore_eos=True,
                                num_draft_tokens=4)
            sampled[(graphs, top_p)] = [eng.generate(p, sp).token_ids for p in PROMPTS]
        if graphs:
            assert eng.draft.graphs.chain_replays > replays
            assert eng.target.graphs.verify_replays > 0  # sampled steps verified in one replay
        # the EAGLE head's sampled rows draft steps 2..K in one graph too: seeded rows (the coupling), and unseeded
        # ones (rejection sampling, which reads the chain's q), their request seeds fixed here so that they repeat
        import engine.sequence as sequence

        monkeypatch.setattr(sequence, "new_seed", iter(range(1000, 2000)).__next__)
        replays = eng.proposers["eagle"]._graphs.replays if graphs else 0
        for top_p, seed in ((1.0, 7), (0.9, 7), (1.0, None), (0.9, None)):
            sp = SamplingParams(temperature=0.8, top_p=top_p, top_k=40 if seed is None else 0, seed=seed,
                                max_new_tokens=48, ignore_eos=True, num_draft_tokens=4, draft_method="eagle")
            sampled[(graphs, f"eagle {top_p} {seed}")] = [eng.generate(p, sp).token_ids for p in PROMPTS]
        if graphs:
            assert eng.proposers["eagle"]._graphs.replays > replays
            assert any(key[3] != "greedy" for key in eng.proposers["eagle"]._graphs.graphs)
    for key in [k[1] for k in sampled if k[0]]:
        assert sampled[(True, key)] == sampled[(False, key)], f"{key}: graphs change sampled output"
    want = outs[(False, 0)]
    for key, got in outs.items():
        for i, (a, b) in enumerate(zip(got, want)):
            first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
            assert first is None, f"graphs={key[0]} K={key[1]} prompt {i}: differs from eager plain at token {first}"


def test_token_counts_of_one_bucket_share_a_left_padded_graph(monkeypatch):
    """Verifying K = 3 (4 tokens a row) and K = 4 (5 tokens) replay one graph of 5 tokens, the shorter rows padded on
    the left as the runner pads ragged rows: one capture, and eager's logits and EAGLE features for every token."""
    from engine.cuda_graphs import TOKEN_BUCKETS, GraphRunner

    assert 4 not in TOKEN_BUCKETS and 5 in TOKEN_BUCKETS
    model = _model(torch.float32)
    eager, graphed = _runner(model, False, monkeypatch), _runner(model, True, monkeypatch)
    got: dict[str, list] = {"eager": [], "graphed": []}
    for name, r in (("eager", eager), ("graphed", graphed)):
        r.aux_layers = (0, 2)
        r.aux_sink = lambda seq, start, h, name=name: got[name].append((seq, start, h.clone()))
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (30, 12)]
    for r in (eager, graphed):
        r.forward([RowInput(i, p, 1) for i, p in enumerate(prompts)])
    captures, replays = GraphRunner.captures, graphed.graphs.replays
    for n in (4, 5, 4, 5, 4):
        rows = [RowInput(i, torch.randint(3, VOCAB, (n,), generator=gen).tolist(), n, aux=True) for i in range(2)]
        a, b = eager.forward(rows), graphed.forward(rows)
        for x, y in zip(a, b):
            assert x.shape == y.shape == (n, VOCAB)
            assert (x - y).abs().max().item() <= 1e-4 * max(1.0, x.abs().max().item())
    assert GraphRunner.captures - captures == 1 and graphed.graphs.replays - replays == 5
    assert [(s, p, h.shape) for s, p, h in got["eager"]] == [(s, p, h.shape) for s, p, h in got["graphed"]]
    for (_, _, x), (_, _, y) in zip(got["eager"], got["graphed"]):
        assert (x - y).abs().max().item() <= 1e-4 * max(1.0, x.abs().max().item())


def test_prewarm_captures_the_first_shapes_so_steps_meet_no_one_off(monkeypatch):
    """Warm-up captures every (rows up to 8, tokens bucket) shape at short contexts: a batch tail of 3 rows verifying
    4 tokens, or 8 rows drafting one, then replays at once (no eager step, no capture) with eager's logits."""
    from engine.cuda_graphs import ROW_BUCKETS, TOKEN_BUCKETS, GraphRunner

    model = _model(torch.float32)
    monkeypatch.delenv("HELIX_GRAPH_CAPTURE_AFTER", raising=False)
    eager, graphed = _runner(model, False, monkeypatch), _runner(model, True, monkeypatch, 1)
    rows8 = sum(1 for r in ROW_BUCKETS if r <= 8)
    assert graphed.graphs.prewarm(8, 100) == rows8 * len(TOKEN_BUCKETS)
    assert graphed.graphs.prewarm(8, 100) == 0  # captured once
    gen = torch.Generator().manual_seed(11)
    for r in (eager, graphed):
        for i in range(8):
            r.forward([RowInput(i, list(range(3, 30 + i)), 1)])
    one_offs, replays = GraphRunner.one_offs, graphed.graphs.replays
    for rows, n in ((3, 4), (8, 1), (5, 9), (1, 2)):
        feed = [RowInput(i, torch.randint(3, VOCAB, (n,), generator=gen).tolist(), n) for i in range(rows)]
        a, b = eager.forward(feed), graphed.forward(feed)
        for x, y in zip(a, b):
            assert (x - y).abs().max().item() <= 1e-4 * max(1.0, x.abs().max().item())
    assert GraphRunner.one_offs == one_offs and graphed.graphs.replays - replays == 4


def test_graphs_keep_their_outputs_only(monkeypatch):
    """The warm-up captures outside the runner's inference mode, over weights that require grad (a model as built
    here or loaded by transformers): the prompt chunks' graphs (up to 512 padded tokens each) then hold their static
    outputs (each row's last logits) and no intermediate of their forwards, which go back to the shared pool for the
    next capture. Recorded for a backward, the graphs kept 83 kB per padded token of this model alive for good
    (every tensor its three layers saved: 345 MiB here on an H100; a 3.8B model's took 58 GB)."""
    from engine.cuda_graphs import prefill_shapes

    model = _model(torch.float32)
    assert model.lm_head.weight.requires_grad and torch.is_grad_enabled()
    graphed = _runner(model, True, monkeypatch, 1)
    graphed.forward([RowInput(0, list(range(3, 30)), 1)])  # the runner's buffers, before the measurement
    graphed.graphs.prewarm(8, 100)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    captured = graphed.graphs.prewarm_prefill(8, 100)
    torch.cuda.synchronize()
    grew = torch.cuda.memory_allocated() - before
    padded = sum(r * m for r, m in prefill_shapes(8))
    assert captured == len(list(prefill_shapes(8))) and padded >= 4000
    assert grew <= 128 * padded, f"{grew} bytes for {padded} padded tokens"  # outputs: [rows, 1, vocab] each


def test_prompt_chunks_replay_graphs_that_keep_the_last_logits(monkeypatch):
    """Prefill chunks of up to PREFILL_GRAPH_TOKENS padded tokens replay graphs of their own, one row or several of
    different lengths (left-padded to a bucket): eager's last logits and EAGLE features for every token, the same cache
    for the steps after, no leak. Longer chunks, keys past PREFILL_MAX_KEYS and rows that want every token's logits run
    eagerly; a warm-up captures the short chunks of 1-8 rows."""
    from engine.cuda_graphs import PREFILL_GRAPH_TOKENS, PREFILL_MAX_KEYS, GraphRunner, prefill_shapes

    model = _model(torch.float32)
    eager, graphed = _runner(model, False, monkeypatch), _runner(model, True, monkeypatch)
    assert graphed.graphs.prewarm_prefill(8, 100) == len(list(prefill_shapes(8)))
    got: dict[str, list] = {"eager": [], "graphed": []}
    for name, r in (("eager", eager), ("graphed", graphed)):
        r.aux_layers = (0, 2)
        r.aux_sink = lambda seq, start, h, name=name: got[name].append((seq, start, h.clone()))
    gen = torch.Generator().manual_seed(13)

    def same(rows, graph: bool):
        replays = graphed.graphs.replays
        a, b = eager.forward(rows), graphed.forward(rows)
        assert graphed.graphs.replays - replays == int(graph), rows
        for x, y in zip(a, b):
            assert x.shape == y.shape
            assert (x - y).abs().max().item() <= 1e-4 * max(1.0, x.abs().max().item())

    ids = lambda n: torch.randint(3, VOCAB, (n,), generator=gen).tolist()  # noqa: E731
    same([RowInput(0, ids(37), 1, aux=True)], True)  # one prompt (bucket 48)
    same([RowInput(1, ids(20), 1), RowInput(2, ids(90), 1, aux=True)], True)  # two, padded to 96
    same([RowInput(3, ids(PREFILL_GRAPH_TOKENS // 2 + 1), 1)], True)  # a 384 bucket: one row fits
    same([RowInput(4, ids(300), 1), RowInput(5, ids(300), 1)], False)  # 2 x 384 padded tokens: eager
    same([RowInput(0, ids(12), 12)], False)  # every token's logits: eager
    for _ in range(3):  # decode steps read what the graphs wrote
        same([RowInput(i, ids(2), 2) for i in range(6)], True)
    for r in (eager, graphed):
        for i in range(1, 6):
            r.free(i)
    same([RowInput(6, ids(PREFILL_MAX_KEYS - 24), 1)], False)  # past 512 tokens: eager
    same([RowInput(6, ids(30), 1)], False)  # a chunk past PREFILL_MAX_KEYS keys: eager
    assert graphed.graphs.failed is None and GraphRunner.captures > 0
    assert [(s, p, h.shape) for s, p, h in got["eager"]] == [(s, p, h.shape) for s, p, h in got["graphed"]]
    for (_, _, x), (_, _, y) in zip(got["eager"], got["graphed"]):
        assert (x - y).abs().max().item() <= 1e-4 * max(1.0, x.abs().max().item())
    for r in (eager, graphed):
        for i in range(7):
            r.free(i)
        r.blocks.check_invariants()
        assert r.blocks.num_free == r.blocks.num_blocks


def test_a_drafting_chain_replays_the_step_by_step_draft(monkeypatch):
    """Greedy drafting steps 2..K in one graph: the tokens, the cache and what the next forward sees are those of
    drafting step by step, for ragged rows, a batch padded up to its rows bucket, and rows that cross a block."""
    from engine.cuda_graphs import GraphRunner

    model = _model(torch.float32)
    eager, graphed = _runner(model, False, monkeypatch), _runner(model, True, monkeypatch)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (14, 31, 40)]  # 14 + 5 crosses 16
    for r in (eager, graphed):
        r.forward([RowInput(i, p, 1) for i, p in enumerate(prompts)])
    assert eager.draft_chain([0, 1, 2], torch.zeros(3, VOCAB, device="cuda"), 2) is None  # no graphs
    for rnd, steps in enumerate((4, 4, 1, 7)):
        feed = [RowInput(i, [3 + rnd + i], 1) for i in range(3)]
        first_e = torch.stack([x[-1] for x in eager.forward(feed)])
        first_g = torch.stack([x[-1] for x in graphed.forward(feed)])
        assert first_e.argmax(-1).tolist() == first_g.argmax(-1).tolist()
        cur = first_e.argmax(-1).tolist()
        want = [cur]
        for _ in range(steps):
            cur = [int(x[-1].argmax()) for x in eager.forward([RowInput(i, [t], 1) for i, t in enumerate(cur)])]
            want.append(cur)
        replays = graphed.graphs.chain_replays
        got = graphed.draft_chain([0, 1, 2], first_g, steps)  # the first draw from the logits, then steps forwards
        assert got is not None and got[1] is None and graphed.graphs.chain_replays == replays + 1
        assert got[0].tolist() == [list(col) for col in zip(*want)]
        assert [graphed.cached_len(i) for i in range(3)] == [eager.cached_len(i) for i in range(3)]
        for r in (eager, graphed):  # roll back as after a verification that accepted one draft token
            for i in range(3):
                r.truncate(i, r.cached_len(i) - steps)
    a = eager.forward([RowInput(i, [9, 10], 2) for i in range(3)])
    b = graphed.forward([RowInput(i, [9, 10], 2) for i in range(3)])
    for x, y in zip(a, b):
        assert (x - y).abs().max().item() <= 1e-4 * max(1.0, x.abs().max().item())
    assert GraphRunner.captures > 0 and graphed.blocks.num_free == eager.blocks.num_free


def test_a_sampled_drafting_chain_draws_what_step_by_step_draws(monkeypatch):
    """A chain of sampled rows (one greedy, one plain T, one with top-p and top-k) draws, with the noise of the same
    keys, the tokens and draft distributions q of drafting step by step with engine.sampler (``draft_draw``: each
    draw cut to the DRAFT_TOP likeliest tokens, q that cut distribution), its first draw too."""
    from engine import rng
    from engine.config import SamplingParams
    from engine.cuda_graphs import ChainSampling
    from engine.sampler import RowParams, draft_draw

    model = _model(torch.float32)
    eager, graphed = _runner(model, False, monkeypatch), _runner(model, True, monkeypatch)
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (20, 33, 9)]
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7),
              SamplingParams(temperature=1.3, top_p=0.8, top_k=20)]
    rp = RowParams.build(params, torch.device("cuda"))
    for r in (eager, graphed):
        r.forward([RowInput(i, p, 1) for i, p in enumerate(prompts)])
    steps = 5
    keys = torch.tensor([[rng.key(10 + i, 30 + s, rng.DRAFT) for s in range(steps + 1)] for i in range(3)]).cuda()
    first = torch.randn(3, VOCAB, generator=gen).cuda() * 3  # each row's logits of its first draw
    want, qs, logits = [], [], first
    for s in range(steps + 1):
        if s:
            logits = torch.stack([x[-1] for x in eager.forward([RowInput(i, [t], 1) for i, t in enumerate(want[-1])])])
        drawn, probs = draft_draw(logits[1:], rp.select([1, 2]), keys[1:, s], True)
        want.append([int(logits[0].argmax()), *drawn.tolist()])
        qs.append(torch.cat([torch.zeros(1, VOCAB, device="cuda"), probs]))
    assert rp.truncates(VOCAB)
    got = graphed.draft_chain([0, 1, 2], first, steps, ChainSampling(rp.temperature, rp.top_p, rp.top_k, keys,
                                                                     truncate=True))
    assert got is not None
    tokens, q = got
    assert tokens.tolist() == [list(col) for col in zip(*want)]
    assert (q - torch.stack(qs, 1)).abs().max().item() <= 1e-5
    assert [graphed.cached_len(i) for i in range(3)] == [eager.cached_len(i) for i in range(3)]


def test_prewarmed_sampled_chains_replay_at_once(monkeypatch):
    """Warm-up captures the sampled drafting chains (no top-p / top-k cut) beside the greedy ones: a sampled chain of
    a prewarmed shape replays at its first use (no eager step, no capture) and draws what it draws when captured
    lazily."""
    from engine.config import SamplingParams
    from engine.cuda_graphs import MAX_CHAIN_STEPS, PREWARM_CHAIN_MODES, ROW_BUCKETS, ChainSampling, GraphRunner
    from engine.sampler import RowParams

    assert PREWARM_CHAIN_MODES == ("greedy", "sample")
    model = _model(torch.float32)
    monkeypatch.delenv("HELIX_GRAPH_CAPTURE_AFTER", raising=False)
    warm, lazy = _runner(model, True, monkeypatch, 1), _runner(model, True, monkeypatch, 0)
    rows8 = sum(1 for r in ROW_BUCKETS if r <= 8)
    assert warm.graphs.prewarm_chains(8, 100, VOCAB) == 2 * rows8 * MAX_CHAIN_STEPS
    gen = torch.Generator().manual_seed(21)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (20, 33, 9)]
    for r in (warm, lazy):
        r.forward([RowInput(i, p, 1) for i, p in enumerate(prompts)])
    rp = RowParams.build([SamplingParams(temperature=0.7), SamplingParams(temperature=1.0),
                          SamplingParams(temperature=0)], torch.device("cuda"))
    keys = torch.arange(12, device="cuda").view(3, 4) * 0x9E3779B97F4A7C1  # any keys of the chain's 4 draws
    first = torch.randn(3, VOCAB, generator=gen).cuda() * 3
    one_offs, captures = GraphRunner.one_offs, GraphRunner.captures
    a = warm.draft_chain([0, 1, 2], first, 3, ChainSampling(rp.temperature, rp.top_p, rp.top_k, keys))
    assert GraphRunner.one_offs == one_offs and GraphRunner.captures == captures and warm.graphs.chain_replays == 1
    b = lazy.draft_chain([0, 1, 2], first, 3, ChainSampling(rp.temperature, rp.top_p, rp.top_k, keys))
    assert a[0].tolist() == b[0].tolist() and (a[1] - b[1]).abs().max().item() <= 1e-5


def test_eager_forwards_skip_cudnn_attention_and_long_graphs_use_it(monkeypatch):
    """cuDNN's SDPA builds a plan per new shape (~80 ms on an H200): eager forwards, which meet new shapes all the
    time, run without it; a graph of a long key bucket captures with it (its plan built once), a short one without.
    Both replay what eager computes."""
    import engine.attention as attention

    if not attention._CUDNN_ALLOWED:
        pytest.skip("this torch build or process has cuDNN SDPA off")
    seen = []
    sdpa = attention.F.scaled_dot_product_attention

    def spy(*a, **k):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*a, **k)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    model = _model(torch.bfloat16)
    eager, graphed = _runner(model, False, monkeypatch), _runner(model, True, monkeypatch)
    for r in (eager, graphed):
        r.forward([RowInput(0, list(range(3, 40)), 1)])  # prefill: eager, and a graph of a short key bucket
    assert seen and not any(seen)
    for context in (40, 600):  # key buckets 256 and 768
        for r in (eager, graphed):
            if r.cached_len(0) < context:  # a long chunk: eager in both
                r.forward([RowInput(0, [5] * (context - r.cached_len(0)), 1)])
        seen.clear()
        a = eager.forward([RowInput(0, [7, 8], 2)])
        assert seen and not any(seen)
        seen.clear()
        b = graphed.forward([RowInput(0, [7, 8], 2)])
        assert graphed.graphs.replays and seen, "the verify step was not captured"
        assert all(x == (context >= attention.CUDNN_MIN_KEYS) for x in seen), (context, seen)
        assert (a[0] - b[0]).abs().max().item() <= 0.05 * a[0].abs().max().item()
        for r in (eager, graphed):
            r.truncate(0, context)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored after every forward and capture


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_graphed_verification_returns_what_eager_verify_returns(dtype, monkeypatch):
    """``run_verify`` (one replay) against engine.rejection ``verify`` (eager) on the same logits: greedy, seeded and
    unseeded rows, with and without top-p / top-k cuts and q, rows that drafted fewer tokens, batches padded to the
    rows bucket and K + 1 padded to the tokens bucket; a shape's first use stays eager, as the forward's do."""
    from engine import rng
    from engine.config import SamplingParams
    from engine.rejection import row_settings, verify
    from engine.sampler import RowParams

    model = _model(torch.float32)
    monkeypatch.delenv("HELIX_GRAPH_CAPTURE_AFTER", raising=False)
    graphs = _runner(model, True, monkeypatch, 1).graphs
    kinds = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, seed=3), SamplingParams(temperature=1.0),
             SamplingParams(temperature=0.7, top_p=0.9, top_k=12, seed=4), SamplingParams(temperature=1.2, top_k=6)]
    gen = torch.Generator().manual_seed(5)
    seen = set()
    for trial, (b, k, with_q) in enumerate([(3, 2, True), (3, 2, True), (5, 3, False), (5, 3, False), (8, 0, False),
                                            (8, 0, False), (2, 4, True), (2, 4, True), (7, 8, True), (7, 8, True)]):
        params = [kinds[(trial // 2 + i) % len(kinds)] for i in range(b)]
        logits = (torch.randn(b, k + 1, VOCAB, generator=gen) * 3).to("cuda", dtype)
        num = [k - (i % 2) if k else 0 for i in range(b)]
        drafts = [logits[i, : num[i]].float().argmax(-1).tolist() for i in range(b)]
        for d in drafts[::3]:  # some drafts rejected at once
            d[:1] = [(t + 1) % VOCAB for t in d[:1]]
        q = torch.softmax(torch.randn(b, k, VOCAB, generator=gen), -1).cuda() if with_q else None
        seeds = [p.seed if p.seed is not None else 500 + i for i, p in enumerate(params)]
        sample = rng.key_rows(seeds, [[60 + j for j in range(k + 1)]] * b, rng.SAMPLE)
        accept = rng.key_rows(seeds, [[60 + j for j in range(k)]] * b, rng.ACCEPT) if k else None
        packed = torch.tensor([d + [-1] * (k - len(d)) for d in drafts], dtype=torch.long).view(b, k).cuda()
        acc, tok = verify(logits, packed, torch.tensor(num).cuda(), q, RowParams.build(params, "cuda"),
                          torch.tensor(sample).cuda(), torch.tensor(accept).cuda() if accept else None)
        want = [[a] + t for a, t in zip(acc.tolist(), tok.tolist())]
        settings, truncate = row_settings(params, VOCAB)
        replays = graphs.verify_replays
        got = graphs.run_verify(logits, drafts, settings, sample, accept, q, truncate)
        if trial % 2 == 0:  # the shape's first use
            assert got is None and graphs.verify_replays == replays
            continue
        assert graphs.verify_replays == replays + 1
        assert [g[: k + 2] for g in got] == want, (trial, got, want)
        seen |= {"all" if w[0] == n else "rejected" for w, n in zip(want, num) if n}
    assert seen == {"all", "rejected"}


def test_rows_of_different_k_draft_in_one_chain(monkeypatch):
    """A step whose rows planned K = 4, 2 and 3 with the draft model (a request near its last token beside others)
    drafts steps 2..4 as one chain replay for all three, and verifies what drafting step by step (no graphs) gives."""
    from engine.config import EngineConfig, SamplingParams
    from engine.factory import build_engine
    from engine.spec_decode import decode_step

    monkeypatch.setenv("HELIX_GRAPH_CAPTURE_AFTER", "0")
    out = {}
    for graphs in (False, True):
        monkeypatch.setenv("HELIX_CUDA_GRAPHS", "1" if graphs else "0")
        eng = build_engine(EngineConfig(target=str(DEMO / "demo-target"), draft=str(DEMO / "demo-draft"), device="cuda",
                                        dtype="float32"), warmup=False)
        reqs = [eng.add_request(p, SamplingParams(temperature=0, max_new_tokens=32, ignore_eos=True,
                                                  num_draft_tokens=4)) for p in PROMPTS]
        while not all(r.prefilled for r in reqs):
            eng.step()
        replays = eng.draft.graphs.chain_replays if graphs else 0
        res, _ = decode_step(eng.target, eng.proposers, dict(zip(reqs, [(4, "model"), (2, "model"), (3, "model")])))
        if graphs:
            assert eng.draft.graphs.chain_replays == replays + 1
        assert [r.k for r in res] == [4, 2, 3]
        out[graphs] = [(r.accepted, r.tokens) for r in res]
    assert out[True] == out[False]
