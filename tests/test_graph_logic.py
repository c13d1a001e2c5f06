"""The CUDA-graph paths' logic on any machine: each graph stands in as its function, replayed over the same static
buffers (``capture`` returns the function's outputs and a replay recomputes them in place), so what the runners put
in and take out of the buffers (padding, shapes sharing buffers, a chain's first draw from logits, keyed noise, the
sampled step's verification) is exercised where CI runs. What only CUDA can show (ops a capture forbids, replay
timing, cuDNN plans) stays in test_cuda_graphs.py."""

import types

import pytest
import torch

import engine.cuda_graphs as cg
from engine import rng
from engine.block_manager import BlockManager
from engine.config import SamplingParams
from engine.kv_pool import KVPool, KVShape
from engine.model_runner import ModelRunner, RowInput
from engine.sampler import RowParams, draft_draw

VOCAB = 101


class _Replayed:
    """A captured graph's stand-in: ``replay`` runs the function again into the outputs the capture returned."""

    def __init__(self, fn, out):
        self.fn, self.out = fn, out

    def replay(self):
        new = self.fn()
        for o, n in zip(*((self.out, new) if isinstance(new, tuple) else ((self.out,), (new,)))):
            o.copy_(n)


def _capture(fn, device, stream, mempool, keys):
    out = fn()
    cg.GraphRunner.captures += 1
    cg.GraphRunner.one_offs += 1
    return _Replayed(fn, out), out


@pytest.fixture
def standin(monkeypatch):
    """Gives a runner "graphs" that replay functions (every shape captured at its first use)."""
    monkeypatch.setattr(cg, "capture", _capture)

    def attach(runner: ModelRunner) -> ModelRunner:
        g = cg.GraphRunner(runner.lean, runner.pool, runner.tables.max_blocks * runner.blocks.block_size)
        g._stream = lambda: (None, None)
        g.capture_after = 0
        runner.graphs = g
        return runner

    return attach


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def _runner(model) -> ModelRunner:
    pool = KVPool(64, 16, KVShape.from_config(model.config), model.dtype, torch.device("cpu"))
    return ModelRunner(model, pool, BlockManager(64, 16), VOCAB, lean=True)


def test_a_chain_draws_its_first_token_from_logits_then_drafts_as_step_by_step(standin):
    """Greedy and sampled chains (a greedy row, a plain sampled one, one with top-p and top-k) against drafting step by
    step: the first draw from the given logits, then each forward's; the noise made from each draw's keys; the same
    tokens, q and cache lengths; batches padded to the rows bucket, and a shape met again replays."""
    model = _model()
    eager, graphed = _runner(model), standin(_runner(model))
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (20, 33, 9)]
    for r in (eager, graphed):
        r.forward([RowInput(i, p, 1) for i, p in enumerate(prompts)])
    rp = RowParams.build([SamplingParams(temperature=0), SamplingParams(temperature=0.7),
                          SamplingParams(temperature=1.3, top_p=0.8, top_k=20)], "cpu")
    for rnd, (steps, sampled) in enumerate([(3, False), (3, True), (5, True), (3, True), (1, False)]):
        keys = torch.tensor([[rng.key(10 + i, 30 + 9 * rnd + s, rng.DRAFT) for s in range(steps + 1)]
                             for i in range(3)])
        first = torch.randn(3, VOCAB, generator=gen) * 3
        want, qs, logits = [], [], first
        for s in range(steps + 1):
            if s:
                logits = torch.stack([x[-1] for x in eager.forward([RowInput(i, [t], 1)
                                                                    for i, t in enumerate(want[-1])])])
            if sampled:  # as a draft draws step by step (the sampled rows' own truncation on)
                drawn, probs = draft_draw(logits[1:], rp.select([1, 2]), keys[1:, s], True)
                want.append([int(logits[0].argmax()), *drawn.tolist()])
                qs.append(torch.cat([torch.zeros(1, VOCAB), probs]))
            else:
                want.append(logits.argmax(-1).tolist())
        sampling = cg.ChainSampling(rp.temperature, rp.top_p, rp.top_k, keys, truncate=True) if sampled else None
        replays = graphed.graphs.chain_replays
        tokens, q = graphed.draft_chain([0, 1, 2], first, steps, sampling)
        assert graphed.graphs.chain_replays == replays + 1
        assert tokens.tolist() == [list(col) for col in zip(*want)], rnd
        assert (q is None) == (not sampled)
        if sampled:
            assert (q - torch.stack(qs, 1)).abs().max().item() <= 1e-5
        assert [graphed.cached_len(i) for i in range(3)] == [eager.cached_len(i) for i in range(3)]
        for r in (eager, graphed):  # as after a verification that kept one draft token
            for i in range(3):
                r.truncate(i, r.cached_len(i) - steps)
    assert len(graphed.graphs.chains) == 4  # four shapes: 3 sampled steps met twice, captured once


def test_a_verification_graph_packs_its_rows_as_eager_verify_reads_them(monkeypatch):
    """``run_verify``'s packing: its graph stands in as a function replayed over the static buffers, so
    the rows (padded to the rows bucket), the positions (padded to the tokens bucket), the buffers shared between
    shapes and what stale rows hold are all exercised; each replay must return ``verify``'s tokens. Shapes of one
    rows bucket follow each other with different layouts (a padding row's stale ints once indexed as tokens)."""
    from engine.rejection import row_settings, verify

    monkeypatch.setattr(cg, "capture", _capture)
    g = cg.GraphRunner(lean=None, pool=types.SimpleNamespace(device=torch.device("cpu")), max_keys=4096)
    monkeypatch.setattr(g, "_stream", lambda: (None, None))
    g.capture_after = 0
    vocab = 30
    kinds = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, seed=3), SamplingParams(temperature=1.0),
             SamplingParams(temperature=0.7, top_p=0.9, top_k=12, seed=4), SamplingParams(temperature=1.2, top_k=6)]
    gen = torch.Generator().manual_seed(2)
    seen = set()
    for trial, (b, k, with_q) in enumerate([(3, 2, True), (3, 3, False), (4, 3, True), (2, 0, False), (7, 8, True),
                                            (5, 4, False), (3, 2, True), (8, 1, True)]):
        params = [kinds[(trial + i) % len(kinds)] for i in range(b)]
        logits = torch.randn(b, k + 1, vocab, generator=gen) * 3
        num = [max(0, k - i % 3) for i in range(b)]
        drafts = [logits[i, : num[i]].argmax(-1).tolist() for i in range(b)]
        for d in drafts[::2]:  # some drafts rejected at once
            d[:1] = [(t + 1) % vocab for t in d[:1]]
        q = torch.softmax(torch.randn(b, k, vocab, generator=gen), -1) if with_q else None
        seeds = [p.seed if p.seed is not None else 700 + i for i, p in enumerate(params)]
        sample = rng.key_rows(seeds, [[20 + j for j in range(k + 1)]] * b, rng.SAMPLE)
        accept = rng.key_rows(seeds, [[20 + j for j in range(k)]] * b, rng.ACCEPT) if k else None
        packed = torch.tensor([d + [-1] * (k - len(d)) for d in drafts], dtype=torch.long).view(b, k)
        acc, tok = verify(logits, packed, torch.tensor(num), q, RowParams.build(params, "cpu"), torch.tensor(sample),
                          torch.tensor(accept) if accept else None)
        settings, truncate = row_settings(params, vocab)
        got = g.run_verify(logits, drafts, settings, sample, accept, q, truncate)
        assert [row[: k + 2] for row in got] == [[a] + t for a, t in zip(acc.tolist(), tok.tolist())], trial
        # the drafts of the rows that drafted still on the device (one width, junk past a row's own K), placeholders
        # in their place on the host: the same verification
        drafters = [i for i in range(b) if num[i]]
        if drafters:
            on_device = torch.tensor([drafts[i] + [vocab - 1] * (k - num[i]) for i in drafters])
            held = [[0] * len(d) for d in drafts]
            got = g.run_verify(logits, held, settings, sample, accept, q, truncate, on_device, drafters)
            assert [row[: k + 2] for row in got] == [[a] + t for a, t in zip(acc.tolist(), tok.tolist())], trial
        # some rows' drafts on the device, the others' on the host (n-gram beside a model's chain): the host ones stay
        some = drafters[::2]
        if 0 < len(some) < len(drafters):
            on_device = torch.tensor([drafts[i] + [vocab - 1] * (k - num[i]) for i in some])
            held = [[0] * len(d) if i in some else d for i, d in enumerate(drafts)]
            got = g.run_verify(logits, held, settings, sample, accept, q, truncate, on_device, some)
            assert [row[: k + 2] for row in got] == [[a] + t for a, t in zip(acc.tolist(), tok.tolist())], trial
        seen |= {"all" if a == n else "rejected" for a, n in zip(acc.tolist(), num) if n}
    assert g.verify_replays == 22 and seen == {"all", "rejected"}


DEMO = __import__("pathlib").Path(__file__).resolve().parents[1] / "resources" / "models"


@pytest.mark.skipif(not (DEMO / "demo-target" / "model.safetensors").exists(), reason="demo models absent")
@pytest.mark.parametrize("overflow", [False, True], ids=["staged", "overflowed"])
def test_an_engine_on_graph_paths_gives_the_eager_engines_tokens(standin, monkeypatch, overflow):
    """The demo pair with the target's, the draft's and the EAGLE head's graphs stood in: seeded sampled requests (the
    coupling, with and without top-p) and unseeded ones (rejection sampling, their seeds fixed here), drafted by the
    draft model and by the head, plain and greedy ones, give the eager engine's tokens: sampled steps verified through
    ``run_verify``, drafts drawn in chains (their first draw too). ``overflowed``: every forward's values taken as not
    fitting the graphs' staging (``GraphRunner.load``'s second copy), the drafts left on the device included."""
    if overflow:
        monkeypatch.setattr(cg.GraphRunner, "_fits", lambda self, at, n: False)
    import engine.sequence as sequence
    from engine.config import EngineConfig
    from engine.factory import build_engine

    prompts = ["Once upon a time, there was a little girl named", "The dog ran to the park and"]
    out = {}
    for graphs in (False, True):
        monkeypatch.setattr(sequence, "new_seed", iter(range(3000, 4000)).__next__)
        eng = build_engine(EngineConfig(target=str(DEMO / "demo-target"), draft=str(DEMO / "demo-draft"),
                                        device="cpu", dtype="float32"), warmup=False)
        head = eng.proposers["eagle"]
        if graphs:
            from engine.proposers.eagle import _HeadChains

            standin(eng.target), standin(eng.draft)
            monkeypatch.setattr(torch.cuda, "Stream", lambda *a: None)
            monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
            head._graphs = _HeadChains(head, eng.target.tables.max_blocks * eng.target.blocks.block_size)
        for method, k, t, top_p, seed in (("model", 4, 0.8, 1.0, 7), ("model", 4, 0.8, 0.9, 7),
                                          ("model", 4, 0.8, 1.0, None), ("model", 0, 0.8, 1.0, 7),
                                          ("eagle", 4, 0.8, 1.0, 7), ("eagle", 3, 0.8, 0.9, None),
                                          ("eagle", 4, 0.0, 1.0, None)):
            sp = SamplingParams(temperature=t, top_p=top_p, seed=seed, max_new_tokens=24, ignore_eos=True,
                                speculative=k > 0, num_draft_tokens=k or None, draft_method=method)
            out[(graphs, method, k, t, top_p, seed)] = [eng.generate(p, sp).token_ids for p in prompts]
        if graphs:
            assert eng.target.graphs.verify_replays > 0 and eng.draft.graphs.chain_replays > 0
            assert head._graphs.replays > 0 and head._graphs.failed is None
    for key in [k[1:] for k in out if k[0]]:
        assert out[(True, *key)] == out[(False, *key)], key
