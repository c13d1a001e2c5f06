"""What K can gain at batch 1, exactly, for greedy decoding with the draft model: ``python -m engine.bench.replay``.

Greedy speculative decoding emits plain greedy decoding's text, and whether the draft model's token at an output
position is accepted depends only on the text before it: the draft drafts from the true prefix as long as every token
before was accepted, and a step stops at its first miss. So one plain greedy run per prompt, and one forward of the draft
over it (its greedy token at every position given the true prefix), tell where every draft of any K policy stops. Any
policy of K then replays over the texts without running a model, at a device's step times per K: fixed K, the best K
per prompt, the best pair of K by where a step starts (after a fully accepted draft or not), and a bound no policy
reaches (each step drafting exactly to its first miss, as if it knew the text ahead).

The replay counts steps as the engine runs them: the prompt's prefill emits the first token, each decode step drafts
min(K, the tokens left but one) and emits the accepted drafts and one target token. Its numbers are the replay's, not the
product's: no host work, no step time but the one given per K, the draft model only (the EAGLE head and n-gram are not
replayed).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from engine.config import MAX_DRAFT_TOKENS

Policy = Callable[[int, bool], int]  # (output position, the step before was a fully accepted draft) -> K


def greedy_misses(engine, prompts: Sequence[str], tokens: int) -> list[list[bool]]:
    """Per prompt, per output token of its plain greedy text: whether the draft model's greedy token given the true
    prefix differs (the draft misses there)."""
    import torch

    from engine.config import SamplingParams

    if engine.draft is None:
        raise ValueError("the replay needs a draft model")
    out = []
    for text in prompts:
        ids = engine.tokenizer.encode(text)
        final = engine.generate(ids, SamplingParams(max_new_tokens=tokens, temperature=0.0, speculative=False,
                                                    ignore_eos=True))
        gen = list(final.token_ids)
        full = torch.tensor([ids + gen], device=engine.draft.device)
        with torch.inference_mode():
            logits = engine.draft.model(full).logits[0, :, : engine.draft.vocab_size]
        guess = logits[len(ids) - 1: len(ids) - 1 + len(gen)].argmax(-1).tolist()
        out.append([g != t for g, t in zip(guess, gen)])
    return out


def replay(misses: Sequence[bool], policy: Policy) -> dict[int, int]:
    """Decode steps per K (0: plain) of one request whose output has ``misses``, under ``policy``."""
    n = len(misses)
    steps: dict[int, int] = {}
    p, full = 1, False  # the prefill emitted output token 0
    while p < n:
        k = min(policy(p, full), n - p - 1)
        a = 0
        while a < k and not misses[p + a]:
            a += 1
        steps[k] = steps.get(k, 0) + 1
        p += a + 1
        full = k > 0 and a == k
    return steps


def _ms(misses: Sequence[bool], policy: Policy, step_ms: Sequence[float]) -> float:
    """Milliseconds of one request's decode steps under ``policy``."""
    return sum(step_ms[k] * n for k, n in replay(misses, policy).items())


def rate(all_misses: Sequence[Sequence[bool]], policy: Policy, step_ms: Sequence[float]) -> float:
    """Tokens per millisecond of decode steps over every request (the prefill's first token not counted)."""
    return sum(len(m) - 1 for m in all_misses) / sum(_ms(m, policy, step_ms) for m in all_misses)


def knows_the_run(all_misses: Sequence[Sequence[bool]], step_ms: Sequence[float]) -> float:
    """The bound: each step drafts the K that makes the most tokens per ms of that step, knowing where its run of
    accepted drafts ends."""
    def policy_for(misses: Sequence[bool]) -> Policy:
        def policy(p: int, _full: bool) -> int:
            run = 0
            while p + run < len(misses) and not misses[p + run]:
                run += 1
            top = max(0, min(MAX_DRAFT_TOKENS, len(misses) - p - 1))
            return max(range(top + 1), key=lambda k: (min(run, k) + 1) / step_ms[k])
        return policy

    return sum(len(m) - 1 for m in all_misses) / sum(_ms(m, policy_for(m), step_ms) for m in all_misses)


def summary(all_misses: Sequence[Sequence[bool]], step_ms: Sequence[float]) -> dict:
    """Fixed K's rates, each prompt's best K, the best pair of K by where a step starts, and the bound."""
    ks = range(1, MAX_DRAFT_TOKENS + 1)
    tokens = sum(len(m) - 1 for m in all_misses)
    # each prompt's milliseconds at each fixed K (0: plain), replayed once: fixed K's rates and each prompt's best K
    ms = [{k: _ms(m, lambda p, f, k=k: k, step_ms) for k in range(MAX_DRAFT_TOKENS + 1)} for m in all_misses]
    fixed = {k: tokens / sum(one[k] for one in ms) for k in range(MAX_DRAFT_TOKENS + 1)}
    best = max(fixed, key=fixed.get)
    # one request's tokens are the same at every K: the fastest K is its best
    per_prompt = [min(ks, key=one.get) for one in ms]
    best_ms = sum(one[k] for one, k in zip(ms, per_prompt))
    pairs = {(a, b): rate(all_misses, lambda p, f, a=a, b=b: b if f else a, step_ms) for a in ks for b in ks}
    pair = max(pairs, key=pairs.get)
    return {"fixed": fixed, "best_k": best, "per_prompt_k": per_prompt,
            "per_prompt": tokens / best_ms,
            "pair": pair, "pair_rate": pairs[pair], "knows_the_run": knows_the_run(all_misses, step_ms)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.bench.replay", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=3, help="the bench's first N prompts")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--target-ms", type=float, default=1.0, help="a plain step's time")
    p.add_argument("--model-ms", required=True, help="the draft model's step times at K = 1..8, comma-separated (ms)")
    args = p.parse_args(argv)
    try:
        model_ms = [float(x) for x in args.model_ms.split(",")]
    except ValueError:
        p.error(f"--model-ms {args.model_ms!r}: give step times in ms, comma-separated")
    if len(model_ms) != MAX_DRAFT_TOKENS or min(model_ms + [args.target_ms]) <= 0 or args.prompts < 1 or args.tokens < 2:
        p.error("give 8 positive step times (K = 1..8), a positive --target-ms, --prompts >= 1 and --tokens >= 2")
    from engine.bench.prompts import load_prompts
    from engine.config import EngineConfig
    from engine.factory import build_engine

    engine = build_engine(EngineConfig(device="cpu", dtype="float32"))
    misses = greedy_misses(engine, load_prompts()[: args.prompts], args.tokens)
    out = summary(misses, [args.target_ms] + model_ms)
    best = out["fixed"][out["best_k"]]
    print("fixed K, tokens/ms: " + "  ".join(f"K={k} {v:.3f}" for k, v in out["fixed"].items()))
    print(f"best fixed K = {out['best_k']}; each prompt's best K {out['per_prompt_k']}: {out['per_prompt'] / best:.3f}x; "
          f"K = {out['pair'][0]} after a draft not fully accepted, {out['pair'][1]} after one fully accepted: "
          f"{out['pair_rate'] / best:.3f}x; knowing each step's run: {out['knows_the_run'] / best:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
