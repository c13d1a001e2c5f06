"""Runs one model's forward pass over a ragged batch on the paged cache.

Each row brings the tokens the model has not seen yet (1 for a decode step, K+1 for a
speculative verification, a whole prompt for prefill). Rows are left-padded to the
longest, so every row's last real tokens line up at the end and ``logits_to_keep``
returns exactly the positions the caller needs.

Two paths: the Llama family runs the engine's lean forward (:mod:`engine.models.llama`,
attention in place on the pool, per-forward host work proportional to the new tokens);
every other architecture runs transformers' own modeling code on :class:`PagedCache`,
which is also the reference the lean forward is tested against.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from engine.attention import AttnBatch, causal_mask, eager_attention, key_slots, sliding_window_of
from engine.block_manager import BlockManager
from engine.block_tables import DeviceBlockTables
from engine.compat import forward_with_cache
from engine.kv_pool import KVPool
from engine.paged_cache import ForwardBatch, PagedCache

logger = logging.getLogger(__name__)


@dataclass
class RowInput:
    seq_id: int
    token_ids: list[int]
    num_logits: int = 1
    aux: bool = False  # deliver this row's aux hidden states to ``ModelRunner.aux_sink`` (an EAGLE-3 head's)
    tail: int = 0  # the last ``tail`` token_ids are placeholders for tokens on the device (``ModelRunner.forward``)


def _tail_index(rows: list[RowInput], n: int, k: int) -> tuple[list[int] | None, list[int] | None]:
    """Where ``ModelRunner.forward``'s ``tail`` goes in the left-padded ``[B, n]`` input: (None, None) where every row
    holds ``k`` placeholders (the last ``k`` columns), else the flat input indices and the flat tail indices."""
    if all(r.tail == k for r in rows):
        return None, None
    dst: list[int] = []
    src: list[int] = []
    j = 0
    for i, r in enumerate(rows):
        if r.tail:
            dst += range(i * n + n - r.tail, i * n + n)
            src += range(j * k, j * k + r.tail)
            j += 1
    return dst, src


def _put_tail(input_ids: torch.Tensor, tail: torch.Tensor, dst: torch.Tensor | None, src: torch.Tensor | None) -> None:
    """``tail`` into the input: its last columns (``dst`` None), or at flat ``dst`` from flat ``src``."""
    if dst is None:
        input_ids[:, input_ids.shape[1] - tail.shape[1]:] = tail
    else:
        input_ids.view(-1).index_copy_(0, dst, tail.reshape(-1).index_select(0, src))


class ModelRunner:
    """One model + its KV pool + its block accounting."""

    def __init__(self, model, pool: KVPool, blocks: BlockManager, vocab_size: int, lean: bool | None = None,
                 max_context: int | None = None):
        self.model = model
        self.pool = pool
        self.blocks = blocks
        self.cache = PagedCache(pool)
        self.device = pool.device
        self.vocab_size = vocab_size  # logits past the tokenizer's vocabulary are dropped
        self.last_forward_s = 0.0
        self.lean = self._build_lean(model, lean)
        # transformers' path masks a sliding-window model's keys as its modeling code would (``_sliding``); the lean
        # forward reads a sliding layer's window only (``LeanCausalLM.window_batch``)
        self.window, self.window_layered = sliding_window_of(model.config)
        self.forward_path = "lean" if self.lean is not None else "transformers"
        if self.lean is not None:
            pool.allocate(self.lean.n_kv, self.lean.head_dim)
            ctx = max_context or getattr(model.config, "max_position_embeddings", 2048) or 2048
            self.tables = DeviceBlockTables(-(-ctx // blocks.block_size) + 1, pool.scratch_block, self.device)
            self.lean.ensure_positions(ctx + blocks.block_size)
        # EAGLE-3 features: the inputs of these layers, for every new token of rows asking for them, go to
        # aux_sink(seq_id, first position, [n, len * hidden]) after a successful forward; off when None
        self.aux_layers: tuple[int, ...] | None = None
        self.aux_sink = None
        self.graphs = None
        if self.lean is not None and self.device.type == "cuda" and os.environ.get("HELIX_CUDA_GRAPHS", "1") != "0":
            from engine.cuda_graphs import GraphRunner

            self.graphs = GraphRunner(self.lean, pool, self.tables.max_blocks * blocks.block_size)

    @staticmethod
    def _build_lean(model, lean: bool | None):
        """The lean forward when the model's family has one (``lean=False`` or HELIX_LEAN=0 forces
        transformers' path; ``lean=True`` makes an unsupported model an error)."""
        from engine.models import lean_model_for

        if lean is None:
            lean = None if os.environ.get("HELIX_LEAN", "1") != "0" else False
        if lean is False:
            return None
        built, reason = lean_model_for(model)
        if built is None:
            if lean:
                raise ValueError(f"the lean forward cannot run this model: {reason}")
            logger.info("lean forward not used (%s); running transformers' modeling code", reason)
        return built

    # ------------------------------------------------------------- accounting
    def cached_len(self, seq_id: int) -> int:
        t = self.blocks.tables.get(seq_id)
        return 0 if t is None else t.num_tokens

    def blocks_for(self, seq_id: int, num_new: int) -> int:
        """Blocks that appending ``num_new`` tokens would take (copy-on-write included)."""
        t = self.blocks.tables.get(seq_id)
        cur_tokens = 0 if t is None else t.num_tokens
        cur_blocks = 0 if t is None else len(t.blocks)
        need = max(0, self.blocks.blocks_needed(cur_tokens + num_new) - cur_blocks)
        if t is not None and num_new and cur_tokens // self.blocks.block_size < cur_blocks:
            if self.blocks.ref_counts[t.blocks[cur_tokens // self.blocks.block_size]] > 1:
                need += 1
        return need

    # ------------------------------------------------------------- forward
    @torch.inference_mode()
    def forward(self, rows: list[RowInput], sync: bool = True, tail: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Write the rows' new tokens to the cache and return each row's last logits.

        Returns one ``[num_logits, vocab]`` float tensor per row. On any error (no free
        block, device OOM) every row is left exactly as it was before the call. ``sync=False``: return once the
        forward is launched (a GPU's work may still run), for callers that launch more work on the logits before
        reading them on the host (which waits for it all): that launching then overlaps the forward. ``tail``:
        ``[D, K]`` tokens on the device (a draft not copied to the host); row j's first ``tail`` of them stand for
        the placeholders of the j-th row with a positive ``RowInput.tail``.
        """
        t0 = time.perf_counter()
        bs = self.blocks.block_size
        starts: list[int] = []
        grown: list[int] = []
        aux: list[torch.Tensor] | None = [] if self.aux_sink is not None and any(r.aux for r in rows) else None
        try:
            for row in rows:
                if row.seq_id not in self.blocks.tables:
                    self.blocks.allocate(row.seq_id)
                starts.append(self.blocks.tables[row.seq_id].num_tokens)
                self.pool.copy_blocks(self.blocks.prepare_append(row.seq_id, len(row.token_ids)))
                grown.append(row.seq_id)
            with eager_attention(self.device):  # a graph captured inside chooses its own (cuda_graphs.capture)
                logits = (self._run_lean(rows, starts, bs, aux, tail) if self.lean is not None
                          else self._run(rows, starts, bs, aux, tail))
        except BaseException:
            for seq_id, start in zip(grown, starts):
                self.blocks.truncate(seq_id, start)
            raise
        for row, start in zip(rows, starts):
            self.blocks.commit(row.seq_id, start + len(row.token_ids))
        if aux:
            n = aux[0].shape[1]
            per_row = aux[0].unbind(0)  # one call for every row's view (indexing row by row: ~2x the host time)
            for row, start, feats in zip(rows, starts, per_row):
                if row.aux:
                    m = len(row.token_ids)
                    self.aux_sink(row.seq_id, start, feats if m == n else feats[n - m:])
        # the caller reads these logits at once anyway; syncing here makes step timers (and with
        # them adaptive K's cost model) measure the device's work, not just its launch (``sync=False``: the caller's
        # timer runs to its own host copy instead)
        if sync and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif sync and self.device.type == "mps":
            torch.mps.synchronize()
        self.last_forward_s = time.perf_counter() - t0
        return logits

    @torch.inference_mode()
    def cached_features(self, rows: list[tuple[int, int, list[int]]]) -> list[torch.Tensor]:
        """The aux hidden states (``aux_layers``: an EAGLE-3 head's features) of each row's ``token_ids``, which the
        cache of ``seq_id`` already holds at positions ``start``.. (rows of ``(seq_id, start, token_ids)``), computed
        again by one forward that reads every key and value from the cache as it was written and writes none (its new
        K/V go to the scratch slot): the features of tokens the target read without handing them over (a prompt prefix
        found in the prefix cache, steps whose rows asked for none). One ``[n, len(aux_layers) * hidden]`` per row;
        eager, the rows left-padded as in a forward."""
        bs, dev = self.blocks.block_size, self.device
        lens = [len(ids) for _, _, ids in rows]
        n = max(lens)
        ends = [start + k for (_, start, _), k in zip(rows, lens)]
        t_len = max(ends)
        nb = -(-t_len // bs)
        ids, pos, tables = [], [], []
        for (seq_id, start, toks), end in zip(rows, ends):
            table = self.blocks.tables[seq_id]
            if self.aux_layers is None or end > table.num_tokens:
                raise ValueError(f"no features of positions {start}..{end - 1}: the cache holds {table.num_tokens} tokens")
            pad = n - len(toks)
            ids.append([0] * pad + toks)
            pos.append([0] * pad + list(range(start, end)))  # padding queries see key 0 alone
            blocks = table.blocks[:nb]
            tables.append(blocks + [blocks[0]] * (nb - len(blocks)))  # keys past a row's end are masked
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        positions = torch.tensor(pos, dtype=torch.long, device=dev)
        table_t = torch.tensor(tables, dtype=torch.long, device=dev)
        gather = key_slots(table_t, t_len, bs).contiguous()  # [B, T]
        scratch = torch.full((len(rows) * n,), self.pool.scratch_slot, dtype=torch.long, device=dev)
        with eager_attention(dev):
            if self.lean is not None:
                batch = self.lean.window_batch(AttnBatch(scratch, gather.reshape(-1), causal_mask(positions, t_len),
                                                         t_len), table_t, positions, bs)
                hidden = self.lean.forward(input_ids, positions, batch, self.pool, 1, self.aux_layers)[1]
            else:
                real_q = torch.tensor([[j >= n - k for j in range(n)] for k in lens], device=dev)
                mask = self._mask(positions, real_q, torch.arange(t_len, device=dev))
                write_rows = real_q.reshape(-1).nonzero().squeeze(1)
                self.cache.batch = ForwardBatch(write_rows, scratch[: write_rows.numel()], gather, min(lens) == n, t_len)
                try:
                    _, states = forward_with_cache(self.model, input_ids, positions, mask, self.cache, 1,
                                                   hidden_states=True)
                finally:
                    self.cache.batch = None
                hidden = torch.cat([states[i] for i in self.aux_layers], -1)
        return [hidden[i, n - k:] for i, k in enumerate(lens)]

    def _run(self, rows: list[RowInput], starts: list[int], bs: int, aux: list | None = None,
             tail: torch.Tensor | None = None) -> list[torch.Tensor]:
        dev = self.device
        lens = [len(r.token_ids) for r in rows]
        n = max(lens)
        ends = [s + k for s, k in zip(starts, lens)]
        t_len = max(ends)
        all_real = all(k == n for k in lens)

        ids = [[0] * (n - len(r.token_ids)) + r.token_ids for r in rows]
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)  # [B, N]
        if tail is not None:
            dst, src = _tail_index(rows, n, tail.shape[1])
            _put_tail(input_ids, tail, *(None if f is None else torch.tensor(f, dtype=torch.long, device=dev)
                                         for f in (dst, src)))
        start_t = torch.tensor(starts, dtype=torch.long, device=dev)
        pad_t = torch.tensor([n - k for k in lens], dtype=torch.long, device=dev)
        q_idx = torch.arange(n, device=dev)
        positions = start_t[:, None] + q_idx[None, :] - pad_t[:, None]  # [B, N]; < start on padding
        real_q = q_idx[None, :] >= pad_t[:, None]  # [B, N]
        position_ids = torch.where(real_q, positions, torch.zeros_like(positions))

        max_blocks = -(-t_len // bs)
        tables = [self.blocks.tables[r.seq_id].blocks for r in rows]
        table_t = torch.tensor([t + [t[0]] * (max_blocks - len(t)) for t in tables], dtype=torch.long, device=dev)
        k_pos = torch.arange(t_len, device=dev)
        gather = table_t[:, k_pos // bs] * bs + (k_pos % bs)[None, :]  # [B, T]

        flat_slots = torch.gather(gather, 1, position_ids)  # [B, N] slot of each query token
        write_rows = real_q.reshape(-1).nonzero().squeeze(1)
        write_slots = flat_slots.reshape(-1).index_select(0, write_rows)

        mask = self._mask(positions, real_q, k_pos)

        self.cache.batch = ForwardBatch(write_rows, write_slots, gather, all_real, t_len)
        keep = max(r.num_logits for r in rows)
        try:
            out = forward_with_cache(self.model, input_ids, position_ids, mask, self.cache, keep,
                                     hidden_states=aux is not None)
        finally:
            self.cache.batch = None
        if aux is not None:
            logits, hidden = out
            aux.append(torch.cat([hidden[i] for i in self.aux_layers], -1))  # hidden[i]: the input of layer i
        else:
            logits = out
        logits = logits[..., : self.vocab_size].float()  # [B, keep, V]
        return [logits[i, keep - r.num_logits :] for i, r in enumerate(rows)]

    def _mask(self, positions: torch.Tensor, real_q: torch.Tensor, k_pos: torch.Tensor
              ) -> torch.Tensor | dict[str, torch.Tensor]:
        """transformers' additive mask ``[B, 1, N, T]`` for queries at ``positions`` ``[B, N]`` (``real_q``: False on
        padding) over key positions ``k_pos``: a query sees the keys up to its own position; a sliding-window model's
        as ``_sliding`` makes it."""
        allowed = (k_pos[None, None, :] <= positions[:, :, None]) & real_q[:, :, None]  # [B, N, T]
        allowed[:, :, 0] |= ~real_q  # padding queries see one harmless key, never a fully masked row
        dtype = self.pool.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=positions.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        mask = mask[:, None, :, :]  # [B, 1, N, T]
        if self.window is not None:
            mask = self._sliding(mask, allowed, positions, k_pos, real_q)
        return mask

    def _sliding(self, mask: torch.Tensor, allowed: torch.Tensor, positions: torch.Tensor, k_pos: torch.Tensor,
                 real_q: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """The mask of a sliding-window model: a query sees the keys of the last ``window`` positions, its own
        included (transformers' ``kv_idx > q_idx - sliding_window``). A model whose layers differ (Gemma 2 / 3,
        Qwen2 with some sliding layers) takes the mapping its modeling code builds itself from layer types, so each
        layer reads its own; one whose every layer slides (Mistral, Phi-3) takes the one mask. Padding queries
        keep seeing their one harmless key."""
        near = (k_pos[None, None, :] > positions[:, :, None] - self.window) | ~real_q[:, :, None]
        sliding = torch.zeros_like(mask).masked_fill_(~(allowed & near)[:, None], torch.finfo(mask.dtype).min)
        return {"full_attention": mask, "sliding_attention": sliding} if self.window_layered else sliding

    def _run_lean(self, rows: list[RowInput], starts: list[int], bs: int, aux: list | None = None,
                  tail: torch.Tensor | None = None) -> list[torch.Tensor]:
        dev = self.device
        b = len(rows)
        lens = [len(r.token_ids) for r in rows]
        n = max(lens)
        ends = [s + k for s, k in zip(starts, lens)]
        t_len = max(ends)
        keep = max(r.num_logits for r in rows)
        aux_layers = self.aux_layers if aux is not None else None
        g = None
        key = self.graphs.graph_key(b, n, t_len, aux_layers, keep) if self.graphs is not None else None
        if key is not None:
            try:
                g = self.graphs.graph(key)
            except Exception:
                if self.graphs.failed is None:
                    raise
        # a graph's rows and tokens buckets: its inputs are built padded to them, and land in them in one copy
        rb, nt = g.input_ids.shape if g is not None else (b, n)
        scratch = self.pool.scratch_slot
        # host work is O(new tokens): ids, positions and write slots of the new tokens only
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        table_rows: list[int] = []
        for row, start, k in zip(rows, starts, lens):
            blocks = self.blocks.tables[row.seq_id].blocks
            table_rows.append(self.tables.sync(row.seq_id, blocks))
            pad = nt - k
            ids += [0] * pad + row.token_ids
            positions += [0] * pad + list(range(start, start + k))
            slots += [scratch] * pad + [blocks[p // bs] * bs + p % bs for p in range(start, start + k)]
        if rb > b:  # a graph's padding rows: position 0, the scratch slot, any live row's table (they write nothing)
            ids += [0] * ((rb - b) * nt)
            positions += [0] * ((rb - b) * nt)
            slots += [scratch] * ((rb - b) * nt)
            table_rows += [table_rows[0]] * (rb - b)
        dst, src = _tail_index(rows, nt, tail.shape[1]) if tail is not None else (None, None)
        m = len(dst) if dst is not None else 0
        values = ids + positions + slots + (dst or []) + (src or []) + table_rows + self.tables.pending()
        # the tables' changes last (``read``)
        meta = (self.graphs.load(g, values) if g is not None
                else torch.tensor(values, dtype=torch.long).to(dev, non_blocking=True))
        cells = rb * nt
        # a graph reads its own input (``meta`` is a view of it, or a copy where the values overflowed the staging: the
        # draft's tail then goes to the graph's input all the same)
        input_ids = g.input_ids if g is not None else meta[:cells].view(rb, nt)
        if tail is not None:
            at = 3 * cells
            _put_tail(input_ids[:b], tail, None if dst is None else meta[at: at + m], meta[at + m: at + 2 * m])
        pos_t = meta[cells: 2 * cells].view(rb, nt)
        slot_t = meta[2 * cells: 3 * cells]
        table = self.tables.read(meta, 3 * cells + 2 * m, rb, g.table if g is not None else None)  # [B, blocks]
        logits = None
        if g is not None:
            out = self.graphs.replay(g, b, n, keep)
            if aux is None:
                logits = out
            else:
                logits, hidden = out
                aux.append(hidden)
        if logits is None:
            mask = None
            causal = b == 1 and n > 1 and starts[0] == 0
            if not causal and (n > 1 or min(ends) < t_len):  # a lone decode row (or equal-length rows) sees every key
                mask = causal_mask(pos_t, t_len)
            run = self.tables.run_slot(rows[0].seq_id, t_len, bs) if b == 1 else None
            gather = key_slots(table, t_len, bs).reshape(-1) if run is None else None
            # a sliding-window model's sliding layers read their window's keys only
            batch = self.lean.window_batch(AttnBatch(slot_t, gather, mask, t_len, causal, run=run), table, pos_t, bs)
            if aux is None:
                logits = self.lean.forward(input_ids, pos_t, batch, self.pool, keep)
            else:
                logits, hidden = self.lean.forward(input_ids, pos_t, batch, self.pool, keep, self.aux_layers)
                aux.append(hidden)
        logits = logits[..., : self.vocab_size].float()  # [B, keep, V]
        return [logits[i, keep - r.num_logits:] for i, r in enumerate(rows)]

    @torch.inference_mode()
    def draft_chain(self, seq_ids: list[int], first: torch.Tensor, steps: int, sampling=None
                    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """A draft's steps + 1 draws and its forwards 2..K in one CUDA graph replay (``GraphRunner.replay_chain``): each
        row draws its first token from ``first`` (``[B, V]``: its logits after its cached tokens, on the device),
        feeds it after its cached tokens, then draws from what it gets, ``steps`` times; greedy, or as ``sampling``
        (a ``cuda_graphs.ChainSampling`` of the rows, keyed per draw) says. Returns the ``[B, steps + 1]`` tokens and
        the draft distributions (None when greedy) on the device, their K/V written and committed like a forward's;
        None where no graph runs this chain (not on CUDA, a shape not captured yet): the caller drafts step by step."""
        g = self.graphs
        if g is None or g.failed is not None or steps < 1:
            return None
        t0 = time.perf_counter()
        bs, b = self.blocks.block_size, len(seq_ids)
        starts = [self.cached_len(s) for s in seq_ids]
        from engine.cuda_graphs import ChainSampling

        key = g.chain_key(b, steps, max(starts) + steps, self.vocab_size, ChainSampling.mode(sampling))
        if key is None:
            return None
        grown: list[tuple[int, int]] = []
        try:
            c = g.chain(key)
            r = c.start.shape[0]  # its rows bucket: padding rows at position 0, writing the scratch slot
            per_row: list[list[int]] = []
            table_rows: list[int] = []
            for seq_id, start in zip(seq_ids, starts):
                self.pool.copy_blocks(self.blocks.prepare_append(seq_id, steps))
                grown.append((seq_id, start))
                blocks = self.blocks.tables[seq_id].blocks
                table_rows.append(self.tables.sync(seq_id, blocks))
                per_row.append([blocks[p // bs] * bs + p % bs for p in range(start, start + steps)])
            pad = [self.pool.scratch_slot] * (r - b)
            slots = [x for s in range(steps) for x in [row[s] for row in per_row] + pad]  # [S, R]
            meta = g.load(c, starts + [0] * (r - b) + slots + table_rows + [table_rows[0]] * (r - b)
                          + self.tables.pending())
            self.tables.read(meta, r + r * steps, r, c.table)
            out = g.replay_chain(c, first, self.vocab_size, sampling)
        except BaseException:
            for seq_id, start in grown:
                self.blocks.truncate(seq_id, start)
            if g.failed is not None:  # the capture failed: draft step by step from now on
                return None
            raise
        for seq_id, start in grown:
            self.blocks.commit(seq_id, start + steps)
        self.last_forward_s = time.perf_counter() - t0  # launched: the caller's copy of the tokens waits for them
        return out

    # ------------------------------------------------------------- lifecycle
    def truncate(self, seq_id: int, num_tokens: int) -> None:
        if seq_id in self.blocks.tables:
            self.blocks.truncate(seq_id, num_tokens)

    def free(self, seq_id: int) -> None:
        self.blocks.free(seq_id)
        if self.lean is not None:
            self.tables.release(seq_id)
