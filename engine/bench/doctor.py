"""The doctor: which drafting method (draft model, n-gram lookup, EAGLE head) and which K pay on this device?

``diagnose(engine, prompts)`` measures, on the engine's device and at realistic context lengths, the target's
single-token step time and the extra target cost per verified token γ; then, for every method the engine has
loaded, a calibration at K = 8 gives its acceptance α (overall and per position), how often it proposes
nothing (n-gram: no match) and its cost per drafted token c, in target steps. The textbook model of
``engine.adaptive`` predicts each method's speed-up at every K; each method is then timed at its best K
against plain decoding on the same prompts (the measured speed-up), and so is ``auto``. The recommendation
is the method and K that measured fastest, or plain decoding when none beats it. With ``apply`` the engine's
adaptive prior and cost ratios start from these measurements.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from engine.adaptive import expected_tokens
from engine.bench.instrument import Instrument
from engine.bench.runs import Method, PassResult, helix_pass
from engine.config import MAX_DRAFT_TOKENS

METHOD_WORDS = {"model": "the draft model", "ngram": "n-gram lookup", "eagle": "the EAGLE head"}
K_CAL = MAX_DRAFT_TOKENS  # calibration: every draft position is seen


@dataclass
class MethodReport:
    """One drafting method, measured."""

    method: str  # model | ngram | eagle
    alpha: float  # geometric estimate: accepted / (accepted + rejections)
    alpha_per_position: list[float]  # P(position i accepted | positions before it accepted)
    miss_rate: float  # share of drafting steps in which it proposed nothing (n-gram: no match)
    draft_cost: float  # cost per drafted token, in target steps
    draft_ms_per_token: float
    best_k: int
    predicted_speedup: float  # at best_k, over plain decoding
    measured_speedup: float  # timed at best_k against plain on the same prompts
    tokens_per_second: float  # at best_k
    num_draft_tokens: int  # in the calibration
    speedup_by_k: dict[int, float] = field(default_factory=dict)  # predicted


@dataclass
class DoctorReport:
    recommended_method: str  # model | ngram | eagle | auto; "" when plain decoding is recommended
    recommended_k: int | None  # 0: speculation will not pay, decode plain; None: auto's adaptive K
    alpha: float  # of the recommended method (of the best one when plain is recommended)
    alpha_per_position: list[float]
    draft_cost: float  # the same method's cost per drafted token, in target steps
    verify_cost: float  # extra target cost per verified token, in target steps
    predicted_speedup: float  # at the recommendation (1.0 when plain is recommended)
    measured_speedup: float  # at the recommendation (1.0 when plain is recommended)
    best_k_speedup: float  # predicted for the best method at its best K, even when < 1
    target_step_ms: float
    draft_step_ms: float  # the same method, per drafted token
    plain_tokens_per_second: float
    auto_measured_speedup: float | None  # draft_method auto with adaptive K, timed the same way
    temperature: float
    num_prompts: int
    num_draft_tokens: int
    verdict: str
    speedup_by_k: dict[int, float] = field(default_factory=dict)
    methods: list[MethodReport] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class ProposerClock:
    """Times every ``propose`` of the engine's proposers (batch 1: one row per call) while installed."""

    def __init__(self, engine):
        self.engine = engine
        self.calls: dict[str, list[tuple[int, float]]] = {}  # method -> [(tokens proposed, seconds)]
        self._cuda = engine.target.device.type == "cuda"

    def __enter__(self) -> "ProposerClock":
        for name, proposer in self.engine.proposers.items():
            proposer.propose = self._timed(name, proposer.propose)  # shadows the bound method
        return self

    def __exit__(self, *exc) -> None:
        for proposer in self.engine.proposers.values():
            if "propose" in vars(proposer):
                delattr(proposer, "propose")

    def _timed(self, name: str, fn):
        def propose(rows):
            if self._cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(rows)
            if self._cuda:
                torch.cuda.synchronize()
            proposed = sum(len(t) for t in out.lists())
            self.calls.setdefault(name, []).append((proposed, time.perf_counter() - t0))
            return out
        return propose


def _per_position(accepted: list[int], drafted: list[int]) -> list[float]:
    """Conditional acceptance: reached position i with all earlier accepted, then accepted."""
    out = []
    for i in range(len(drafted)):
        reached = drafted[i] if i == 0 else min(accepted[i - 1], drafted[i])
        if reached:
            out.append(round(accepted[i] / reached, 4))
    return out


def predicted_speedup(alpha: float, k: int, cost: float, verify_cost: float, miss_rate: float = 0.0) -> float:
    """Tokens per unit of target-step time over plain's 1: drafting steps give E(α, K) tokens and cost
    1 + (γ + c)·K; a step in which the method proposed nothing decodes one token at plain cost."""
    tokens = (1 - miss_rate) * expected_tokens(alpha, k) + miss_rate
    cost = (1 - miss_rate) * (1 + (verify_cost + cost) * k) + miss_rate
    return tokens / cost


def _pass(engine, prompt: list[int], method: str | None, k: int | None, temperature: float, max_new_tokens: int,
          seed: int) -> PassResult:
    m = Method("plain", "helix") if method is None else Method(f"{method} K={k}", "helix", True, k, draft_method=method)
    return helix_pass(engine, [prompt], m, temperature, max_new_tokens, seed=seed)


def _gamma(specs: list[Instrument], t1: float, fallback: float) -> float:
    """Extra target cost per verified token, from every verification of n > 1 tokens."""
    samples = [(t / t1 - 1.0) / (n - 1) for spec in specs for (role, stage, rows, n), ts in spec.forwards.times.items()
               if role == "target" and stage == "decode" and rows == 1 and n > 1 for t in ts]
    return max(0.0, statistics.median(samples)) if samples else fallback


def diagnose(engine, prompts: list[str] | list[list[int]], temperature: float = 0.7, max_new_tokens: int = 64,
             apply: bool = True, methods: list[str] | None = None, progress=None) -> DoctorReport:
    """Measure every drafting method (``methods``: a subset of what is loaded) and recommend one and K.
    ``progress(text)`` hears about each phase. With ``apply``, the engine's adaptive prior and cost
    ratios (alpha_prior, draft_cost, eagle_cost, verify_cost) start from the measurements."""
    loaded = list(engine.proposers)
    methods = loaded if methods is None else [m for m in loaded if m in methods]
    if not methods:
        raise ValueError(f"none of the requested methods is loaded (loaded: {', '.join(loaded)})")
    say = progress or (lambda text: None)
    ids = [engine.tokenizer(p, add_special_tokens=True)["input_ids"] if isinstance(p, str) else list(p)
           for p in prompts]
    # short untimed passes load kernels (and on GPUs pick GEMM algorithms) at these shapes
    say("warming up")
    _pass(engine, ids[0], None, None, temperature, min(8, max_new_tokens), 0)
    for m in methods:
        _pass(engine, ids[0], m, K_CAL, temperature, min(2 * K_CAL, max_new_tokens), 0)

    # calibration: plain and each method at K = 8 alternate prompt by prompt, so a change in machine load
    # between them cannot skew the cost ratios
    plain = Instrument(engine)
    specs = {m: Instrument(engine) for m in methods}
    cal = {m: PassResult() for m in methods}
    clocks = {m: ProposerClock(engine) for m in methods}
    for i, prompt in enumerate(ids):
        say(f"calibrating at K={K_CAL}: prompt {i + 1} of {len(ids)}")
        with plain:
            _pass(engine, prompt, None, None, temperature, max_new_tokens, i)
        for m in methods:
            with specs[m], clocks[m]:
                cal[m].merge(_pass(engine, prompt, m, K_CAL, temperature, max_new_tokens, i))
    t1 = plain.forwards.median("target", tokens=1) or engine.t_target1
    gamma = _gamma(list(specs.values()), t1, engine.verify_cost)
    reports = {m: _calibrated(m, cal[m], specs[m].alpha() or 0.0, clocks[m].calls.get(m, []), t1, gamma)
               for m in methods}

    # each method at its best K against plain (and auto, adaptive), alternating prompt by prompt again
    timed = {m: PassResult() for m in [None, *methods, "auto"]}
    for i, prompt in enumerate(ids):
        say(f"timing each method at its best K: prompt {i + 1} of {len(ids)}")
        timed[None].merge(_pass(engine, prompt, None, None, temperature, max_new_tokens, 100 + i))
        for m in methods:
            timed[m].merge(_pass(engine, prompt, m, reports[m].best_k, temperature, max_new_tokens, 100 + i))
        timed["auto"].merge(_pass(engine, prompt, "auto", None, temperature, max_new_tokens, 100 + i))
    plain_tps = timed[None].tokens_per_second
    for m, rep in reports.items():
        rep.tokens_per_second = round(timed[m].tokens_per_second, 2)
        rep.measured_speedup = round(timed[m].tokens_per_second / plain_tps, 4) if plain_tps else 0.0
    auto = round(timed["auto"].tokens_per_second / plain_tps, 4) if plain_tps else None

    best = max(reports.values(), key=lambda r: r.measured_speedup)  # the fastest fixed method and K
    # the recommendation: whichever measured fastest, auto included; plain when nothing beats plain decoding
    if max(best.measured_speedup, auto or 0.0) <= 1.0:
        method, k, measured, predicted = "", 0, 1.0, 1.0
    elif auto is not None and auto > best.measured_speedup:
        method, k, measured, predicted = "auto", None, auto, best.predicted_speedup
    else:
        method, k, measured, predicted = best.method, best.best_k, best.measured_speedup, best.predicted_speedup
    if apply:
        _apply(engine, reports, best, t1, gamma)
    return DoctorReport(
        recommended_method=method, recommended_k=k, alpha=best.alpha, alpha_per_position=best.alpha_per_position,
        draft_cost=best.draft_cost, verify_cost=round(gamma, 4), predicted_speedup=predicted, measured_speedup=measured,
        best_k_speedup=max(r.predicted_speedup for r in reports.values()),
        target_step_ms=round(t1 * 1e3, 3), draft_step_ms=best.draft_ms_per_token,
        plain_tokens_per_second=round(plain_tps, 2), auto_measured_speedup=auto, temperature=temperature,
        num_prompts=len(ids), num_draft_tokens=sum(r.num_draft_tokens for r in reports.values()),
        verdict=_verdict(engine, reports, best, method, gamma, auto), speedup_by_k=best.speedup_by_k,
        methods=list(reports.values()),
    )


def _calibrated(method: str, res: PassResult, alpha: float, calls: list[tuple[int, float]], t1: float,
                gamma: float) -> MethodReport:
    """``alpha``: the geometric estimate over the calibration's drafts; ``calls``: its proposals (tokens, s)."""
    misses = sum(1 for n, _ in calls if n == 0)
    miss_rate = misses / len(calls) if calls else 0.0
    per_token = [s / n for n, s in calls if n]
    cost_s = statistics.median(per_token) if per_token else 0.0
    cost = cost_s / t1 if t1 else 0.0
    by_k = {k: round(predicted_speedup(alpha, k, cost, gamma, miss_rate), 4) for k in range(1, MAX_DRAFT_TOKENS + 1)}
    k_best = max(by_k, key=by_k.get)
    return MethodReport(method=method, alpha=round(alpha, 4),
                        alpha_per_position=_per_position(res.accepted_per_position, res.drafts_per_position),
                        miss_rate=round(miss_rate, 4), draft_cost=round(cost, 4),
                        draft_ms_per_token=round(cost_s * 1e3, 4), best_k=k_best, predicted_speedup=by_k[k_best],
                        measured_speedup=0.0, tokens_per_second=0.0, num_draft_tokens=res.num_draft_tokens,
                        speedup_by_k=by_k)


def _apply(engine, reports: dict[str, MethodReport], best: MethodReport, t1: float, gamma: float) -> None:
    if best.alpha > 0:
        engine.alpha_prior = best.alpha
    if "model" in reports:
        engine.draft_cost = reports["model"].draft_cost
    if "eagle" in reports:
        engine.eagle_cost = reports["eagle"].draft_cost
    engine.verify_cost = gamma
    engine.t_target1 = t1


def _verdict(engine, reports: dict[str, MethodReport], best: MethodReport, method: str, gamma: float,
             auto: float | None) -> str:
    """Why this recommendation, in the measurements' words."""
    device = engine.device_kind
    why = (f"{best.method}'s drafts were accepted with α={best.alpha:.2f}"
           + (f" (no proposal in {best.miss_rate:.0%} of steps)" if best.miss_rate else "")
           + f", a drafted token costs {best.draft_cost:.2f} of a target step")
    fixed = "; ".join(f"{r.method} K={r.best_k} measured {r.measured_speedup:.2f}x (predicted {r.predicted_speedup:.2f}x)"
                      for r in sorted(reports.values(), key=lambda r: -r.measured_speedup))
    auto_note = f"; auto (adaptive method and K) measured {auto:.2f}x" if auto is not None else ""
    if method == "auto":
        return (f"speculation pays on {device}: keep draft_method=auto with adaptive K: it measured {auto:.2f}x over "
                f"plain decoding, more than any one method at a fixed K ({fixed}); {why}.")
    if method:
        return (f"speculation pays on {device}: use draft_method={method} with K={best.best_k} "
                f"({METHOD_WORDS.get(method, method)}): measured {best.measured_speedup:.2f}x over plain decoding "
                f"(predicted {best.predicted_speedup:.2f}x); {why}. All: {fixed}{auto_note}.")
    problems = []
    if best.draft_cost > 0.3:
        problems.append(f"a drafted token costs {best.draft_cost:.2f} of a target step (want well under 0.3)")
    if best.alpha < 0.5:
        problems.append(f"only {best.alpha:.0%} of {best.method}'s draft tokens are accepted")
    if best.miss_rate > 0.5:
        problems.append(f"{best.method} proposes nothing in {best.miss_rate:.0%} of steps")
    if gamma > 0.3:
        problems.append(f"verifying each extra token costs {gamma:.2f} of a target step")
    return (f"speculation will not pay on {device}: {fixed}{auto_note}; "
            + ("; ".join(problems) or "drafting is too slow for its acceptance") + ". Decode plain (speculative=false).")


def format_report(report: DoctorReport) -> str:
    lines = [f"target step {report.target_step_ms:.2f} ms ({report.plain_tokens_per_second:.1f} tok/s plain), "
             f"extra cost per verified token γ = {report.verify_cost:.3f}; temperature {report.temperature:g}, "
             f"{report.num_prompts} prompts"]
    for m in report.methods:
        lines += [
            f"{m.method}: acceptance α = {m.alpha:.3f} ({m.num_draft_tokens} draft tokens"
            + (f", no proposal in {m.miss_rate:.0%} of steps" if m.miss_rate else "") + "); per position: "
            + (", ".join(f"{a:.2f}" for a in m.alpha_per_position) or "-"),
            f"  cost per drafted token c = {m.draft_cost:.3f} ({m.draft_ms_per_token:.3f} ms); predicted speed-up by "
            "K: " + ", ".join(f"K={k} {v:.2f}x" for k, v in m.speedup_by_k.items()),
            f"  at K={m.best_k}: predicted {m.predicted_speedup:.2f}x, measured {m.measured_speedup:.2f}x "
            f"({m.tokens_per_second:.1f} tok/s)",
        ]
    if report.auto_measured_speedup is not None:
        lines.append(f"auto (adaptive method and K): measured {report.auto_measured_speedup:.2f}x")
    rec = {"": "none (plain decoding)", "auto": "auto, adaptive K"}.get(
        report.recommended_method, f"{report.recommended_method}, K={report.recommended_k}")
    predicted = "" if report.recommended_method == "auto" else f", {report.predicted_speedup:.2f}x (predicted)"
    lines += [f"recommended method and K: {rec}; expected speed-up {report.measured_speedup:.2f}x (measured)"
              f"{predicted}", report.verdict]
    return "\n".join(lines)
