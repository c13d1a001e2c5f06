"""KV memory: bytes the paged cache holds for a batch of mixed prompt and output lengths, against a
contiguous cache preallocated to the model's maximum length (and to the batch's longest request)."""

from __future__ import annotations

from engine.config import SamplingParams


def _runner_bytes(runner) -> tuple[int, int, int, int]:
    """(bytes in used blocks, bytes of stored tokens, allocated slots, stored tokens) of one model's cache."""
    st = runner.blocks.stats()
    per_token = runner.pool.shape.bytes_per_token(runner.pool.dtype)
    return st.used * runner.blocks.block_size * per_token, st.tokens_stored * per_token, st.slots_allocated, \
        st.tokens_stored


def mixed_batch(prompts: list[list[int]], n: int, max_new: list[int], max_context: int
                ) -> tuple[list[list[int]], list[int]]:
    """``n`` prompts of 1-4 concatenated openings and output lengths cycling through ``max_new``,
    each request kept within the model's context."""
    out, lengths = [], []
    for i in range(n):
        joined: list[int] = []
        for j in range(1 + i % 4):
            joined += prompts[(i + j) % len(prompts)]
        new = min(max_new[i % len(max_new)], max_context // 2)
        out.append(joined[: max_context - new - 16])
        lengths.append(new)
    return out, lengths


def memory_bench(engine, prompts: list[list[int]], n: int = 8, max_new: tuple[int, ...] = (16, 48, 96, 160, 256),
                 speculative: bool = True) -> dict:
    """Run the mixed batch concurrently (greedy, adaptive K) and sample the block tables after every step."""
    batch, lengths = mixed_batch(prompts, n, list(max_new), engine.max_context)
    runners = [engine.target] + ([engine.draft] if engine.draft is not None and speculative else [])
    per_token = sum(r.pool.shape.bytes_per_token(r.pool.dtype) for r in runners)
    samples: list[tuple[int, int, int, int]] = []

    def on_step(eng) -> None:
        used = stored = slots = tokens = 0
        for r in runners:
            u, s, sl, t = _runner_bytes(r)
            used, stored, slots, tokens = used + u, stored + s, slots + sl, tokens + t
        if stored:
            samples.append((used, stored, slots, tokens))

    done = []
    for ids, m in zip(batch, lengths):
        params = SamplingParams(max_new_tokens=m, temperature=0.0, ignore_eos=True, speculative=speculative)
        engine.add_request(ids, params, sink=lambda ev: done.append(ev) if hasattr(ev, "finish_reason") else None)
    while engine.has_work():
        engine.step()
        on_step(engine)
    peak = max(samples, key=lambda s: s[1])
    max_ctx = engine.max_context
    longest = max(len(p) + m for p, m in zip(batch, lengths))
    contiguous_max = n * max_ctx * per_token
    contiguous_batch = n * longest * per_token
    ratios = [u / s for u, s, _sl, _t in samples]
    return {
        "requests": n,
        "prompt_tokens": [len(p) for p in batch],
        "max_new_tokens": lengths,
        "models": "target + draft" if len(runners) > 1 else "target",
        "bytes_per_token": per_token,
        "block_size": engine.config.block_size,
        "peak_paged_bytes": peak[0],
        "peak_stored_bytes": peak[1],
        "peak_paged_over_stored": round(peak[0] / peak[1], 4),
        "mean_paged_over_stored": round(sum(ratios) / len(ratios), 4),
        "max_paged_over_stored": round(max(ratios), 4),
        "peak_fragmentation": round(1 - peak[3] / peak[2], 4) if peak[2] else 0.0,
        "contiguous_max_length_bytes": contiguous_max,
        "contiguous_batch_longest_bytes": contiguous_batch,
        "contiguous_max_over_paged": round(contiguous_max / peak[0], 2),
        "contiguous_batch_over_paged": round(contiguous_batch / peak[0], 2),
        "max_context": max_ctx,
        "pool_reserved_bytes": sum(r.pool.bytes_allocated() for r in runners),
        "steps_sampled": len(samples),
    }

