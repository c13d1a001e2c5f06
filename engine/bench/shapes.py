"""Models of real shapes with random weights, built in code (no download), a draft that is the
target's own first layers (shared weights), controlled acceptance, and the device copy bandwidth.

Acceptance is set by scaling the deeper layers' ``o_proj`` and ``down_proj`` by ε: what those layers
add to the residual stream shrinks, so the truncated draft predicts the target better (ε = 1: the
untouched random model, a useless draft; ε ≈ 0.04 gave acceptance ≈ 0.5 at K = 4 on an H200).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shape:
    family: str  # "llama" | "qwen2" | "phi3" | "gemma3"
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    rope_theta: float = 10000.0
    tie: bool = False
    rope_scaling: dict | None = None
    partial_rotary: float = 1.0  # phi3: the share of each head's dims rotated
    head_dim_: int | None = None  # where it is not hidden / heads (Gemma 3)
    window: int | None = None  # gemma3: the sliding layers' window (every sixth layer attends to every key)
    local_rope_theta: float = 10000.0  # gemma3: the sliding layers' rope base

    @property
    def head_dim(self) -> int:
        return self.head_dim_ or self.hidden // self.heads


SHAPES = {
    "tinyllama-1.1b": Shape("llama", 32000, 2048, 5632, 22, 32, 4),
    "qwen2.5-1.5b": Shape("qwen2", 151936, 1536, 8960, 28, 12, 2, rope_theta=1e6, tie=True),
    "llama-3.1-8b": Shape("llama", 128256, 4096, 14336, 32, 32, 8, rope_theta=5e5,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # Phi-4-mini: 24 heads of 128 over 8 KV heads, 3/4 of each head rotated, LongRoPE past 4096 positions (factors
    # of the right length, not the checkpoint's: random weights)
    "phi-4-mini": Shape("phi3", 200064, 3072, 8192, 32, 24, 8, rope_theta=1e4, tie=True, partial_rotary=0.75,
                        rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 48,
                                      "long_factor": [1.0 + i for i in range(48)],
                                      "original_max_position_embeddings": 4096}),
    # Gemma 3 1B: 4 heads of 256 over one KV head, five sliding layers (a window of 512) to each full one, the
    # norms around attention and MLP, a 262k vocabulary, tied embeddings
    "gemma-3-1b": Shape("gemma3", 262144, 1152, 6912, 26, 4, 1, rope_theta=1e6, tie=True, head_dim_=256, window=512),
    "tiny": Shape("llama", 512, 64, 128, 4, 4, 2),  # for CPU tests
}


def hf_config(shape: Shape, max_positions: int):
    common = dict(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                  num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                  num_key_value_heads=shape.kv_heads, max_position_embeddings=max_positions,
                  tie_word_embeddings=shape.tie, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  attn_implementation="sdpa")
    rope = {"rope_type": "default", "rope_theta": shape.rope_theta}
    if shape.rope_scaling:
        rope = dict(shape.rope_scaling, rope_theta=shape.rope_theta)
    if shape.family == "qwen2":
        from transformers import Qwen2Config

        cfg = Qwen2Config(**common)
    elif shape.family == "gemma3":
        from transformers import Gemma3TextConfig

        types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(shape.layers)]
        cfg = Gemma3TextConfig(**common, head_dim=shape.head_dim, sliding_window=shape.window, layer_types=types,
                               query_pre_attn_scalar=shape.head_dim,
                               rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": shape.rope_theta},
                                                "sliding_attention": {"rope_type": "default",
                                                                      "rope_theta": shape.local_rope_theta}})
        return cfg
    elif shape.family == "phi3":
        from transformers import Phi3Config

        original = (shape.rope_scaling or {}).get("original_max_position_embeddings", max_positions)
        rope = dict(rope, partial_rotary_factor=shape.partial_rotary)
        cfg = Phi3Config(**common, original_max_position_embeddings=original, partial_rotary_factor=shape.partial_rotary)
    else:
        from transformers import LlamaConfig

        cfg = LlamaConfig(**common)
    # transformers 5 reads rope_parameters; older 4.x-style configs read rope_theta / rope_scaling
    cfg.rope_theta = shape.rope_theta
    if hasattr(cfg, "rope_parameters"):
        cfg.rope_parameters = rope
    elif shape.rope_scaling:
        cfg.rope_scaling = rope
    return cfg


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_target(shape: Shape, device: torch.device, dtype: torch.dtype, max_positions: int = 4096, seed: int = 0):
    """The target with random weights (HF's own initialisation), created on ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(shape, max_positions)
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        model = AutoModelForCausalLM.from_config(cfg)
    return model.to(device=device, dtype=dtype).eval()


def truncated_draft(target, layers: int):
    """A draft of the target's first ``layers`` decoder layers, embedding, final norm and head,
    sharing every weight with the target (no copy); the engine gives it its own KV pool."""
    import copy

    cfg = copy.deepcopy(target.config)
    cfg.num_hidden_layers = layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:layers]
    cls = type(target)
    with torch.device("meta"):
        draft = cls(cfg)
    draft.model.embed_tokens = target.model.embed_tokens
    draft.model.layers = torch.nn.ModuleList(list(target.model.layers[:layers]))
    draft.model.norm = target.model.norm
    draft.model.rotary_emb = target.model.rotary_emb
    draft.lm_head = target.lm_head
    draft.generation_config = copy.deepcopy(target.generation_config)
    left = [n for n, t in list(draft.named_parameters()) + list(draft.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"truncated draft left tensors on the meta device: {left[:5]}")
    return draft.eval()


class AcceptanceKnob:
    """Scales the deeper layers' output projections in place to a chosen ε (relative to the random
    initialisation), keeping the current ε so each change is one multiplication. ``on_change`` callbacks run
    after each change: copies of the weights made after the knob was built must follow it (the lean forward's
    oneDNN-packed copies on the CPU, ``LeanCausalLM.refresh_packed``)."""

    def __init__(self, target, draft_layers: int):
        self.mods = []
        for layer in target.model.layers[draft_layers:]:
            if getattr(layer, "post_feedforward_layernorm", None) is not None:  # Gemma 2 / 3 normalise what the
                # attention and the MLP add: their output norms scale it (weights as 1 + w)
                self.mods += [layer.post_attention_layernorm, layer.post_feedforward_layernorm]
            else:
                self.mods += [layer.self_attn.o_proj, layer.mlp.down_proj]
        self.eps = 1.0
        self.on_change: list = []

    @torch.no_grad()
    def set(self, eps: float) -> None:
        if eps <= 0:
            raise ValueError("epsilon must be > 0")
        factor = eps / self.eps
        for m in self.mods:
            if "RMSNorm" in type(m).__name__:  # Gemma's, 1 + w' = factor * (1 + w): the lean forward reads a copy,
                # which its ``refresh_copies`` renews (``on_change``)
                m.weight.mul_(factor).add_(factor - 1.0)
            else:
                m.weight.mul_(factor)  # the lean forward and CUDA graphs read these same bytes
        self.eps = eps
        for fn in self.on_change:
            fn()


def weight_bytes(model) -> int:
    """Bytes of the distinct tensors a forward reads (shared/tied tensors once)."""
    seen, total = set(), 0
    for p in model.parameters():
        key = (p.untyped_storage().data_ptr(), p.data_ptr())
        if key not in seen:
            seen.add(key)
            total += p.numel() * p.element_size()
    return total


def kv_bytes_per_position(shape: Shape, dtype: torch.dtype) -> int:
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * torch.empty((), dtype=dtype).element_size()


def copy_bandwidth(device: torch.device, mib: int = 1024, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    n = mib * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    del src, dst
    return 2 * n * 4 / best


def random_prompts(vocab: int, length: int, count: int, seed: int = 0) -> list[list[int]]:
    """Token ids drawn uniformly (ids 0..2 are pad/bos/eos and never drawn)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (count, length), generator=g).tolist()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def id_tokenizer(vocab: int):
    """A word-level tokenizer with exactly ``vocab`` ids ("t0", "t1", ...): the bench drives token
    ids directly, and the engine only needs something that counts and decodes them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", bos_token="t1",
                                   eos_token="t2")


@torch.no_grad()
def randomize_weights(model, seed: int = 0) -> None:
    """Overwrite a loaded model's weights in place with a fresh random initialisation of the same
    shapes (linear and embedding weights ~ N(0, initializer_range), norms 1): the useless draft of
    issue 14. In place, because the lean forward reads these same tensors."""
    std = getattr(model.config, "initializer_range", 0.02)
    g = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(std).to(p.dtype))
