"""Speculative sampling (Leviathan et al. 2023, arXiv 2211.17192; Chen et al. 2023).

Terms, as in vLLM's rejection sampler:
- *accepted* tokens: draft tokens the target keeps;
- the *recovered* (here: ``target``) token: drawn at the first rejection from the
  normalised residual ``max(0, p - q)``;
- the *bonus* token: drawn from the target's distribution after all K were accepted.

With p the target's and q the draft's transformed distribution at a position and x the
draft token there: q(x) <= p(x): always accept; q(x) > p(x): accept with probability
p(x)/q(x). This keeps the output distribution exactly p. At temperature 0 both are
one-hot, so a draft token is accepted iff it equals the target's argmax and the
correction is that argmax.
"""

from __future__ import annotations

import torch

from engine.sampler import sample


def verify_greedy(draft_tokens: list[int], target_logits: torch.Tensor) -> tuple[int, int]:
    """``target_logits``: ``[K + 1, V]``. Returns (number accepted, next token)."""
    target_choice = target_logits.argmax(-1).tolist()  # [K + 1]
    accepted = 0
    for drafted, wanted in zip(draft_tokens, target_choice):
        if drafted != wanted:
            break
        accepted += 1
    return accepted, target_choice[accepted]


def verify_sampled(
    draft_tokens: list[int],
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator,
) -> tuple[int, int]:
    """Exact rejection sampling.

    draft_probs:  [K, V]      q at each drafted position
    target_probs: [K + 1, V]  p at each drafted position, plus one for the bonus
    Returns (number accepted, next token): the recovered token at the first rejection,
    or the bonus token when all K were accepted.
    """
    k = len(draft_tokens)
    draft_probs = draft_probs.cpu()
    target_probs = target_probs.cpu()
    idx = torch.tensor(draft_tokens, dtype=torch.long)
    p = target_probs[torch.arange(k), idx]  # [K]
    q = draft_probs[torch.arange(k), idx]  # [K]
    u = torch.rand(k, generator=generator)
    accept = (u * q) <= p  # u < p/q without dividing by a zero q
    rejected = (~accept).nonzero()
    if rejected.numel() == 0:
        return k, sample(target_probs[k], generator)
    first = int(rejected[0])
    residual = (target_probs[first] - draft_probs[first]).clamp_(min=0)
    total = float(residual.sum())
    if total <= 0:  # only reachable through rounding: p == q everywhere
        residual = target_probs[first]
        total = float(residual.sum())
    return first, sample(residual / total, generator)


def verify_always_accept(draft_tokens, draft_probs, target_probs, generator) -> tuple[int, int]:
    """A deliberately wrong rule (keeps every draft token). The test suite proves the
    distribution test catches it; never used by the engine."""
    return len(draft_tokens), sample(target_probs[len(draft_tokens)].cpu(), generator)
