"""The paged cache must give the default cache's logits, for every architecture users pair.

These runners use transformers' modeling code on the paged cache (``lean=False``): that path
serves every family the lean forward does not, and is the lean forward's reference
(tests/test_lean_forward.py)."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
)

from engine.block_manager import BlockManager
from engine.compat import cache_kwarg
from engine.kv_pool import KVPool, KVShape
from engine.loader import max_context_of
from engine.model_runner import ModelRunner, RowInput

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)

CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=4096),
    "phi3": lambda: Phi3Config(**COMMON, pad_token_id=0),
    "gemma": lambda: GemmaConfig(**COMMON, head_dim=16),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256),
    # sliding windows far shorter than the contexts below (up to 87 tokens): every layer (Mistral), or some
    # (Gemma 2 with its soft-capping, Gemma 3, Qwen2 past max_window_layers)
    "mistral-window": lambda: MistralConfig(**COMMON, sliding_window=8),
    "gemma2-window": lambda: Gemma2Config(**COMMON, head_dim=16, sliding_window=8),
    "gemma3-window": lambda: Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=8,
                                              layer_types=["sliding_attention", "full_attention"]),
    "qwen2-window": lambda: Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "phi3-window": lambda: Phi3Config(**COMMON, pad_token_id=0, sliding_window=8),  # Phi-3-mini-4k's kind
    "gemma3-multimodal": lambda: _gemma3_multimodal(),  # Gemma 3 4B+: the text side of a text-and-image model
}


def _gemma3_multimodal(vocab: int = VOCAB):
    from transformers import Gemma3Config, SiglipVisionConfig

    text = Gemma3TextConfig(**{**COMMON, "vocab_size": vocab}, head_dim=16, sliding_window=8,
                            layer_types=["sliding_attention", "full_attention"])
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    cfg.architectures = ["Gemma3ForConditionalGeneration"]
    return cfg


def _make_model(name: str):
    torch.manual_seed(0)
    cfg = CONFIGS[name]()
    attn = "eager" if cfg.model_type == "gemma2" else "sdpa"  # Gemma 2's soft-capping has no SDPA path
    cfg._attn_implementation = attn
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).float().eval()


def _make_runner(model, blocks: int = 64, block_size: int = 16, lean: bool = False) -> ModelRunner:
    shape = KVShape.from_config(model.config)
    pool = KVPool(blocks, block_size, shape, torch.float32, torch.device("cpu"))
    return ModelRunner(model, pool, BlockManager(blocks, block_size), VOCAB, lean=lean)


@torch.inference_mode()
def _reference_logits(model, prompt: list[int], steps: int) -> tuple[list[torch.Tensor], list[int]]:
    """Prefill + greedy decode with transformers' own DynamicCache."""
    cache = DynamicCache(config=model.config)
    kw = {cache_kwarg(model): cache, "use_cache": True}
    out = model(input_ids=torch.tensor([prompt]), **kw)
    logits, tokens = [out.logits[0, -1]], []
    for _ in range(steps):
        tok = int(logits[-1].argmax())
        tokens.append(tok)
        out = model(input_ids=torch.tensor([[tok]]), **kw)
        logits.append(out.logits[0, -1])
    return logits, tokens


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("batch", [1, 3])
def test_paged_logits_match_dynamic_cache(arch, batch):
    _match_dynamic_cache(arch, batch, lean=False)


@pytest.mark.parametrize("arch", ["mistral-window", "phi3-window", "qwen2-window", "gemma2-window", "gemma3-window",
                                  "gemma3-multimodal"])
@pytest.mark.parametrize("batch", [1, 3])
def test_the_lean_forward_masks_sliding_windows(arch, batch):
    """Mistral 7B v0.1 and Phi-3-mini-4k slide on every layer, Gemma 2, Gemma 3 (text, and the text side of its
    text-and-image checkpoints) and Qwen2 past ``max_window_layers`` on some: the lean forward hides the keys before each query's
    window on those layers (a lone prompt's prefill, decode rows, ragged batches), so they serve their whole context
    on it."""
    _match_dynamic_cache(arch, batch, lean=True)


def _match_dynamic_cache(arch: str, batch: int, lean: bool) -> None:
    model = _make_model(arch)
    steps = 64
    prompts = [[(7 * i + 3 * b) % VOCAB for i in range(5 + 9 * b)] for b in range(batch)]  # 5, 14, 23 tokens
    refs = [_reference_logits(model, p, steps) for p in prompts]
    runner = _make_runner(model, lean=lean)
    assert runner.forward_path == ("lean" if lean else "transformers")
    got = runner.forward([RowInput(b, p, 1) for b, p in enumerate(prompts)])
    for step in range(steps + 1):
        for b in range(batch):
            diff = (got[b][-1] - refs[b][0][step]).abs().max().item()
            assert diff <= 1e-5, f"{arch} batch={batch} row={b} step={step}: max abs diff {diff}"
        if step == steps:
            break
        got = runner.forward([RowInput(b, [refs[b][1][step]], 1) for b in range(batch)])
    for b in range(batch):
        runner.free(b)
    runner.blocks.check_invariants()
    assert runner.blocks.num_free == runner.blocks.num_blocks


def test_ragged_verification_rows_match_single_rows():
    """A row of K+1 tokens next to a row of 1 token gives the same logits as each alone."""
    model = _make_model("llama")
    a, b = list(range(3, 23)), list(range(40, 47))
    solo = _make_runner(model)
    solo_a = solo.forward([RowInput(0, a[:15], 1)]) and solo.forward([RowInput(0, a[15:], 5)])[0]
    solo_b = solo.forward([RowInput(1, b[:6], 1)]) and solo.forward([RowInput(1, b[6:], 1)])[0]
    both = _make_runner(model)
    both.forward([RowInput(0, a[:15], 1), RowInput(1, b[:6], 1)])
    got_a, got_b = both.forward([RowInput(0, a[15:], 5), RowInput(1, b[6:], 1)])
    assert torch.allclose(got_a, solo_a, atol=1e-5)
    assert torch.allclose(got_b, solo_b, atol=1e-5)


def test_sliding_window_models_serve_their_whole_context():
    """Both forwards mask the window (the matches above), so a sliding-window model's limit is its position limit."""
    mistral = MistralConfig(**{**COMMON, "max_position_embeddings": 4096}, sliding_window=128)
    assert max_context_of(mistral) == 4096
    assert max_context_of(Qwen2Config(**COMMON, use_sliding_window=False, sliding_window=32)) == 256
    gemma3 = Gemma3TextConfig(**{**COMMON, "max_position_embeddings": 4096}, head_dim=16, sliding_window=128)
    assert max_context_of(gemma3) == 4096
    assert max_context_of(Gemma2Config(**COMMON, head_dim=16, sliding_window=8)) == 256


def test_a_gemma3_text_and_image_checkpoint_loads_and_serves_its_context(tmp_path):
    """Gemma 3 from 4B on is a Gemma3ForConditionalGeneration checkpoint: the loader takes it as the causal LM
    transformers' AutoModelForCausalLM makes of it, with its whole context."""
    from engine.devices import DeviceInfo
    from engine.loader import load_model
    from tests.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_gemma3_multimodal(len(tok))).save_pretrained(tmp_path / "gemma3")
    tok.save_pretrained(tmp_path / "gemma3")
    loaded = load_model(str(tmp_path / "gemma3"), DeviceInfo("cpu", torch.device("cpu"), "test cpu", "test"))
    assert type(loaded.model).__name__ == "Gemma3ForConditionalGeneration" and loaded.max_context == 256


def test_a_gemma2_checkpoint_loads_with_eager_attention(tmp_path):
    """transformers (5.24 here; 5.13 still ran it on SDPA) has no SDPA attention for Gemma 2: the loader falls back
    to eager instead of failing."""
    from engine.devices import DeviceInfo
    from engine.loader import load_model
    from tests.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Gemma2Config(**{**COMMON, "vocab_size": len(tok)}, head_dim=16,
                                                          sliding_window=8, pad_token_id=2, bos_token_id=0,
                                                          eos_token_id=0), attn_implementation="eager")
    model.save_pretrained(tmp_path / "gemma2")
    tok.save_pretrained(tmp_path / "gemma2")
    loaded = load_model(str(tmp_path / "gemma2"), DeviceInfo("cpu", torch.device("cpu"), "test cpu", "test"))
    sdpa = type(loaded.model)._supports_sdpa  # transformers 5.13 still ran Gemma 2 on SDPA
    assert loaded.model.config._attn_implementation == ("sdpa" if sdpa else "eager") and loaded.max_context == 256


def test_truncate_rewrites_only_the_kept_prefix():
    """After a rollback, re-feeding other tokens gives the logits of the new sequence."""
    model = _make_model("qwen2")
    runner = _make_runner(model)
    seq = list(range(1, 30))
    runner.forward([RowInput(0, seq, 1)])
    runner.truncate(0, 18)
    assert runner.blocks.tables[0].num_tokens == 18 and len(runner.blocks.tables[0].blocks) == 2
    got = runner.forward([RowInput(0, [50, 51, 52], 3)])[0]
    fresh = _make_runner(model).forward([RowInput(0, seq[:18] + [50, 51, 52], 3)])[0]
    assert torch.allclose(got, fresh, atol=1e-5)
