"""Chunked prefill: a prompt enters the caches at most CHUNK tokens per step, so a long prompt
neither builds a huge attention mask nor stalls the other requests' decoding."""

from __future__ import annotations

import torch

from engine.model_runner import ModelRunner, RowInput
from engine.sequence import Request

CHUNK = 512  # prompt tokens per runner per prefill step (over all prefilling requests)


def plan_chunks(runner: ModelRunner, reqs: list[Request], budget: int = CHUNK,
                record_cached: bool = False) -> dict[Request, int]:
    """Tokens each request feeds ``runner`` this step, oldest first, within ``budget``. Allocates
    the request's table (attaching cached prefix blocks) the first time it is seen."""
    plan: dict[Request, int] = {}
    for req in reqs:
        ids = req.prefill_ids
        if req.seq_id not in runner.blocks.tables:
            runner.blocks.allocate(req.seq_id)
            cached = runner.blocks.match_prefix(req.seq_id, ids)
            if record_cached and not req.output_ids:
                req.stats.num_cached_prompt_tokens = cached
        n = min(len(ids) - runner.cached_len(req.seq_id), budget)
        if n > 0:
            plan[req] = n
            budget -= n
        if budget <= 0:
            break
    return plan


def blocks_needed(runner: ModelRunner, plan: dict[Request, int]) -> int:
    return sum(runner.blocks_for(r.seq_id, n) for r, n in plan.items())


def run_chunks(runner: ModelRunner, plan: dict[Request, int]) -> dict[Request, torch.Tensor]:
    """Feed the planned chunks; returns the last logits [1, V] of requests whose prompt is now complete."""
    if not plan:
        return {}
    rows = []
    for req, n in plan.items():
        start = runner.cached_len(req.seq_id)
        rows.append(RowInput(req.seq_id, req.prefill_ids[start: start + n], 1, req.use_eagle))
    logits = runner.forward(rows)
    done = {}
    for (req, _), out in zip(plan.items(), logits):
        if runner.cached_len(req.seq_id) == len(req.prefill_ids):
            runner.blocks.register_prefix(req.seq_id, req.prompt_ids)
            done[req] = out
    return done


def complete(runner: ModelRunner | None, req: Request) -> bool:
    return runner is None or (req.seq_id in runner.blocks.tables and
                              runner.cached_len(req.seq_id) >= len(req.prefill_ids))
