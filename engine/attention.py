"""Paged attention for the lean forward: write the new K/V into their slots, attend over each
row's own blocks.

The metadata (:class:`AttnBatch`) is built once per forward and shared by every layer:
where each new token's K/V goes, which pool slot holds key position ``t`` of each row, and
a boolean mask only when one is needed. A batch of one decoding row needs no mask at all.

A lone row whose blocks are consecutive in the pool (the block manager hands a sequence the block
after its last where it can) is one run of slots: its keys and values are read in place, as a view
of the pool, with no gather at all. Measured on the 2-core EPYC (demo pair, fp32, batch 1, 128
tokens, 16 requests alternating the two ways): plain decoding 113 -> 122 tok/s (median), the EAGLE
head 209 -> 219; the per-layer gathers had cost 1.2 ms of an 8 ms plain step, each copy running
after a GEMM streamed the weights through the caches. Batches of several rows gather (SDPA takes one
tensor, and attention written out as two matmuls and a softmax ran 2.7x slower than SDPA at 8 rows
here). On CUDA the gather index has a static shape, so the whole step can be captured in a CUDA
graph; graphs replay the gather path. Keys and values are read straight from the pool's
``[slots, kv_heads, head_dim]`` layout, never rebuilt per query head: the query heads of one KV
group are folded into the query dimension (GQA without ``repeat_interleave``, which DirectML runs
on the CPU).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# cuDNN's SDPA, which torch prefers on recent NVIDIA GPUs, builds an execution plan for every new shape of queries and
# keys. Measured on an H200 (torch 2.11, bf16, TinyLlama-1.1B shape): an eager prefill of a new length took 78-94 ms,
# the same forward again 11-13 ms; the draft's first catch-up of 8 ragged rows stalled a batch-8 step for 0.7-1.3 s.
# Eager forwards meet a new shape nearly every time (prompt lengths, catch-ups, steps not captured yet), so they run
# without it (flash or memory-efficient attention: prefill of a new length 9-18 ms, again 7 ms). A CUDA graph builds
# its plan once, at capture, and replays it; there cuDNN pays where its split over the keys does: one decoding row
# over 512+ keys (plain batch 1 at 1536-token prompts 212 -> 328 tok/s; 32 query heads fold into 4 KV groups, too few
# blocks for flash), not at the shortest key bucket (batch 8 at K = 4 with 32-token prompts: 3670 -> 4600 tok/s
# without it).
CUDNN_MIN_KEYS = 512  # the smallest key bucket whose CUDA graphs may use cuDNN's SDPA
_HAS_CUDNN_SWITCH = hasattr(torch.backends.cuda, "enable_cudnn_sdp") and hasattr(torch.backends.cuda,
                                                                                    "cudnn_sdp_enabled")
_CUDNN_ALLOWED = _HAS_CUDNN_SWITCH and torch.backends.cuda.cudnn_sdp_enabled()  # the process's setting at import


@contextlib.contextmanager
def cudnn_attention(enabled: bool):
    """SDPA may (``enabled``, where the process allowed it) or may not pick cuDNN inside; the setting is restored."""
    if not _HAS_CUDNN_SWITCH:
        yield
        return
    be = torch.backends.cuda
    prev, want = be.cudnn_sdp_enabled(), enabled and _CUDNN_ALLOWED
    if prev != want:
        be.enable_cudnn_sdp(want)
    try:
        yield
    finally:
        if prev != want:
            be.enable_cudnn_sdp(prev)


def eager_attention(device: torch.device):
    """The context of an eager forward on ``device``: on CUDA, no cuDNN SDPA (see CUDNN_MIN_KEYS)."""
    return cudnn_attention(False) if device.type == "cuda" else contextlib.nullcontext()


@dataclass
class AttnBatch:
    """One forward's attention metadata for ``B`` rows of ``N`` (left-padded) new tokens.

    slot_mapping: [B * N]   pool slot of each new token (padding writes to the scratch block)
    gather:       [B * T]   pool slot of key position ``t`` of each row (past a row's end: scratch)
    mask:         [B, 1, N, T] bool, True = may attend; None when every query sees every key
    causal:       a fresh prompt (N == T): plain causal attention, which picks the fused kernels
    run:          B == 1 only: the pool slot of key position 0 when positions 0..T-1 are consecutive slots
                  (``gather`` is then unused and may be None)
    window_gather: [B * W] pool slot of each key the sliding layers read (``window_keys``: the last W positions a
                  row's queries can see, W = window + N - 1), with ``window_mask`` ``[B, 1, N, W]`` theirs; None where no
                  key lies outside a window (those layers then read ``gather`` under ``mask`` like the others)
    """

    slot_mapping: torch.Tensor
    gather: torch.Tensor | None
    mask: torch.Tensor | None
    num_keys: int
    causal: bool = False
    folded: torch.Tensor | None = None  # the mask as the layers use it, built by the first layer only
    run: int | None = None
    window_gather: torch.Tensor | None = None
    window_mask: torch.Tensor | None = None
    folded_window: torch.Tensor | None = None

    def layer_mask(self, groups: int, dtype: torch.dtype, sliding: bool = False) -> torch.Tensor | None:
        """``mask`` (``window_mask`` for a ``sliding`` layer) as an additive ``[B, 1, G * N, T]`` bias (G query heads
        per KV head folded into the query dimension), made once per forward instead of once per layer."""
        if sliding and self.window_mask is not None:
            if self.folded_window is None:
                self.folded_window = _fold(self.window_mask, groups, dtype)
            return self.folded_window
        if self.mask is None:
            return None
        if self.folded is None:
            self.folded = _fold(self.mask, groups, dtype)
        return self.folded


def _fold(mask: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    b, _, n, t = mask.shape
    m = mask if groups == 1 else mask.expand(b, groups, n, t).reshape(b, 1, groups * n, t)
    return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, float("-inf"))


def sliding_window_of(config) -> tuple[int | None, bool]:
    """(the window, whether only some layers slide) of a model whose attention slides, else (None, False):
    ``layer_types`` where the config lists them (Gemma 2 / 3, Qwen2), else ``sliding_window`` unless
    ``use_sliding_window`` is off (Mistral, Phi-3)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(cfg, "sliding_window", None)
    if not window:
        return None, False
    types = getattr(cfg, "layer_types", None)
    if types:
        return (int(window), True) if "sliding_attention" in types else (None, False)
    return (int(window), False) if getattr(cfg, "use_sliding_window", True) else (None, False)


def window_keys(table: torch.Tensor, positions: torch.Tensor, window: int, num_keys: int, block_size: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys a sliding layer reads, for rows of ``[B, N]`` query ``positions`` (left-padded: the last column is
    each row's last token) over ``[B, blocks]`` block ``table``s of ``num_keys`` keys: the W = min(window + N - 1,
    num_keys) positions from ``lo = max(0, last - W + 1)``, every key any of the row's queries can see. Returns (their
    pool slots ``[B * W]``, the mask ``[B, 1, N, W]``: key ``lo + j`` is visible to a query at ``q`` iff
    ``q - window < lo + j <= q``, transformers' ``kv_idx > q_idx - sliding_window``; a padding query before ``lo``
    sees key ``lo`` alone). Tensor ops only: CUDA graphs
    capture it with their static positions and tables."""
    b, n = positions.shape
    w = min(window + n - 1, num_keys)
    lo = (positions[:, -1] - (w - 1)).clamp_(min=0)  # [B]
    kp = lo[:, None] + torch.arange(w, device=positions.device)  # [B, W] key positions
    slots = table.gather(1, kp // block_size) * block_size + kp % block_size
    q = positions[:, :, None]  # [B, N, 1]
    visible = (kp[:, None, :] <= q) & (kp[:, None, :] > q - window)
    visible[:, :, :1] |= q < lo[:, None, None]
    return slots.reshape(-1), visible[:, None]


def key_slots(table: torch.Tensor, num_keys: int, block_size: int) -> torch.Tensor:
    """``[B, blocks]`` block table -> ``[B, num_keys]`` pool slot of each key position."""
    b = table.shape[0]
    nb = -(-num_keys // block_size)
    slots = table[:, :nb, None] * block_size + torch.arange(block_size, device=table.device)
    return slots.view(b, nb * block_size)[:, :num_keys]


def causal_mask(positions: torch.Tensor, num_keys: int) -> torch.Tensor:
    """``[B, N]`` query positions -> ``[B, 1, N, T]`` bool: key ``t`` is visible iff ``t <= position`` (a sliding
    layer's window: ``window_keys``)."""
    keys = torch.arange(num_keys, device=positions.device)
    return (keys[None, None, :] <= positions[:, :, None])[:, None]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                    batch: AttnBatch, scale: float, sliding: bool = False, softcap: float | None = None) -> torch.Tensor:
    """q: [B, N, Hq, D]; k, v: [B, Nk, Hkv, D] (new tokens; N = Nk, or fewer queries: the last N of each row's new
    tokens, with ``batch.mask`` theirs); pools: [slots, Hkv, D]. Returns [B, N, Hq * D]. ``sliding``: a layer that
    reads ``batch.window_mask`` where the batch has one; ``softcap``: scores squashed to ``cap * tanh(s / cap)`` before
    the mask and softmax (Gemma 2), computed here as transformers' eager attention does (no SDPA kernel has it)."""
    windowed = sliding and batch.window_mask is not None
    b, n, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    t = batch.num_keys
    k_pool.index_copy_(0, batch.slot_mapping, k.reshape(-1, hkv, d))
    v_pool.index_copy_(0, batch.slot_mapping, v.reshape(-1, hkv, d))
    if windowed and batch.window_gather is not None:  # a sliding layer: the keys of its window only
        w = batch.window_gather.numel() // b
        keys = k_pool.index_select(0, batch.window_gather).view(b, w, hkv, d).transpose(1, 2)  # [B, Hkv, W, D]
        values = v_pool.index_select(0, batch.window_gather).view(b, w, hkv, d).transpose(1, 2)
    elif batch.run is not None:  # one row in consecutive slots: read in place
        keys = k_pool.narrow(0, batch.run, t).view(b, t, hkv, d).transpose(1, 2)  # [1, Hkv, T, D]
        values = v_pool.narrow(0, batch.run, t).view(b, t, hkv, d).transpose(1, 2)
    else:
        keys = k_pool.index_select(0, batch.gather).view(b, t, hkv, d).transpose(1, 2)  # [B, Hkv, T, D]
        values = v_pool.index_select(0, batch.gather).view(b, t, hkv, d).transpose(1, 2)
    if softcap is not None:
        return _softcapped(q, keys, values, batch, scale, softcap, windowed)
    if batch.causal and not windowed:  # prefill from position 0: share K/V across the group by a view, not a copy per head
        if g > 1:
            keys = keys[:, :, None].expand(b, hkv, g, t, d).reshape(b, hq, t, d)
            values = values[:, :, None].expand(b, hkv, g, t, d).reshape(b, hq, t, d)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, is_causal=True, scale=scale)
        return out.transpose(1, 2).reshape(b, n, hq * d)
    if g == 1:
        qh = q.transpose(1, 2)  # [B, H, N, D]
    else:  # fold the G query heads of each KV head into the query dimension
        qh = q.view(b, n, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, g * n, d)
    out = F.scaled_dot_product_attention(qh, keys, values, attn_mask=batch.layer_mask(g, q.dtype, windowed),
                                         scale=scale)
    if g == 1:
        return out.transpose(1, 2).reshape(b, n, hq * d)
    return out.view(b, hkv, g, n, d).permute(0, 3, 1, 2, 4).reshape(b, n, hq * d)


def _softcapped(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, batch: AttnBatch, scale: float, cap: float,
                windowed: bool) -> torch.Tensor:
    """``paged_attention`` with soft-capped scores, the G query heads of a KV head folded into the query dimension:
    (q k^T * scale / cap).tanh() * cap, plus the mask, softmax in fp32, times v."""
    b, n, hq, d = q.shape
    hkv, t = keys.shape[1], keys.shape[2]
    g = hq // hkv
    qh = q.view(b, n, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, g * n, d)
    scores = torch.matmul(qh, keys.transpose(2, 3)).mul_(scale).div_(cap).tanh_().mul_(cap)  # [B, Hkv, G*N, T]
    mask = batch.layer_mask(g, scores.dtype, windowed)
    if mask is None and batch.causal:
        mask = _fold(torch.ones(n, t, dtype=torch.bool, device=q.device).tril_(t - n)[None, None], g, scores.dtype)
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, values)  # [B, Hkv, G*N, D]
    return out.view(b, hkv, g, n, d).permute(0, 3, 1, 2, 4).reshape(b, n, hq * d)
