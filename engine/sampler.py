"""Turning logits into a distribution and drawing from it.

The same transform (temperature, then top-k, then top-p) is applied to the target's and
the draft's logits, so speculative sampling compares like with like.
"""

from __future__ import annotations

import torch

from engine.config import SamplingParams


def probs_from_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """``[..., V]`` logits -> ``[..., V]`` float32 probabilities after the request's transform.

    Temperature 0 gives a one-hot distribution on the argmax (greedy).
    """
    logits = logits.float()
    if params.temperature == 0:
        out = torch.zeros_like(logits)
        return out.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    # subtract the max first: tiny temperatures then give -inf for the rest, never inf - inf = nan
    logits = (logits - logits.max(-1, keepdim=True).values) / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # drop a token when the tokens strictly before it already reach top_p
        before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = before >= params.top_p
        drop_sorted[..., 0] = False  # the most likely token always stays, however small top_p is
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """Draw one token id from a ``[V]`` distribution (on CPU, with the request's generator)."""
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def top_logprobs(logits: torch.Tensor, token_id: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of ``token_id`` under the raw target distribution, and the top ``k``."""
    logp = torch.log_softmax(logits.float(), -1)
    chosen = float(logp[token_id])
    if k <= 0:
        return chosen, []
    vals, idx = torch.topk(logp, k)
    return chosen, list(zip(idx.tolist(), vals.tolist()))
