"""The EAGLE-3 proposer: a one-layer head over the target's own hidden states drafts K tokens.

Features. Rows of requests that may draft with the head (``Request.use_eagle``) ask the target for its aux
hidden states (``RowInput.aux``); the target runner hands them to :meth:`EagleProposer.receive` after
each forward, prefill and verification alike. They wait here, raw, until the head reads them: the head's
input at position t is (feature f_t, token x_{t+1}), so a request with N tokens can feed pairs up to
N - 2, whose features the verification of the previous step has produced.

State per request, rolled back exactly: the head's paged KV cache holds real pairs only (the chain of
a draft, which feeds the head its own outputs, is dropped from the cache as soon as the draft is
made), and the waiting features are cut to the verified tokens.

Shared prompts. The head's cache shares full blocks of prompt pairs between requests as the target's
shares prompt blocks (keyed by the pairs' tokens). Where the target found a prefix in its cache that
the head did not (a prompt first read by a request that did not draft with the head), no features
were made for it: the head has the target compute them again from its cache when it reads those pairs
(``_inputs_many``), as it does for the tokens of steps whose rows asked for none (``StepPlanner.features``).
Exactness never depends on the head; only acceptance does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.attention import AttnBatch, causal_mask, eager_attention, key_slots
from engine.block_manager import BlockManager
from engine.block_tables import DeviceBlockTables
from engine.devices import to_device
from engine.eagle.head import EagleHead
from engine.kv_pool import KVPool, KVShape
from engine.model_runner import ModelRunner
from engine.proposers.base import Proposal, StepRows
from engine.proposers.draft_model import NORMAL_BEHIND
from engine.sampler import draft_draw

if TYPE_CHECKING:
    from engine.sequence import Request

logger = logging.getLogger(__name__)

CATCH_UP = 512  # pairs per head forward while catching up (a long prompt)
COMPACT_PARTS = 16  # verifications' feature tensors a request holds before they are joined (``_Features``)
MAX_WAITING = 256  # features a request may hold unread before the head reads them (auto rows drafting otherwise)


class _Features:
    """A request's waiting features, positions ``first`` .. ``first + n - 1``: the verifications' feature tensors as they
    came (views; ``skip`` rows of the first one already read), joined into one tensor when read or every COMPACT_PARTS
    of them. A row that drafts with the head reads one verification's features a step: a view, no copy. A buffer that
    copied each step's features in (one copy kernel per row and step) made an adaptive batch's plain steps on an H200
    0.2 ms slower than plain requests' (8 rows, demo pair: 2.2 against 2.0 ms), and a ``torch.cat`` of the waiting rows
    and the new ones at every verification took 0.18 ms a step at 8 rows on the 2-core CPU."""

    __slots__ = ("first", "parts", "skip", "n", "size")

    def __init__(self, first: int, aux: torch.Tensor) -> None:
        self.first, self.parts, self.skip, self.n = first, [aux], 0, aux.shape[0]
        self.size = self.n  # rows in the parts, read ones (``skip``) and rolled-back ones included

    def rows(self) -> torch.Tensor:
        """The waiting features ``[n, 3H]`` (a view: read it before the next ``put``)."""
        self._keep(self.skip + self.n)
        if len(self.parts) > 1:
            self.parts = [torch.cat(self.parts)]
        return self.parts[0][self.skip: self.skip + self.n]

    def put(self, start: int, aux: torch.Tensor) -> None:
        """Features from position ``start`` (``first <= start <= first + n``) on: later ones are replaced."""
        keep = start - self.first
        self._keep(self.skip + keep)
        self.parts.append(aux)
        self.n = keep + aux.shape[0]
        self.size += aux.shape[0]
        if len(self.parts) > COMPACT_PARTS:  # a row that does not draft with the head: its steps' tensors, joined
            self.parts = [torch.cat(self.parts)[self.skip:]]
            self.size -= self.skip
            self.skip = 0

    def drop(self, cut: int) -> None:
        """The first ``cut`` features were read into the head's cache."""
        self.first, self.n, self.skip = self.first + cut, self.n - cut, self.skip + cut
        while len(self.parts) > 1 and self.skip >= self.parts[0].shape[0]:
            gone = self.parts.pop(0).shape[0]
            self.skip -= gone
            self.size -= gone
        if self.skip >= 64 and 2 * self.skip >= self.parts[0].shape[0]:  # most of a long part read (a prompt's)
            self.parts[0] = self.parts[0][self.skip:].clone()  # keep its rest, not all of it
            self.size -= self.skip
            self.skip = 0

    def _keep(self, total: int) -> None:
        """Keep the first ``total`` rows of the parts (those past them were rolled back). Nothing to cut (a plain
        step appending after what waits, the common case): returns at once. Else the parts are cut from the end: the
        rolled-back rows are the last verification's, in the last part or two. Walking every part at every
        verification took ~12 us a row and step on the 2-core CPU (8 rows: 0.1 ms a step, the gap between an adaptive
        row's plain step and a plain request's on an H200); after drafting steps, whose rejected positions leave rows
        to cut at every step, the walk from the first part still took ~2.6 us a row and step there."""
        if total >= self.size:
            return
        parts, size = self.parts, self.size
        while len(parts) > 1 and size - parts[-1].shape[0] >= total:
            size -= parts.pop().shape[0]
        if size > total:  # the last part kept in part (the first one, emptied, keeps the width)
            last = parts[-1]
            parts[-1] = last[: last.shape[0] - (size - total)]
        self.size = total


class EagleProposer:
    name = "eagle"

    def __init__(self, head: EagleHead, target: ModelRunner, num_blocks: int | None = None):
        self.head = head
        self.target = target
        self.device = target.device
        self.backlog = 0
        self.vocab_size = target.vocab_size
        cfg = head.cfg
        bs = target.blocks.block_size
        n_blocks = num_blocks or 2 * target.blocks.num_blocks  # one layer: cheap; room for unshared prefixes
        self.blocks = BlockManager(n_blocks, bs)
        self.pool = KVPool(n_blocks, bs, KVShape(1, cfg.num_key_value_heads, cfg.head_dim), head.fc.weight.dtype,
                           self.device)
        self.pool.allocate(cfg.num_key_value_heads, cfg.head_dim)
        max_ctx = n_blocks * bs
        ctx = getattr(target.model.config, "max_position_embeddings", 2048) or 2048
        self.tables = DeviceBlockTables(-(-ctx // bs) + 1, self.pool.scratch_block, self.device)
        head.ensure_positions(min(ctx, max_ctx) + 2 * bs)
        head.prepare_inference()
        layers = getattr(target.model.config, "num_hidden_layers", None)
        target.aux_layers = head.layer_ids(layers)
        target.aux_sink = self.receive
        ids = head.draft_to_target
        never = (ids >= self.vocab_size).to(self.device)  # ids past the tokenizer's vocabulary are never drafted
        self._never = never if bool(never.any()) else None  # their logits are masked to -inf (None: every id drafts)
        # draft id -> target id (those never drafted at the last id: a draw's q over the target vocabulary holds them
        # at weight 0, sampler.draft_draw)
        self._ids = ids.to(self.device).clamp(max=self.vocab_size - 1)
        self._waiting: dict[int, _Features] = {}  # seq_id -> its features the head has not read
        self._to_read: dict[int, Request] = {}  # seq_id -> request: more than MAX_WAITING features waiting
        self._shared: set[int] = set()  # seq_ids whose prompt pairs are registered for prefix sharing
        self.cost_prior = _param_ratio(head, target.model)  # a draft step's cost in target steps, until measured
        self._graphs = _HeadChains(self, max_ctx) if target.graphs is not None else None  # CUDA: drafting chains

    # ------------------------------------------------------------------ features from the target
    def receive(self, seq_id: int, start: int, aux: torch.Tensor) -> None:
        """The target's aux states ``[n, 3H]`` at positions start..start+n-1 (called by the target runner)."""
        held = self._waiting.get(seq_id)
        if held is not None and held.first <= start <= held.first + held.n:
            held.put(start, aux)
        else:
            self._waiting[seq_id] = _Features(start, aux)

    # ------------------------------------------------------------------ the protocol
    def propose(self, rows: StepRows) -> Proposal:
        b, kmax = len(rows.reqs), max(rows.ks, default=0)
        lists: list[list[int]] = [[] for _ in range(b)]
        if kmax == 0:
            return Proposal(lists, None)
        self.backlog = sum(max(0, self.behind(r) - NORMAL_BEHIND) for r in rows.reqs)
        self._catch_up(rows.reqs)
        drafting = [i for i in range(b) if rows.ks[i] > 0]
        inputs = dict(zip(drafting, self._inputs_many([(rows.reqs[i], None, None) for i in drafting])))
        self._share_prompts([rows.reqs[i] for i, got in inputs.items() if got is not None])
        ready = [i for i, got in inputs.items() if got is not None]
        sampled = [i for i in ready if not rows.reqs[i].params.greedy]
        keep_q = any(rows.reqs[i].params.seed is None for i in sampled)
        q = torch.zeros(b, kmax, self.vocab_size, device=self.device) if keep_q else None
        keys = rows.draw_keys(sampled, kmax) if sampled else None
        slot = {i: n for n, i in enumerate(sampled)}
        real_len = {i: rows.reqs[i].num_tokens - 1 for i in ready}  # pairs with the target's own features
        feed = [(rows.reqs[i].seq_id, *inputs[i]) for i in ready]
        active = ready
        chain: _Chain | None = None
        try:
            for j in range(kmax):
                if not active:
                    break
                # step 0 reads the real pairs; each later step one pair of the chain per row (its own last output)
                out = self._forward(feed) if j == 0 else self._chain_forward(chain, active, feed, j)  # [A, D]
                nxt = [n for n, i in enumerate(active) if rows.ks[i] > j + 1]
                if nxt and chain is None:
                    cont = [active[n] for n in nxt]
                    chain = self._chain(cont, [rows.reqs[i].seq_id for i in cont], [real_len[i] for i in cont],
                                        [rows.ks[i] - 1 for i in cont])
                    if len(cont) == len(active) and len({rows.ks[i] for i in cont}) == 1:
                        rest = self._graphed(rows, cont, chain, out, slot, keys)
                        if rest is not None:  # every draw and steps 2..K ran as one CUDA graph
                            drawn, probs = rest
                            if len(cont) == b:  # every row: its tokens stay on the device (Proposal.drafted)
                                return Proposal(None, probs if q is not None else None, drafted=drawn)
                            for i, toks in zip(cont, drawn.tolist()):
                                lists[i] += toks
                            if q is not None and probs is not None:
                                q[torch.tensor(cont, device=self.device), : probs.shape[1]] = probs
                            break
                drawn = self._draw(out, [rows.reqs[i] for i in active], [slot.get(i) for i in active], keys, j,
                                   rows, q, active)
                tokens = drawn.tolist()
                for i, t in zip(active, tokens):
                    lists[i].append(t)
                if not nxt:
                    break
                feed = (out if len(nxt) == len(active) else out[torch.tensor(nxt, device=self.device)],
                        [tokens[n] for n in nxt])
                active = [active[n] for n in nxt]
        finally:
            for i, n in real_len.items():  # the chain's own entries never stay in the cache
                self._truncate(rows.reqs[i].seq_id, n)
        return Proposal(lists, q)

    @property
    def chains(self) -> bool:
        """Whether drafting runs as one CUDA graph (``_graphed``); see spec_decode._one_k."""
        g = self._graphs
        return g is not None and g.failed is None

    def fits(self, plan: dict[Request, int]) -> bool:
        need = 0
        for req, k in plan.items():
            if k:
                need += self._blocks_for(req.seq_id, req.num_tokens - 1 - self._cached(req.seq_id) + k - 1)
        return need <= self.blocks.num_free

    def behind(self, req: Request) -> int:
        return max(0, req.num_tokens - 1 - self._cached(req.seq_id))

    def rollback(self, req: Request, num_tokens: int) -> None:
        """Keep pairs and features of the verified tokens (position < num_tokens - 1 for pairs, < num_tokens
        for features); list the request for ``read_waiting`` where its features piled up while it decoded otherwise."""
        self._truncate(req.seq_id, max(0, num_tokens - 1))
        held = self._waiting.get(req.seq_id)
        if held is None:
            return
        held.n = min(held.n, max(0, num_tokens - held.first))
        if held.n > MAX_WAITING:
            self._to_read[req.seq_id] = req

    @property
    def reads_waiting(self) -> bool:
        """Whether requests hold more than MAX_WAITING unread features (``read_waiting``)."""
        return bool(self._to_read)

    def read_waiting(self) -> None:
        """Read the features that piled up past MAX_WAITING for requests drafting otherwise (``rollback`` lists them),
        all such rows in one forward of up to MAX_WAITING / 2 pairs each, where the head's cache has room. The engine
        runs it as deferred work (``LLMEngine._defer``): on a GPU it overlaps the next step's verification. Read in the
        step, one row at a time, the head's eager forwards were most of what the default's steps cost over the draft
        model's alone at 8 clients on an H100 (demo pair, K = 6: 2.42 against 2.35 ms a step; 2.31 against 2.30 after)."""
        rows, self._to_read = list(self._to_read.values()), {}
        rows = [r for r in rows if r.seq_id in self._waiting  # not released since (finished, preempted)
                and self._blocks_for(r.seq_id, r.num_tokens - 1 - self._cached(r.seq_id)) <= self.blocks.num_free]
        if rows:
            self._catch_up(rows, chunk=MAX_WAITING // 2)

    def release(self, req: Request) -> None:
        self._waiting.pop(req.seq_id, None)
        self._to_read.pop(req.seq_id, None)
        self._shared.discard(req.seq_id)
        self.blocks.free(req.seq_id)
        self.tables.release(req.seq_id)

    def time_step(self, context: int, reps: int = 5, seq_id: int = -1) -> float:
        """Median seconds of one greedy draft step (one pair of a drafting chain in, a token out) after ``context``
        pairs, over ``reps`` steps on a scratch sequence that is freed again (warm-up's cost measurement)."""
        feats = torch.zeros(context, 3 * self.head.cfg.target_hidden_size, dtype=self.pool.dtype, device=self.device)
        times = []
        try:
            out = self._forward([(seq_id, [1] * context, feats)])
            chain = self._chain([0], [seq_id], [context], [reps + 1])
            for j in range(1, reps + 2):  # the first step warms up
                t0 = time.perf_counter()
                out = self._chain_forward(chain, [0], (out, [1]), j)
                self._ids[self.head.logits(out).argmax(-1)].tolist()
                times.append(time.perf_counter() - t0)
            return sorted(times[1:])[len(times[1:]) // 2]
        finally:
            self.blocks.free(seq_id)
            self.tables.release(seq_id)

    # ------------------------------------------------------------------ internals
    def _cached(self, seq_id: int) -> int:
        t = self.blocks.tables.get(seq_id)
        return 0 if t is None else t.num_tokens

    def _blocks_for(self, seq_id: int, num_new: int) -> int:
        t = self.blocks.tables.get(seq_id)
        have = 0 if t is None else len(t.blocks)
        return max(0, self.blocks.blocks_needed(self._cached(seq_id) + max(0, num_new)) - have)

    def _truncate(self, seq_id: int, n: int) -> None:
        """Keep pairs < n, and no block past them (a chain's room is reserved before its pairs are written)."""
        t = self.blocks.tables.get(seq_id)
        if t is not None and (t.num_tokens > n or len(t.blocks) > self.blocks.blocks_needed(n)):
            self.blocks.truncate(seq_id, n)

    @staticmethod
    def _pair_keys(ids: list[int]) -> list[tuple[int, int]]:
        """What the head's entry at position t depends on, as prefix-cache keys: (x_t, x_{t+1}); the hash
        chain over them covers x_0..x_{t+1}, exactly the tokens behind the pair (f_t, x_{t+1})."""
        return list(zip(ids[:-1], ids[1:]))

    def _attach(self, req: Request) -> None:
        """A request the head has not seen starts from the full blocks of its prompt's pairs that another
        request left in the head's cache (as the target shares prompt blocks)."""
        if req.seq_id not in self.blocks.tables:
            self.blocks.allocate(req.seq_id)
            self.blocks.match_prefix(req.seq_id, self._pair_keys(req.prompt_ids))

    def _share_prompts(self, reqs: list[Request]) -> None:
        """Register the head's blocks of a prompt's pairs, once they are read, for later requests to share."""
        for req in reqs:
            sid = req.seq_id
            if sid not in self._shared and self._cached(sid) >= len(req.prompt_ids) - 1:
                self.blocks.register_prefix(sid, self._pair_keys(req.prompt_ids))
                self._shared.add(sid)

    def _inputs_many(self, wanted: list[tuple[Request, int | None, int | None]]) -> list:
        """For each (request, upto, chunk): (tokens, raw features) of the pairs the head has not read, up to pair
        ``upto`` (default: the last pair, N - 2) and at most ``chunk`` of them; None where the target has not read
        those tokens yet. Features the target did not hand over (a prompt prefix it found
        in its prefix cache, steps whose rows asked for none: ``StepPlanner.features``) are computed again from its
        cache, every row's in one forward (``ModelRunner.cached_features``). Read with zero features in their place,
        such a gap cut the head's acceptance for the rest of the request: on the 2-core CPU (demo pair, greedy, K = 4)
        from 0.68 to 0.13 after 64 tokens drafted with the draft model without features, and from 0.70 to 0.31 after a
        32-48 token prompt prefix the target had cached."""
        out: list = []
        parts: list[list] = []  # per request: its feature pieces, tensors or indices into ``missing``
        missing: list[tuple[int, int, list[int]]] = []  # (seq_id, start, token ids) to compute again
        for req, upto, chunk in wanted:
            self._attach(req)
            upto = req.num_tokens - 2 if upto is None else upto
            h = self._cached(req.seq_id)
            if chunk is not None:
                upto = min(upto, h + chunk - 1)
            held = self._waiting.get(req.seq_id)
            covered = held is not None and held.first <= h and upto < held.first + held.n
            if upto < h or (not covered and self.target.cached_len(req.seq_id) <= upto):
                out.append(None)
                parts.append([])
                continue
            out.append(req.all_ids[h + 1: upto + 2])
            if covered:
                parts.append([held.rows()[h - held.first: upto + 1 - held.first]])  # the common case: a view
                continue
            # positions h..upto: the waiting features where they lie among them (a..b - 1), the rest computed again
            lo, hi = h, upto + 1
            a = b = hi
            have = None
            if held is not None and held.first < hi and held.first + held.n > lo:
                a, b = max(lo, held.first), min(hi, held.first + held.n)
                have = held.rows()[a - held.first: b - held.first]
            pieces: list = []  # in position order: a missing front, the waiting part, a missing back
            if a > lo:
                missing.append((req.seq_id, lo, req.all_ids[lo:a]))
                pieces.append(len(missing) - 1)
            if have is not None:
                pieces.append(have)
            if hi > b:
                missing.append((req.seq_id, b, req.all_ids[b:hi]))
                pieces.append(len(missing) - 1)
            parts.append(pieces)
        computed = self.target.cached_features(missing) if missing else []
        for n, pieces in enumerate(parts):
            if out[n] is not None:
                feats = [computed[p] if isinstance(p, int) else p for p in pieces]
                out[n] = (out[n], feats[0] if len(feats) == 1 else torch.cat(feats))
        return out

    def _consume(self, seq_id: int, upto: int) -> None:
        """Features of positions <= upto are in the head's cache now: drop them."""
        held = self._waiting.get(seq_id)
        if held is not None:
            held.drop(min(held.n, max(0, upto + 1 - held.first)))

    def _catch_up(self, reqs: list[Request], upto: int | None = None, chunk: int = CATCH_UP) -> None:
        """Read long runs of waiting pairs (a prompt) in forwards of at most ``chunk`` pairs, so that the
        draft's first forward reads no more than that either."""
        while True:
            due = [(r, last, chunk) for r in reqs
                   if (last := r.num_tokens - 2 if upto is None else upto) - self._cached(r.seq_id) + 1 > chunk]
            feed = [(r.seq_id, *got) for (r, _, _), got in zip(due, self._inputs_many(due)) if got is not None]
            if not feed:
                return
            self._forward(feed)

    def read_prompts(self, reqs: list[Request]) -> None:
        """Read the waiting pairs of just-prefilled requests but their last one (a drafting step's first forward reads
        it), where the head's cache has room: their first drafting step then reads what a normal step does."""
        reqs = [r for r in reqs if self._blocks_for(r.seq_id, r.num_tokens - 2 - self._cached(r.seq_id))
                <= self.blocks.num_free]
        self._catch_up(reqs, chunk=CATCH_UP)
        got = self._inputs_many([(r, r.num_tokens - 3, None) for r in reqs])
        feed = [(r.seq_id, *g) for r, g in zip(reqs, got) if g is not None]
        if feed:
            self._forward(feed)

    def _forward(self, rows: list[tuple[int, list[int], torch.Tensor]]) -> torch.Tensor:
        """Feed each row's real pairs (seq_id, tokens, the target's raw features) after its cached ones; return the
        pre-norm output at each row's last pair ``[B, D]``. The features are fused in one GEMM for all rows (the
        drafting chain's own pairs go through ``_chain_forward``)."""
        dev, bs, head = self.device, self.blocks.block_size, self.head
        b = len(rows)
        lens = [len(t) for _, t, _ in rows]
        n = max(lens)
        starts = [self._cached(s) for s, _, _ in rows]
        fused = head.fuse(torch.cat([f for _, _, f in rows])).split([f.shape[0] for _, _, f in rows])
        d = head.cfg.hidden_size
        feats = torch.zeros(b, n, d, dtype=self.pool.dtype, device=dev)
        ids, positions, slots, table_rows = [], [], [], []
        grown = []
        try:
            for i, ((seq_id, toks, _), start, k) in enumerate(zip(rows, starts, lens)):
                feats[i, n - k:] = fused[i]
                if seq_id not in self.blocks.tables:
                    self.blocks.allocate(seq_id)
                self.blocks.prepare_append(seq_id, k)
                grown.append((seq_id, start))
                blocks = self.blocks.tables[seq_id].blocks
                table_rows.append(self.tables.sync(seq_id, blocks))
                ids += [0] * (n - k) + toks
                positions += [0] * (n - k) + list(range(start, start + k))
                slots += [self.pool.scratch_slot] * (n - k) + [blocks[p // bs] * bs + p % bs
                                                               for p in range(start, start + k)]
            meta = torch.tensor(ids + positions + slots + table_rows + self.tables.pending(), dtype=torch.long).to(
                dev, non_blocking=True)
            ids_t, pos_t = meta[: b * n].view(b, n), meta[b * n: 2 * b * n].view(b, n)
            t_len = max(s + k for s, k in zip(starts, lens))
            table = self.tables.read(meta, 3 * b * n, b)
            # only each row's last pair is a query (forward_paged's last_only): it sees every key of a row that
            # reaches the longest, so a mask is needed only where rows end apart
            needs_mask = min(s + k for s, k in zip(starts, lens)) < t_len
            run = self.tables.run_slot(rows[0][0], t_len, bs) if b == 1 else None  # one row: read in place
            gather = key_slots(table, t_len, bs).reshape(-1) if run is None else None
            batch = AttnBatch(meta[2 * b * n: 3 * b * n], gather,
                              causal_mask(pos_t[:, -1:], t_len) if needs_mask else None, t_len, run=run)
            with torch.inference_mode(), eager_attention(dev):
                out = head.forward_paged(ids_t, feats, pos_t, batch, self.pool.keys[0], self.pool.values[0],
                                         last_only=True)
        except BaseException:
            for seq_id, start in grown:
                self.blocks.truncate(seq_id, start)
            raise
        for (seq_id, _, _), start, k in zip(rows, starts, lens):
            self.blocks.commit(seq_id, start + k)
            self._consume(seq_id, start + k - 1)
        return out[:, -1]

    def _chain(self, idx: list[int], seq_ids: list[int], starts: list[int], steps: list[int]) -> _Chain:
        """Room for the chain of drafting steps 1..K-1 of rows ``idx`` (``steps`` pairs per row from position
        ``starts``), reserved at once, and every key slot the chain will read: a chain step then needs no block
        bookkeeping, table sync or gather index of its own."""
        bs = self.blocks.block_size
        for sid, n in zip(seq_ids, steps):
            self.blocks.prepare_append(sid, n)  # (no copy-on-write: the head's blocks are never forked)
        table_rows = [self.tables.sync(sid, self.blocks.tables[sid].blocks) for sid in seq_ids]
        longest = max(s + n for s, n in zip(starts, steps))
        meta = torch.tensor(table_rows + self.tables.pending(), dtype=torch.long).to(self.device)
        table = self.tables.read(meta, 0, len(table_rows))
        return _Chain({i: n for n, i in enumerate(idx)}, seq_ids, [self.blocks.tables[sid].blocks for sid in seq_ids],
                      starts, key_slots(table, longest, bs), torch.arange(longest, device=self.device))

    def _chain_forward(self, chain: _Chain, active: list[int], feed: tuple[torch.Tensor, list[int]], j: int
                       ) -> torch.Tensor:
        """Drafting step ``j`` >= 1 of rows ``active`` (a subset of the chain's, in its order): each feeds its
        last output and token at position real_len + j - 1. Returns the new outputs ``[A, D]``."""
        feats, tokens = feed
        bs, a = self.blocks.block_size, len(active)
        at = [chain.index[i] for i in active]
        pos = [chain.start[c] + j - 1 for c in at]
        slots = [chain.blocks[c][p // bs] * bs + p % bs for c, p in zip(at, pos)]
        meta = torch.tensor(tokens + pos + slots, dtype=torch.long).to(self.device, non_blocking=True)
        pos_t = meta[a: 2 * a].view(a, 1)
        t_len = max(pos) + 1
        run = self.tables.run_slot(chain.seq_ids[at[0]], t_len, bs) if a == 1 else None  # one row: read in place
        keys = None
        if run is None:
            keys = chain.keys[:, :t_len] if a == len(chain.seq_ids) else \
                chain.keys.index_select(0, torch.tensor(at, device=self.device))[:, :t_len]
            keys = keys.reshape(-1)
        mask = (chain.arange[:t_len][None, :] <= pos_t).view(a, 1, 1, t_len) if min(pos) < t_len - 1 else None
        batch = AttnBatch(meta[2 * a:], keys, mask, t_len, run=run)
        with torch.inference_mode(), eager_attention(self.device):
            out = self.head.forward_paged(meta[:a].view(a, 1), feats.view(a, 1, -1), pos_t, batch,
                                          self.pool.keys[0], self.pool.values[0])
        for c, p in zip(at, pos):
            self.blocks.commit(chain.seq_ids[c], p + 1)
        return out[:, -1]

    def _graphed(self, rows: StepRows, cont: list[int], chain: _Chain, feats: torch.Tensor, slot: dict[int, int],
                 keys: list[list[int]] | None) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Every draw of the chain rows ``cont`` (all the step's rows, one K) and drafting steps 2..K as one CUDA graph
        replay (``_HeadChains``), the first draw from ``feats`` (step 1's outputs ``[C, D]``): each step feeds the
        head its own last output and the token it drew from it, with no host round trip (step by step, each step is a
        host-built batch, the head's kernels launched one by one, a sync and a host copy of its tokens). Greedy rows
        take the argmax; sampled rows race over the head's distribution spread over the target vocabulary, as
        ``_draw`` does, and the chain writes their q. Returns the ``[C, K]`` tokens and, when some row samples, q
        ``[C, K, V]``, on the device; None where it does not run (not CUDA, a shape met the first time, a failed
        capture, more sampled rows than sampled chains take): the caller draws step by step."""
        g = self._graphs
        if g is None or g.failed is not None:
            return None
        from engine.cuda_graphs import ChainSampling

        k = rows.ks[cont[0]]
        sampling = None
        if slot:
            sampling = ChainSampling.of_rows(rows.rp.select(cont), [keys[slot[i]][:k] if i in slot else [0] * k
                                                                    for i in cont], self.vocab_size)
            if sampling is None:
                return None
        c, steps = len(chain.seq_ids), k - 1
        key = g.key(c, steps, chain.keys.shape[1], ChainSampling.mode(sampling))
        if key is None:
            return None
        bs = self.blocks.block_size
        slots = [[blocks[(st + s) // bs] * bs + (st + s) % bs for blocks, st in zip(chain.blocks, chain.start)]
                 for s in range(steps)]
        meta = torch.tensor(chain.start + [x for row in slots for x in row], dtype=torch.long).to(self.device)
        try:
            out = g.run(key, feats, meta[:c], meta[c:].view(steps, c), chain.keys, sampling)
        except Exception:
            if g.failed is None:
                raise
            return None
        for sid, st in zip(chain.seq_ids, chain.start):
            self.blocks.commit(sid, st + steps)
        return out

    def _draw(self, out: torch.Tensor, reqs: list[Request], slots: list[int | None], keys: list[list[int]] | None,
              j: int, rows: StepRows, q: torch.Tensor | None, active: list[int]) -> torch.Tensor:
        """One draft token per active row: the argmax for greedy rows, an exponential race over the head's
        distribution (the row's temperature / top-k / top-p, cut to its likeliest tokens: ``sampler.draft_draw``)
        for sampled rows, keyed by ``keys[slot][j]``. Returns the target ids ``[A]`` on the device."""
        logits = self.head.logits(out).float()  # [A, draft_vocab]
        if self._never is not None:
            logits = logits.masked_fill(self._never, float("-inf"))
        tokens = self._ids[logits.argmax(-1)]
        s_rows = [n for n, s in enumerate(slots) if s is not None]
        if s_rows:
            local = torch.tensor(s_rows, device=self.device)
            sub = rows.rp.select([active[n] for n in s_rows])
            tokens[local], probs = draft_draw(logits[local], sub,
                                              to_device([keys[slots[n]][j] for n in s_rows], torch.int64, self.device),
                                              sub.truncates(self.vocab_size), self._ids, self.vocab_size,
                                              need_q=q is not None)  # [S], [S, V] over the target vocabulary
            if q is not None:
                q[torch.tensor([active[n] for n in s_rows], device=self.device), j] = probs
        return tokens


@dataclass
class _Chain:
    """One step's drafting chain: per chain row (proposal index -> position here) its seq id, blocks, first chain
    position, and the pool slot of each key position ``[C, longest]``."""

    index: dict[int, int]
    seq_ids: list[int]
    blocks: list[list[int]]
    start: list[int]
    keys: torch.Tensor
    arange: torch.Tensor


def _param_ratio(head: EagleHead, target) -> float:
    """Head weights / target weights: what a draft step costs relative to a target step where streaming the
    weights bounds both (decode on a CPU or a small batch on a GPU)."""
    head_n = sum(p.numel() for p in head.parameters())
    target_n = sum(p.numel() for p in target.parameters())
    return head_n / max(1, target_n)


class _HeadChains:
    """CUDA graphs of the head's drafting chains (``EagleProposer._graphed``), one per (rows bucket, steps, key
    bucket, mode: greedy, sample, or sample-cut where some row's top-p / top-k cuts), captured on a shape's second use
    into their own memory pool."""

    def __init__(self, proposer: EagleProposer, max_keys: int):
        from engine.cuda_graphs import key_buckets

        self.p = proposer
        self.key_buckets = key_buckets(max_keys)
        self.graphs: dict[tuple[int, int, int, str], tuple] = {}
        self._io: dict[int, torch.Tensor] = {}  # rows bucket -> sampled chains' q
        self.failed: str | None = None
        self.replays = 0
        self.device = proposer.device
        self.bytes_per_token = 0.0  # ``cuda_graphs.measured``
        self.stream = torch.cuda.Stream(proposer.device)
        self.mempool = torch.cuda.graph_pool_handle()

    def key(self, rows: int, steps: int, keys: int, mode: str = "greedy") -> tuple[int, int, int, str] | None:
        """The graph of this chain, when it is captured or is now met the second time (None: run step by step)."""
        from engine.cuda_graphs import MAX_CHAIN_STEPS, ROW_BUCKETS, bucket, graph_need, memory_for_graphs

        r, t = bucket(rows, ROW_BUCKETS), bucket(keys, self.key_buckets)
        if r is None or t is None or not 1 <= steps <= MAX_CHAIN_STEPS:
            return None
        key = (r, steps, t, mode)
        if key not in self.graphs and (self.p.target.graphs.not_yet(("eagle chain", *key))  # the target's count
                                       or not memory_for_graphs(self.device, graph_need(self, key))):
            return None
        return key

    def prewarm(self, max_rows: int, keys: int, modes: tuple[str, ...]) -> int:
        """Capture every chain of (rows bucket up to ``max_rows``, steps 1..MAX_CHAIN_STEPS, each of ``modes``) at the
        key bucket of ``keys`` now (as ``GraphRunner.prewarm_chains`` does for the draft model); returns how many."""
        from engine.cuda_graphs import bucket, capture_missing, chain_shapes

        t = bucket(keys, self.key_buckets)
        if t is None or self.failed is not None:
            return 0
        return capture_missing(self, self.graphs, (((r, steps, t, mode), lambda r=r, steps=steps, mode=mode:
                                                    self._capture(r, steps, t, mode))
                                                   for r, steps, mode in chain_shapes(max_rows, modes)))

    @torch.inference_mode()
    def run(self, key: tuple[int, int, int, str], feats: torch.Tensor, start: torch.Tensor, slots: torch.Tensor,
            keys: torch.Tensor, sampling=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        g = self.graphs.get(key)
        if g is None:
            from engine.cuda_graphs import measured, release_graphs

            try:
                g = self.graphs[key] = measured(self, key, lambda: self._capture(*key))
            except Exception as exc:
                release_graphs(self, f"{type(exc).__name__}: {exc}")
                logger.warning("CUDA graph capture of an EAGLE drafting chain failed, drafting step by step: %s",
                               self.failed)
                raise
        feat, pos0, slot_t, gather, out, cs = g[1:]
        c, (r, _steps, t, _mode) = feats.shape[0], key
        feat[:c].copy_(feats)
        pos0[:c].copy_(start)
        pos0[c:].zero_()
        slot_t[:, :c].copy_(slots)
        slot_t[:, c:].fill_(self.p.pool.scratch_slot)
        gather.view(r, t)[:c, : keys.shape[1]].copy_(keys)
        gather.view(r, t)[:c, keys.shape[1]:].fill_(self.p.pool.scratch_slot)
        if cs is not None:
            cs.load(sampling)
        g[0].replay()
        self.replays += 1
        return out[:c].clone(), (cs.probs[:c].clone() if cs is not None else None)

    @torch.inference_mode()
    def _capture(self, r: int, steps: int, t: int, mode: str) -> tuple:
        from engine.cuda_graphs import ChainSampling, capture

        p, dev = self.p, self.p.device
        head, scratch = p.head, p.pool.scratch_slot
        feat = torch.zeros(r, head.cfg.hidden_size, dtype=p.pool.dtype, device=dev)
        pos0 = torch.zeros(r, dtype=torch.long, device=dev)
        slot_t = torch.full((steps, r), scratch, dtype=torch.long, device=dev)
        gather = torch.full((r * t,), scratch, dtype=torch.long, device=dev)
        cs = None if mode == "greedy" else ChainSampling.buffers(self._io, r, steps + 1, p.vocab_size, dev,
                                                                 mode == "sample-cut")

        def draw(f: torch.Tensor, s: int) -> torch.Tensor:  # a draw from the head's output f: as EagleProposer._draw
            logits = head.logits(f).float()
            if p._never is not None:
                logits = logits.masked_fill(p._never, float("-inf"))
            tok = p._ids[logits.argmax(-1)]
            if cs is not None:  # sampled rows race over the head's distribution on the target vocabulary
                tok = cs.draw(s, logits, tok, p._ids)
            return tok

        def chain() -> torch.Tensor:
            f = feat
            tok = draw(f, 0)  # the first draw, from the first step's outputs
            out = [tok]
            for s in range(steps):
                pos = (pos0 + s).view(r, 1)
                batch = AttnBatch(slot_t[s], gather, causal_mask(pos, t), t)
                f = head.forward_paged(tok.view(r, 1), f.view(r, 1, -1), pos, batch, p.pool.keys[0],
                                       p.pool.values[0])[:, -1]
                tok = draw(f, s + 1)
                out.append(tok)
            return torch.stack(out, 1)

        graph, out = capture(chain, dev, self.stream, self.mempool, keys=t)
        return graph, feat, pos0, slot_t, gather, out, cs
