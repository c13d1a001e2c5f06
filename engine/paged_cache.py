"""A transformers ``Cache`` that reads and writes the paged KV pool.

The model runner builds a :class:`ForwardBatch` (where each new token goes, which slots
each row attends to) once per forward pass; every attention layer then calls
``PagedCache.update``, which scatters the new K/V into their blocks and gathers each
row's whole history back, padded to the longest row. The 4-D mask built with the batch
hides padding, so rows of different lengths share one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from engine.kv_pool import KVPool


@dataclass
class ForwardBatch:
    """Index tensors for one forward pass over ``B`` rows of ``N`` (left-padded) new tokens.

    write_rows:  [W]    flat indices into ``B * N`` of the real (non-padding) new tokens
    write_slots: [W]    pool slot for each of them
    gather:      [B, T] pool slot of key position ``t`` of each row (padding points anywhere valid)
    """

    write_rows: torch.Tensor
    write_slots: torch.Tensor
    gather: torch.Tensor
    all_rows_real: bool
    kv_length: int


class PagedCache(Cache):
    """Cache whose storage is a :class:`KVPool`; one instance per model, reused every step."""

    def __init__(self, pool: KVPool):
        super().__init__(layers=[])
        self.pool = pool
        self.batch: ForwardBatch | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key_states: [B, H, N, D]
        batch = self.batch
        k_pool, v_pool = self.pool.layer(layer_idx, key_states)
        b, h, n, d = key_states.shape
        new_k = key_states.transpose(1, 2).reshape(b * n, h, d)  # [B*N, H, D]
        new_v = value_states.transpose(1, 2).reshape(b * n, h, d)
        if not batch.all_rows_real:
            new_k = new_k.index_select(0, batch.write_rows)
            new_v = new_v.index_select(0, batch.write_rows)
        k_pool.index_copy_(0, batch.write_slots, new_k.to(k_pool.dtype))
        v_pool.index_copy_(0, batch.write_slots, new_v.to(v_pool.dtype))
        # index_select on the flat index is several times faster than advanced indexing on CPU
        flat = batch.gather.view(-1)
        keys = k_pool.index_select(0, flat).view(b, -1, h, d).permute(0, 2, 1, 3)  # [B, H, T, D]
        values = v_pool.index_select(0, flat).view(b, -1, h, d).permute(0, 2, 1, 3)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.batch is None else self.batch.kv_length

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return (0 if self.batch is None else self.batch.kv_length), 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    def __len__(self) -> int:
        return self.pool.shape.num_layers

    @property
    def is_compileable(self) -> bool:
        return False
