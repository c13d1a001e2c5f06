"""The draft-model proposer: a small model with its own paged KV cache drafts K tokens autoregressively."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine import prefill
from engine.config import MAX_DRAFT_TOKENS
from engine.devices import to_device
from engine.model_runner import ModelRunner, RowInput
from engine.proposers.base import Proposal, StepRows
from engine.sampler import draft_draw

if TYPE_CHECKING:
    from engine.sequence import Request


CATCH_UP = 512  # tokens per catch-up forward (as prefill chunks)
NORMAL_BEHIND = MAX_DRAFT_TOKENS + 2  # more unread tokens than a verification leaves: a catch-up (``backlog``)


class DraftModelProposer:
    name = "model"

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.last_time_s = 0.0
        self.backlog = 0

    def propose(self, rows: StepRows) -> Proposal:
        """K draft forwards, batched over the rows still drafting; one small host copy per forward (on CUDA, where
        every row drafts the same K: the K draws and forwards 2..K in one graph replay, ``_chain``)."""
        b, kmax = len(rows.reqs), max(rows.ks, default=0)
        dev = self.runner.device
        sampled = [i for i, r in enumerate(rows.reqs) if not r.params.greedy]
        keep_q = any(rows.reqs[i].params.seed is None for i in sampled)
        q = torch.zeros(b, kmax, self.runner.vocab_size, device=dev) if keep_q else None
        keys = rows.draw_keys(sampled, kmax)
        slot = {i: n for n, i in enumerate(sampled)}
        keys_t = None  # [S, K] on the device, where the rows draw step by step
        self.backlog = sum(max(0, self.behind(r) - NORMAL_BEHIND) for r in rows.reqs)
        self._read_prompts(rows.reqs)
        self._catch_up(rows.reqs)
        lists: list[list[int]] = [[] for _ in range(b)]
        for j in range(kmax):
            active = [i for i in range(b) if rows.ks[i] > j]
            feed = []
            for i in active:
                req = rows.reqs[i]
                ids = req.all_ids[self.runner.cached_len(req.seq_id):] if j == 0 else [lists[i][-1]]
                feed.append(RowInput(req.seq_id, ids, 1))
            # not synced: the sampling below and the chain are launched while the forward runs
            logits = torch.stack([out[-1] for out in self.runner.forward(feed, sync=False)])  # [A, V]
            got = self._chain(rows, logits, keys, slot) if j == 0 and kmax > 1 and min(rows.ks) == kmax else None
            if got is not None:  # every draw and forwards 2..K ran as one CUDA graph: the tokens stay on the device
                drawn, probs = got
                return Proposal(None, probs if keep_q else None, drafted=drawn)
            if sampled and keys_t is None:
                keys_t = to_device(keys, torch.int64, dev)
            tokens = logits.argmax(-1)
            s_rows = [(n, i) for n, i in enumerate(active) if i in slot]
            if len(s_rows) == len(active) == b:  # every row sampled and still drafting: no index tensors
                tokens, probs = draft_draw(logits, rows.rp, keys_t[:, j], rows.rp.truncates(logits.shape[-1]),
                                           need_q=q is not None)
                if q is not None:
                    q[:, j] = probs
            elif s_rows:
                local = to_device([n for n, _ in s_rows], torch.long, dev)
                s = [i for _, i in s_rows]
                sub = rows.rp.select(s)
                tokens[local], probs = draft_draw(logits[local], sub,
                                                  keys_t[to_device([slot[i] for i in s], torch.long, dev), j],
                                                  sub.truncates(logits.shape[-1]), need_q=q is not None)  # [S], [S, V]
                if q is not None:
                    q[to_device(s, torch.long, dev), j] = probs
            for i, t in zip(active, tokens.tolist()):
                lists[i].append(t)
        return Proposal(lists, q)

    @property
    def chains(self) -> bool:
        """Whether drafting runs as one CUDA graph (``_chain``); see spec_decode._one_k."""
        g = self.runner.graphs
        return g is not None and g.failed is None

    def _chain(self, rows: StepRows, first: torch.Tensor, keys: list[list[int]], slot: dict[int, int]
               ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Every row's K draws (one K), the first from ``first`` (``[B, V]``, the first forward's logits), and
        forwards 2..K as one graph replay (ModelRunner.draft_chain, CUDA only), with no host round trip between
        them: their ``[B, K]`` tokens and draft distributions (None when greedy) on the device; None where it does
        not run (the caller drafts step by step). ``keys``: the sampled rows' keys of their K draws (row ``slot[i]``
        for row ``i``)."""
        from engine.cuda_graphs import ChainSampling

        b, draws = len(rows.reqs), max(rows.ks)
        if self.runner.graphs is None:
            return None
        sampling = None
        if slot:
            greedy = [0] * draws  # greedy rows take the argmax: their keys are never read
            sampling = ChainSampling.of_rows(rows.rp, [keys[slot[i]] if i in slot else greedy for i in range(b)],
                                             self.runner.vocab_size)
            if sampling is None:
                return None
        return self.runner.draft_chain([r.seq_id for r in rows.reqs], first, draws - 1, sampling)

    def _read_prompts(self, reqs: list[Request]) -> None:
        """Rows whose draft has not read their prompt (adaptive requests: the engine prefills the draft only for a
        fixed K) read it as a prefill does: cached prefix blocks attached, the rest in chunks, the prefix
        registered. On an H200, 8 rows of two 1536-token prompts read through the catch-up took 380 ms, the
        prefill's prefix cache a fraction of that."""
        fresh = [r for r in reqs if r.seq_id not in self.runner.blocks.tables]
        while fresh:
            plan = prefill.plan_chunks(self.runner, fresh)
            if not plan:
                return
            prefill.run_chunks(self.runner, plan)
            fresh = [r for r in fresh if not prefill.complete(self.runner, r)]

    def _catch_up(self, reqs: list[Request]) -> None:
        """A draft that sat out plain steps first reads what it missed, at most CATCH_UP tokens per
        forward, so that its first draft step feeds no more than that either."""
        while True:
            behind = [(r, len(r.all_ids) - self.runner.cached_len(r.seq_id)) for r in reqs]
            feed = [RowInput(r.seq_id, r.all_ids[self.runner.cached_len(r.seq_id):][:CATCH_UP], 1)
                    for r, gap in behind if gap > CATCH_UP]
            if not feed:
                return
            self.runner.forward(feed)

    def behind(self, req: Request) -> int:
        return req.num_tokens - self.runner.cached_len(req.seq_id)

    def fits(self, plan: dict[Request, int]) -> bool:
        r = self.runner
        need = sum(r.blocks_for(q.seq_id, q.num_tokens - r.cached_len(q.seq_id) + k) for q, k in plan.items() if k)
        return need <= r.blocks.num_free

    def rollback(self, req: Request, num_tokens: int) -> None:
        self.runner.truncate(req.seq_id, min(num_tokens, self.runner.cached_len(req.seq_id)))

    def release(self, req: Request) -> None:
        self.runner.free(req.seq_id)
