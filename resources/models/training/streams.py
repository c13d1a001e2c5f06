"""Token streams and training windows: plain text (every token is a target) and conversations (only the
replies are), sampled as random fixed-length windows; held-out sets as padded batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import EOS_ID, PAD_ID

if TYPE_CHECKING:
    import torch


@dataclass
class TokenStream:
    """Documents back to back. ``mask[i]`` says whether token i is a training target (None: all are);
    ``starts`` are the document offsets windows must begin at (None: any offset)."""

    ids: "torch.Tensor"  # [n] int64
    mask: "torch.Tensor | None" = None  # [n] bool
    starts: "torch.Tensor | None" = None  # [num_docs] int64

    def __len__(self) -> int:
        return len(self.ids)


def plain_stream(id_lists: list[list[int]]) -> TokenStream:
    """<eos> doc <eos> doc ... <eos>: every document starts right after <|endoftext|>."""
    import torch

    flat = [EOS_ID]
    for ids in id_lists:
        flat.extend(ids)
        flat.append(EOS_ID)
    return TokenStream(torch.tensor(flat, dtype=torch.long))


def masked_stream(seqs: list[tuple[list[int], list[int]]]) -> TokenStream:
    """(ids, mask) sequences, each already starting with <|endoftext|>; windows start at a sequence."""
    import torch

    ids, mask, starts = [], [], []
    for s, m in seqs:
        starts.append(len(ids))
        ids.extend(s)
        mask.extend(m)
    return TokenStream(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool),
                       torch.tensor(starts, dtype=torch.long))


class WindowSampler:
    """Random (ctx+1)-token windows from streams, each stream picked with a given weight; returns inputs,
    next-token targets and the targets' mask."""

    def __init__(self, streams: list[TokenStream | None], weights: list[float], ctx: int, seed: int):
        import numpy as np

        self.streams, self.starts, w = [], [], []
        for s, wt in zip(streams, weights):
            if s is None or wt <= 0 or len(s) <= ctx + 1:
                continue
            starts = None if s.starts is None else s.starts[s.starts <= len(s) - ctx - 1].numpy()
            if starts is not None and len(starts) == 0:
                continue
            self.streams.append(s)
            self.starts.append(starts)
            w.append(wt)
        if not self.streams:
            raise ValueError(f"no training stream is longer than the context ({ctx} tokens)")
        self.weights = np.array(w, dtype=np.float64) / sum(w)
        self.ctx = ctx
        self.rng = np.random.default_rng(seed)

    def batch(self, bsz: int, device):
        import torch

        rows, masks = [], []
        for k in self.rng.choice(len(self.streams), size=bsz, p=self.weights):
            s, starts = self.streams[k], self.starts[k]
            start = int(self.rng.integers(0, len(s) - self.ctx - 1)) if starts is None else int(self.rng.choice(starts))
            rows.append(s.ids[start : start + self.ctx + 1])
            m = s.mask[start + 1 : start + self.ctx + 1] if s.mask is not None else torch.ones(self.ctx, dtype=torch.bool)
            masks.append(m)
        w = torch.stack(rows).to(device, non_blocking=True)
        return w[:, :-1], w[:, 1:], torch.stack(masks).to(device, non_blocking=True)


def stream_windows(stream: TokenStream, ctx: int, max_windows: int = 0) -> list[tuple[list[int], list[int]]]:
    """Non-overlapping (ctx+1)-token windows over a plain stream, as (ids, mask) sequences."""
    ids = stream.ids.tolist()
    n = (len(ids) - 1) // ctx
    if max_windows:
        n = min(n, max_windows)
    return [(ids[i * ctx : i * ctx + ctx + 1], [1] * (ctx + 1)) for i in range(n)]


def padded_batches(seqs: list[tuple[list[int], list[int]]], bsz: int, ctx: int):
    """Batches (x, y, m) of right-padded sequences (cut to ctx+1 tokens), sorted by length; m masks y."""
    import torch

    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    for b in range(0, len(order), bsz):
        group = [seqs[i] for i in order[b : b + bsz]]
        L = min(ctx + 1, max(len(s) for s, _ in group))
        ids = torch.full((len(group), L), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(group), L), dtype=torch.bool)
        for r, (s, m) in enumerate(group):
            s, m = s[:L], m[:L]
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(m)] = torch.tensor(m, dtype=torch.bool)
        yield ids[:, :-1], ids[:, 1:], mask[:, 1:]
