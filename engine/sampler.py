"""Turning logits into distributions and drawing from them, batched, on the logits' device.

One transform (temperature, then top-k, then top-p) is applied to the target's and the
draft's logits alike, so speculative sampling compares like with like. Draws are
exponential races, argmax(p / E) with E ~ Exp(1) from :mod:`engine.rng`: no multinomial.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine import rng
from engine.config import SamplingParams
from engine.devices import to_device


@dataclass
class RowParams:
    """Per-row sampling settings as tensors ``[B]`` (rows of a step, on one device), with the
    host-side settings they came from so that row selections never need a device sync."""

    temperature: torch.Tensor  # float32; 0 = greedy
    top_p: torch.Tensor  # float32
    top_k: torch.Tensor  # int64; 0 = off
    host: list[SamplingParams]

    @classmethod
    def build(cls, params: list[SamplingParams], device) -> RowParams:
        t = to_device([[p.temperature, p.top_p, p.top_k] for p in params], torch.float32, device)
        return cls(t[:, 0], t[:, 1], t[:, 2].long(), list(params))

    def select(self, rows: list[int]) -> RowParams:
        """The settings of ``rows`` (indices into these rows), in that order: these very settings where that is every
        row in order (a drafting step of rows that all draft with one proposer: on an H100 at batch 1 the copy of the
        indices and the three index ops took ~60 us of a sampled step's host time, 3-5 ms)."""
        if len(rows) == len(self.host) and all(i == r for i, r in enumerate(rows)):
            return self
        idx = to_device(rows, torch.long, self.temperature.device)
        return RowParams(self.temperature[idx], self.top_p[idx], self.top_k[idx], [self.host[i] for i in rows])

    def rows(self, predicate) -> list[int]:
        return [i for i, p in enumerate(self.host) if predicate(p)]

    def truncates(self, vocab: int) -> bool:
        return any(p.top_p < 1.0 or 0 < p.top_k < vocab for p in self.host)


def probs_batch(logits: torch.Tensor, rp: RowParams, truncate: bool | None = None) -> torch.Tensor:
    """``[B, ..., V]`` logits -> ``[B, ..., V]`` float32 probabilities under each row's transform: the softmax of
    ``transform``."""
    return transform(logits, rp, truncate).softmax(-1)


def transform(logits: torch.Tensor, rp: RowParams, truncate: bool | None = None) -> torch.Tensor:
    """``[B, ..., V]`` logits -> ``[B, ..., V]`` float32 log-weights under each row's transform: (logits - max) / T,
    -inf where top-k / top-p cut.

    Rows must have temperature > 0 (greedy rows are an argmax and never come here); the sort
    that top-k / top-p need runs only when some row truncates (``truncate``; None: as ``rp`` says).
    """
    shape = logits.shape
    vocab = shape[-1]
    b = shape[0]
    extra = logits[0].numel() // vocab  # positions per row
    x = logits.reshape(b * extra, vocab).float()
    per = lambda t: t[:, None].expand(b, extra).reshape(-1, 1)  # noqa: E731  [B] -> [B*extra, 1]
    # subtract the max first: tiny temperatures then give -inf for the rest, never inf - inf = nan
    x = (x - x.max(-1, keepdim=True).values) / per(rp.temperature)
    if rp.truncates(vocab) if truncate is None else truncate:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        k = per(torch.where((rp.top_k > 0) & (rp.top_k < vocab), rp.top_k, vocab))
        kth = sorted_x.gather(-1, k - 1)
        ranks = torch.arange(vocab, device=x.device)[None, :]
        sorted_x = sorted_x.masked_fill(sorted_x < kth, float("-inf"))
        sorted_p = sorted_x.softmax(-1)
        # drop a token when the tokens strictly before it already reach top_p (the first always stays)
        drop_sorted = ((sorted_p.cumsum(-1) - sorted_p) >= per(rp.top_p)) & (ranks > 0)
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        x = x.masked_fill(drop | (x < kth), float("-inf"))
    return x.view(shape)


def race(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The exponential race: argmax(p / E) over the last dim is a draw from p (p need not sum to 1)."""
    return (probs / noise).argmax(-1)


# The race's noise is E = -log(u) with u in [2^-24, 1 - 2^-24] (engine.rng.uniform), so E lies in [E_MIN, E_MAX] and
# a token with p < p_max * E_MIN / E_MAX can never beat the likeliest one (p_max / E <= p / E_MIN for every E). Half
# of that bound keeps float32 rounding on the safe side.
PRUNE = 0.5 * -math.log1p(-2.0 ** -24) / (24 * math.log(2.0))
PRUNE_MIN_VOCAB = 8192  # cut rows' races on the CPU over vocabularies at least this large hash only what can win


def draw(probs: torch.Tensor, keys: torch.Tensor, cut: bool = False) -> torch.Tensor:
    """One token per row of ``probs`` ``[..., V]``, keyed by ``keys`` ``[...]`` (see engine.rng.key).

    ``cut``: the rows' top-p / top-k zeroed most of the vocabulary (``cuts``). On the CPU such a race hashes only the
    tokens that can win (``_draw_pruned``; the same token: the others' p / E stays below the likeliest token's whatever
    their noise). A whole 152k vocabulary's noise costs ~10 int64 passes over it: on the 2-core CPU here 103 ms for 8
    rows x 5 positions, against 30 ms for their probabilities. Uncut rows keep the full race (on the demo target at
    T = 0.7 a median 78% of the vocabulary is within reach), as GPUs do (no host sync; it runs inside CUDA graphs)."""
    if cut and probs.device.type == "cpu" and probs.shape[-1] >= PRUNE_MIN_VOCAB:
        got = _draw_pruned(probs, keys)
        if got is not None:
            return got
    return race(probs, rng.exponentials(keys, probs.shape[-1]))


# A draft samples from its distribution cut to its DRAFT_TOP likeliest tokens, renormalised (its q is that cut
# distribution): the exponential race then hashes 32 tokens a row, not the vocabulary, and no softmax runs over the
# vocabulary. Exact either way: rejection sampling is exact for whatever q the draft drew from and reports, and a
# seeded row's output is the target's own race. What it costs in acceptance, measured on the demo pair at T = 0.8
# (1152 positions of the target's own texts): rejection sampling 0.7939 against 0.7954 uncut, the seeded coupling
# 0.7703 against 0.7724 (M = 16: 0.7920 / 0.7680; M = 1, a greedy draft: 0.673 / 0.673). What it saves, one thread of
# the 2-core CPU (medians, T = 0.8): a draw of 8 rows over the demo's 4096 tokens 0.28-0.30 -> 0.12-0.14 ms (a drafting
# step at K = 3 draws three times); over a 151936-token vocabulary 1.1-1.5 -> 0.33-0.37 ms for one row, 13.6-14.7 ->
# 1.7-1.9 ms for 8. Flipped step by step through 8-client passes of the demo pair at T = 0.8 (seeded, fixed K), the
# EAGLE head's K = 3 steps ran 3.8% faster (median of paired steps) for 0.7% fewer tokens a step, the draft model's
# K = 2 steps 1.1% faster.
DRAFT_TOP = 32


def draft_draw(logits: torch.Tensor, rp: RowParams, keys: torch.Tensor, truncate: bool,
               ids: torch.Tensor | None = None, vocab: int | None = None, need_q: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A draft's draws for sampled rows: tokens ``[S]`` from logits ``[S, V']`` under each row's transform cut to its
    DRAFT_TOP likeliest tokens (see there), keyed by ``keys`` ``[S]``, and the distribution q ``[S, vocab]`` each was
    drawn from (None unless ``need_q``). ``truncate``: some row's top-k / top-p cuts (``RowParams.truncates``; those
    are over the whole distribution). ``ids``: the target's token id of each of the logits' ``V'`` entries (a draft
    head with a vocabulary of its own; None: the same vocabulary, ``vocab`` = V'). No host sync: CUDA graphs capture
    it (engine.cuda_graphs ``ChainSampling``)."""
    m = min(DRAFT_TOP, logits.shape[-1])
    if truncate:
        top = transform(logits, rp, True).topk(m, -1)
        w = top.values.softmax(-1)
    else:
        top = logits.float().topk(m, -1)
        w = ((top.values - top.values[:, :1]) / rp.temperature[:, None]).softmax(-1)
    tokens = top.indices if ids is None else ids[top.indices]  # [S, M], target ids
    pick = race(w, rng.uniform_at(keys[:, None].expand_as(tokens).contiguous(), tokens).log_().neg_())
    drawn = tokens.gather(-1, pick[:, None]).squeeze(-1)
    if not need_q:
        return drawn, None
    q = torch.zeros(logits.shape[0], vocab or logits.shape[-1], device=logits.device)
    return drawn, q.scatter_add_(-1, tokens, w)  # added: ids a head never drafts may share one id, at weight 0


def cuts(params, vocab: int) -> bool:
    """Whether some of these requests' settings (``SamplingParams``) cut the vocabulary by top-p / top-k."""
    return any(not p.greedy and (p.top_p < 1.0 or 0 < p.top_k < vocab) for p in params)


def _draw_pruned(probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor | None:
    """``draw`` over the tokens within reach of each row's likeliest (p >= p_max * PRUNE); None where more than a
    quarter of them are (the full race is then about as cheap)."""
    vocab = probs.shape[-1]
    flat = probs.reshape(-1, vocab)
    n = flat.shape[0]
    near = flat >= flat.amax(-1, keepdim=True) * PRUNE
    if int(near.sum()) * 4 > flat.numel():
        return None
    rows, cols = near.nonzero(as_tuple=True)  # row-major: each row's tokens in id order
    ratio = flat[rows, cols] / rng.uniform_at(keys.reshape(-1)[rows], cols).log_().neg_()
    best = torch.full((n,), -math.inf).scatter_reduce_(0, rows, ratio, "amax")
    won = ratio == best[rows]
    first = torch.full((n,), vocab, dtype=torch.long).scatter_reduce_(0, rows[won], cols[won], "amin")  # as argmax
    return first.view(probs.shape[:-1])


def probs_from_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """``[..., V]`` logits -> probabilities for one request's settings (temperature 0: one-hot argmax)."""
    logits = logits.float()
    if params.temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    flat = logits.reshape(-1, logits.shape[-1])
    rp = RowParams.build([params] * flat.shape[0], logits.device)
    return probs_batch(flat, rp).view(logits.shape)


def top_logprobs(logits: torch.Tensor, token_id: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of ``token_id`` under the raw target distribution, and the top ``k``."""
    logp = torch.log_softmax(logits.float(), -1)
    chosen = float(logp[token_id])
    if k <= 0:
        return chosen, []
    vals, idx = torch.topk(logp, k)
    return chosen, list(zip(idx.tolist(), vals.tolist()))
