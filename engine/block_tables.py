"""A device-side mirror of the block manager's tables, kept up to date incrementally.

Each sequence owns one row of a persistent ``[rows, max_blocks]`` index tensor on the
model's device; only entries that changed since the last forward are written (a new block
every ``block_size`` tokens, a copy-on-write replacement, a rollback). Per-forward host
work is therefore proportional to the new tokens, not to the context, and a CUDA graph can
read the table from a fixed address. The changed entries of one forward's rows are written together, in one scatter
whose indices and values travel in the forward's own metadata copy (``pending``, ``apply``).

It also knows, per sequence, how many of its first blocks are consecutive in the pool (``run_slot``):
attention reads such a row's keys in place instead of gathering them (engine.attention).
"""

from __future__ import annotations

import torch


class DeviceBlockTables:
    def __init__(self, max_blocks_per_seq: int, scratch_block: int, device: torch.device, capacity: int = 32):
        self.max_blocks = max_blocks_per_seq
        self.scratch = scratch_block
        self.device = device
        self.table = torch.full((capacity, max_blocks_per_seq), scratch_block, dtype=torch.long, device=device)
        self._row: dict[int, int] = {}
        self._synced: dict[int, list[int]] = {}
        self._run: dict[int, int] = {}  # seq_id -> how many of its first blocks are consecutive
        # flat index into ``table`` -> the value to write there: the entries ``sync`` and ``release`` changed, written
        # by the next ``apply`` (a later change of an entry replaces an earlier one). Written row by row as they
        # changed, a step's rows cost a host-to-device copy and an indexed write each: ~5 rows a step at 8 clients
        # drafting K = 6 (a new block, a rollback's freed one), 0.23 ms of host time a step in the tables' syncs on
        # an H200 (demo pair; ~3.2 ms steps)
        self._writes: dict[int, int] = {}
        self._free_rows = list(range(capacity - 1, -1, -1))

    def _grow(self) -> None:
        old = self.table.shape[0]
        with torch.inference_mode(False):  # a normal tensor: released rows are reset outside inference mode
            extra = torch.full((old, self.max_blocks), self.scratch, dtype=torch.long, device=self.device)
            self.table = torch.cat([self.table, extra], 0)
        self._free_rows.extend(range(2 * old - 1, old - 1, -1))

    def sync(self, seq_id: int, blocks: list[int]) -> int:
        """Bring ``seq_id``'s row up to date with ``blocks``; return the row index."""
        row = self._row.get(seq_id)
        if row is None:
            if not self._free_rows:
                self._grow()
            row = self._free_rows.pop()
            self._row[seq_id] = row
            self._synced[seq_id] = []
            self._run[seq_id] = 0
        old = self._synced[seq_id]
        if blocks != old:
            if len(blocks) > self.max_blocks:
                raise ValueError(f"sequence needs {len(blocks)} blocks; the table holds {self.max_blocks}")
            first = 0
            for a, b in zip(old, blocks):
                if a != b:
                    break
                first += 1
            base, writes = row * self.max_blocks, self._writes
            for col in range(first, len(blocks)):
                writes[base + col] = blocks[col]
            for col in range(len(blocks), len(old)):
                writes[base + col] = self.scratch
            self._synced[seq_id] = list(blocks)
            run = min(self._run[seq_id], first, len(blocks))
            if run == 0 and blocks:
                run = 1
            while run < len(blocks) and blocks[run] == blocks[run - 1] + 1:
                run += 1
            self._run[seq_id] = run
        return row

    def run_slot(self, seq_id: int, num_keys: int, block_size: int) -> int | None:
        """The pool slot of ``seq_id``'s position 0 when its positions below ``num_keys`` lie in consecutive slots
        (as of its last ``sync``), else None."""
        if self._run.get(seq_id, 0) * block_size < num_keys:
            return None
        return self._synced[seq_id][0] * block_size

    def release(self, seq_id: int) -> None:
        row = self._row.pop(seq_id, None)
        if row is None:
            return
        n = len(self._synced.pop(seq_id))
        self._run.pop(seq_id, None)
        base = row * self.max_blocks
        for col in range(n):
            self._writes[base + col] = self.scratch
        self._free_rows.append(row)

    def pending(self) -> list[int]:
        """The entries waiting to be written (flat indices, then their values; empty: none): a forward puts them at the
        end of its metadata copy, after its rows' indices, and reads its rows with ``read``. They wait until written:
        a forward that fails before leaves them to the next one (the rows' blocks as last synced, ``_synced``, are what
        later syncs compare against)."""
        if not self._writes:
            return []
        return [*self._writes, *self._writes.values()]

    def read(self, meta: torch.Tensor, at: int, rows: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The ``[rows, max_blocks]`` tables of a forward's rows, their row indices at ``meta[at: at + rows]`` and
        ``pending``'s entries after them (to the end of ``meta``), written first in one scatter. ``out``: ``[rows, B]``
        to gather their first B blocks into (a CUDA graph's input)."""
        n = (meta.shape[0] - at - rows) // 2
        if n:
            self.table.view(-1).index_copy_(0, meta[at + rows: at + rows + n], meta[at + rows + n:])
            self._writes.clear()
        if out is None:
            return self.table.index_select(0, meta[at: at + rows])
        return torch.index_select(self.table[:, : out.shape[1]], 0, meta[at: at + rows], out=out)
