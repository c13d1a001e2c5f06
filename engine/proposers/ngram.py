"""N-gram prompt lookup: propose what followed the last occurrence of the context's last n tokens.

No model, no memory beyond a per-request index; proposals are deterministic (q one-hot).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.proposers.base import Proposal, StepRows

if TYPE_CHECKING:
    from engine.sequence import Request

MAX_N, MIN_N = 4, 1


class _Index:
    """n-gram (as a tuple) -> position of its last token, for n-grams ending before ``upto``."""

    def __init__(self) -> None:
        self.last: dict[tuple[int, ...], int] = {}
        self.upto = 0

    def extend(self, ids: list[int], end: int) -> None:
        for i in range(self.upto, end):
            for n in range(MIN_N, MAX_N + 1):
                if i - n + 1 >= 0:
                    self.last[tuple(ids[i - n + 1: i + 1])] = i
        self.upto = max(self.upto, end)


def lookup(ids: list[int], k: int, index: _Index | None = None) -> list[int]:
    """``k`` tokens that followed the most recent earlier match of the longest suffix (n = 4..1), or none."""
    if k <= 0 or len(ids) < 2:
        return []
    index = index or _Index()
    index.extend(ids, len(ids) - 1)  # n-grams ending before the last token: the suffix never matches itself
    for n in range(min(MAX_N, len(ids) - 1), MIN_N - 1, -1):
        end = index.last.get(tuple(ids[-n:]))
        if end is not None:
            # what followed the match; where that runs into the end, the text repeats with this period
            period = len(ids) - 1 - end
            return [ids[len(ids) - period + i % period] for i in range(k)]
    return []


class NgramProposer:
    name = "ngram"
    backlog = 0  # its index grows with the emitted tokens, never in a burst worth leaving out of step timings

    def __init__(self) -> None:
        self._index: dict[int, _Index] = {}

    def propose(self, rows: StepRows) -> Proposal:
        out = []
        for req, k in zip(rows.reqs, rows.ks):
            out.append(lookup(req.all_ids, k, self._index.setdefault(req.seq_id, _Index())))
        return Proposal(out, None)

    def fits(self, plan: dict[Request, int]) -> bool:
        return True

    def behind(self, req: Request) -> int:
        return 0  # its index grows with every emitted token

    def rollback(self, req: Request, num_tokens: int) -> None:
        pass  # the index holds only emitted tokens, which are never taken back

    def release(self, req: Request) -> None:
        self._index.pop(req.seq_id, None)
