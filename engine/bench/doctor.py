"""The draft-pair doctor: is speculation worth it for this target, draft and device, and at which K?

``diagnose(engine, prompts)`` measures, on the engine's device and at realistic context
lengths, the target's single-token step time, the draft/target step-cost ratio c and the
extra target cost per verified token γ, runs a short calibration at K = 8 to measure the
acceptance α (overall and per position), and picks K by the model in ``engine.adaptive``.
It then sets ``engine.alpha_prior`` (and the cost ratios) so adaptive K starts from them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from engine.adaptive import best_k, expected_tokens
from engine.bench.instrument import Instrument
from engine.bench.runs import Method, PassResult, helix_pass
from engine.config import MAX_DRAFT_TOKENS


@dataclass
class DoctorReport:
    recommended_k: int  # 0: speculation will not pay; decode plain
    alpha: float  # geometric estimate: accepted / (accepted + rejections)
    alpha_per_position: list[float]  # P(position i accepted | positions before it accepted)
    draft_cost: float  # draft step / target step
    verify_cost: float  # extra target cost per verified token, in target steps
    predicted_speedup: float  # at recommended_k (1.0 when plain is recommended)
    best_k_speedup: float  # predicted at the best K even when < 1
    target_step_ms: float
    draft_step_ms: float
    temperature: float
    num_prompts: int
    num_draft_tokens: int
    verdict: str
    speedup_by_k: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _per_position(accepted: list[int], drafted: list[int]) -> list[float]:
    """Conditional acceptance: reached position i with all earlier accepted, then accepted."""
    out = []
    for i in range(len(drafted)):
        reached = drafted[i] if i == 0 else min(accepted[i - 1], drafted[i])
        if reached:
            out.append(round(accepted[i] / reached, 4))
    return out


def diagnose(engine, prompts: list[str] | list[list[int]], temperature: float = 0.7, max_new_tokens: int = 64,
             apply: bool = True) -> DoctorReport:
    """Measure and recommend; with ``apply`` set engine.alpha_prior / draft_cost / verify_cost."""
    if engine.draft is None:
        raise ValueError("the doctor needs a draft model")
    ids = [engine.tokenizer(p, add_special_tokens=True)["input_ids"] if isinstance(p, str) else list(p)
           for p in prompts]
    plain = Instrument(engine)
    spec = Instrument(engine)
    k_cal = MAX_DRAFT_TOKENS
    # short untimed passes load kernels (and on GPUs pick GEMM algorithms) at these shapes
    helix_pass(engine, ids[:1], Method("plain", "helix"), temperature, min(8, max_new_tokens))
    helix_pass(engine, ids[:1], Method("warm-up", "helix", True, k_cal), temperature, min(2 * k_cal, max_new_tokens))
    # plain and speculative passes alternate prompt by prompt, so a change in machine load between them
    # cannot skew the draft/target cost ratio
    res = PassResult()
    for i, prompt in enumerate(ids):
        with plain:
            helix_pass(engine, [prompt], Method("plain", "helix"), temperature, max_new_tokens, seed=i)
        with spec:
            res.merge(helix_pass(engine, [prompt], Method(f"K={k_cal}", "helix", True, k_cal), temperature,
                                 max_new_tokens, seed=i))
    t1 = plain.forwards.median("target", tokens=1) or engine.t_target1
    t_draft = spec.forwards.median("draft") or 0.0
    t_verify = spec.forwards.median("target", tokens=k_cal + 1)
    draft_cost = t_draft / t1
    verify_cost = max(0.0, (t_verify / t1 - 1.0) / k_cal) if t_verify else engine.verify_cost
    alpha = spec.alpha() or 0.0
    per_pos = _per_position(res.accepted_per_position, res.drafts_per_position)
    by_k = {k: round(expected_tokens(alpha, k) / (1 + (verify_cost + draft_cost) * k), 4)
            for k in range(1, MAX_DRAFT_TOKENS + 1)}
    k_best, gain = best_k(alpha, draft_cost, verify_cost)
    if gain >= 1.0:
        k_rec, predicted = k_best, gain
        verdict = (f"speculation pays on {engine.device_kind}: use K={k_best} (predicted {gain:.2f}x over plain "
                   f"decoding; draft tokens accepted with α={alpha:.2f}, a draft step costs {draft_cost:.2f} of a "
                   f"target step)")
    else:
        k_rec, predicted = 0, 1.0
        why = []
        if draft_cost > 0.3:
            why.append(f"a draft step costs {draft_cost:.2f} of a target step (want well under 0.3)")
        if alpha < 0.5:
            why.append(f"only {alpha:.0%} of draft tokens are accepted")
        if verify_cost > 0.3:
            why.append(f"verifying each extra token costs {verify_cost:.2f} of a target step")
        verdict = (f"speculation will not pay on {engine.device_kind}: the best K={k_best} predicts {gain:.2f}x; "
                   + ("; ".join(why) or "draft too slow for its acceptance") + ". Decode without the draft.")
    if apply:
        engine.alpha_prior = alpha if alpha > 0 else engine.alpha_prior
        engine.draft_cost = draft_cost
        engine.verify_cost = verify_cost
        engine.t_target1 = t1
    return DoctorReport(
        recommended_k=k_rec, alpha=round(alpha, 4), alpha_per_position=per_pos, draft_cost=round(draft_cost, 4),
        verify_cost=round(verify_cost, 4), predicted_speedup=round(predicted, 4), best_k_speedup=round(gain, 4),
        target_step_ms=round(t1 * 1e3, 3), draft_step_ms=round(t_draft * 1e3, 3), temperature=temperature,
        num_prompts=len(ids), num_draft_tokens=res.num_draft_tokens, verdict=verdict, speedup_by_k=by_k,
    )


def format_report(report: DoctorReport) -> str:
    lines = [
        f"target step {report.target_step_ms:.2f} ms, draft step {report.draft_step_ms:.2f} ms "
        f"(draft/target cost c = {report.draft_cost:.3f}), extra cost per verified token γ = {report.verify_cost:.3f}",
        f"acceptance α = {report.alpha:.3f} at temperature {report.temperature:g} over {report.num_prompts} prompts "
        f"({report.num_draft_tokens} draft tokens); per position: "
        + ", ".join(f"{a:.2f}" for a in report.alpha_per_position),
        "predicted speed-up by K: " + ", ".join(f"K={k} {v:.2f}x" for k, v in report.speedup_by_k.items()),
        f"recommended K: {report.recommended_k or 'none (plain decoding)'}; expected speed-up "
        f"{report.predicted_speedup:.2f}x",
        report.verdict,
    ]
    return "\n".join(lines)
