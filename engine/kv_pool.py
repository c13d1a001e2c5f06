"""The tensor pool: K and V of every layer of one model, in fixed-size blocks.

Layout per layer: ``[(num_blocks + 1) * block_size, num_kv_heads, head_dim]`` so a token's
slot is ``block * block_size + offset``. The extra last block is scratch: padding tokens
write there and gathers past a row's end read from there, so no step needs a data-dependent
index (and none syncs the device). Layers are allocated on first write, with the shape the
model actually produces (GQA, odd head dims and GPT-2 all just work), or up front by
:meth:`KVPool.allocate` for the lean forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config) -> "KVShape":
        text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        layers = text_cfg.num_hidden_layers
        heads = text_cfg.num_attention_heads
        kv_heads = getattr(text_cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // heads
        return cls(layers, kv_heads, head_dim)

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.empty((), dtype=dtype).element_size()


MAX_AUTO_TOKENS = 262144


def num_blocks_for(
    shape: KVShape, dtype: torch.dtype, device: torch.device, block_size: int,
    tokens: int | None, memory_fraction: float,
) -> int:
    """Blocks from a token budget, else from a fraction of free device memory."""
    if tokens is None:
        per_token = shape.bytes_per_token(dtype)
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            # a desktop serves a handful of requests: more than this only costs memory and bookkeeping
            tokens = min(int(free * memory_fraction) // per_token, MAX_AUTO_TOKENS)
        else:
            # CPU, DirectML, MPS: no portable free-memory query; a budget that suits a desktop.
            tokens = min(32768, max(4096, (512 << 20) // per_token))
    return max(1, tokens // block_size)


class KVPool:
    """Owns the K/V tensors; knows nothing about which sequence uses which block."""

    def __init__(self, num_blocks: int, block_size: int, shape: KVShape, dtype: torch.dtype, device: torch.device):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.shape = shape
        self.dtype = dtype
        self.device = device
        self.keys: list[torch.Tensor | None] = [None] * shape.num_layers
        self.values: list[torch.Tensor | None] = [None] * shape.num_layers
        self.scratch_block = num_blocks  # never handed out by the block manager

    @property
    def num_slots(self) -> int:
        return (self.num_blocks + 1) * self.block_size

    @property
    def scratch_slot(self) -> int:
        return self.scratch_block * self.block_size

    def allocate(self, heads: int, head_dim: int) -> None:
        """Allocate every layer now (the lean forward knows its shapes before the first write)."""
        for idx in range(self.shape.num_layers):
            if self.keys[idx] is None:
                self.keys[idx] = torch.zeros(self.num_slots, heads, head_dim, dtype=self.dtype, device=self.device)
                self.values[idx] = torch.zeros_like(self.keys[idx])

    def bytes_allocated(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    def layer(self, idx: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pool tensors of layer ``idx``; ``like`` is ``[batch, heads, tokens, head_dim]``."""
        k = self.keys[idx]
        if k is None:
            heads, head_dim = like.shape[1], like.shape[3]
            # zeros, not empty: padded gather slots must never hold NaN bit patterns
            k = torch.zeros(self.num_slots, heads, head_dim, dtype=like.dtype, device=like.device)
            self.keys[idx] = k
            self.values[idx] = torch.zeros_like(k)
        return k, self.values[idx]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks ``src -> dst`` in every layer."""
        if not pairs:
            return
        bs = self.block_size
        for tensors in (self.keys, self.values):
            for t in tensors:
                if t is None:
                    continue
                for src, dst in pairs:
                    t[dst * bs : (dst + 1) * bs].copy_(t[src * bs : (src + 1) * bs])
