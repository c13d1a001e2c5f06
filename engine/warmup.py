"""Warm-up: load kernels and measure the step costs adaptive K starts from."""

from __future__ import annotations

import logging
import statistics
import time
from typing import TYPE_CHECKING

from engine.config import MAX_DRAFT_TOKENS
from engine.model_runner import ModelRunner, RowInput

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)
PREWARM_ROWS = 8  # CUDA graphs captured at warm-up: row buckets up to this (1, 2, 4, 8) x every tokens bucket
PREWARM_MIN_GPU_BYTES = 8 << 30  # ... on GPUs of at least this much memory (smaller ones capture as shapes come)


def _gpu_bytes(device) -> int:
    import torch

    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0


def _calibrate_cpu_gemms(target: ModelRunner, sid: int, ids: list[int]) -> None:
    """On the CPU, where small weights have oneDNN-packed copies: whether GEMMs over them run packed, per token count,
    from the target's own forwards over the warm-up sequence (``packed.calibrate_by_forward``; once per process)."""
    if target.device.type != "cpu" or target.lean is None:
        return
    from engine.models import packed

    n = len(ids)

    def run(tokens: int) -> None:  # logits for every token, as a verification (and a batch of decode rows) reads them
        target.forward([RowInput(sid, [ids[i % n] for i in range(tokens)], tokens)])
        target.truncate(sid, n)

    t0 = time.perf_counter()
    room = target.tables.max_blocks * target.blocks.block_size - n - 1
    if packed.calibrate_by_forward(run, max_tokens=room) is not None:
        logger.info("warm-up: %s (%.2f s)", packed.packing_note(), time.perf_counter() - t0)


def warmup(engine: LLMEngine, context: int = 128, reps: int = 5) -> None:
    """Mimic the decode loop: a sequence with ``context`` tokens in both caches, then alternating
    draft step / target step / 5-token verification, medians of ``reps``. Sets the engine's cost
    ratios and seeds adaptive K's step-time table at batch 1 (real steps refine both)."""
    started = time.perf_counter()
    sid = -1
    n = max(8, min(context, engine.max_context - 16))
    ids = [i % max(2, engine.vocab_size - 1) + 1 for i in range(n)]
    runners = [r for r in (engine.target, engine.draft) if r is not None]
    target_logits = [r.forward([RowInput(sid, ids)])[0] for r in runners][0]  # (runners[0] is the target)
    _calibrate_cpu_gemms(engine.target, sid, ids)
    t0, captured = time.perf_counter(), 0
    for r in runners:  # CUDA graphs of the step shapes met first (up to 8 rows, every K), before any request; their
        # logits buffers take ~600 x vocabulary x 2 bytes a runner (91 MB at Qwen's 152k), and the prompt chunks' (last
        # logits only) ~90 rows x vocabulary x 2 bytes more each way (27 MB there), so not on small GPUs
        if getattr(r, "graphs", None) is not None and _gpu_bytes(r.device) >= PREWARM_MIN_GPU_BYTES:
            for aux in {None, r.aux_layers}:
                captured += r.graphs.prewarm(PREWARM_ROWS, n + MAX_DRAFT_TOKENS + 1, aux)
                captured += r.graphs.prewarm_prefill(PREWARM_ROWS, n + MAX_DRAFT_TOKENS + 1, aux)  # short prompts' reads
            if r is engine.draft:  # its drafting chains too (ModelRunner.draft_chain), greedy and sampled
                captured += r.graphs.prewarm_chains(PREWARM_ROWS, n + MAX_DRAFT_TOKENS + 1, r.vocab_size)
            if r is engine.target:  # sampled steps' verifications (spec_decode.decode_step): their inputs take
                # 15 rows x 17 positions x vocabulary x 4 bytes (155 MB at Qwen's 152k)
                captured += r.graphs.prewarm_verify(PREWARM_ROWS, target_logits.shape[-1], target_logits.dtype)
    head_chains = getattr(engine.proposers.get("eagle"), "_graphs", None)
    if head_chains is not None and _gpu_bytes(engine.target.device) >= PREWARM_MIN_GPU_BYTES:  # the head's chains
        from engine.cuda_graphs import PREWARM_CHAIN_MODES

        captured += head_chains.prewarm(PREWARM_ROWS, n + MAX_DRAFT_TOKENS + 1, PREWARM_CHAIN_MODES)
    graph_s = time.perf_counter() - t0
    if captured:
        logger.info("warm-up: captured %d CUDA graphs in %.1f s", captured, graph_s)

    def timed(runner: ModelRunner, toks: list[int]) -> float:
        t0 = time.perf_counter()
        runner.forward([RowInput(sid, toks, len(toks))])
        dt = time.perf_counter() - t0
        runner.truncate(sid, n)
        return dt

    eagle = engine.proposers.get("eagle")
    te = [eagle.time_step(n, reps)] if eagle is not None else []
    def drafted(runner: ModelRunner) -> float:
        """Seconds per drafted token of a greedy K = 4 draft: one forward, then the draws and forwards 2..4 as one
        graph where the runner has one (CUDA), else step by step."""
        import torch

        t0 = time.perf_counter()
        first = runner.forward([RowInput(sid, [1])])[0][-1:]  # [1, V]: the chain draws from these logits first
        if runner.draft_chain([sid], first, 3) is None:
            for _ in range(3):
                runner.forward([RowInput(sid, [1])])
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)
        dt = time.perf_counter() - t0
        runner.truncate(sid, n)
        return dt / 4

    t1, t2, t5, td = [], [], [], []
    for _ in range(reps):
        if engine.draft is not None:
            td.append(drafted(engine.draft))
        t1.append(timed(engine.target, [1]))
        t2.append(timed(engine.target, [1, 2]))
        t5.append(timed(engine.target, [1, 2, 3, 4, 5]))
    for r in runners:
        r.free(sid)
    med = statistics.median
    engine.t_target1 = med(t1)
    engine.verify_cost = max(0.0, (med(t5) / engine.t_target1 - 1.0) / 4.0)
    engine.observe_verify(1, med(t1), med(t1))  # the first position's cost, until decode steps measure it
    engine.observe_verify(2, med(t2))
    if td:
        engine.draft_cost = med(td) / engine.t_target1
    if te:
        engine.eagle_cost = med(te) / engine.t_target1
    for times in engine.policy.step_times():  # greedy and sampled steps start from the forwards' times alike
        times.observe("", 1, 0, med(t1))
        times.observe("ngram", 1, 4, med(t5))
        if td:
            times.observe("model", 1, 4, med(t5) + 4 * med(td))
        if te:
            times.observe("eagle", 1, 4, med(t5) + 4 * med(te))
    # what the warm-up cost (the bench's JSON records it beside the machine): CUDA graphs captured, and seconds
    engine.warmup_stats = {"seconds": round(time.perf_counter() - started, 3), "graphs_captured": captured,
                           "graph_seconds": round(graph_s, 3)}
    logger.info("warm-up: target step %.2f ms, draft/target cost %.3f, EAGLE head/target %s, verify cost per token "
                "%.3f", engine.t_target1 * 1e3, engine.draft_cost, f"{engine.eagle_cost:.3f}" if te else "-",
                engine.verify_cost)
