"""Block accounting invariants: no leak, no double free, refcounts never negative, copy-on-write."""

import random

import pytest

from engine.block_manager import BlockManager
from engine.errors import KVCacheExhausted


def _grow(bm: BlockManager, seq: int, n: int) -> list[tuple[int, int]]:
    copies = bm.prepare_append(seq, n)
    bm.commit(seq, bm.tables[seq].num_tokens + n)
    return copies


def test_allocate_append_free_returns_every_block():
    bm = BlockManager(8, block_size=16)
    bm.allocate(1)
    _grow(bm, 1, 40)
    assert len(bm.tables[1].blocks) == 3 and bm.num_free == 5
    bm.free(1)
    bm.check_invariants()
    assert bm.num_free == 8


def test_truncate_frees_whole_blocks_at_once():
    bm = BlockManager(8, block_size=16)
    bm.allocate(1)
    _grow(bm, 1, 50)  # 4 blocks
    bm.truncate(1, 17)  # keeps 2 blocks
    assert len(bm.tables[1].blocks) == 2 and bm.tables[1].num_tokens == 17 and bm.num_free == 6
    bm.truncate(1, 16)
    assert len(bm.tables[1].blocks) == 1
    bm.check_invariants()


def test_fork_shares_blocks_and_copy_on_write_splits_the_partial_block():
    bm = BlockManager(8, block_size=16)
    bm.allocate(1)
    _grow(bm, 1, 20)  # blocks: full + partial
    bm.fork(1, 2)
    assert bm.stats().shared == 2
    copies = _grow(bm, 2, 1)  # child writes into the shared partial block
    assert len(copies) == 1 and copies[0][0] == bm.tables[1].blocks[1]
    assert bm.tables[2].blocks[0] == bm.tables[1].blocks[0]  # full block still shared
    assert bm.tables[2].blocks[1] != bm.tables[1].blocks[1]
    assert bm.stats().shared == 1
    bm.free(1)
    bm.free(2)
    bm.check_invariants()
    assert bm.num_free == 8


def test_prefix_blocks_are_reused_and_keep_one_token_to_compute():
    bm = BlockManager(16, block_size=4)
    prompt = list(range(10))
    bm.allocate(1)
    assert bm.match_prefix(1, prompt) == 0
    _grow(bm, 1, len(prompt))
    bm.register_prefix(1, prompt)
    bm.allocate(2)
    assert bm.match_prefix(2, prompt) == 8  # two full blocks shared, the rest recomputed
    assert bm.tables[2].blocks == bm.tables[1].blocks[:2]
    bm.allocate(3)
    assert bm.match_prefix(3, list(range(8))) == 4  # at least one token is left to run the model on
    for s in (1, 2, 3):
        bm.free(s)
    bm.check_invariants()
    bm.allocate(4)  # a freed block keeps its hash until it is handed out again
    assert bm.match_prefix(4, prompt) == 8
    bm.free(4)
    bm.check_invariants()


def test_exhaustion_is_a_clear_error_and_changes_nothing():
    bm = BlockManager(2, block_size=4)
    bm.allocate(1)
    _grow(bm, 1, 6)
    with pytest.raises(KVCacheExhausted, match="KV cache is full"):
        bm.prepare_append(1, 8)
    assert len(bm.tables[1].blocks) == 2 and bm.tables[1].num_tokens == 6
    bm.check_invariants()


def test_double_free_is_caught():
    bm = BlockManager(2, block_size=4)
    bm.allocate(1)
    _grow(bm, 1, 3)
    block = bm.tables[1].blocks[0]
    bm.free(1)
    with pytest.raises(AssertionError, match="double free"):
        bm._release(block)


def test_random_operations_keep_invariants():
    rng = random.Random(0)
    bm = BlockManager(64, block_size=4)
    live: list[int] = []
    next_id = 0
    for _ in range(3000):
        op = rng.random()
        try:
            if op < 0.3 or not live:
                sid, next_id = next_id, next_id + 1
                bm.allocate(sid)
                live.append(sid)
                toks = [rng.randrange(5) for _ in range(rng.randrange(1, 20))]
                bm.match_prefix(sid, toks)
                _grow(bm, sid, len(toks) - bm.tables[sid].num_tokens)
                bm.register_prefix(sid, toks)
            elif op < 0.55:
                _grow(bm, rng.choice(live), rng.randrange(1, 9))
            elif op < 0.7:
                s = rng.choice(live)
                bm.truncate(s, rng.randrange(0, bm.tables[s].num_tokens + 1))
            elif op < 0.8:
                bm.fork(rng.choice(live), next_id)
                live.append(next_id)
                next_id += 1
            else:
                s = live.pop(rng.randrange(len(live)))
                bm.free(s)
        except KVCacheExhausted:
            s = live.pop(0)
            bm.free(s)
        bm.check_invariants()
    for s in live:
        bm.free(s)
    bm.check_invariants()
    assert bm.num_free == 64


def test_a_sequence_grows_into_the_block_after_its_last():
    """Blocks are handed out as runs where they can be: attention reads a lone row in consecutive blocks in place."""
    bm = BlockManager(32, block_size=4)
    for sid in (0, 1):
        bm.allocate(sid)
    for _ in range(3):  # interleaved growth: neither sequence can be consecutive
        for sid in (0, 1):
            _grow(bm, sid, 4)
    assert bm.tables[0].blocks == [0, 2, 4] and bm.tables[1].blocks == [1, 3, 5]
    bm.free(0)
    bm.free(1)
    bm.allocate(2)
    _grow(bm, 2, 4 * 9)
    blocks = bm.tables[2].blocks
    assert blocks == list(range(blocks[0], blocks[0] + 9)), blocks
    for _ in range(500):  # speculative rollback across a block boundary, over and over: the same next block again
        _grow(bm, 2, 3)
        assert bm.tables[2].blocks[-1] == blocks[0] + 9
        bm.truncate(2, 4 * 9)
        assert len(bm._free) <= 2 * bm.num_free + 65  # the lazily deleted entries are dropped now and then
    bm.check_invariants()
    bm.free(2)
    assert bm.num_free == 32


def test_the_block_after_is_not_taken_while_it_holds_a_cached_prefix():
    bm = BlockManager(8, block_size=2)
    bm.allocate(0)
    _grow(bm, 0, 8)  # blocks 0-3
    bm.register_prefix(0, [1, 2, 3, 4, 5, 6, 7, 8])
    bm.truncate(0, 2)  # blocks 1-3 are free but keep their prefix
    _grow(bm, 0, 2)
    assert bm.tables[0].blocks == [0, 4]
    bm.allocate(1)
    assert bm.match_prefix(1, [1, 2, 3, 4, 5, 6, 7]) == 6  # the prefix survived, taken from the middle of the list
    _grow(bm, 1, 1)
    assert bm.tables[1].blocks[:3] == [0, 1, 2]
    bm.check_invariants()
    assert bm.num_free == 8 - 5


def test_device_block_tables_write_a_forwards_changes_in_one_scatter_and_mirror_the_tables():
    """``DeviceBlockTables``: after any sequence of syncs (rows growing, shrinking, a block replaced by copy-on-write),
    releases and growths of the table, the device table after a ``read`` with what ``pending`` gave holds every
    synced row's blocks and the scratch block everywhere else; a change written twice before a forward keeps the last;
    nothing is written until then (one scatter a forward) nor dropped before it is, and a forward with no change takes
    nothing."""
    import torch

    from engine.block_tables import DeviceBlockTables

    rng = random.Random(3)
    scratch, width = 99, 6
    tables = DeviceBlockTables(width, scratch, torch.device("cpu"), capacity=2)
    live: dict[int, list[int]] = {}
    for step in range(300):
        for _ in range(rng.randint(1, 4)):
            seq = rng.randrange(6)
            if seq in live and rng.random() < 0.2:
                tables.release(seq)
                del live[seq]
                continue
            blocks = list(live.get(seq, []))
            op = rng.random()
            if op < 0.4 and len(blocks) < width:
                blocks.append(rng.randrange(50))
            elif op < 0.6 and blocks:
                del blocks[rng.randrange(len(blocks)):]
            elif op < 0.8 and blocks:
                blocks[rng.randrange(len(blocks))] = rng.randrange(50)
            tables.sync(seq, blocks)
            live[seq] = blocks
        before = tables.table.clone()
        packed = tables.pending()
        assert torch.equal(tables.table, before), step  # nothing written before the forward applies it
        assert tables.pending() == packed, step  # ... and nothing dropped: a forward failing here leaves them queued
        rows = tables.table.shape[0]
        got = tables.read(torch.tensor(list(range(rows)) + packed), 0, rows)
        assert tables.pending() == [] and torch.equal(got, tables.table), step
        rows = {tables._row[s]: b for s, b in live.items()}
        for row in range(tables.table.shape[0]):
            want = rows.get(row, [])
            assert tables.table[row].tolist() == want + [scratch] * (width - len(want)), (step, row)
    assert tables.table.shape[0] >= 4  # it grew past its first capacity
    tables.sync(100, [1, 2])
    tables.sync(100, [1, 3])  # changed again before the forward: the last write stands
    tables.read(torch.tensor([0] + tables.pending()), 0, 1)
    assert tables.table[tables._row[100]].tolist()[:3] == [1, 3, scratch]
