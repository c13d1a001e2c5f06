"""The EAGLE-3 draft head: one Llama decoder layer over the target's fused hidden states and the
token embeddings, drafting autoregressively (Li et al., EAGLE-3, arXiv 2503.01840).

Shape, with the published checkpoints' parameter names:

- ``fc``: Linear ``[3 * Dt -> D]`` fusing the target's low, mid and high aux states (concatenated in
  that order; see :mod:`engine.eagle.config` for which layers);
- ``midlayer``: one decoder layer whose attention reads ``concat(input_layernorm(embed(token)),
  hidden_norm(feature))`` ``[2D]`` (q/k/v project 2D -> heads), with the residual taken from the feature
  (``norm_before_residual`` moves it after ``hidden_norm``), then a SwiGLU MLP;
- ``norm`` + ``lm_head`` ``[D -> draft_vocab]``; draft id ``d`` is target id ``d + d2t[d]``; ``t2d`` marks
  the target ids the draft vocabulary holds;
- the token embedding is the target's own (shared, not stored), unless the checkpoint brings
  ``embed_tokens.weight``.

Alignment (as EAGLE and vLLM): the head's input at position t is the pair (f_t, x_{t+1}), f_t being the
target's fused feature at position t (computed from x_0..x_t) and x_{t+1} the token after it; its output
there predicts x_{t+2}. Drafting step j >= 1 feeds the head's own pre-norm output of step j-1 as the
feature, with the token it just drafted, at position t + j.

Training API (teacher-forced, full sequence, with EAGLE-3's training-time test)::

    head = EagleHead(EagleConfig.for_target(target.config, draft_vocab_size=...))
    head.attach_embeddings(target.get_input_embeddings())             # shared, frozen
    out = head.forward_train(aux_hidden, input_ids, steps=3, valid=attention_mask)
    # aux_hidden [B, T, 3*Dt]: target_out.hidden_states[i] for i in head.layer_ids(L), concatenated on -1
    #                          (hidden_states[i] is the input of layer i, as from output_hidden_states=True)
    # input_ids  [B, T]: the tokens the target read; valid [B, T] bool (False on right padding) or None
    # out: list of `steps` logits [B, T, draft_vocab]. out[s][:, t] predicts token t + s + 2, so its
    #      teacher is the target's distribution at position t + s + 1 restricted to the draft vocabulary,
    #      target_logits[:, t + s + 1][..., head.draft_to_target]; positions with t + s + 2 >= T (or
    #      past `valid`) have no teacher: mask them (head.train_mask(valid, s) gives the mask).

Step s >= 1 of the unroll feeds the step s-1 outputs as features with the true tokens shifted by s
(teacher forcing); its query at position t attends to the real pairs 0..t and to its own chain at t.
Inference (:meth:`forward_paged`) reads and writes a paged KV cache (engine.attention), one layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttnBatch, paged_attention
from engine.eagle.config import EagleConfig
from engine.models import packed
from engine.models.llama import _fuse, _linear, rms_norm, rope_tables, rotate


class _Norm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class _Attention(nn.Module):
    def __init__(self, cfg: EagleConfig):
        super().__init__()
        d_in, hq, hkv, hd = 2 * cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(d_in, hq * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d_in, hkv * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d_in, hkv * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(hq * hd, cfg.hidden_size, bias=cfg.attention_bias)


class _MLP(nn.Module):
    def __init__(self, cfg: EagleConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)


class _MidLayer(nn.Module):
    def __init__(self, cfg: EagleConfig):
        super().__init__()
        self.self_attn = _Attention(cfg)
        self.mlp = _MLP(cfg)
        self.input_layernorm = _Norm(cfg.hidden_size)
        self.hidden_norm = _Norm(cfg.hidden_size)
        self.post_attention_layernorm = _Norm(cfg.hidden_size)


class EagleHead(nn.Module):
    def __init__(self, cfg: EagleConfig, own_embeddings: bool = False):
        super().__init__()
        self.cfg = cfg
        self.fc = nn.Linear(3 * cfg.target_hidden_size, cfg.hidden_size, bias=False)
        self.midlayer = _MidLayer(cfg)
        self.norm = _Norm(cfg.hidden_size)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        full = cfg.draft_vocab_size == cfg.vocab_size
        self.register_buffer("t2d", (torch.ones if full else torch.zeros)(cfg.vocab_size, dtype=torch.bool))
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if own_embeddings else None
        self._shared_embed: list = []  # [the target's embedding], a list so that nn.Module does not register it
        self._fused = None
        self._cos = self._sin = None
        self.inv_freq, self.rope_scaling = self._rope_inv_freq(cfg)

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _rope_inv_freq(cfg: EagleConfig) -> tuple[torch.Tensor, float]:
        """inv_freq and attention scaling from transformers' rope code (default, linear, llama3, yarn...)."""
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        rope = dict(cfg.rope)
        lc = LlamaConfig(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                         head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
                         rope_theta=rope.get("rope_theta", 10000.0),
                         rope_scaling=None if rope.get("rope_type", "default") == "default" else rope)
        if hasattr(lc, "rope_parameters"):
            lc.rope_parameters = {**(lc.rope_parameters or {}), **rope}
        rotary = LlamaRotaryEmbedding(lc)
        return rotary.inv_freq.detach().float().clone(), float(getattr(rotary, "attention_scaling", 1.0))

    def attach_embeddings(self, embedding: nn.Embedding | torch.Tensor) -> None:
        """Share the target's input embedding (module or ``[V, D]`` weight): not a parameter of the head, never
        saved; read at each call, so a target that re-lays its weights out later is followed."""
        if self.embed_tokens is not None:
            return
        weight = embedding.weight if isinstance(embedding, nn.Module) else embedding
        if weight.shape[1] != self.cfg.hidden_size:
            raise ValueError(f"the target's embeddings are {weight.shape[1]}-wide; the head's hidden size is "
                             f"{self.cfg.hidden_size} and the head brings no embeddings of its own")
        self._shared_embed[:] = [embedding]

    def layer_ids(self, num_target_layers: int) -> tuple[int, ...]:
        return self.cfg.layer_ids_for(num_target_layers)

    @property
    def draft_to_target(self) -> torch.Tensor:
        """``[draft_vocab]`` target id of each draft id."""
        return torch.arange(self.cfg.draft_vocab_size, device=self.d2t.device) + self.d2t

    def set_vocab_map(self, target_ids: torch.Tensor) -> None:
        """Use the target ids ``target_ids`` ``[draft_vocab]`` (ascending) as the draft vocabulary."""
        ids = target_ids.to(self.d2t.device, torch.long)
        if ids.shape != (self.cfg.draft_vocab_size,) or bool((ids[1:] <= ids[:-1]).any()):
            raise ValueError(f"need {self.cfg.draft_vocab_size} ascending target ids")
        self.d2t.copy_(ids - torch.arange(len(ids), device=ids.device))
        self.t2d.zero_()
        self.t2d[ids] = True

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens is not None:
            return self.embed_tokens(ids)
        if not self._shared_embed:
            raise RuntimeError("attach the target's embeddings first (EagleHead.attach_embeddings)")
        src = self._shared_embed[0]
        return F.embedding(ids, src.weight if isinstance(src, nn.Module) else src)

    # ------------------------------------------------------------------ shared layer math
    def _layer(self, emb: torch.Tensor, feat: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend,
               proj, last_only: bool = False) -> torch.Tensor:
        """emb, feat ``[B, N, D]`` -> the layer's pre-norm output ``[B, N, D]`` (the next step's feature).
        ``attend(q, k, v)`` (q ``[B, Nq, Hq, hd]``, k and v ``[B, N, Hkv, hd]``) returns ``[B, Nq, Hq * hd]``;
        ``proj`` applies the weights. ``last_only``: the output of each row's last position only (``[B, 1, D]``);
        K/V are still made for all N. With one layer nothing else reads the other positions' outputs: a real pair's
        successor reads the target's feature, not the head's, so attention and the MLP run for one query a row."""
        cfg, layer = self.cfg, self.midlayer
        b, n, d = feat.shape
        hq, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        eps = cfg.rms_norm_eps
        h = rms_norm(feat, layer.hidden_norm.weight, eps)
        residual = h if cfg.norm_before_residual else feat
        x = torch.cat([rms_norm(emb, layer.input_layernorm.weight, eps), h], -1).reshape(b * n, 2 * d)
        qkv = proj.qkv(x)
        qk = rotate(qkv[:, : (hq + hkv) * hd].view(b, n, hq + hkv, hd), cos, sin)  # q and k rotated in one go
        q, k = qk[:, :, :hq], qk[:, :, hq:]
        v = qkv[:, (hq + hkv) * hd:].view(b, n, hkv, hd)
        if last_only and n > 1:
            q, residual, n = q[:, -1:], residual[:, -1:], 1
        x = proj.o(attend(q, k, v).reshape(b * n, hq * hd), residual.reshape(b * n, d))
        gate, up = proj.gate_up(rms_norm(x, layer.post_attention_layernorm.weight, eps)).split(cfg.intermediate_size, -1)
        return proj.down(F.silu(gate) * up, x).view(b, n, d)

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """Pre-norm outputs ``[..., D]`` -> draft-vocabulary logits ``[..., draft_vocab]``."""
        x = rms_norm(out, self.norm.weight, self.cfg.rms_norm_eps)
        if self._fused is not None:
            return _linear(x.reshape(-1, x.shape[-1]), self._fused.lm_head, None, self._fused.tr,
                           pk=self._fused.lm_head_p).view(*x.shape[:-1], -1)
        return self.lm_head(x)

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``[...]`` positions -> cos and the signed sin (``signed_sin``) ``[..., 1, hd]`` (call ensure_positions first)."""
        if self._cos is None or self._cos.dtype != dtype or self._cos.device != positions.device:
            self.ensure_positions(256 if self._cos is None else self._cos.shape[0], dtype, positions.device)
        return self._cos[positions].unsqueeze(-2), self._sin[positions].unsqueeze(-2)

    def ensure_positions(self, n: int, dtype: torch.dtype | None = None, device=None) -> None:
        """Grow the rotary table to cover positions < ``n`` (computed in fp32, cast to the weights' dtype)."""
        dtype = dtype or self.fc.weight.dtype
        device = device or self.fc.weight.device
        same = self._cos is not None and self._cos.dtype == dtype and self._cos.device == device
        if same and self._cos.shape[0] >= n:
            return
        if same:
            n = max(n, 2 * self._cos.shape[0])
        self._cos, self._sin = rope_tables(self.inv_freq, self.rope_scaling, n, dtype, device)

    # ------------------------------------------------------------------ training
    def forward_train(self, aux_hidden: torch.Tensor, input_ids: torch.Tensor, steps: int = 1,
                      valid: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Teacher-forced unroll of ``steps`` drafting steps over whole sequences (see the module docstring).

        aux_hidden ``[B, T, 3*Dt]``, input_ids ``[B, T]``, valid ``[B, T]`` bool or None. Returns ``steps``
        logits ``[B, T, draft_vocab]``; out[s][:, t] predicts token t + s + 2."""
        b, t = input_ids.shape
        if aux_hidden.shape[:2] != (b, t) or aux_hidden.shape[-1] != 3 * self.cfg.target_hidden_size:
            raise ValueError(f"aux_hidden must be [B, T, {3 * self.cfg.target_hidden_size}] for input_ids [B, T]; "
                             f"got {tuple(aux_hidden.shape)} and {tuple(input_ids.shape)}")
        dev = input_ids.device
        feat = self.fc(aux_hidden.to(self.fc.weight.dtype))
        pos = torch.arange(t, device=dev)
        causal = pos[None, :] <= pos[:, None]  # [T, T]: query row, key column
        # padding keys are hidden; a query always sees itself, so no row is fully masked
        key_ok = causal[None]
        if valid is not None:
            key_ok = key_ok & (valid[:, None, :].bool() | torch.eye(t, dtype=torch.bool, device=dev))
        self.ensure_positions(t + steps, self.fc.weight.dtype, dev)
        proj = _TrainProj(self)
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        outs = []
        for s in range(steps):
            ids = torch.zeros_like(input_ids)
            if s + 1 < t:
                ids[:, : t - s - 1] = input_ids[:, s + 1:]  # pair (feature at t, token t + s + 1)
            cos, sin = self._cos_sin((pos + s)[None].expand(b, t), feat.dtype)

            def attend(q, k, v, s=s):
                keys.append(k)
                values.append(v)
                return self._ttt_attention(q, keys, values, key_ok)

            feat = self._layer(self.embed(ids), feat, cos, sin, attend, proj)
            outs.append(self.logits(feat))
        return outs

    def _ttt_attention(self, q, keys, values, key_ok) -> torch.Tensor:
        """Step s's queries over step 0's keys (causal) and steps 1..s's keys at the same position."""
        b, t, hq, hd = q.shape
        g = hq // keys[0].shape[2]
        rep = lambda x: x.transpose(1, 2).repeat_interleave(g, 1)  # noqa: E731  [B, T, Hkv, hd] -> [B, Hq, T, hd]
        qh = q.transpose(1, 2)  # [B, Hq, T, hd]
        scale = self.cfg.head_dim ** -0.5
        scores = [qh @ rep(keys[0]).transpose(-1, -2) * scale]  # [B, Hq, T, T]
        scores[0] = scores[0].masked_fill(~key_ok[:, None], float("-inf"))
        for k in keys[1:]:
            scores.append((qh * rep(k)).sum(-1, keepdim=True) * scale)  # [B, Hq, T, 1]: the chain's own keys
        probs = torch.cat(scores, -1).float().softmax(-1).to(q.dtype)
        out = probs[..., :t] @ rep(values[0])
        for j, v in enumerate(values[1:], start=1):
            out = out + probs[..., t + j - 1: t + j] * rep(v)
        return out.transpose(1, 2).reshape(b, t, hq * hd)

    @staticmethod
    def train_mask(valid: torch.Tensor, step: int) -> torch.Tensor:
        """``[B, T]`` bool: where out[step] has a teacher (token t + step + 2 exists in the valid span)."""
        b, t = valid.shape
        mask = torch.zeros_like(valid, dtype=torch.bool)
        if step + 2 < t:
            mask[:, : t - step - 2] = valid[:, step + 2:].bool()
        return mask

    # ------------------------------------------------------------------ inference on the paged cache
    def prepare_inference(self) -> None:
        """Fuse q/k/v and gate/up (and on the CPU transpose the weights, as the lean target forward does);
        the module's parameters become views of the fused weights. Inference only: call after loading."""
        self._fused = _InferProj(self)

    def fuse(self, aux: torch.Tensor) -> torch.Tensor:
        """Target aux states ``[..., 3*Dt]`` -> features ``[..., D]``."""
        if self._fused is None:
            return self.fc(aux)
        return _linear(aux.reshape(-1, aux.shape[-1]), self._fused.fc, None, self._fused.tr,
                       pk=self._fused.fc_p).view(*aux.shape[:-1], -1)

    def forward_paged(self, ids: torch.Tensor, feats: torch.Tensor, positions: torch.Tensor, batch: AttnBatch,
                      k_pool: torch.Tensor, v_pool: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Incremental forward: ids, positions ``[B, N]``, feats ``[B, N, D]`` (fused) -> pre-norm outputs
        ``[B, N, D]`` (``[B, 1, D]`` at each row's last position with ``last_only``: ``batch.mask`` is then that
        query's); the new pairs' K/V are written to their slots in the pools ``[slots, Hkv, hd]``."""
        proj = self._fused or _TrainProj(self)
        cos, sin = self._cos_sin(positions, feats.dtype)
        scale = self.cfg.head_dim ** -0.5
        attend = lambda q, k, v: paged_attention(q, k, v, k_pool, v_pool, batch, scale)  # noqa: E731
        return self._layer(self.embed(ids), feats, cos, sin, attend, proj, last_only)


class _TrainProj:
    """The layer's projections from the module's own parameters (autograd-friendly)."""

    def __init__(self, head: EagleHead):
        self.a, self.m = head.midlayer.self_attn, head.midlayer.mlp

    def qkv(self, x):
        return torch.cat([self.a.q_proj(x), self.a.k_proj(x), self.a.v_proj(x)], -1)

    def o(self, x, residual):
        return residual + self.a.o_proj(x)

    def gate_up(self, x):
        return torch.cat([self.m.gate_proj(x), self.m.up_proj(x)], -1)

    def down(self, x, residual):
        return residual + self.m.down_proj(x)


class _InferProj:
    """Fused (and on the CPU transposed) weights, shared with the module's parameters (engine.models.llama)."""

    def __init__(self, head: EagleHead):
        a, m = head.midlayer.self_attn, head.midlayer.mlp
        self.tr = tr = head.fc.weight.device.type == "cpu"
        self.qkv_w, self.qkv_b = _fuse([a.q_proj, a.k_proj, a.v_proj], tr)
        self.o_w, self.o_b = _fuse([a.o_proj], tr)
        self.gate_up_w, self.gate_up_b = _fuse([m.gate_proj, m.up_proj], tr)
        self.down_w, self.down_b = _fuse([m.down_proj], tr)
        self.fc, _ = _fuse([head.fc], tr)
        self.lm_head, _ = _fuse([head.lm_head], tr)
        # oneDNN-packed copies for GEMMs of several rows on the CPU (engine.models.packed)
        self.qkv_p = self.o_p = self.gate_up_p = self.down_p = self.fc_p = self.lm_head_p = None
        weights = {"qkv": self.qkv_w, "o": self.o_w, "gate_up": self.gate_up_w, "down": self.down_w,
                   "fc": self.fc, "lm_head": self.lm_head}
        self.packing = packed.pack_all([(self, f"{n}_p", w) for n, w in weights.items()], tr)

    def qkv(self, x):
        return _linear(x, self.qkv_w, self.qkv_b, self.tr, pk=self.qkv_p)

    def o(self, x, residual):
        return _linear(x, self.o_w, self.o_b, self.tr, residual=residual, pk=self.o_p)

    def gate_up(self, x):
        return _linear(x, self.gate_up_w, self.gate_up_b, self.tr, pk=self.gate_up_p)

    def down(self, x, residual):
        return _linear(x, self.down_w, self.down_b, self.tr, residual=residual, pk=self.down_p)
