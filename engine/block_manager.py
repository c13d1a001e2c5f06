"""Block accounting for the paged KV cache: free list, reference counts, prefix hashes.

Plain Python, no torch, so its invariants are unit-tested in milliseconds. The tensors
themselves live in :mod:`engine.kv_pool`; this file only decides which physical block
holds which logical token range of which sequence.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.errors import KVCacheExhausted


@dataclass
class BlockTable:
    """Logical token positions of one sequence mapped to physical blocks.

    Position ``p`` lives in ``blocks[p // block_size]`` at offset ``p % block_size``.
    ``num_tokens`` counts the positions whose K/V have been written.
    """

    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0


@dataclass(frozen=True)
class BlockStats:
    total: int
    used: int
    free: int
    shared: int
    tokens_stored: int
    slots_allocated: int

    @property
    def fragmentation(self) -> float:
        """Share of allocated slots that hold no token (internal fragmentation)."""
        if self.slots_allocated == 0:
            return 0.0
        return 1.0 - self.tokens_stored / self.slots_allocated


FIRST_BLOCK_LOOKS = 8  # free-list entries a new sequence looks at for a block it can grow from


class BlockManager:
    """Allocates fixed-size blocks to sequences.

    - ``allocate``/``free`` move blocks between the free list and owners, counting references.
    - ``fork`` makes a child share every block of its parent (reference count + 1).
    - ``prepare_append`` reserves room for new tokens and performs copy-on-write when the
      block being written is shared; it returns the (src, dst) block copies the caller must
      apply to the tensor pool.
    - Full prompt blocks are registered under a hash of their whole prefix, so a later
      sequence with the same prefix reuses them (``match_prefix``). A freed block keeps its
      hash until it is handed out again.
    - A sequence's next block is the one after its last where that one is free and holds no
      cached prefix: a row whose blocks are consecutive is one run of pool slots, which attention
      reads in place as a view instead of gathering it (``engine.attention``).

    The free list is a deque with lazy deletion: a block handed out from its middle (the block
    after a sequence's last, a cached prefix) leaves its entry behind, and each release makes a new
    entry (``generation * num_blocks + block``); an entry whose block was handed out or released
    again since is skipped when it reaches the front. ``num_free`` counts the free blocks themselves.
    """

    def __init__(self, num_blocks: int, block_size: int = 16):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.num_shared = 0  # blocks with more than one owner, kept up to date (pools can have 100k+ blocks)
        self._free: deque[int] = deque(range(num_blocks))  # entries, see the docstring
        self._gen = [0] * num_blocks  # releases of each block so far: only its latest entry is live
        self._num_free = num_blocks
        self._hash_to_block: dict[int, int] = {}
        self._block_to_hash: dict[int, int] = {}
        self.tables: dict[int, BlockTable] = {}

    # ------------------------------------------------------------------ queries
    @property
    def num_free(self) -> int:
        return self._num_free

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self._num_free

    def table(self, seq_id: int) -> BlockTable:
        return self.tables[seq_id]

    def stats(self) -> BlockStats:
        used = self.num_blocks - self._num_free
        shared = self.num_shared
        tokens = sum(t.num_tokens for t in self.tables.values())
        slots = sum(len(t.blocks) for t in self.tables.values()) * self.block_size
        return BlockStats(self.num_blocks, used, self._num_free, shared, tokens, slots)

    def owners(self) -> dict[int, list[int]]:
        """Physical block -> sequence ids holding it (for the KV cache view)."""
        out: dict[int, list[int]] = {}
        for seq_id, t in self.tables.items():
            for b in t.blocks:
                out.setdefault(b, []).append(seq_id)
        return out

    # ------------------------------------------------------------------ changes
    def _open(self, block: int) -> bool:
        """Free and caching no prefix: a block a sequence may grow into."""
        return 0 <= block < self.num_blocks and self.ref_counts[block] == 0 and block not in self._block_to_hash

    def _pop_live(self) -> int:
        while True:
            entry = self._free.popleft()
            if self._live(entry):
                return entry  # else: handed out from the middle of the list, or released again, since

    def _take_block(self, after: int | None = None) -> int:
        """A free block: ``after + 1`` when it is open, else the free list's first; a sequence's first block
        (``after`` None) is the first of the list's first few whose next block is open, where there is one."""
        if not self._num_free:
            raise KVCacheExhausted(
                f"KV cache is full ({self.num_blocks} blocks of {self.block_size} tokens); "
                "lower max_new_tokens, wait for running requests, or raise the KV budget"
            )
        if after is not None and self._open(after + 1):
            block = after + 1
        else:
            seen = [self._pop_live()]
            while after is None and not self._open(seen[-1] % self.num_blocks + 1) \
                    and len(seen) < min(FIRST_BLOCK_LOOKS, self._num_free):
                seen.append(self._pop_live())
            if after is None and self._open(seen[-1] % self.num_blocks + 1):
                seen.insert(0, seen.pop())
            block = seen[0] % self.num_blocks
            self._free.extendleft(reversed(seen[1:]))  # the others stay where they were
        self._num_free -= 1
        old_hash = self._block_to_hash.pop(block, None)
        if old_hash is not None and self._hash_to_block.get(old_hash) == block:
            del self._hash_to_block[old_hash]
        self.ref_counts[block] = 1
        self._compact()
        return block

    def _compact(self) -> None:
        """Drop the dead entries once they outnumber the live ones (amortised O(1) per block handed out or freed)."""
        if len(self._free) > 2 * self._num_free + 64:
            self._free = deque(e for e in self._free if self._live(e))

    def _live(self, entry: int) -> bool:
        gen, block = divmod(entry, self.num_blocks)
        return self.ref_counts[block] == 0 and self._gen[block] == gen

    def _incref(self, block: int) -> None:
        self.ref_counts[block] += 1
        if self.ref_counts[block] == 2:
            self.num_shared += 1

    def _release(self, block: int) -> None:
        if self.ref_counts[block] <= 0:
            raise AssertionError(f"double free of block {block}")
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 1:
            self.num_shared -= 1
        if self.ref_counts[block] == 0:
            self._num_free += 1
            self._gen[block] += 1
            entry = self._gen[block] * self.num_blocks + block
            # Hashed blocks go to the back so their contents survive longest for reuse.
            if block in self._block_to_hash:
                self._free.append(entry)
            else:
                self._free.appendleft(entry)
            self._compact()

    def allocate(self, seq_id: int) -> BlockTable:
        """Create an empty block table for a new sequence."""
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id} already has a block table")
        table = BlockTable()
        self.tables[seq_id] = table
        return table

    def match_prefix(self, seq_id: int, token_ids: list[int]) -> int:
        """Attach cached full blocks matching the start of ``token_ids`` to an empty table.

        At least one token is always left uncached, so the caller has a position to run
        the model on. Returns the number of tokens whose K/V are already in the pool.
        """
        table = self.tables[seq_id]
        assert not table.blocks, "match_prefix needs an empty table"
        max_blocks = (len(token_ids) - 1) // self.block_size
        h = 0
        for i in range(max_blocks):
            h = hash((h, tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])))
            block = self._hash_to_block.get(h)
            if block is None:
                break
            if self.ref_counts[block] == 0:
                self._num_free -= 1  # its entry in the free list is skipped when it reaches the front
            self._incref(block)
            table.blocks.append(block)
        table.num_tokens = len(table.blocks) * self.block_size
        return table.num_tokens

    def register_prefix(self, seq_id: int, token_ids: list[int]) -> None:
        """Record the hashes of the sequence's full blocks covered by ``token_ids``."""
        table = self.tables[seq_id]
        n_full = min(len(token_ids), table.num_tokens) // self.block_size
        h = 0
        for i in range(n_full):
            h = hash((h, tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])))
            block = table.blocks[i]
            if h not in self._hash_to_block and block not in self._block_to_hash:
                self._hash_to_block[h] = block
                self._block_to_hash[block] = h

    def prepare_append(self, seq_id: int, num_new: int) -> list[tuple[int, int]]:
        """Make room for ``num_new`` tokens after ``num_tokens``; returns copy-on-write pairs.

        All-or-nothing: if the pool cannot supply the blocks, nothing changes and
        :class:`KVCacheExhausted` is raised.
        """
        table = self.tables[seq_id]
        start, end = table.num_tokens, table.num_tokens + num_new
        need_new = max(0, self.blocks_needed(end) - len(table.blocks))
        first_written = start // self.block_size
        cow = (
            num_new > 0
            and first_written < len(table.blocks)
            and self.ref_counts[table.blocks[first_written]] > 1
        )
        if need_new + int(cow) > self._num_free:
            raise KVCacheExhausted(
                f"KV cache is full: need {need_new + int(cow)} blocks, {self._num_free} free"
            )
        copies: list[tuple[int, int]] = []
        if cow:
            src = table.blocks[first_written]
            dst = self._take_block(table.blocks[first_written - 1] if first_written else None)
            self._release(src)
            table.blocks[first_written] = dst
            copies.append((src, dst))
        for _ in range(need_new):
            table.blocks.append(self._take_block(table.blocks[-1] if table.blocks else None))
        return copies

    def commit(self, seq_id: int, num_tokens: int) -> None:
        """Mark ``num_tokens`` positions as written (after the forward pass)."""
        table = self.tables[seq_id]
        assert num_tokens <= len(table.blocks) * self.block_size
        table.num_tokens = num_tokens

    def truncate(self, seq_id: int, num_tokens: int) -> None:
        """Keep the first ``num_tokens`` positions; whole blocks past them are freed at once."""
        table = self.tables[seq_id]
        keep = self.blocks_needed(num_tokens)
        for block in reversed(table.blocks[keep:]):  # the first ends up first on the free list (see free)
            self._release(block)
        del table.blocks[keep:]
        table.num_tokens = min(table.num_tokens, num_tokens)

    def fork(self, parent_id: int, child_id: int) -> BlockTable:
        """Give ``child_id`` the parent's blocks, shared (copy-on-write on the next write)."""
        parent = self.tables[parent_id]
        if child_id in self.tables:
            raise ValueError(f"sequence {child_id} already has a block table")
        for block in parent.blocks:
            self._incref(block)
        child = BlockTable(list(parent.blocks), parent.num_tokens)
        self.tables[child_id] = child
        return child

    def free(self, seq_id: int) -> None:
        """Release every block of a sequence (finished, cancelled or preempted)."""
        table = self.tables.pop(seq_id, None)
        if table is None:
            return
        for block in reversed(table.blocks):  # freed last to first, the blocks of no prefix end up at the front of
            self._release(block)  # the free list in their order: the next sequence takes them as one run again

    def check_invariants(self) -> None:
        """Raise AssertionError if reference counts and the free list disagree."""
        counted = [0] * self.num_blocks
        for t in self.tables.values():
            for b in t.blocks:
                counted[b] += 1
            assert t.num_tokens <= len(t.blocks) * self.block_size
        assert counted == self.ref_counts, "reference counts do not match the block tables"
        assert self.num_shared == sum(1 for r in self.ref_counts if r > 1), "shared-block count is off"
        live = [e % self.num_blocks for e in self._free if self._live(e)]
        assert len(live) == len(set(live)), "a free block has two live entries"
        for b in range(self.num_blocks):
            assert self.ref_counts[b] >= 0
        assert sorted(live) == [b for b in range(self.num_blocks) if self.ref_counts[b] == 0], \
            "free blocks and live free-list entries differ"
        assert self._num_free == len(live), "free-block count is off"
