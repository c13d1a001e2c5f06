"""FIFO admission under a bound on running sequences and on KV blocks, with preemption; requests
that could never fit are refused when they arrive.

The scheduler never deadlocks when blocks run out: a step that cannot fit preempts the
newest running request (its blocks are freed and it goes back to the front of the queue,
keeping the tokens it already produced), and a request that cannot fit even alone fails
with a clear error.
"""

from __future__ import annotations

from collections import deque

from engine.errors import PromptTooLong
from engine.model_runner import ModelRunner
from engine.sequence import Request, Status


class Scheduler:
    def __init__(self, target: ModelRunner, draft: ModelRunner | None, max_running: int, max_waiting: int, lookahead: int):
        self.target = target
        self.draft = draft
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.lookahead = lookahead  # room kept per admitted request for one speculative step
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def _fits(self, req: Request, runner: ModelRunner, reserved: int) -> bool:
        need = runner.blocks.blocks_needed(len(req.prefill_ids) + self.lookahead + 1)
        return need + reserved <= runner.blocks.num_free

    def fits_alone(self, req: Request) -> bool:
        n = len(req.prefill_ids) + self.lookahead + 1
        ok = self.target.blocks.blocks_needed(n) <= self.target.blocks.num_blocks
        if ok and req.use_draft and self.draft is not None:
            ok = self.draft.blocks.blocks_needed(n) <= self.draft.blocks.num_blocks
        return ok

    def refuse_unfittable(self, req: Request, max_context: int) -> None:
        """Refuse up front a request that could not finish even alone in the KV cache (4xx naming the
        limit) instead of failing it mid-way; a draft pool too small for it just means no model drafting."""
        n, m = len(req.prompt_ids), req.params.max_new_tokens
        extra = self.lookahead + 1  # room for one speculative step past the last token
        need = min(n + m, max_context) + extra
        blocks = self.target.blocks
        if blocks.blocks_needed(need) > blocks.num_blocks:
            cap = blocks.num_blocks * blocks.block_size
            fix = (f"lower max_new_tokens to at most {cap - n - extra}" if cap - n - extra >= 1
                   else f"shorten the prompt to under {cap - extra} tokens")
            raise PromptTooLong(
                f"prompt ({n} tokens) + max_new_tokens ({m}) needs {need} tokens of KV cache, but it holds {cap} "
                f"tokens; {fix}, or raise the KV budget (--kv-cache-tokens)")
        if req.use_draft and self.draft is not None and self.draft.blocks.blocks_needed(need) > self.draft.blocks.num_blocks:
            req.use_draft = False

    def admit(self) -> list[Request]:
        """Pop waiting requests, oldest first, while they fit; stop at the first that doesn't."""
        admitted: list[Request] = []
        reserved_t = reserved_d = 0
        while self.waiting and len(self.running) + len(admitted) < self.max_running:
            req = self.waiting[0]
            if not self._fits(req, self.target, reserved_t):
                break
            if req.use_draft and self.draft is not None and not self._fits(req, self.draft, reserved_d):
                break
            self.waiting.popleft()
            n = len(req.prefill_ids) + self.lookahead + 1
            reserved_t += self.target.blocks.blocks_needed(n)
            if req.use_draft and self.draft is not None:
                reserved_d += self.draft.blocks.blocks_needed(n)
            req.status = Status.RUNNING
            admitted.append(req)
        self.running.extend(admitted)
        return admitted

    def preempt_newest(self) -> Request | None:
        """Free the newest running request's blocks and put it back at the head of the queue."""
        if len(self.running) <= 1:
            return None
        req = self.running.pop()
        self.release(req)
        req.status = Status.WAITING
        req.stats.num_preemptions += 1
        self.waiting.appendleft(req)
        return req

    def release(self, req: Request) -> None:
        self.target.free(req.seq_id)
        if self.draft is not None:
            self.draft.free(req.seq_id)

    def remove(self, req: Request) -> None:
        self.release(req)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
