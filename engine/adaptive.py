"""Adaptive draft length.

Policy. Let α be the probability that a draft token is accepted (assumed independent
per position), c the draft step time over the target's single-token step time, and γ
the extra target time per verified token (verifying K+1 tokens costs ``1 + γK`` single
steps). One speculative step of length K then yields on average

    E[tokens](K) = (1 - α^(K+1)) / (1 - α)

tokens for a cost of ``1 + γK + cK`` single target steps, while plain decoding yields one
token per step of cost 1. We pick K in 1..8 maximising the ratio (the predicted
speed-up); when even the best K is predicted to be slower than plain decoding (ratio
< 1) the request drops speculation and runs the plain path.

α is estimated per request as a geometric maximum-likelihood estimate,
accepted / (accepted + rejections), shrunk towards the engine-wide prior until the
request has a few drafts of its own; c and γ are measured by the engine (moving
averages of real step times).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import MAX_DRAFT_TOKENS

PRIOR_WEIGHT = 8.0  # pseudo-trials of the prior α
MIN_DRAFTS_BEFORE_OFF = 8  # enough evidence that one noisy step time cannot switch speculation off


def expected_tokens(alpha: float, k: int) -> float:
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def predicted_speedup(alpha: float, k: int, draft_cost: float, verify_cost: float) -> float:
    return expected_tokens(alpha, k) / (1.0 + verify_cost * k + draft_cost * k)


def best_k(alpha: float, draft_cost: float, verify_cost: float, max_k: int = MAX_DRAFT_TOKENS) -> tuple[int, float]:
    """(K, predicted speed-up) maximising the ratio above."""
    return max(
        ((k, predicted_speedup(alpha, k, draft_cost, verify_cost)) for k in range(1, max_k + 1)),
        key=lambda kv: kv[1],
    )


@dataclass
class AdaptiveState:
    """Per-request acceptance evidence."""

    accepted: int = 0
    rejections: int = 0
    drafts: int = 0

    def observe(self, k: int, accepted: int) -> None:
        self.drafts += 1
        self.accepted += accepted
        self.rejections += int(accepted < k)

    def alpha(self, prior: float) -> float:
        a = self.accepted + PRIOR_WEIGHT * prior
        return a / (a + self.rejections + PRIOR_WEIGHT * (1.0 - prior))

    def choose(self, prior: float, draft_cost: float, verify_cost: float) -> int:
        """K to use next; 0 means "speculation will not pay: go plain"."""
        k, gain = best_k(self.alpha(prior), draft_cost, verify_cost)
        if gain < 1.0 and self.drafts >= MIN_DRAFTS_BEFORE_OFF:
            return 0
        return k
