"""Evaluation of the saved pair: held-out losses, and greedy speculative decoding through the Helix engine
(acceptance at K, per position, replies) on held-out story openings and on chat prompts."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

from .chat_format import encode_conversations
from .common import log
from .config import VALID_FILE, Config
from .copy_data import SentencePool, copy_conversation, told_twice
from .corpus import eval_story_indices, opening, read_docs
from .draft import agreement
from .instruct import TASKS, story_conversation
from .models import heldout_loss, load_pair, n_params
from .streams import plain_stream, stream_windows
from .tokenizer import encode_texts

# Prompts written for the evaluation, in phrasings the training data does not use.
HANDWRITTEN = [
    [{"role": "user", "content": "Could you make up a tale about a bear who loves honey?"}],
    [{"role": "user", "content": "My son likes trains. Tell him a story about a red train."}],
    [{"role": "user", "content": "Write a funny story about a cat and a dog who become friends."}],
    [{"role": "user", "content": "I need a bedtime story with a princess and a dragon."}],
    [{"role": "system", "content": "You are a storyteller."},
     {"role": "user", "content": "A girl named Mia finds a magic key. What happens?"}],
    [{"role": "user", "content": "Please say this sentence back to me: The little fox ran home before the rain came."}],
    [{"role": "user", "content": "Tom had a red kite. He flew it at the park. The wind took it up into a tree. "
                                 "His dad helped him get it down.\n\nWhich sentence comes first in this story?"}],
    [{"role": "user", "content": "Hello! What can you do?"}],
]


def chat_eval_set(valid_docs: list[str], n: int, seed: int) -> list[dict]:
    """n chat prompts from held-out stories, the tasks taken in turn; each keeps the held-out reply."""
    rng = random.Random(seed)
    names = list(TASKS)
    out, i = [], 0
    for idx in eval_story_indices(len(valid_docs), 4 * n):
        if len(out) >= n:
            break
        story, other = valid_docs[idx], valid_docs[(idx + 1) % len(valid_docs)]
        made = story_conversation(story, other, rng, task=names[i % len(names)])
        if made:
            task, messages = made
            out.append({"task": task, "story_index": idx, "messages": messages[:-1], "reference": messages[-1]["content"]})
            i += 1
    return out


def copy_prompt_sets(engine, tok, valid_docs: list[str], openings: list[str], cfg: Config, ctx: int) -> dict:
    """N-gram prompt lookup (and the draft model, for comparison) on prompts whose continuation repeats the
    prompt: issue 16's repeat set (3 held-out openings, then the first sentence again, as ``main.py bench
    --prompt-set repeat``) and chat requests to repeat passages recombined from held-out stories."""
    from engine.bench.prompts import repeat_prompts
    from engine.server.chat import chat_prompt

    rng = random.Random(cfg.seed + 23)
    pool = SentencePool(valid_docs)
    chats = [copy_conversation(pool, rng)[:-1] for _ in range(max(4, cfg.eval_chat_prompts // 2))]
    sets = {"repeat": [tok(p)["input_ids"] for p in repeat_prompts(openings)],
            "copy_chat": [chat_prompt(tok, [(m["role"], m["content"]) for m in msgs]) for msgs in chats]}
    out = {}
    for name, prompts in sets.items():
        prompts = [p for p in prompts if len(p) <= ctx - 16]
        for method in ("ngram", "model"):
            acc, events = run_set(engine, prompts, cfg.eval_new_tokens, cfg.spec_k, method=method,
                                  check_exact=1 if method == "ngram" else 0)
            acc["sample"] = events[0].text if events else None
            out[f"{name}_{method}"] = acc
            log(f"eval: {name} prompts ({len(prompts)}), {method} K={cfg.spec_k}: acceptance "
                f"{acc['acceptance_rate']:.4f}, mean acceptance length {acc['mean_acceptance_length']:.3f}, "
                f"{acc['num_drafts']} drafts for {acc['generated_tokens']} tokens")
    return out


def build_eval_engine(target_dir: Path, draft_dir: Path, threads: int):
    from engine import EngineConfig
    from engine.factory import build_engine

    return build_engine(EngineConfig(target=str(target_dir), draft=str(draft_dir), device="cpu", dtype="float32",
                                     num_threads=threads, kv_cache_tokens=16384), warmup=False)


def run_set(engine, prompts: list[list[int]], new_tokens: int, k: int, method: str = "model",
            check_exact: int = 2) -> tuple[dict, list]:
    """Greedy decoding of each prompt with K=k drafts of ``method``; the first ``check_exact`` prompts are
    also decoded plainly and must give the same tokens. Returns (stats, finish events)."""
    from engine import SamplingParams
    from engine.stats import SpecDecodingStats

    total = SpecDecodingStats()
    events, exact = [], []
    t0 = time.time()
    for j, ids in enumerate(prompts):
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, num_draft_tokens=k, draft_method=method)
        ev = engine.generate(ids, params)
        total.merge(ev.stats)
        events.append(ev)
        if j < check_exact:
            plain = engine.generate(ids, SamplingParams(max_new_tokens=new_tokens, temperature=0.0, speculative=False))
            exact.append(plain.token_ids == ev.token_ids)
    drafts = max(1, total.num_drafts)
    return {
        "k": k, "method": method, "prompts": len(prompts),
        "generated_tokens": sum(len(e.token_ids) for e in events),
        "finish_reasons": {r: sum(e.finish_reason == r for e in events) for r in {e.finish_reason for e in events}},
        "num_drafts": total.num_drafts, "num_draft_tokens": total.num_draft_tokens,
        "num_accepted_tokens": total.num_accepted_tokens,
        "acceptance_rate": total.acceptance_rate,
        "mean_acceptance_length": total.mean_acceptance_length,
        "accepted_per_position": [a / drafts for a in total.accepted_per_position[:k]],
        "greedy_equals_plain": exact, "seconds": round(time.time() - t0, 1),
    }, events


def evaluate(target_dir: Path, draft_dir: Path, corpus: Path, cfg: Config, threads: int = 2, ngram: bool = True):
    import torch

    from engine.server.chat import chat_prompt

    device = torch.device("cpu")
    torch.set_num_threads(threads)
    tok, target, draft = load_pair(target_dir, draft_dir, device)
    ctx = target.config.max_position_embeddings
    valid_docs = read_docs(Path(corpus) / VALID_FILE, cfg.max_docs, cfg.max_doc_chars)
    sample = valid_docs[0]
    assert tok.decode(tok(sample, add_special_tokens=False)["input_ids"]) == sample, "tokenizer does not round-trip"

    # held-out losses: plain stories (windows over the stream) and chat replies (conversations of held-out stories)
    story_seqs = stream_windows(plain_stream(encode_texts(tok, valid_docs)), ctx)
    chat = chat_eval_set(valid_docs, len(valid_docs), cfg.seed + 7)
    chat_seqs = [s for s in encode_conversations(tok, [c["messages"] + [{"role": "assistant", "content": c["reference"]}]
                                                       for c in chat]) if len(s[0]) <= ctx + 1]
    res = {"device": "cpu", "threads": threads}
    for name, m in (("target", target), ("draft", draft)):
        losses = {"stories": heldout_loss(m, story_seqs, ctx, device), "chat": heldout_loss(m, chat_seqs, ctx, device)}
        res[name] = {"layers": m.config.num_hidden_layers, "parameters": n_params(m),
                     "heldout_loss": losses, "heldout_ppl": {k: math.exp(v) for k, v in losses.items()}}
    twice = told_twice(tok, valid_docs, cfg.copy_heldout, cfg.seed + 22, ctx)
    for name, m in (("target", target), ("draft", draft)):  # copying: the second telling vs the first
        res[name]["copy_loss"] = {"passages": len(twice),
                                  "first": heldout_loss(m, [(s, m1) for s, m1, _ in twice], ctx, device),
                                  "second": heldout_loss(m, [(s, m2) for s, _, m2 in twice], ctx, device)}
    res["agreement_teacher_forced_heldout"] = {
        "stories": agreement(draft, target, story_seqs[:64], ctx, device),
        "chat": agreement(draft, target, chat_seqs[:256], ctx, device),
    }
    del target, draft
    log(f"eval: held-out loss target {res['target']['heldout_loss']}, draft {res['draft']['heldout_loss']}; "
        f"teacher-forced agreement {res['agreement_teacher_forced_heldout']}")

    # greedy speculative decoding through the engine
    engine = build_eval_engine(target_dir, draft_dir, threads)
    idx = eval_story_indices(len(valid_docs), cfg.eval_prompts)
    openings = [opening(valid_docs[i]) for i in idx]
    story_prompts = [tok(o)["input_ids"] for o in openings]
    acc, events = run_set(engine, story_prompts, cfg.eval_new_tokens, cfg.spec_k)
    acc["eval_story_indices"] = idx
    res["stories"] = acc
    res["story_samples"] = [{"story_index": idx[i], "opening": openings[i], "continuation": events[i].text,
                             "finish_reason": events[i].finish_reason} for i in range(min(3, len(events)))]
    log(f"eval: stories, greedy K={cfg.spec_k}: acceptance {acc['acceptance_rate']:.4f}, per position "
        f"{[round(v, 3) for v in acc['accepted_per_position']]}, mean acceptance length "
        f"{acc['mean_acceptance_length']:.3f}, greedy == plain {acc['greedy_equals_plain']} ({acc['seconds']}s)")

    items = chat_eval_set(valid_docs, cfg.eval_chat_prompts, cfg.seed + 8)
    items += [{"task": "handwritten", "messages": m, "reference": None} for m in HANDWRITTEN]
    prompts = [chat_prompt(tok, [(m["role"], m["content"]) for m in it["messages"]]) for it in items]
    keep = [i for i, p in enumerate(prompts) if len(p) <= ctx - 16]
    items, prompts = [items[i] for i in keep], [prompts[i] for i in keep]
    acc, events = run_set(engine, prompts, cfg.eval_chat_new_tokens, cfg.spec_k)
    acc["tasks"] = {t: sum(it["task"] == t for it in items) for t in dict.fromkeys(it["task"] for it in items)}
    res["chat"] = acc
    res["chat_samples"] = [{"task": it["task"], "messages": it["messages"], "reply": ev.text,
                            "finish_reason": ev.finish_reason, "acceptance_rate": ev.stats.acceptance_rate}
                           for it, ev in zip(items, events)]
    log(f"eval: chat, greedy K={cfg.spec_k}: acceptance {acc['acceptance_rate']:.4f}, per position "
        f"{[round(v, 3) for v in acc['accepted_per_position']]}, mean acceptance length "
        f"{acc['mean_acceptance_length']:.3f}, finish {acc['finish_reasons']}, greedy == plain "
        f"{acc['greedy_equals_plain']} ({acc['seconds']}s)")
    if ngram:
        ng, _ = run_set(engine, prompts, cfg.eval_chat_new_tokens, cfg.spec_k, method="ngram", check_exact=0)
        res["chat_ngram"] = ng
        log(f"eval: chat, n-gram prompt lookup K={cfg.spec_k}: acceptance {ng['acceptance_rate']:.4f} over "
            f"{ng['num_drafts']} drafts for {ng['generated_tokens']} tokens")
        res.update(copy_prompt_sets(engine, tok, valid_docs, openings, cfg, ctx))
    log(f"eval: copy loss (held-out passages told twice), first / second telling: target "
        f"{res['target']['copy_loss']['first']:.3f} / {res['target']['copy_loss']['second']:.3f}, draft "
        f"{res['draft']['copy_loss']['first']:.3f} / {res['draft']['copy_loss']['second']:.3f}")
    for s in res["chat_samples"][:: max(1, len(res["chat_samples"]) // 8)]:
        log(f"--- {s['task']}: {s['messages'][-1]['content'][:160]!r}\n{s['reply']}")
    return res
