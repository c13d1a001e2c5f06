"""Read-only views of an engine for the API, the UI and the charts: plain dicts, no behaviour."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.adaptive import GREEDY

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine


def engine_info(engine: LLMEngine) -> dict:
    return {
        "target": engine.target_name,
        "draft": engine.draft_name,
        "has_draft": engine.draft is not None,
        "eagle": engine.eagle_name,
        "draft_methods": ["auto", *engine.proposers],
        "device": engine.device_kind,
        "device_name": engine.device_name,
        "dtype": engine.dtype_name,
        "max_context": engine.max_context,
        "block_size": engine.config.block_size,
    }


def engine_snapshot(engine: LLMEngine) -> dict:
    """Everything the API, UI and charts show, as plain data. Call on the engine thread."""
    tb = engine.target.blocks
    st = tb.stats()
    seq_to_req = {r.seq_id: r.request_id for r in list(engine.scheduler.running)}
    owners = tb.owners()
    spec = engine.spec_stats
    return {
        "requests_served": engine.requests_served,
        "requests_running": engine.num_running,
        "requests_waiting": engine.num_waiting,
        "tokens_generated": engine.tokens_generated,
        "tokens_per_second_1m": round(engine.tokens_per_second_recent(), 3),
        "spec": {
            "num_drafts": spec.num_drafts,
            "num_draft_tokens": spec.num_draft_tokens,
            "num_accepted_tokens": spec.num_accepted_tokens,
            "accepted_per_position": list(spec.accepted_per_position),
            "drafts_per_position": list(spec.drafts_per_position),
            "acceptance_rate": round(spec.acceptance_rate, 4),
            "mean_acceptance_length": round(spec.mean_acceptance_length, 4),
            "draft_time_s": round(spec.draft_time_s, 6),
            "target_time_s": round(spec.target_time_s, 6),
        },
        # per drafting method (and "plain"): drafts, acceptance, and the decode speed of the row-steps that used it
        "methods": {m: st.to_dict() for m, st in engine.method_stats.items()},
        "adaptive": {"alpha_prior": round(engine.alpha_prior, 4), "draft_cost": round(engine.draft_cost, 4),
                     "eagle_cost": round(engine.eagle_cost, 4),
                     "verify_cost": round(engine.verify_cost, 4), "first_position_cost": round(engine.first_cost, 4),
                     "recommended_k": engine.recommended_k()[0],
                     **adaptive_view(engine)},
        # CPU: torch threads of small steps and of big ones, and the measured ms per token of each (engine.threads)
        "threads": {"default": engine.threads.small, "big_steps": engine.threads.big,
                    "ms_per_token": {f"{phase}/{t}+tok/{r}+rows/{n}": round(v * 1e3, 4)
                                     for ((phase, t, r), n), v in sorted(engine.threads.avg.items())}},
        "kv": {
            "total": st.total, "used": st.used, "free": st.free, "shared": st.shared,
            "tokens_stored": st.tokens_stored, "slots_allocated": st.slots_allocated,
            "fragmentation": round(st.fragmentation, 4), "block_size": tb.block_size,
            "usage": round(st.used / st.total, 4) if st.total else 0.0,
            "bytes_allocated": engine.target.pool.bytes_allocated(),
            # block index -> request ids holding it (several = shared prefix block)
            "owners": {b: [seq_to_req.get(s, str(s)) for s in seqs] for b, seqs in owners.items()},
        },
        "draft_kv": None if engine.draft is None else {
            "total": engine.draft.blocks.num_blocks, "used": engine.draft.blocks.num_blocks - engine.draft.blocks.num_free,
        },
        "eagle_kv": None if "eagle" not in engine.proposers else {
            "total": engine.proposers["eagle"].blocks.num_blocks,
            "used": engine.proposers["eagle"].blocks.num_blocks - engine.proposers["eagle"].blocks.num_free,
        },
    }


def _label(key: tuple[str, str]) -> str:
    """A (method, sampling class) key of the policy's acceptance estimates as shown: the method, and the class where
    the requests sampled."""
    method, sampling = key
    return method if sampling == GREEDY else f"{method} {sampling}"


def adaptive_view(engine: LLMEngine) -> dict:
    """The last adaptive decision and why, and the measured step times it decided from."""
    policy = engine.policy
    d = policy.decision
    return {
        "decision": {"k": d.k, "method": d.method, "reason": d.reason,
                     "gains": {str(k): round(g, 3) for k, g in d.gains.items()}},
        "step_ms": {f"{m or 'plain'}/b{b}/ctx{c}/k{k}": round(policy.times.at_pace(b, [t])[0] * 1e3, 3)
                    for (m, b, c, k), t in sorted(policy.times.avg.items())},
        # per method (and sampling class, where not greedy: ``engine.adaptive.sampling_class``)
        "acceptance_by_method": {_label(key): round(s.acceptance_rate, 4) for key, s in policy.shared.items()},
        # ... and per draft position: how often drafts got past it over what the acceptance model predicted
        "calibration": {_label(key): [round(r, 3) for r in c.ratios()] for key, c in sorted(policy.calibration.items())},
        # per batch bucket: how much slower (> 1) or faster the machine runs now than when it was first timed there
        "pace": {f"b{b}": round(p, 4) for b, p in sorted(policy.times.pace.items())},
    }
