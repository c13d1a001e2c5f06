"""A lean forward for the Llama family (Llama, Mistral, Qwen2, Qwen3, Phi-3, SmolLM3, Gemma, Gemma 2 and Gemma 3, and
so TinyLlama, SmolLM, Phi-3.5 / Phi-4-mini and the demo pair), owned by the engine and reading the paged KV cache in
place.

Shape after gpt-fast's ``model.py`` and nano-vllm's ``models/qwen3.py``: fused QKV and
gate/up projections, RMSNorm, rotary embeddings from the config, GQA without
``repeat_interleave`` (the query heads of a KV group are folded into the query-length
dimension, so K/V are never copied per query head). The weights are the Hugging Face
model's own: the fused matrices are built once and the HF projections are re-pointed at
views of them, so the generic model (the fallback and the tests' reference) shares every
byte with this one.

Each layer writes the new tokens' K/V into their pool slots and reads each row's history
through one gather index built per forward (:class:`engine.attention.AttnBatch`).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from engine.attention import AttnBatch, paged_attention, sliding_window_of, window_keys
from engine.models import packed

logger = logging.getLogger(__name__)
_HAS_RMS_NORM = hasattr(F, "rms_norm")  # torch >= 2.4
# phi3: QKV and gate/up come fused in the checkpoint; smollm3: every fourth layer without rotary embeddings (NoPE);
# gemma / gemma2 / gemma3_text: embeddings scaled by sqrt(hidden), RMSNorm weights as 1 + w, gated tanh-GELU; Gemma 2 / 3
# add norms after attention and MLP and a window on some layers, Gemma 2 soft-caps its attention scores and logits,
# Gemma 3 has q/k norms and a rope of its own for its sliding layers (``GEMMA``)
FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "gemma", "gemma2", "gemma3_text"}
GEMMA = {"gemma", "gemma2", "gemma3_text"}
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu}
STATIC_ROPE = {"default", "linear", "llama3", "yarn"}
ROPE_TYPES = STATIC_ROPE | {"longrope"}  # longrope: two tables, chosen per position (``LeanCausalLM._long_rope``)


def text_config(model):
    """The config of ``model``'s language model (a text-and-image checkpoint's text side: Gemma 3 4B+)."""
    cfg = getattr(model, "config", None)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def text_model(model):
    """The decoder stack (embeddings, layers, rotary embedding, final norm) of ``model``."""
    inner = getattr(model, "model", None)
    return getattr(inner, "language_model", None) or inner


def activation_of(cfg) -> str:
    """The MLP's activation as transformers' code picks it: Gemma 2 / 3 read ``hidden_activation``, the others
    (Gemma's first generation too) ``hidden_act``."""
    if getattr(cfg, "model_type", None) in ("gemma2", "gemma3_text"):
        return getattr(cfg, "hidden_activation", None) or "gelu_pytorch_tanh"
    return getattr(cfg, "hidden_act", None) or "silu"


def unsupported_reason(model) -> str | None:
    """Why ``model`` cannot run on the lean forward (None: it can)."""
    cfg = text_config(model)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in FAMILIES:
        return f"model type {mtype!r} is not in the lean families {sorted(FAMILIES)}"
    if activation_of(cfg) not in ACTIVATIONS:
        return f"activation {activation_of(cfg)!r} (lean forward implements {sorted(ACTIVATIONS)})"
    params = _rope_parameters(cfg)
    for rope in _per_layer_type(params):
        if rope.get("rope_type", "default") not in ROPE_TYPES:
            return f"rope type {rope.get('rope_type')!r} depends on sequence length"
        if rope.get("rope_type") == "longrope" and params is not rope:
            return "longrope per layer type"
        if rope.get("rope_type") == "longrope" and _original_max(cfg) is None:
            return "longrope without original_max_position_embeddings"
    inner = text_model(model)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "unexpected module layout"
    if getattr(cfg, "pretraining_tp", 1) not in (1, None):
        return "pretraining_tp > 1"
    return None


def _per_layer_type(params: dict) -> list[dict]:
    """A config's rope parameters: one dict, or Gemma 3's one per layer type (``{"full_attention": {...}, ...}``)."""
    nested = [v for v in params.values() if isinstance(v, dict)]
    return nested if nested and len(nested) == len(params) else [params]


def _original_max(cfg) -> int | None:
    """The pretraining context a longrope model switches tables at (its rope parameters', or the config's)."""
    n = _rope_parameters(cfg).get("original_max_position_embeddings") or getattr(
        cfg, "original_max_position_embeddings", None)
    return int(n) if n else None


def _rope_parameters(cfg) -> dict:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if isinstance(params, dict) and "rope_type" not in params and "type" in params:
        params = {**params, "rope_type": params["type"]}
    return params if isinstance(params, dict) else {}


def _inv_freq(rotary, prefix: str) -> tuple[torch.Tensor, float]:
    """A rotary embedding's inv_freq and attention scaling (``prefix``: a layer type's, Gemma 3). transformers updates
    a dynamic rope's inv_freq in place as it runs; ``original_inv_freq`` is the one it started from (longrope's short
    table)."""
    inv = getattr(rotary, f"{prefix}original_inv_freq", None)
    if inv is None:
        inv = getattr(rotary, f"{prefix}inv_freq")
    return inv.detach().float().clone(), float(getattr(rotary, f"{prefix}attention_scaling", 1.0))


def _long_inv_freq(model, rotary, original_max: int) -> torch.Tensor:
    """A longrope model's long-context inv_freq, from transformers' own rope code (its table past
    ``original_max`` positions)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = getattr(rotary, "config", None) or model.config
    inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](cfg, None, seq_len=original_max + 1)
    return inv_freq.detach().float().clone()


def _fuse(mods: list[torch.nn.Linear], transposed: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight for ``mods`` (``[out, in]``, or ``[in, out]`` when ``transposed``), and the HF modules
    re-pointed at views of it, so both forwards share the memory."""
    if len(mods) == 1 and not transposed:
        return mods[0].weight, mods[0].bias
    with torch.no_grad():
        weight = torch.cat([m.weight.t() if transposed else m.weight for m in mods], 1 if transposed else 0)
        weight = weight.contiguous()
        bias = torch.cat([m.bias for m in mods], 0) if mods[0].bias is not None else None
        row = 0
        for m in mods:
            n = m.weight.shape[0]
            m.weight.data = weight[:, row: row + n].t() if transposed else weight[row: row + n]
            if bias is not None:
                m.bias.data = bias[row: row + n]
            row += n
    return weight, bias


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with the first half of its last dim negated: the table ``rotate`` takes."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), -1)


def rotate_part(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """``rotate`` over the first ``cos.shape[-1]`` dims of ``x``, the rest passed through (a partial rotary factor,
    Phi-4-mini's 0.75: HF's apply_rotary_pos_emb with a shorter cos/sin)."""
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return rotate(x, cos, sin_signed)
    return torch.cat((rotate(x[..., :rd], cos, sin_signed), x[..., rd:]), -1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotary embedding ``x * cos + rotate_half(x) * sin`` (HF's half-split layout), with ``sin_signed`` from
    ``signed_sin``: rotate_half(x) * sin = roll(x, half) * sin_signed, so three ops instead of seven (slice, neg,
    slice, cat, mul, mul, add). Exact up to the rounding of a fused multiply-add (2e-7 relative). Measured on the
    2-core EPYC, one row of 8 heads: 41 -> 15 us, in every layer of every forward. ``roll`` on the CPU and CUDA;
    other devices (DirectML) take a cat."""
    half = x.shape[-1] // 2
    r = x.roll(half, -1) if x.device.type in ("cpu", "cuda") else torch.cat((x[..., half:], x[..., :half]), -1)
    return torch.addcmul(x * cos, r, sin_signed)


def rope_tables(inv_freq: torch.Tensor, scaling: float, n: int, dtype: torch.dtype, device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and the signed sin (``signed_sin``) ``[n, D]`` for positions 0..n-1, computed in fp32 as HF does, then cast
    to ``dtype``: the tables ``rotate`` takes."""
    pos = torch.arange(n, device=device, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq.to(device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), signed_sin((emb.sin() * scaling).to(dtype))


_EPS: dict[float, torch.Tensor] = {}


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """``w * x / sqrt(mean(x^2) + eps)`` over the last dim, as HF's LlamaRMSNorm (fp32 math, then cast back).

    fp32 on the CPU: five ops, from the L2 norm (``vector_norm`` is one reduction kernel), instead of the eight
    ``F.rms_norm`` decomposes into there (a float() and a type_as copy, pow, mean as sum + div, add, rsqrt, two
    muls). In a decode step each op runs after a GEMM streamed the weights through the caches, where it costs several
    times what it costs in a loop: measured on the 2-core EPYC, one row of 256, 9.3 against 14.8 us in a loop, 20
    against 42 us inside the EAGLE head's step. Within 2e-7 relative of ``F.rms_norm``. CUDA (one fused kernel) and
    other fp32 devices take ``F.rms_norm``; other dtypes elsewhere normalise in fp32 as HF does."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        e = _EPS.get(eps)
        if e is None:
            e = _EPS[eps] = torch.tensor([eps], dtype=torch.float32)
        n = torch.linalg.vector_norm(x, 2, -1, True)
        scale = torch.addcmul(e, n, n, value=1.0 / x.shape[-1]).rsqrt_()
        if torch.is_inference_mode_enabled():
            return torch.mul(x, scale).mul_(w)
        return x * scale * w  # autograd (the EAGLE head's training on a CPU): no in-place on what backward reads
    if _HAS_RMS_NORM and (x.is_cuda or x.dtype == torch.float32):
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool,
            residual: torch.Tensor | None = None, pk: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T (+ b) (+ residual)`` for 2-D ``x``; the residual add is fused into the GEMM. ``pk``:
    the weight's oneDNN-packed copy, used for GEMMs of several rows (:mod:`engine.models.packed`)."""
    if pk is not None and packed.use_packed(x.shape[0], w):
        return packed.linear(x, pk, b, residual)
    if not transposed:
        if residual is None:
            return F.linear(x, w, b)
        out = torch.addmm(residual, x, w.t())
        return out if b is None else out + b
    if residual is None:
        return torch.mm(x, w) if b is None else torch.addmm(b, x, w)
    out = torch.addmm(residual, x, w)
    return out if b is None else out + b


def norm_weight(module, gemma: bool) -> torch.Tensor | None:
    """An RMSNorm's weight as ``rms_norm`` multiplies by: Gemma's ``1 + w`` (in fp32, as its norm computes: a copy,
    which ``LeanCausalLM.refresh_copies`` renews), others' own."""
    w = getattr(module, "weight", None)
    if w is None or not gemma:
        return w
    copy = (1.0 + w.detach().float()).contiguous()
    copy.source = w  # the weight it was made from
    return copy


class _Layer:
    def __init__(self, hf_layer, n_heads: int, n_kv: int, head_dim: int, transposed: bool, gemma: bool = False,
                 sliding: bool = False):
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        qkv, gate_up = getattr(attn, "qkv_proj", None), getattr(mlp, "gate_up_proj", None)  # Phi-3: fused already,
        # in the same order ([q; k; v] and [gate; up] rows)
        self.qkv_w, self.qkv_b = _fuse([qkv] if qkv is not None else [attn.q_proj, attn.k_proj, attn.v_proj],
                                       transposed)
        self.o_w, self.o_b = _fuse([attn.o_proj], transposed)
        self.gate_up_w, self.gate_up_b = _fuse([gate_up] if gate_up is not None else [mlp.gate_proj, mlp.up_proj],
                                               transposed)
        self.down_w, self.down_b = _fuse([mlp.down_proj], transposed)
        self.in_norm = norm_weight(hf_layer.input_layernorm, gemma)
        # Gemma 2 / 3 normalise the attention's and the MLP's outputs before each residual add, and name their norm
        # before the MLP ``pre_feedforward_layernorm`` (their ``post_attention_layernorm`` is the first of those)
        sandwich = getattr(hf_layer, "pre_feedforward_layernorm", None) is not None
        self.attn_out_norm = norm_weight(hf_layer.post_attention_layernorm, gemma) if sandwich else None
        self.mlp_out_norm = norm_weight(hf_layer.post_feedforward_layernorm, gemma) if sandwich else None
        self.post_norm = norm_weight(hf_layer.pre_feedforward_layernorm if sandwich
                                     else hf_layer.post_attention_layernorm, gemma)
        self.rope = bool(getattr(attn, "use_rope", True))  # SmolLM3's NoPE layers rotate nothing
        self.q_norm = norm_weight(getattr(attn, "q_norm", None), gemma)  # Qwen3, Gemma 3
        self.k_norm = norm_weight(getattr(attn, "k_norm", None), gemma)
        self.sliding = sliding  # reads the keys of its window only (``AttnBatch.window_gather``)
        self.local_rope = False  # rotated by the model's sliding layers' table (Gemma 3)
        self.qk = (n_heads + n_kv) * head_dim
        self.v = n_kv * head_dim
        self.inter = gate_up.weight.shape[0] // 2 if gate_up is not None else mlp.gate_proj.weight.shape[0]
        self.qkv_p = self.o_p = self.gate_up_p = self.down_p = None  # oneDNN-packed copies (CPU)

    def weights(self) -> dict[str, torch.Tensor]:
        return {"qkv": self.qkv_w, "o": self.o_w, "gate_up": self.gate_up_w, "down": self.down_w}


class LeanCausalLM:
    """``forward(input_ids [B, N], positions [B, N], batch, pool, keep) -> logits [B, keep, V]``."""

    def __init__(self, model):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(reason)
        cfg = text_config(model)
        inner = text_model(model)
        self.config = cfg
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        self.gemma = cfg.model_type in GEMMA
        self.scale = (getattr(cfg, "query_pre_attn_scalar", None) or self.head_dim) ** -0.5 if self.gemma \
            else self.head_dim ** -0.5
        self.act = ACTIVATIONS[activation_of(cfg)]
        # Gemma 2: scores and logits squashed to cap * tanh(x / cap)
        self.attn_softcap = getattr(cfg, "attn_logit_softcapping", None) or None
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None) or None
        # the sliding window (None: full attention) of every layer (Mistral 7B v0.1, Phi-3-mini-4k), or, with
        # ``window_layered``, of the layers ``layer_types`` names sliding (Gemma 2 / 3, Qwen2 past max_window_layers):
        # those layers read the keys of their window only (``window_batch``)
        self.window, self.window_layered = sliding_window_of(cfg)
        types = list(getattr(cfg, "layer_types", None) or [])
        sliding = [self.window is not None and (not self.window_layered or (i < len(types)
                                                                             and types[i] == "sliding_attention"))
                   for i in range(len(inner.layers))]
        self.embed = inner.embed_tokens.weight
        self.norm = norm_weight(inner.norm, self.gemma)
        # On the CPU a GEMM over a [in, out] weight streams it about twice as fast as over [out, in]
        # (measured on the 2-core EPYC here: 51 vs 98 us for a 256x768 fp32 weight at one row), and the
        # decode step is bound by streaming the weights. GPUs keep the usual layout.
        self.transposed = self.embed.device.type == "cpu"
        self.layers = [_Layer(layer, self.n_heads, self.n_kv, self.head_dim, self.transposed, self.gemma, s)
                       for layer, s in zip(inner.layers, sliding)]
        tied = model.lm_head.weight.data_ptr() == self.embed.data_ptr()
        self.lm_head, _ = _fuse([model.lm_head], self.transposed)
        # a tied embedding is the head's storage: rows are then read as columns of the [H, V] matrix
        self.embed_t = self.lm_head if tied and self.transposed else None
        if self.embed_t is not None:
            self.embed = None
        rotary = inner.rotary_emb
        # Gemma 3 rotates its sliding layers by a table of their own (a base of 10k against the full layers' 1M and,
        # from 4B on, their linear scaling): transformers keeps one inv_freq per layer type
        kinds = [k for k in ("full_attention_", "sliding_attention_") if hasattr(rotary, f"{k}inv_freq")]
        self.inv_freq, self.rope_scaling = _inv_freq(rotary, kinds[0] if kinds else "")
        self.local_inv_freq, self.local_scaling = _inv_freq(rotary, kinds[1]) if len(kinds) == 2 else (None, 1.0)
        for layer, t in zip(self.layers, types if self.local_inv_freq is not None else []):
            layer.local_rope = t == "sliding_attention"
        self.rot_dim = 2 * self.inv_freq.numel()  # under head_dim with a partial rotary factor
        if self.rot_dim > self.head_dim:
            raise ValueError(f"rotary dims {self.rot_dim} exceed the head dim {self.head_dim}")
        if self.local_inv_freq is not None and 2 * self.local_inv_freq.numel() != self.rot_dim:
            raise ValueError("the sliding layers' rotary dims differ from the full layers'")
        # Gemma scales the embeddings by sqrt(hidden), rounded to the weights' dtype as its code does
        self.embed_scale = float(torch.tensor(cfg.hidden_size ** 0.5, dtype=self.lm_head.dtype)) if self.gemma else None
        self.long_inv_freq, self.original_max = None, None
        if _rope_parameters(cfg).get("rope_type") == "longrope":
            self.original_max = _original_max(cfg)
            self.long_inv_freq = _long_inv_freq(model, rotary, self.original_max)
        self.dtype = self.lm_head.dtype
        self.device = self.lm_head.device
        self._cos = self._sin = None
        self.lm_head_p = None
        self.packing = self._pack()
        self._grow_rope(min(4096, int(getattr(cfg, "max_position_embeddings", 2048) or 2048)))

    def _pack(self) -> str:
        """Give the big CPU weights oneDNN-packed copies for multi-row GEMMs; returns what was done."""
        slots = [(layer, f"{name}_p", w) for layer in self.layers for name, w in layer.weights().items()]
        slots.append((self, "lm_head_p", self.lm_head))
        why = packed.pack_all(slots, self.transposed)
        self._packed_slots = [s for s in slots if getattr(s[0], s[1]) is not None]
        logger.info("lean forward, CPU GEMMs of several rows: %s", why)
        return why

    def refresh_copies(self) -> int:
        """``refresh_packed``, and Gemma's ``1 + w`` norm weights renewed in place (CUDA graphs read the same bytes)
        from the weights they were made from, after those were changed in place; returns how many tensors were."""
        copies = [w for layer in self.layers for w in (layer.in_norm, layer.post_norm, layer.attn_out_norm,
                                                        layer.mlp_out_norm, layer.q_norm, layer.k_norm)]
        renewed = 0
        with torch.no_grad():
            for w in copies + [self.norm]:
                if w is not None and getattr(w, "source", None) is not None:
                    w.copy_(1.0 + w.source.float())
                    renewed += 1
        return renewed + self.refresh_packed()

    def refresh_packed(self) -> int:
        """Pack again every weight that has a packed copy, after its values were changed in place (the packed
        copy is a separate buffer: one-row GEMMs would read the new values, several-row ones the old); returns
        how many were packed."""
        for owner, attr, w in self._packed_slots:
            setattr(owner, attr, packed.pack(w, self.transposed))
        return len(self._packed_slots)

    # ------------------------------------------------------------------ rotary
    def _grow_rope(self, n: int) -> None:
        """cos/sin for positions 0..n-1 (``rope_tables``), in the model dtype; a longrope model's long table
        follows the short one's n rows in the same tensors (``_long_rope``)."""
        self._cos, self._sin = rope_tables(self.inv_freq, self.rope_scaling, n, self.dtype, self.device)
        if self.long_inv_freq is not None:
            cos, sin = rope_tables(self.long_inv_freq, self.rope_scaling, n, self.dtype, self.device)
            self._cos, self._sin = torch.cat((self._cos, cos)), torch.cat((self._sin, sin))
        if self.local_inv_freq is not None:
            self._cos_local, self._sin_local = rope_tables(self.local_inv_freq, self.local_scaling, n, self.dtype,
                                                           self.device)

    def _long_rope(self, positions: torch.Tensor) -> torch.Tensor:
        """Rows into the tables of a longrope model: a position past the pretraining context
        (``original_max_position_embeddings``) is rotated by the long table, one before it by the short table.

        transformers picks one table for a whole forward, the long one where its longest position reaches past the
        pretraining context: decoding a token at a time, that is this rule exactly. In a forward of several tokens
        (a verification, a prompt chunk, a batch) its choice would depend on how the tokens were split into
        forwards and what ran beside them: a verification reaching past the switch would write its earlier tokens'
        keys with the long table where plain decoding wrote them with the short one, and greedy speculation would
        differ from plain decoding there. Per position, every split and batch writes the same keys. (A prompt
        longer than the pretraining context read in one forward is rotated long throughout by transformers, and
        here short up to the switch, as a token-at-a-time read of it would be.)"""
        n = self._cos.shape[0] // 2
        return positions + (positions >= self.original_max) * n

    def ensure_positions(self, n: int) -> None:
        """Grow the rotary table to cover positions < ``n`` (call outside graph capture)."""
        have = self._cos.shape[0] // (2 if self.long_inv_freq is not None else 1)
        if n > have:
            self._grow_rope(max(n, 2 * have))

    def window_batch(self, batch: AttnBatch, table: torch.Tensor, positions: torch.Tensor, block_size: int
                     ) -> AttnBatch:
        """``batch`` with the keys and mask its sliding layers read (``attention.window_keys``), where some of its
        ``num_keys`` keys may lie before a query's window; as it was otherwise."""
        if self.window is not None and batch.num_keys > self.window:
            batch.window_gather, batch.window_mask = window_keys(table, positions, self.window, batch.num_keys,
                                                                 block_size)
        return batch

    # ------------------------------------------------------------------ forward
    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.gemma and x.dtype != torch.float32:  # Gemma multiplies by 1 + w in fp32, then casts
            return rms_norm(x.float(), w, self.eps).to(x.dtype)
        return rms_norm(x, w, self.eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttnBatch, pool, keep: int,
                aux_layers: tuple[int, ...] | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, keep, V]``; with ``aux_layers`` also the inputs of those layers, concatenated
        ``[B, N, len * H]`` for every new token (an EAGLE-3 head's features; references, no copies)."""
        b, n = input_ids.shape
        saved: dict[int, torch.Tensor] = {}
        hq, hkv, d, tr = self.n_heads, self.n_kv, self.head_dim, self.transposed
        ids = input_ids.reshape(-1)
        if self.embed_t is None:
            x = F.embedding(ids, self.embed)  # [B*N, H]: every GEMM is 2-D
        else:
            x = self.embed_t.index_select(1, ids).t().contiguous()
        if self.embed_scale is not None:
            x = x * self.embed_scale
        rows = positions if self.long_inv_freq is None else self._long_rope(positions)
        tables = {False: (self._cos[rows].view(b, n, 1, self.rot_dim), self._sin[rows].view(b, n, 1, self.rot_dim))}
        if self.local_inv_freq is not None:
            tables[True] = (self._cos_local[rows].view(b, n, 1, self.rot_dim),
                            self._sin_local[rows].view(b, n, 1, self.rot_dim))
        for i, layer in enumerate(self.layers):
            cos, sin = tables[layer.local_rope]
            if aux_layers is not None and i in aux_layers:
                saved[i] = x  # never written in place: later layers make new tensors
            qkv = _linear(self._norm(x, layer.in_norm), layer.qkv_w, layer.qkv_b, tr, pk=layer.qkv_p)  # [B*N, (Hq+2Hkv)*D]
            qk = qkv[:, : layer.qk].view(b, n, hq + hkv, d)
            v = qkv[:, layer.qk:].view(b, n, hkv, d)
            if layer.q_norm is None:
                if layer.rope:
                    qk = rotate_part(qk, cos, sin)  # q and k in one go
                q, k = qk[:, :, :hq], qk[:, :, hq:]
            else:  # Qwen3 normalises q and k per head before the rotation
                q = rotate_part(self._norm(qk[:, :, :hq], layer.q_norm), cos, sin)
                k = rotate_part(self._norm(qk[:, :, hq:], layer.k_norm), cos, sin)
            attn = paged_attention(q, k, v, pool.keys[i], pool.values[i], batch, self.scale, layer.sliding,
                                   self.attn_softcap)  # [B, N, Hq*D]
            if layer.attn_out_norm is None:
                x = _linear(attn.view(b * n, hq * d), layer.o_w, layer.o_b, tr, residual=x, pk=layer.o_p)
            else:  # Gemma 2 / 3: the output normalised before the residual add
                x = x + self._norm(_linear(attn.view(b * n, hq * d), layer.o_w, layer.o_b, tr, pk=layer.o_p),
                                   layer.attn_out_norm)
            gate_up = _linear(self._norm(x, layer.post_norm), layer.gate_up_w, layer.gate_up_b, tr,
                              pk=layer.gate_up_p)
            gate, up = gate_up.split(layer.inter, dim=-1)
            if layer.mlp_out_norm is None:
                x = _linear(self.act(gate) * up, layer.down_w, layer.down_b, tr, residual=x, pk=layer.down_p)
            else:
                x = x + self._norm(_linear(self.act(gate) * up, layer.down_w, layer.down_b, tr, pk=layer.down_p),
                                   layer.mlp_out_norm)
        x = x.view(b, n, -1)[:, n - keep:].reshape(b * keep, -1)
        x = self._norm(x, self.norm)
        logits = _linear(x, self.lm_head, None, tr, pk=self.lm_head_p).view(b, keep, -1)  # [B, keep, V]
        if self.final_softcap is not None:
            logits = (logits / self.final_softcap).tanh_().mul_(self.final_softcap)
        if aux_layers is None:
            return logits
        return logits, torch.cat([saved[i] for i in aux_layers], -1).view(b, n, -1)
