"""A GPU's step times on any machine: the engine drafts, verifies and decides for real (demo pair, one request at a
time), and a virtual clock charges every decode step the time its plan would take on the device, so adaptive K can be
compared with fixed K at a GPU's costs where no GPU is lent. ``python -m engine.bench.emulate --help``.

A step's charge: the target's step (``--target-ms``), plus per drafted token the verification's extra
(``--verify-ms``) and the proposer's draft (``--draft-ms`` for the draft model, ``--eagle-ms`` for the EAGLE head,
nothing for n-gram) and a drafting step's fixed cost (``--overhead-ms``), plus ``--catch-up-ms`` per token a proposer
reads that it skipped, times log-normal noise (``--noise``), plus, in a slow phase of the machine (``--phase-steps``:
their mean length in decode steps, the machine switching between a normal and a slow phase at random; 0 = none),
``--phase-ms`` on every drafting step and PLAIN_PHASE_SHARE of it on a plain one (an H100 at 8 clients ran a whole
bench repeat with its drafting steps ~0.4-0.5 ms slower and its plain steps ~0.2 ms slower: host-bound steps). Each
mode's rate is also given at the device's costs alone (its steps charged without noise and phases: what its decisions
are worth, whichever phase its passes fell in). The defaults are an H100's with the demo pair in fp16 (thirty-ninth
round: fixed K = 2 / 4 / 6 / 8 took 1.23 / 1.49 / 1.77 / 2.07 ms a step). Prefill costs nothing here,
and nothing the plan does not decide is charged (graph captures, host work): its numbers are the emulation's, not the
product's. The engine runs with CUDA's adaptive settings (``--cpu-policy``: the CPU's), and its cost ratios (a drafted
token's, a verified one's, the first verified position's) are the device's throughout, never this machine's forwards':
a seed (``--seed``, the noise) repeats a run.
"""

from __future__ import annotations

import argparse
import collections
import math
import random
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceCosts:
    target_ms: float = 0.87
    verify_ms: float = 0.005
    draft_ms: float = 0.145
    eagle_ms: float = 0.27
    overhead_ms: float = 0.05
    catch_up_ms: float = 0.004
    phase_ms: float = 0.0  # in a slow phase: added to each drafting step (PLAIN_PHASE_SHARE of it to a plain one)
    model_ms: tuple[float, ...] = ()  # measured step times of the draft model's K = 1, 2, ... (a device's steps are not
    # linear in K: an H100 took 1.77 ms at K = 6, 1.99 at K = 7, 2.10 at K = 8); past its end, the linear model

    def step_ms(self, method: str, k: int) -> float:
        """A batch-1 step of ``method`` at K (K = 0: plain)."""
        if not k:
            return self.target_ms
        if method == "model" and k <= len(self.model_ms):
            return self.model_ms[k - 1]
        per = {"model": self.draft_ms, "eagle": self.eagle_ms}.get(method, 0.0)
        return self.target_ms + self.overhead_ms + (self.verify_ms + per) * k


PLAIN_PHASE_SHARE = 0.4  # of ``phase_ms``, what a slow phase adds to a plain step


def _home(name: str):
    """The module whose constant ``name`` is (``engine.adaptive``, ``engine.level_filter`` or
    ``engine.proposers.ngram``; None: none of them)."""
    from engine import adaptive, level_filter
    from engine.proposers import ngram

    return next((m for m in (adaptive, level_filter, ngram) if hasattr(m, name)), None)


class VirtualClock:
    """Stands in for the ``time`` module of ``engine.llm_engine``: seconds the emulated device has spent."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def emulate(modes: list[str], rounds: int = 3, prompts: int = 6, tokens: int = 128, temperature: float = 0.0,
            costs: DeviceCosts = DeviceCosts(), noise: float = 0.03, cuda_policy: bool = True,
            constants: dict[str, float] | None = None, seed: int = 1, prompt_set: str = "default",
            phase_steps: int = 0, order: str = "passes", shape: str | None = None, eps: float = 0.0316) -> dict:
    """Tokens per emulated millisecond of each mode (``default``: adaptive method and K; ``dmodel`` / ``deagle``:
    adaptive K with one proposer; ``kN``: fixed K = N with the draft model; ``plain``), rounds rotated, and each mode's
    share of steps per (method, K). ``phase_steps``: the mean length of the machine's phases (``costs.phase_ms``).
    ``order``: ``passes``, each mode's prompts one after another in a round; ``bench``, each prompt through every mode
    in turn, as the bench runs them (``engine.bench.suite._run_rounds``): the fixed-K passes a default request follows
    then time their K a few dozen steps before it, not a whole round of prompts. ``shape``: a real shape with random
    weights and its truncated self-draft at ``eps`` (``engine.bench.shapes``; the shape bench's pair, in float32 on this
    CPU's first two cores, its 32-token random prompts) in place of the demo pair."""
    if order not in ("passes", "bench"):
        raise ValueError(f"order {order!r}: give 'passes' or 'bench'")
    if shape is not None and prompt_set != "default":
        raise ValueError(f"prompt_set {prompt_set!r} is the demo pair's: a shape runs its own random prompts")
    import torch

    from engine import adaptive
    from engine import llm_engine as le
    from engine.bench.prompts import load_prompts, repeat_prompts
    from engine.config import EngineConfig, SamplingParams
    from engine.factory import build_engine

    threads = torch.get_num_threads()  # put back at the end, as the constants are
    torch.set_num_threads(1)
    saved = {name: getattr(_home(name), name) for name in (constants or {})}
    real_decode, real_time = le.decode_step, le.time
    clock, rng, mix = VirtualClock(), random.Random(seed), collections.Counter()
    phases, slow = random.Random(seed + 7919), [False]  # the machine's phases: a stream of their own
    clean = [0.0]  # ms of the steps at the device's costs alone (no noise, no phase): what the decisions are worth

    def decode(target, proposers, plan, *args, **kwargs):
        results, timing = real_decode(target, proposers, plan, *args, **kwargs)
        k, method = max(plan.values())
        ms = costs.step_ms(method, k) + costs.catch_up_ms * sum(p.backlog for p in proposers.values())
        clean[0] += ms
        if phase_steps:
            if phases.random() < 1.0 / phase_steps:
                slow[0] = not slow[0]
            if slow[0]:
                ms += costs.phase_ms * (1.0 if k else PLAIN_PHASE_SHARE)
        clock.now += ms * math.exp(rng.gauss(0.0, noise)) / 1e3
        mix[(method if k else "", k)] += 1
        return results, timing

    try:
        for name, value in (constants or {}).items():
            setattr(_home(name), name, type(getattr(_home(name), name))(value))
        if shape is None:
            engine = build_engine(EngineConfig(device="cpu", dtype="float32", num_threads=1))
        else:
            engine, texts = _shape_engine(shape, eps, prompts, tokens)
        le.decode_step, le.time = decode, clock
        if cuda_policy:
            engine.overlap = True
        engine.policy = adaptive.Policy.for_device(cuda_policy)
        t1 = costs.step_ms("", 0) / 1e3  # what the warm-up measures, at the device's costs
        engine.t_target1, engine.verify_cost = t1, costs.verify_ms / costs.target_ms
        engine.draft_cost, engine.eagle_cost = costs.draft_ms / costs.target_ms, costs.eagle_ms / costs.target_ms
        engine._verify_s, engine._plain_s = {}, None  # the warm-up's forwards (this machine's) forgotten
        engine.observe_verify(1, t1, t1)
        engine.observe_verify(2, t1 * (1.0 + engine.verify_cost))
        # the cost ratios stay the device's: the forwards' own timings (this machine's, real time) would move them,
        # and with them n-gram's position costs, so a seed would not repeat a run
        engine._observe_times = lambda *args, **kwargs: None
        for times in engine.policy.step_times():
            times.observe("", 1, 0, t1)
            for method in ("ngram", "model", "eagle"):
                times.observe(method, 1, 4, costs.step_ms(method, 4) / 1e3)
        if shape is None:
            texts = load_prompts()
            texts = (repeat_prompts(texts) if prompt_set == "repeat" else texts)[:prompts]

        def params(mode: str, seed: int) -> SamplingParams:
            common = dict(max_new_tokens=tokens, temperature=temperature, seed=seed, ignore_eos=True)
            if mode == "plain":
                return SamplingParams(speculative=False, **common)
            if mode in ("default", "dmodel", "deagle"):
                return SamplingParams(draft_method={"default": "auto", "dmodel": "model", "deagle": "eagle"}[mode],
                                      **common)
            return SamplingParams(num_draft_tokens=int(mode[1:]), draft_method="model", **common)

        rates: dict[str, list[float]] = {m: [] for m in modes}
        clean_rates: dict[str, list[float]] = {m: [] for m in modes}  # the same steps at the device's costs alone
        mixes: dict[str, collections.Counter] = {m: collections.Counter() for m in modes}
        for r in range(rounds):
            rotated = modes[r % len(modes):] + modes[:r % len(modes)]
            runs = ([(mode, i, text) for mode in rotated for i, text in enumerate(texts)] if order == "passes" else
                    [(mode, i, text) for i, text in enumerate(texts) for mode in rotated])
            made = dict.fromkeys(modes, 0)
            spent = {m: [0.0, 0.0] for m in modes}  # emulated ms, and at the device's costs alone
            for mode, i, text in runs:
                mix.clear()
                start, clean_start = clock.now, clean[0]
                made[mode] += len(engine.generate(text, params(mode, 1000 * r + i)).token_ids)
                spent[mode][0] += (clock.now - start) * 1e3
                spent[mode][1] += clean[0] - clean_start
                mixes[mode].update(mix)
            for mode in modes:
                rates[mode].append(made[mode] / spent[mode][0])
                clean_rates[mode].append(made[mode] / spent[mode][1])
    finally:
        le.decode_step, le.time = real_decode, real_time
        torch.set_num_threads(threads)
        for name, value in saved.items():
            setattr(_home(name), name, value)
    ratios = {"draft": engine.draft_cost, "verify": engine.verify_cost, "first": engine.first_cost}
    return {"rates": rates, "clean_rates": clean_rates, "ratios": ratios,
            "mix": {m: {f"{meth[:1]}{k}": n / max(1, sum(c.values())) for (meth, k), n in c.items()}
                    for m, c in mixes.items()}}


def _shape_engine(name: str, eps: float, prompts: int, tokens: int):
    """The shape bench's engine for ``name`` (float32, this CPU, up to two threads) with its draft's acceptance set by
    ``eps``, and ``prompts`` of its 32-token random prompts, room for ``tokens`` more each."""
    import os

    import torch

    from engine.bench import shapes
    from engine.bench.shape_bench import ShapeConfig, _build

    if name not in shapes.SHAPES:
        raise ValueError(f"shape {name!r}: give one of {', '.join(shapes.SHAPES)}")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))  # emulate() set one thread for the demo pair
    shape, _layers, _target, engine, knob = _build(name, ShapeConfig(device="cpu", concurrency=1),
                                                   torch.device("cpu"), torch.float32, 32 + tokens + 16)
    knob.set(eps)
    return engine, shapes.random_prompts(shape.vocab, 32, prompts, seed=32)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.bench.emulate", description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="default,dmodel,k4,k5,k6,k8")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--noise", type=float, default=0.03)
    p.add_argument("--prompt-set", choices=("default", "repeat"), default="default",
                   help="the bench's prompts, or issue 16's set whose continuations repeat the prompt")
    p.add_argument("--seed", type=int, default=1, help="the step times' noise (a seed repeats a run)")
    p.add_argument("--order", choices=("passes", "bench"), default="passes",
                   help="each mode's prompts in a row per round, or each prompt through every mode in turn (the bench's)")
    p.add_argument("--phase-steps", type=int, default=0,
                   help="mean length of the machine's slow and normal phases in decode steps (0: no phases)")
    for field_name, value in DeviceCosts().__dict__.items():
        if field_name != "model_ms":  # --phase-ms among them
            p.add_argument(f"--{field_name.replace('_', '-')}", type=float, default=value)
    p.add_argument("--model-ms", default="", help="the draft model's step times at K = 1, 2, ..., comma-separated "
                                                   "(ms; default: the linear model)")
    p.add_argument("--shape", default=None, help="a shape of engine.bench.shapes with random weights and its truncated "
                                                 "self-draft in place of the demo pair (e.g. tinyllama-1.1b)")
    p.add_argument("--eps", type=float, default=0.0316, help="with --shape: the deeper layers' scale (acceptance "
                                                             "~0.5 at K = 4 at 0.0316)")
    p.add_argument("--cpu-policy", action="store_true", help="the CPU's adaptive settings, not CUDA's")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a constant of engine.adaptive, engine.level_filter or engine.proposers.ngram for this run "
                        "(e.g. K_MARGIN=1.0)")
    args = p.parse_args(argv)
    constants = {}
    for item in args.set:
        name, _, value = item.partition("=")
        if not value or _home(name) is None:
            p.error(f"--set {item!r}: give NAME=VALUE with NAME a constant of engine.adaptive, engine.level_filter "
                    "or engine.proposers.ngram")
        constants[name] = float(value)
    try:
        model_ms = tuple(float(x) for x in args.model_ms.split(",") if x.strip())
    except ValueError:
        p.error(f"--model-ms {args.model_ms!r}: give step times in ms, comma-separated")
    costs = DeviceCosts(**{f: getattr(args, f) for f in DeviceCosts().__dict__ if f != "model_ms"}, model_ms=model_ms)
    if args.phase_steps < 0 or args.phase_ms < 0:
        p.error("--phase-steps and --phase-ms must be >= 0")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    out = emulate(modes, args.rounds, args.prompts, args.tokens, args.temperature, costs, args.noise,
                  not args.cpu_policy, constants, args.seed, args.prompt_set, args.phase_steps, args.order,
                  args.shape, args.eps)
    fixed = [statistics.median(v) for m, v in out["rates"].items() if m.startswith("k")]
    best = max(fixed) if fixed else None
    clean_best = max((statistics.median(v) for m, v in out["clean_rates"].items() if m.startswith("k")), default=None)
    for mode, rates in out["rates"].items():
        med = statistics.median(rates)
        vs = f"  {med / best:.3f}x the best fixed K" if best else ""
        if clean_best and (args.noise or args.phase_steps):  # the decisions' worth at the device's costs alone
            vs += f" ({statistics.median(out['clean_rates'][mode]) / clean_best:.3f}x without noise and phases)"
        print(f"{mode:8s} {med:.3f} tokens/ms ({' '.join(f'{x:.3f}' for x in rates)}){vs}")
        top = sorted(out["mix"][mode].items(), key=lambda kv: -kv[1])[:8]
        print("         steps: " + " ".join(f"{k}:{v:.2f}" for k, v in top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
