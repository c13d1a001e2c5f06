"""CPU time of single KV-cached decoding steps of the saved pair (and of drafts of other depths), to
estimate the speed-up and to choose the draft's depth."""

from __future__ import annotations

import copy
import os
import time


def step(model, ids, cache=None):
    """One KV-cached forward; works with both the `past_key_values` (transformers <5.2x) and the
    newer `cache` argument names. Returns (logits, cache)."""
    import inspect

    name = getattr(model, "_helix_cache_kw", None)
    if name is None:
        params = inspect.signature(model.forward).parameters
        name = "cache" if "cache" in params else "past_key_values"
        model._helix_cache_kw = name
    kw = {name: cache} if cache is not None else {}
    o = model(input_ids=ids, use_cache=True, **kw)
    c = getattr(o, "cache", None)
    if c is None:
        c = o.past_key_values
    return o.logits, c


def cpu_step_times(target, draft, threads: int = 2, ctx_len: int = 64, reps: int = 200, variants=(1, 2, 3)):
    """CPU time of one KV-cached decoding step, torch.set_num_threads(threads): 1 token (draft and
    target) and k+1=5 tokens (the target scoring a draft), after a ctx_len-token prompt; each model
    then keeps decoding on its own cache (context grows by 1 or 5 tokens a step, as in real use, and
    is reset to the prompt once it passes ctx_len + 128 tokens).
    The models are timed round-robin, step by step, so that load from other processes hits them all
    alike; we report the median and the minimum per model and the median of the per-round ratio.
    Drafts of other depths (same width, random weights: the step time does not depend on the
    weights) are timed as well, to show how the draft depth was chosen."""
    import statistics

    import torch
    from transformers import LlamaForCausalLM

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    target, draft = target.to("cpu").float(), draft.to("cpu").float()
    g = torch.Generator().manual_seed(0)
    V = target.config.vocab_size
    prompt = torch.randint(3, V, (1, ctx_len), generator=g)
    runs = {"target_1": (target, 1), "target_5": (target, 5), "draft_1": (draft, 1)}
    for n in variants:
        c = copy.deepcopy(target.config)
        c.num_hidden_layers = n
        runs[f"draft_{n}layer_1"] = (LlamaForCausalLM(c).eval(), 1)
    times = {k: [] for k in runs}
    with torch.no_grad():
        caches = {k: step(m, prompt)[1] for k, (m, _) in runs.items()}
        lens = {k: ctx_len for k in runs}
        for r in range(reps + 10):
            for k, (m, n) in runs.items():
                if lens[k] + n > ctx_len + 128:  # keep contexts in [ctx_len, ctx_len + 128]
                    caches[k], lens[k] = step(m, prompt)[1], ctx_len
                lens[k] += n
                x = torch.randint(3, V, (1, n), generator=g)
                t0 = time.perf_counter()
                _, caches[k] = step(m, x, caches[k])
                if r >= 10:
                    times[k].append(1000 * (time.perf_counter() - t0))
    torch.set_num_threads(old)
    res = {}
    for k in ("target_1", "target_5", "draft_1"):
        res[k + "_ms"] = statistics.median(times[k])
        res[k + "_min_ms"] = min(times[k])
    res["ratio_draft_over_target"] = statistics.median(d / t for d, t in zip(times["draft_1"], times["target_1"]))
    res["draft_depth_variants_1_ms"] = {str(n): statistics.median(times[f"draft_{n}layer_1"]) for n in variants}
    res["draft_depth_variants_1_min_ms"] = {str(n): min(times[f"draft_{n}layer_1"]) for n in variants}
    res.update(threads=threads, ctx_len=ctx_len, reps=reps)
    try:
        res["loadavg_1min"] = os.getloadavg()[0]
    except OSError:
        pass
    return res
