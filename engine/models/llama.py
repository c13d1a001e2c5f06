"""A lean forward for the Llama family (Llama, Mistral, Qwen2, Qwen3, and so TinyLlama, SmolLM
and the demo pair), owned by the engine and reading the paged KV cache in place.

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

import torch
import torch.nn.functional as F

from engine.attention import AttnBatch, paged_attention

FAMILIES = {"llama", "mistral", "qwen2", "qwen3"}
STATIC_ROPE = {"default", "linear", "llama3", "yarn"}


def unsupported_reason(model) -> str | None:
    """Why ``model`` cannot run on the lean forward (None: it can)."""
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in FAMILIES:
        return f"model type {mtype!r} is not in the lean families {sorted(FAMILIES)}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r} (lean forward implements silu)"
    rope = _rope_parameters(cfg)
    if rope.get("rope_type", "default") not in STATIC_ROPE:
        return f"rope type {rope.get('rope_type')!r} depends on sequence length"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "unexpected module layout"
    if getattr(cfg, "pretraining_tp", 1) not in (1, None):
        return "pretraining_tp > 1"
    return None


def _rope_parameters(cfg) -> dict:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if isinstance(params, dict) and "rope_type" not in params and "type" in params:
        params = {**params, "rope_type": params["type"]}
    return params if isinstance(params, dict) else {}


def _fuse(mods: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of ``mods`` and re-point each module at its view."""
    with torch.no_grad():
        weight = torch.cat([m.weight for m in mods], 0)
        bias = torch.cat([m.bias for m in mods], 0) if mods[0].bias is not None else None
        row = 0
        for m in mods:
            n = m.weight.shape[0]
            m.weight.data = weight[row: row + n]
            if bias is not None:
                m.bias.data = bias[row: row + n]
            row += n
    return weight, bias


class _Layer:
    def __init__(self, hf_layer, cfg, n_heads: int, n_kv: int, head_dim: int):
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.qkv_w, self.qkv_b = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_w, self.o_b = attn.o_proj.weight, attn.o_proj.bias
        self.gate_up_w, self.gate_up_b = _fuse([mlp.gate_proj, mlp.up_proj])
        self.down_w, self.down_b = mlp.down_proj.weight, mlp.down_proj.bias
        self.in_norm = hf_layer.input_layernorm.weight
        self.post_norm = hf_layer.post_attention_layernorm.weight
        self.q_norm = getattr(getattr(attn, "q_norm", None), "weight", None)  # Qwen3
        self.k_norm = getattr(getattr(attn, "k_norm", None), "weight", None)
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv, head_dim
        self.split = (n_heads * head_dim, n_kv * head_dim, n_kv * head_dim)
        self.inter = mlp.gate_proj.weight.shape[0]


class LeanCausalLM:
    """``forward(input_ids [B, N], positions [B, N], batch, pool, keep) -> logits [B, keep, V]``."""

    def __init__(self, model):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(reason)
        cfg = model.config
        inner = model.model
        self.config = cfg
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        self.embed = inner.embed_tokens.weight
        self.norm = inner.norm.weight
        self.lm_head = model.lm_head.weight
        self.layers = [_Layer(layer, cfg, self.n_heads, self.n_kv, self.head_dim) for layer in inner.layers]
        rotary = inner.rotary_emb
        self.inv_freq = rotary.inv_freq.detach().float().clone()
        self.rope_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        self.dtype = self.embed.dtype
        self.device = self.embed.device
        self._cos = self._sin = None
        self._grow_rope(min(4096, int(getattr(cfg, "max_position_embeddings", 2048) or 2048)))

    # ------------------------------------------------------------------ rotary
    def _grow_rope(self, n: int) -> None:
        """cos/sin for positions 0..n-1, computed in fp32 as HF does, then cast to the model dtype."""
        pos = torch.arange(n, device=self.device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq.to(self.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [n, D]
        self._cos = (emb.cos() * self.rope_scaling).to(self.dtype)
        self._sin = (emb.sin() * self.rope_scaling).to(self.dtype)

    def ensure_positions(self, n: int) -> None:
        """Grow the rotary table to cover positions < ``n`` (call outside graph capture)."""
        if n > self._cos.shape[0]:
            self._grow_rope(max(n, 2 * self._cos.shape[0]))

    # ------------------------------------------------------------------ forward
    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # as HF's LlamaRMSNorm: normalise in fp32, cast back, then scale
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * xf.to(x.dtype)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttnBatch, pool, keep: int,
                return_hidden: bool = False):
        b, n = input_ids.shape
        x = F.embedding(input_ids, self.embed)  # [B, N, H]
        cos = self._cos[positions].unsqueeze(2)  # [B, N, 1, D]
        sin = self._sin[positions].unsqueeze(2)
        fp32 = x.dtype == torch.float32
        for i, layer in enumerate(self.layers):
            h = F.rms_norm(x, (x.shape[-1],), layer.in_norm, self.eps) if fp32 else self._rms(x, layer.in_norm)
            qkv = F.linear(h, layer.qkv_w, layer.qkv_b)
            q, k, v = qkv.split(layer.split, dim=-1)
            q = q.view(b, n, self.n_heads, self.head_dim)
            k = k.view(b, n, self.n_kv, self.head_dim)
            v = v.view(b, n, self.n_kv, self.head_dim)
            if layer.q_norm is not None:
                q = self._rms(q, layer.q_norm)
                k = self._rms(k, layer.k_norm)
            q = self._rope(q, cos, sin)
            k = self._rope(k, cos, sin)
            k_pool, v_pool = pool.keys[i], pool.values[i]
            attn = paged_attention(q, k, v, k_pool, v_pool, batch, self.scale)  # [B, N, Hq*D]
            x = x + F.linear(attn, layer.o_w, layer.o_b)
            h = F.rms_norm(x, (x.shape[-1],), layer.post_norm, self.eps) if fp32 else self._rms(x, layer.post_norm)
            gate, up = F.linear(h, layer.gate_up_w, layer.gate_up_b).split(layer.inter, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer.down_w, layer.down_b)
        x = x[:, n - keep:]
        x = F.rms_norm(x, (x.shape[-1],), self.norm, self.eps) if fp32 else self._rms(x, self.norm)
        logits = F.linear(x, self.lm_head)  # [B, keep, V]
        return (logits, x) if return_hidden else logits
