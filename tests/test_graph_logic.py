"""The CUDA-graph paths' logic on any machine: each graph stands in as its function, replayed over the same static
buffers (``capture`` returns the function's outputs and a replay recomputes them in place), so what the runners put
in and take out of the buffers (padding, shapes sharing buffers, a chain's first draw from logits, keyed noise, the
sampled step's verification) is exercised where CI runs. What only CUDA can show (ops a capture forbids, replay
timing, cuDNN plans) stays in test_cuda_graphs.py."""

import pytest
import torch

import engine.cuda_graphs as cg
from engine import rng
from engine.block_manager import BlockManager
from engine.config import SamplingParams
from engine.kv_pool import KVPool, KVShape
from engine.model_runner import ModelRunner, RowInput
from engine.sampler import RowParams, probs_batch, race

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
        noise = rng.exponentials(keys, VOCAB)
        first = torch.randn(3, VOCAB, generator=gen) * 3
        want, qs, logits = [], [], first
        for s in range(steps + 1):
            if s:
                logits = torch.stack([x[-1] for x in eager.forward([RowInput(i, [t], 1)
                                                                    for i, t in enumerate(want[-1])])])
            if sampled:
                probs = probs_batch(logits[1:], rp.select([1, 2]))
                want.append([int(logits[0].argmax()), *race(probs, noise[1:, s]).tolist()])
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


DEMO = __import__("pathlib").Path(__file__).resolve().parents[1] / "resources" / "models"


@pytest.mark.skipif(not (DEMO / "demo-target" / "model.safetensors").exists(), reason="demo models absent")
def test_an_engine_on_graph_paths_gives_the_eager_engines_tokens(standin, monkeypatch):
    """The demo pair with the target's, the draft's and the EAGLE head's graphs stood in: seeded sampled requests (the
    coupling, with and without top-p) and unseeded ones (rejection sampling, their seeds fixed here), drafted by the
    draft model and by the head, plain and greedy ones, give the eager engine's tokens: sampled steps verified through
    ``run_verify``, drafts drawn in chains (their first draw too)."""
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
