"""On-policy distillation data: the trained target continues story openings and answers chat prompts built
from the train stories, greedily and by sampling; the draft then learns the target's distributions on it."""

from __future__ import annotations

import copy
import math
import random
import time

from .chat_format import encode_conversations
from .common import Progress, autocast, log
from .config import PAD_ID, STOP_IDS, Config
from .corpus import opening
from .instruct import build_conversations


def generate_batch(model, prompts: list[list[int]], device, new_tokens: int, temperature: float | None):
    """Continue left-padded prompts; returns each row's continuation through its first stop token."""
    import torch

    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p) :] = torch.tensor(p)
        mask[i, L - len(p) :] = 1
    kw = dict(do_sample=False) if temperature is None else dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    with torch.no_grad(), autocast(device):
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
            eos_token_id=list(STOP_IDS), pad_token_id=PAD_ID, **kw,
        )
    res = []
    for i in range(len(prompts)):
        cont = out[i, L:].tolist()
        ends = [j for j, t in enumerate(cont) if t in STOP_IDS]
        res.append(cont[: ends[0] + 1] if ends else cont)
    return res


def distill_prompts(hf_tok, ts_docs: list[str], cfg: Config):
    """(prompt ids, prompt mask) per kind: 'story' (2-sentence openings, every token a target) and 'chat'
    (conversations without their last reply, only replies are targets); prompts fit in half the context."""
    docs = ts_docs[: cfg.gen_openings] if cfg.gen_openings else ts_docs
    limit = cfg.ctx // 2
    stories = [p for p in (hf_tok(opening(d))["input_ids"] for d in docs) if len(p) <= limit]
    convs, _ = build_conversations(docs, 1, cfg.seed + 5)
    chats = [(ids, mask) for ids, mask in encode_conversations(hf_tok, [c[:-1] for c in convs], True)
             if len(ids) <= limit]
    return {"story": [(p, [1] * len(p)) for p in stories], "chat": chats}


def make_distill_data(model, hf_tok, ts_docs: list[str], cfg: Config, device):
    """Sequences (ids, mask) the target wrote: greedy story continuations and chat replies first, then
    ``gen_samples`` samples of each at ``gen_temperature``, until ``gen_max_minutes``."""
    import torch

    prompts = distill_prompts(hf_tok, ts_docs, cfg)
    jobs = [("story", None), ("chat", None)] + [(k, cfg.gen_temperature) for _ in range(cfg.gen_samples)
                                                 for k in ("chat", "story")]
    total = sum(math.ceil(len(prompts[k]) / cfg.gen_batch) for k, _ in jobs)
    prog = Progress("generate", total, 1)
    torch.manual_seed(cfg.seed + 2)
    # generation needs no backward: a bf16 copy (bf16 KV cache) and the fast kernels
    gm = copy.deepcopy(model).to(torch.bfloat16) if device.type == "cuda" else model
    det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    seqs, counts, k, t0 = [], {}, 0, time.time()
    for kind, temp in jobs:
        batch_prompts = sorted(prompts[kind], key=lambda p: len(p[0]))
        for i in range(0, len(batch_prompts), cfg.gen_batch):
            if cfg.gen_max_minutes and time.time() - t0 > 60 * cfg.gen_max_minutes:
                break
            group = batch_prompts[i : i + cfg.gen_batch]
            new_tokens = min(cfg.gen_new_tokens, cfg.ctx - max(len(p) for p, _ in group))
            conts = generate_batch(gm, [p for p, _ in group], device, new_tokens, temp)
            seqs += [(p + c, m + [1] * len(c)) for (p, m), c in zip(group, conts)]
            key = f"{kind} {'greedy' if temp is None else f'T={temp}'}"
            counts[key] = counts.get(key, 0) + len(group)
            k += 1
            prog.update(k, job=key, seqs=len(seqs))
    if cfg.gen_max_minutes and time.time() - t0 > 60 * cfg.gen_max_minutes:
        log(f"generate: time budget of {cfg.gen_max_minutes} min reached")
    torch.use_deterministic_algorithms(det, warn_only=True)
    del gm
    random.Random(cfg.seed + 3).shuffle(seqs)
    ntok = sum(len(s) for s, _ in seqs)
    n_end = sum(1 for s, _ in seqs if s[-1] in STOP_IDS)
    log(f"distillation data: {len(seqs)} sequences {counts}, {ntok:,} tokens, {n_end} ended with a stop token")
    return seqs, {"sequences": len(seqs), "by_kind": counts, "tokens": ntok, "ended_with_stop": n_end}
