#!/usr/bin/env python3
"""Train an EAGLE-3 draft head (engine.eagle.EagleHead) for a Helix target; default: the demo target.

Recipe (EAGLE-3, arXiv 2503.01840, with its "training-time test"):
  1. data: windows drawn, by the weights of ``--mix``, from the target's own writing (``gen``: greedy and
     sampled continuations of train-story openings, and replies to chat prompts when the target has the
     chat format: self-distillation, as for the demo draft), plain train stories, books and chat
     conversations (replies only are trained on);
  2. the frozen target reads each window (``output_hidden_states=True``): the inputs of its low, mid and
     high aux layers are the head's features, its logits the teacher;
  3. the head is unrolled ``--ttt-steps`` drafting steps (``EagleHead.forward_train``): step 0 reads the
     target's features, step s >= 1 its own step s-1 outputs, so it learns from the states it will see
     while drafting; step s is trained with soft cross-entropy against the target's next-token
     distribution (restricted to the draft vocabulary), weighted ``--step-decay ** s``. The tokens fed with
     its outputs are the data's: on the target's greedy text, exactly what the head must have drafted for
     its chain to be accepted so far;
  4. the checkpoint with the most expected accepted tokens at K is kept: on held-out greedy text of the
     target, step s's top-1 agreement is the greedy acceptance of position s+1 given the earlier ones, so
     their running products are the acceptance per position. It is saved as an EAGLE-3 folder
     (config.json + fp16 model.safetensors; embeddings shared with the target, not stored) and evaluated
     through the Helix engine on CPU (greedy, K, held-out story openings; chat prompts for a chat target).

It lives beside train_demo.py, not in the engine: it is a build tool for shipped artifacts that needs the
corpus and the demo pipeline's data helpers (``training``); the engine ships only the head, its loader and
the proposer. The objective is the head's own ``forward_train``, which engine tests check against drafting.

Usage (from the repo root):
  python resources/models/train_eagle.py --device cuda --corpus .data --skip-eval   # GPU: < 10 minutes
  python resources/models/train_eagle.py --eval-only                     # then on CPU, through the engine
  python resources/models/train_eagle.py --preset cpu-demo --device cpu --threads 1   # ~5 minutes on a CPU
  python resources/models/train_eagle.py --init resources/models/demo-eagle --target NEW   # continue a head
  python resources/models/train_eagle.py --help                          # every setting

The GPU command (``.data`` is a copy of /work/shared/data/corpus, as for train_demo.py) generates the
target's data for at most 2.5 minutes and trains for at most 5 (the step count shrinks to fit, so the LR
schedule still ends); the head goes to resources/models/demo-eagle and the record to
resources/models/eagle_results.json.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

from training.common import Progress, StepBudget, add_config_flags, autocast, log, lr_at, pick_device, set_seed  # noqa: E402
from training.config import ASSISTANT, ASSISTANT_ID, DEFAULT_CORPUS, VALID_FILE  # noqa: E402
from training.config import Config as DemoConfig  # noqa: E402

DEFAULT_TARGET = HERE / "demo-target"
DEFAULT_OUT = HERE / "demo-eagle"
SOURCES = ("gen", "stories", "chat", "books", "copy")


@dataclass
class Config:
    seed: int = 1234
    ctx: int = 512  # training window (tokens); at most the target's max_position_embeddings
    # head shape
    draft_vocab: int = 0  # >0: draft over the N most frequent tokens of the training data (0: all of them)
    intermediate: int = 0  # MLP width of the head's layer (0: the target's)
    # data
    mix: str = "gen=0.7,stories=0.15,chat=0.1,books=0.05"  # window sources and weights (missing ones drop out)
    copy_docs: int = 20000  # the "copy" source: passages told twice (training/copy_data.py)
    init: str = ""  # a head folder to continue training (its draft vocabulary kept); "": start from the target
    use_extra: bool = True  # tinystories_train_extra_truecased.txt
    max_docs: int = 0  # >0: only the first N documents of each corpus file
    max_doc_chars: int = 0  # >0: cut every document to N characters
    chat_per_story: int = 1  # conversations built from each train story (targets with the chat format)
    gen_openings: int = 0  # story openings / chat prompts the target continues (0: every train story)
    gen_samples: int = 1  # sampled continuations per prompt, after the greedy one
    gen_temperature: float = 0.8
    gen_new_tokens: int = 256
    gen_batch: int = 1024
    gen_max_minutes: float = 0.0  # >0: stop generating after this long
    # training
    steps: int = 3000
    batch: int = 64
    lr: float = 1e-3
    wd: float = 0.0
    warmup: int = 100
    min_lr_frac: float = 0.1
    ttt_steps: int = 5  # drafting steps unrolled per window (training-time test)
    step_decay: float = 0.8  # loss weight of unrolled step s: step_decay ** s
    max_minutes: float = 0.0  # >0: fit the step count into this many minutes
    eval_every: int = 250
    holdout_frac: float = 0.02  # share of the generated sequences held out to choose the checkpoint
    # evaluation (CPU, through the engine)
    eval_prompts: int = 50
    eval_new_tokens: int = 128
    spec_k: int = 4
    log_every: int = 50


PRESETS = {
    "full": dict(gen_max_minutes=2.5, max_minutes=5.0),  # fits one 10-minute GPU command
    # the demo target on a 2-core CPU in a few minutes: short windows, few generated stories
    "cpu-demo": dict(ctx=128, batch=8, steps=300, lr=2e-3, warmup=20, gen_openings=400, gen_samples=0,
                     gen_new_tokens=128, gen_batch=64, eval_every=50, holdout_frac=0.05, log_every=10,
                     mix="gen=0.8,stories=0.2", max_minutes=4.0),
    # the test's preset: seconds on a CPU
    "tiny": dict(ctx=32, batch=4, steps=12, lr=3e-3, warmup=2, max_docs=40, max_doc_chars=1500,
                 gen_openings=12, gen_samples=0, gen_new_tokens=24, gen_batch=12, eval_every=6,
                 holdout_frac=0.25, eval_prompts=2, eval_new_tokens=12, log_every=3, ttt_steps=3,
                 mix="gen=0.6,stories=0.2,books=0.2"),
}


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, w = part.partition("=")
        if name not in SOURCES:
            raise ValueError(f"--mix: unknown source {name!r} (sources: {', '.join(SOURCES)})")
        try:
            mix[name] = float(w)
        except ValueError:
            raise ValueError(f"--mix: {part!r} is not source=weight") from None
        if mix[name] < 0:
            raise ValueError(f"--mix: weight of {name} is negative")
    if not any(mix.values()):
        raise ValueError(f"--mix {text!r} gives no source a weight")
    return mix


# ----------------------------------------------------------------------------- data
def has_chat_format(tok) -> bool:
    """Whether the target's tokenizer is the demo's chat one (role tokens at the ids training.config fixes)."""
    return tok.convert_tokens_to_ids(ASSISTANT) == ASSISTANT_ID


def demo_config(cfg: Config, ctx: int, books: bool = True) -> DemoConfig:
    """The demo pipeline's settings for the shared data helpers (corpus, conversations, generation)."""
    return DemoConfig(seed=cfg.seed, ctx=ctx, use_extra=cfg.use_extra, max_docs=cfg.max_docs,
                      max_doc_chars=cfg.max_doc_chars, books_weight=float(books), chat_per_story=cfg.chat_per_story,
                      gen_openings=cfg.gen_openings, gen_samples=cfg.gen_samples,
                      gen_temperature=cfg.gen_temperature, gen_new_tokens=cfg.gen_new_tokens,
                      gen_batch=cfg.gen_batch, gen_max_minutes=cfg.gen_max_minutes)


def self_distillation(target, tok, stories: list[str], dcfg: DemoConfig, chat: bool, device):
    """The target's own writing: greedy (then sampled) continuations of story openings, and replies to chat
    prompts when ``chat``. Returns (greedy, sampled) lists of (ids, mask) sequences."""
    import torch
    from training.distill_data import distill_prompts, generate_batch

    prompts = distill_prompts(tok, stories, dcfg)
    kinds = ["story"] + (["chat"] if chat else [])
    by_len = {k: sorted(prompts[k], key=lambda p: len(p[0])) for k in kinds}  # less padding per batch
    jobs = [(k, None) for k in kinds] + [(k, dcfg.gen_temperature) for _ in range(dcfg.gen_samples) for k in kinds]
    todo = [(kind, temp, i) for kind, temp in jobs for i in range(0, len(by_len[kind]), dcfg.gen_batch)]
    prog = Progress("generate", len(todo), 1)
    torch.manual_seed(dcfg.seed + 2)
    gm = copy.deepcopy(target).to(torch.bfloat16) if device.type == "cuda" else target  # bf16 KV cache: faster
    out, t0 = {None: [], "sampled": []}, time.time()
    for n, (kind, temp, i) in enumerate(todo, 1):
        if dcfg.gen_max_minutes and time.time() - t0 > 60 * dcfg.gen_max_minutes:
            log(f"generate: time budget of {dcfg.gen_max_minutes} min reached")
            break
        group = by_len[kind][i: i + dcfg.gen_batch]
        new = min(dcfg.gen_new_tokens, dcfg.ctx - max(len(p) for p, _ in group))
        conts = generate_batch(gm, [p for p, _ in group], device, new, temp)
        out[None if temp is None else "sampled"] += [(p + c, m + [1] * len(c)) for (p, m), c in zip(group, conts)]
        prog.update(n, job=f"{kind} {'greedy' if temp is None else f'T={temp}'}",
                    seqs=len(out[None]) + len(out["sampled"]))
    return out[None], out["sampled"]


def build_data(cfg: Config, target, tok, corpus: Path, device):
    """Training streams by source, their weights, and the held-out greedy sequences (checkpoint choice)."""
    import random

    from training.chat_format import encode_conversations
    from training.corpus import load_corpus
    from training.instruct import build_conversations
    from training.streams import masked_stream, plain_stream
    from training.tokenizer import encode_texts

    mix = parse_mix(cfg.mix)
    chat = has_chat_format(tok)
    if not chat and mix.get("chat"):
        log("data: the target has no chat format (no <|assistant|> token); the chat source is left out")
        mix["chat"] = 0.0
    dcfg = demo_config(cfg, cfg.ctx, books=bool(mix.get("books") or mix.get("chat") or mix.get("copy")))
    data = load_corpus(corpus, dcfg)
    streams = {"stories": plain_stream(encode_texts(tok, data["ts"]))}
    if mix.get("books"):
        streams["books"] = plain_stream(encode_texts(tok, data["books"]))
    if mix.get("copy"):
        from training.copy_data import copy_sequences

        seqs = copy_sequences(tok, data["ts"] + data["books"], cfg.copy_docs, cfg.seed + 21,
                              chat_frac=0.4 if chat else 0.0)
        streams["copy"] = masked_stream(seqs)
    if mix.get("chat"):
        convs, _ = build_conversations(data["ts"], cfg.chat_per_story, cfg.seed + 4, data["books"],
                                       dcfg.book_passages if data["books"] else 0)
        streams["chat"] = masked_stream([s for s in encode_conversations(tok, convs) if len(s[0]) > 1])
    greedy, sampled = self_distillation(target, tok, data["ts"], dcfg, chat, device)
    order = list(range(len(greedy)))
    random.Random(cfg.seed + 3).shuffle(order)
    held = set(order[: max(1, int(cfg.holdout_frac * len(greedy)))])
    heldout = [greedy[i] for i in sorted(held)]
    train_seqs = [s for i, s in enumerate(greedy) if i not in held] + sampled
    if train_seqs:
        streams["gen"] = masked_stream(train_seqs)
    weights = {k: mix.get(k, 0.0) for k in streams}
    log("data: " + ", ".join(f"{k} {len(s):,} tokens (weight {weights[k]:g})" for k, s in streams.items())
        + f"; held out {len(heldout)} greedy sequences")
    return streams, weights, heldout


def draft_vocabulary(streams: dict, weights: dict, n: int, vocab: int, keep: list[int]):
    """The ``n`` target ids most frequent in the training windows (by source weight), plus ``keep``."""
    import torch

    counts = torch.zeros(vocab, dtype=torch.float64)
    for k, s in streams.items():
        if weights.get(k):
            counts += weights[k] * torch.bincount(s.ids, minlength=vocab).double() / len(s)
    counts[torch.tensor(keep, dtype=torch.long)] = float("inf")
    ids = counts.topk(n).indices.sort().values
    covered = float(counts[ids][counts[ids].isfinite()].sum() / counts[counts.isfinite()].sum())
    return ids, covered


# ----------------------------------------------------------------------------- model
def make_head(cfg: Config, target, ids=None, device=None):
    import torch

    from engine.eagle import EagleConfig, EagleHead, load_head

    if cfg.init:
        return load_head(cfg.init, target, dtype=torch.float32, device=device).train().requires_grad_(True)
    hcfg = EagleConfig.for_target(target.config, draft_vocab_size=len(ids) if ids is not None else None,
                                  intermediate_size=cfg.intermediate or None)
    head = EagleHead(hcfg)
    if ids is not None:
        head.set_vocab_map(ids)
    with torch.no_grad():  # start from the target's output layer: final norm and (draft rows of) its lm_head
        head.lm_head.weight.copy_(target.get_output_embeddings().weight[head.draft_to_target])
        head.norm.weight.copy_(target.model.norm.weight)
    head.attach_embeddings(target.get_input_embeddings())
    return head


def target_pass(target, head, x):
    """Frozen target over ``x`` [B, T]: (aux states [B, T, 3*D] for the head, logits [B, T, V])."""
    import torch

    with torch.no_grad():
        out = target(input_ids=x, output_hidden_states=True)
        ids = head.layer_ids(target.config.num_hidden_layers)
        return torch.cat([out.hidden_states[i] for i in ids], -1), out.logits


def ttt_loss(head, outs, t_logits, m, decay: float):
    """Weighted soft cross-entropy of the unrolled steps against the target, and per-step statistics.

    outs[s] [B, T, Vd]: step s at position t predicts token t+s+2, whose teacher is t_logits[:, t+s+1]
    (restricted to the draft vocabulary) and whose training mask is m[:, t+s+1] (m masks y = x shifted).
    Positions whose target argmax the draft vocabulary lacks are left out (the head cannot match them)."""
    import torch
    import torch.nn.functional as F

    ids = head.draft_to_target
    total, stats = 0.0, []
    T = t_logits.shape[1]
    for s, logits in enumerate(outs):
        n = T - s - 1
        if n <= 0:
            break
        teacher = t_logits[:, s + 1:].float()  # [B, n, V]
        mask = m[:, s + 1:].bool() & head.t2d[teacher.argmax(-1)]
        p = F.softmax(teacher[..., ids], -1)  # [B, n, Vd]
        logp = F.log_softmax(logits[:, :n].float(), -1)
        ce = -(p * logp).sum(-1)
        cnt = mask.sum()
        loss = (ce * mask).sum() / cnt.clamp_min(1)
        total = total + decay ** s * loss
        with torch.no_grad():
            hit = ((logp.argmax(-1) == p.argmax(-1)) & mask).sum()
        stats.append((loss.detach(), hit, cnt))
    return total, stats


def acceptance_from_steps(acc: list[float], k: int) -> tuple[list[float], float]:
    """Per-step agreements on greedy text are greedy acceptance per position, given the earlier positions
    were accepted: P(position i accepted) = product of the first i; expected accepted = their sum."""
    per_pos, run = [], 1.0
    for a in acc[:k]:
        run *= a
        per_pos.append(run)
    return per_pos, sum(per_pos)


def heldout_agreement(target, head, seqs, ctx: int, steps: int, device, bsz: int = 32) -> list[float]:
    """Per-step top-1 agreement with the target on the held-out greedy sequences (teacher-forced chain)."""
    import torch
    from training.streams import padded_batches

    was = head.training
    head.eval()
    hits, cnts = [0] * steps, [0] * steps
    with torch.no_grad():
        for x, _, m in padded_batches(seqs, bsz, ctx):
            x, m = x.to(device), m.to(device)
            with autocast(device):
                aux, t_logits = target_pass(target, head, x)
                outs = head.forward_train(aux, x, steps=steps)
            for s, (_, hit, cnt) in enumerate(ttt_loss(head, outs, t_logits, m, 1.0)[1]):
                hits[s] += int(hit)
                cnts[s] += int(cnt)
    head.train(was)
    return [h / max(1, c) for h, c in zip(hits, cnts)]


# ----------------------------------------------------------------------------- training
def train_head(cfg: Config, target, head, streams: dict, weights: dict, heldout: list, device):
    import torch
    from training.streams import WindowSampler

    set_seed(cfg.seed + 20)
    head.to(device).train()
    params = [p for p in head.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    groups = [{"params": decay, "weight_decay": cfg.wd}, {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), **({"fused": True} if device.type == "cuda" else {}))
    names = list(streams)
    sampler = WindowSampler([streams[k] for k in names], [weights[k] for k in names], cfg.ctx, cfg.seed + 21)
    k = cfg.spec_k

    def score() -> tuple[float, list[float]]:
        acc = heldout_agreement(target, head, heldout, cfg.ctx, max(cfg.ttt_steps, k), device)
        return acceptance_from_steps(acc, k)[1], acc

    s0, acc0 = score()
    log(f"eagle: before training, held-out agreement per step {[round(a, 3) for a in acc0]}, "
        f"expected accepted at K={k}: {s0:.3f}")
    best = (s0, 0, {n: v.detach().cpu().clone() for n, v in head.state_dict().items()})
    history = [{"step": 0, "agreement": acc0, "expected_accepted": s0}]
    budget = StepBudget("eagle", cfg.steps, cfg.max_minutes)
    prog = Progress("eagle", cfg.steps, cfg.log_every)
    step = 0
    while step < budget.total and not budget.expired():
        lr = lr_at(step, budget.total, cfg.lr, cfg.warmup, cfg.min_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        x, _, m = sampler.batch(cfg.batch, device)
        with autocast(device):
            aux, t_logits = target_pass(target, head, x)
            outs = head.forward_train(aux, x, steps=cfg.ttt_steps)
        loss, stats = ttt_loss(head, outs, t_logits, m, cfg.step_decay)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        budget.after_step(step)
        prog.total = budget.total
        info = {"loss": loss.item(), "acc0": float(stats[0][1] / max(1, int(stats[0][2]))),
                f"acc{len(stats) - 1}": float(stats[-1][1] / max(1, int(stats[-1][2]))), "lr": lr}
        if step % cfg.eval_every == 0 or step == budget.total:
            s, acc = score()
            history.append({"step": step, "agreement": acc, "expected_accepted": s})
            if s > best[0]:
                best = (s, step, {n: v.detach().cpu().clone() for n, v in head.state_dict().items()})
            prog.update(step, force=True, **info, held=s, best=best[0])
        else:
            prog.update(step, **info)
    head.load_state_dict(best[2])
    head.eval()
    acc = history[[h["step"] for h in history].index(best[1])]["agreement"]
    per_pos, expected = acceptance_from_steps(acc, k)
    log(f"eagle: best at step {best[1]}: held-out agreement per step {[round(a, 3) for a in acc]}, so greedy "
        f"acceptance per position {[round(a, 3) for a in per_pos]}, rate {expected / k:.3f} at K={k}")
    return {"steps_run": step, "best_step": best[1], "heldout_agreement_per_step": acc,
            "heldout_acceptance_per_position": per_pos, "heldout_acceptance_rate": expected / k,
            "history": history}


# ----------------------------------------------------------------------------- evaluation (CPU, the engine)
def evaluate(target_dir: Path, head_dir: Path, corpus: Path, cfg: Config, threads: int, draft_dir: Path | None):
    """Greedy speculative decoding through the Helix engine on held-out story openings (and chat prompts made
    from held-out stories, for a target with the chat format): the head at K and, for comparison, the draft
    model; the first prompts of each method are checked against plain greedy. Also the warm-up's step costs
    (head step / target step) and tokens/s of each method."""
    import torch
    from training.corpus import eval_story_indices, opening, read_docs
    from training.evaluate import HANDWRITTEN, chat_eval_set, run_set
    from transformers import AutoTokenizer

    from engine import EngineConfig
    from engine.factory import build_engine

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(target_dir)
    valid = read_docs(Path(corpus) / VALID_FILE, cfg.max_docs, cfg.max_doc_chars)
    idx = eval_story_indices(len(valid), cfg.eval_prompts)
    sets = {"stories": [tok(opening(valid[i]))["input_ids"] for i in idx]}
    if has_chat_format(tok):
        from engine.server.chat import chat_prompt

        items = [it["messages"] for it in chat_eval_set(valid, cfg.eval_prompts, cfg.seed + 8)] + HANDWRITTEN
        sets["chat"] = [chat_prompt(tok, [(m["role"], m["content"]) for m in msgs]) for msgs in items]
    engine = build_engine(EngineConfig(target=str(target_dir), draft=str(draft_dir) if draft_dir else None,
                                       eagle=str(head_dir), device="cpu", dtype="float32", num_threads=threads,
                                       kv_cache_tokens=16384), warmup=True)
    res = {"threads": threads, "eval_story_indices": idx,
           "step_cost": {"target_step_ms": 1e3 * engine.t_target1, "eagle_over_target": engine.eagle_cost,
                         "draft_over_target": engine.draft_cost if draft_dir else None}}
    log(f"eval: warm-up step costs {json.dumps(res['step_cost'])}")
    methods = ["eagle"] + (["model"] if draft_dir else [])
    for name, prompts in sets.items():
        for method in methods:
            acc, _ = run_set(engine, prompts, cfg.eval_new_tokens, cfg.spec_k, method=method)
            res[f"{name}_{method}"] = acc
            log(f"eval ({name}, {method}, greedy, K={cfg.spec_k}): acceptance {acc['acceptance_rate']:.4f}, per "
                f"position {[round(v, 3) for v in acc['accepted_per_position']]}, mean acceptance length "
                f"{acc['mean_acceptance_length']:.3f}, greedy == plain {acc['greedy_equals_plain']} ({acc['seconds']}s)")
    res["speed"] = time_methods(engine, sets["stories"][: min(8, len(idx))], cfg, methods)
    res["step_cost_after_runs"] = {"target_step_ms": 1e3 * engine.t_target1, "eagle_over_target": engine.eagle_cost,
                                   "draft_over_target": engine.draft_cost if draft_dir else None}
    log(f"eval: step costs measured while decoding {json.dumps(res['step_cost_after_runs'])}")
    return res


def time_methods(engine, prompts, cfg: Config, methods: list[str]) -> dict:
    """Tokens/s of plain greedy decoding and of each method at K on a few prompts (one CPU, one run each)."""
    from engine import SamplingParams

    out = {}
    for method in ["plain"] + methods:
        params = (SamplingParams(max_new_tokens=cfg.eval_new_tokens, temperature=0.0, speculative=False)
                  if method == "plain" else
                  SamplingParams(max_new_tokens=cfg.eval_new_tokens, temperature=0.0, num_draft_tokens=cfg.spec_k,
                                 draft_method=method))
        t0, n = time.perf_counter(), 0
        for ids in prompts:
            n += len(engine.generate(ids, params).token_ids)
        out[method] = n / (time.perf_counter() - t0)
    log("eval: tokens/s " + ", ".join(f"{k} {v:.1f}" for k, v in out.items()))
    return {"tokens_per_second": out, "prompts": len(prompts)}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=Path, default=DEFAULT_TARGET, help="target HF folder (default: %(default)s)")
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="corpus dir (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the head's folder (default: %(default)s)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    ap.add_argument("--eval-only", action="store_true", help="only evaluate the head in OUT (CPU, the engine)")
    ap.add_argument("--skip-eval", action="store_true", help="train and save only (evaluate later with --eval-only)")
    ap.add_argument("--draft", type=Path, default=HERE / "demo-draft",
                    help="draft model to compare with in the evaluation ('' for none; default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads on the CPU, training and evaluation (default 2; 1 on a busy machine)")
    ap.add_argument("--results", type=Path, default=None, help="metrics JSON (default: OUT/../eagle_results.json)")
    add_config_flags(ap, Config)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = Config(**PRESETS[args.preset])
    for f in fields(Config):
        if getattr(args, f.name) is not None:
            setattr(cfg, f.name, getattr(args, f.name))
    parse_mix(cfg.mix)  # a bad --mix fails before anything loads
    if not (args.target / "config.json").is_file():
        raise SystemExit(f"train_eagle: no target model at {args.target} (config.json missing)")
    if args.eval_only and not (args.out / "config.json").is_file():
        raise SystemExit(f"train_eagle: no head at {args.out} to evaluate (train one first)")
    results_path = args.results or args.out.parent / "eagle_results.json"
    summary = {"config": dataclasses.asdict(cfg), "preset": args.preset, "target": str(args.target),
               "argv": list(argv if argv is not None else sys.argv[1:])}
    t_start = time.time()
    if not args.eval_only:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from engine.eagle import save_head

        device = pick_device(args.device)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
        else:
            torch.set_num_threads(args.threads)
        log(f"config ({args.preset}): {json.dumps(dataclasses.asdict(cfg))}")
        log(f"device {device}, torch {torch.__version__}")
        set_seed(cfg.seed)
        tok = AutoTokenizer.from_pretrained(args.target)
        target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).to(device).eval()
        target.requires_grad_(False)
        cfg.ctx = min(cfg.ctx, target.config.max_position_embeddings)
        t0 = time.time()
        streams, weights, heldout = build_data(cfg, target, tok, args.corpus, device)
        summary["data"] = {"tokens": {k: len(s) for k, s in streams.items()}, "weights": weights,
                           "heldout_sequences": len(heldout), "seconds": round(time.time() - t0, 1)}
        ids = None
        if cfg.init:
            log(f"head: continuing {cfg.init} (its draft vocabulary)")
        elif cfg.draft_vocab and cfg.draft_vocab < target.config.vocab_size:
            stop = target.generation_config.eos_token_id
            keep = sorted({*([stop] if isinstance(stop, int) else stop or []), tok.eos_token_id} - {None})
            ids, covered = draft_vocabulary(streams, weights, cfg.draft_vocab, target.config.vocab_size, keep)
            summary["data"]["draft_vocab_coverage"] = covered
            log(f"draft vocabulary: {cfg.draft_vocab} of {target.config.vocab_size} tokens, covering {covered:.4f} "
                "of the training tokens")
        head = make_head(cfg, target, ids, device)
        n_par = sum(p.numel() for p in head.parameters())
        log(f"head: {n_par:,} parameters, aux layers {head.layer_ids(target.config.num_hidden_layers)} of "
            f"{target.config.num_hidden_layers}, draft vocabulary {head.cfg.draft_vocab_size}")
        t0 = time.time()
        info = train_head(cfg, target, head, streams, weights, heldout, device)
        info["seconds"] = round(time.time() - t0, 1)
        info["parameters"] = n_par
        if device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(0)
        summary["training"] = info
        save_head(head.float(), args.out)
        summary["head_bytes"] = folder_bytes(args.out)
        log(f"saved {args.out}: " + ", ".join(f"{p.name} {p.stat().st_size:,} B" for p in sorted(args.out.iterdir()))
            + f" (total {summary['head_bytes']:,} B)")
    if not args.skip_eval:
        draft = args.draft if args.draft and str(args.draft) and (args.draft / "config.json").is_file() else None
        summary["eval"] = evaluate(args.target, args.out, args.corpus, cfg, args.threads, draft)
        summary["head_bytes"] = folder_bytes(args.out)
    summary["total_seconds"] = round(time.time() - t_start, 1)
    if args.eval_only and results_path.is_file():  # keep the training record, refresh the metrics
        try:
            summary = {**json.loads(results_path.read_text()), "eval": summary["eval"]}
        except ValueError:
            pass
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(summary, indent=1) + "\n")
    log(f"results written to {results_path}")
    return summary


if __name__ == "__main__":
    main()
