"""The Proposer protocol: propose up to K tokens per row, with their draft probabilities q."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from engine import rng
from engine.sampler import RowParams

if TYPE_CHECKING:
    from engine.sequence import Request


@dataclass
class StepRows:
    """The rows a proposer drafts for in one step: row i drafts up to ``ks[i]`` tokens from absolute
    position ``reqs[i].num_tokens``. ``rp``: their sampling tensors (None when every row is greedy).
    Seeded sampled rows must draw with the target's own noise (see engine.rejection)."""

    reqs: list[Request]
    ks: list[int]
    rp: RowParams | None

    def draw_keys(self, idx: list[int], k: int) -> list[list[int]]:
        """The keys (engine.rng.key) of rows ``idx``'s draws at their next ``k`` positions: seeded rows draw with the
        target's own stream (the coupling, see engine.rejection), unseeded ones with the draft stream."""
        return [[rng.key(self.reqs[i].seed, self.reqs[i].num_tokens + j,
                         rng.SAMPLE if self.reqs[i].params.seed is not None else rng.DRAFT) for j in range(k)]
                for i in idx]


@dataclass
class Proposal:
    """Up to K tokens per row. ``token_lists[i]`` may be shorter than asked (even empty: the row
    then decodes plain this step). ``probs``: q ``[B, K, V]`` for rows that sampled from a
    distribution, or None when every proposal is deterministic (q one-hot on the token). ``drafted``: the rows' tokens
    ``[B, K]`` still on the device (``token_lists`` None until ``lists`` copies them), where one CUDA graph drew them
    all; a row uses its own first K of them: the verification can read them there, with no host round trip between
    drafting and verifying."""

    token_lists: list[list[int]] | None
    probs: torch.Tensor | None = None
    drafted: torch.Tensor | None = None

    def lists(self) -> list[list[int]]:
        """The tokens on the host (copied from ``drafted`` on first use: a sync with the device)."""
        if self.token_lists is None:
            self.token_lists = self.drafted.tolist()
        return self.token_lists


class Proposer(Protocol):
    name: str
    # what the last ``propose`` had to read beyond a normal step (a draft returning from plain steps catches up on
    # the tokens it missed): such a step paid a one-off cost and is no timing of a drafting step
    backlog: int

    def propose(self, rows: StepRows) -> Proposal:
        """Draft for ``rows``. Changes state: a draft model's KV cache grows by what it read."""
        ...

    def fits(self, plan: dict[Request, int]) -> bool:
        """Whether this step's drafting fits the proposer's memory. Reads only."""
        ...

    def behind(self, req: Request) -> int:
        """Tokens of ``req`` the proposer would read before drafting (its catch-up after plain steps). Reads only."""
        ...

    def rollback(self, req: Request, num_tokens: int) -> None:
        """Forget everything past the first ``num_tokens`` tokens of ``req`` (the verified ones)."""
        ...

    def release(self, req: Request) -> None:
        """Drop all state held for ``req`` (finished, preempted or switched to plain)."""
        ...
