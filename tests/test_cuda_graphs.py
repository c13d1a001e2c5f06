"""CUDA graphs replay the lean forward exactly: same logits as eager, same greedy text, no leak.

Runs only where CUDA is available (the lent GPU machine); skipped on CPU-only machines."""

import pytest
import torch

from engine.block_manager import BlockManager
from engine.kv_pool import KVPool, KVShape
from engine.model_runner import ModelRunner, RowInput

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
VOCAB = 101


def _model(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg).to("cuda", dtype).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def _runner(model, graphs: bool, monkeypatch) -> ModelRunner:
    monkeypatch.setenv("HELIX_CUDA_GRAPHS", "1" if graphs else "0")
    pool = KVPool(128, 16, KVShape.from_config(model.config), model.dtype, torch.device("cuda"))
    return ModelRunner(model, pool, BlockManager(128, 16), VOCAB, lean=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_matches_eager_on_ragged_decode_and_verify(dtype, monkeypatch):
    model = _model(dtype)
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


def test_graphed_engine_greedy_equals_eager_and_plain(monkeypatch):
    from engine.config import EngineConfig, SamplingParams
    from engine.llm_engine import LLMEngine
    from tests.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    target = _model(torch.float32)
    outs = {}
    for graphs in (False, True):
        monkeypatch.setenv("HELIX_CUDA_GRAPHS", "1" if graphs else "0")
        draft = _model(torch.float32)
        with torch.no_grad():
            del draft.model.layers[1:]
            draft.config.num_hidden_layers = 1
        eng = LLMEngine(target, tok, draft, EngineConfig(target="t", draft="d", kv_cache_tokens=4096))
        for k in (None, 4):
            sp = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True,
                                speculative=k is not None, num_draft_tokens=k)
            outs[(graphs, k)] = eng.generate("Once upon a time", sp).token_ids
    assert outs[(True, None)] == outs[(False, None)] == outs[(True, 4)] == outs[(False, 4)]
