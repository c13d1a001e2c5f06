#!/usr/bin/env python3
"""Train Helix Desktop's embedded demo model pair (draft + target) for speculative decoding.

Pipeline (all seeded):
  1. read the corpus (TinyStories pieces + public-domain children's books, see SOURCES.md);
  2. train one byte-level BPE tokenizer (``tokenizers``) on the TinyStories train text;
  3. train the *target*: a deep ``LlamaForCausalLM`` (12 layers, width 256), mostly on
     TinyStories with some book text, residual dropout + weight decay, keeping the checkpoint
     with the best held-out loss (early stopping);
  4. let the target write on-policy distillation data (greedy and temperature-0.8
     continuations of train-story openings);
  5. train the *draft*: a shallow ``LlamaForCausalLM`` (2 layers, same width and tokenizer)
     initialised from the target's embeddings, first layers and final norm, distilled with
     KL(target || draft) on the target's logits over the generated text (plus some real text);
  6. save both as complete Hugging Face folders (float16 ``model.safetensors``) and evaluate
     them: held-out loss/perplexity and exact greedy speculative-decoding acceptance at K=4 on
     openings of held-out ``tinystories_valid.txt`` stories.

Usage (from the repo root):
  python resources/models/train_demo.py                       # full run (GPU: minutes)
  python resources/models/train_demo.py --preset tiny --out /tmp/demo   # CI-sized smoke run
  python resources/models/train_demo.py --eval-only --time-cpu  # re-evaluate the saved folders

Every ``Config`` field can be overridden on the command line (``--target-steps 2000`` ...).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
DEFAULT_CORPUS = REPO_ROOT.parent / "shared" / "data" / "corpus"
DEFAULT_OUT = HERE

EOS = "<|endoftext|>"  # document separator; also used as BOS (GPT-2 style)
UNK = "<unk>"
PAD = "<pad>"
SPECIAL_TOKENS = [EOS, UNK, PAD]  # ids 0, 1, 2
EOS_ID, UNK_ID, PAD_ID = 0, 1, 2

TRAIN_FILES = ("tinystories_train.txt", "tinystories_train_extra_truecased.txt")
BOOKS_FILE = "gutenberg_children.txt"
VALID_FILE = "tinystories_valid.txt"


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    seed: int = 1234
    # tokenizer / shape
    vocab_size: int = 4096
    ctx: int = 512  # training context == max_position_embeddings == model_max_length
    hidden: int = 256
    intermediate: int = 768
    heads: int = 4
    target_layers: int = 12
    draft_layers: int = 2
    # data
    use_extra: bool = True  # tinystories_train_extra_truecased.txt
    books_weight: float = 0.2  # fraction of target training windows drawn from the books (0 = skip)
    max_docs: int = 0  # >0: only the first N documents of each file (CI / smoke tests)
    max_doc_chars: int = 0  # >0: truncate every document (books are huge) to N chars
    # target training
    target_steps: int = 1500
    target_batch: int = 64
    target_lr: float = 1.5e-3
    target_wd: float = 0.1
    target_dropout: float = 0.15
    warmup: int = 100
    min_lr_frac: float = 0.1
    eval_every: int = 100
    patience: int = 6  # evals without held-out improvement before stopping
    target_max_minutes: float = 0.0  # >0: wall-clock safety stop for the target phase
    # on-policy distillation data written by the target
    gen_openings: int = 0  # 0 = every train story; else the first N
    gen_greedy: bool = True  # greedy continuation of 1-sentence and 2-sentence openings
    gen_samples: int = 1  # temperature samples per story opening
    gen_temperature: float = 0.8
    gen_new_tokens: int = 256
    gen_batch: int = 1024
    gen_max_minutes: float = 0.0  # >0: wall-clock safety stop for generation
    # draft distillation
    draft_steps: int = 3000
    draft_batch: int = 64
    draft_lr: float = 1e-3
    draft_wd: float = 0.0
    draft_real_frac: float = 0.2  # fraction of windows from real train text (rest: generated)
    draft_argmax_ce: float = 0.0  # extra CE on the target's argmax token
    draft_eval_every: int = 250
    draft_max_minutes: float = 0.0  # >0: wall-clock safety stop for the draft phase
    # evaluation
    eval_prompts: int = 50
    eval_new_tokens: int = 128
    spec_k: int = 4
    log_every: int = 50


PRESETS = {
    "full": {},
    "tiny": dict(
        vocab_size=384, ctx=64, hidden=32, intermediate=64, heads=2, target_layers=2,
        draft_layers=1, books_weight=0.2, max_docs=120, max_doc_chars=4000,
        target_steps=6, target_batch=8, eval_every=3, patience=100, warmup=2,
        gen_openings=16, gen_samples=1, gen_new_tokens=24, gen_batch=16,
        draft_steps=6, draft_batch=8, draft_eval_every=3,
        eval_prompts=3, eval_new_tokens=16, log_every=2,
    ),
}


# ----------------------------------------------------------------------------- utils
def log(*a):
    print(*a, flush=True)


class Progress:
    """Minimal tqdm-style progress lines that read well in logs (no carriage returns)."""

    def __init__(self, name: str, total: int, every: int):
        self.name, self.total, self.every = name, total, max(1, every)
        self.t0 = time.time()

    @staticmethod
    def _fmt(s: float) -> str:
        s = int(s)
        return f"{s // 60:02d}:{s % 60:02d}" if s < 3600 else f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"

    def update(self, i: int, force: bool = False, **info):
        if not (force or i % self.every == 0 or i == self.total):
            return
        el = time.time() - self.t0
        rate = i / el if el > 0 else 0.0
        eta = (self.total - i) / rate if rate > 0 else 0.0
        pct = 100.0 * i / max(1, self.total)
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
        log(f"{self.name}: {pct:3.0f}%| {i}/{self.total} [{self._fmt(el)}<{self._fmt(eta)}, {rate:.2f}it/s] {extra}")


def set_seed(seed: int):
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def pick_device(name: str | None = None):
    import torch

    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- corpus
def read_docs(path: Path, max_docs: int = 0, max_chars: int = 0) -> list[str]:
    """Documents are non-empty lines (paragraphs) followed by a line holding only <|endoftext|>."""
    docs, cur = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line == EOS:
                if cur:
                    d = "\n".join(cur)
                    docs.append(d[:max_chars] if max_chars else d)
                    cur = []
                    if max_docs and len(docs) >= max_docs:
                        break
            elif line:
                cur.append(line)
    if cur and not (max_docs and len(docs) >= max_docs):
        docs.append("\n".join(cur))
    return docs


def load_corpus(corpus: Path, cfg: Config) -> dict[str, list[str]]:
    corpus = Path(corpus)
    if not (corpus / VALID_FILE).exists():
        raise FileNotFoundError(f"corpus not found: {corpus} (expected {VALID_FILE} there)")
    ts = []
    for fn in TRAIN_FILES if cfg.use_extra else TRAIN_FILES[:1]:
        ts += read_docs(corpus / fn, cfg.max_docs, cfg.max_doc_chars)
    books = read_docs(corpus / BOOKS_FILE, cfg.max_docs, cfg.max_doc_chars) if cfg.books_weight > 0 else []
    valid = read_docs(corpus / VALID_FILE, cfg.max_docs, cfg.max_doc_chars)
    log(f"corpus {corpus}: {len(ts)} train stories, {len(books)} books, {len(valid)} held-out stories")
    return {"ts": ts, "books": books, "valid": valid}


_SENT_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'])\s+")


def opening(doc: str, n_sent: int = 2, min_words: int = 8) -> str:
    """First sentence(s) of a story: n_sent sentences, or fewer once it has >= min_words words
    (n_sent=2, min_words=8 is how the held-out evaluation openings are made)."""
    first_par = doc.split("\n")[0]
    sents = [s for s in _SENT_END.split(first_par) if s]
    out = []
    for s in sents[:n_sent]:
        out.append(s)
        if len(" ".join(out).split()) >= min_words:
            break
    return " ".join(out)


def eval_story_indices(n_valid: int, n: int) -> list[int]:
    """n held-out stories spread evenly over tinystories_valid.txt."""
    n = min(n, n_valid)
    return [int((i + 0.5) * n_valid / n) for i in range(n)]


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer(docs: list[str], cfg: Config):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [EOS_ID, UNK_ID, PAD_ID]
    # Like the training stream, every text starts after <|endoftext|>: prepend it as BOS.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B", special_tokens=[(EOS, EOS_ID)]
    )
    return wrap_tokenizer(tok, cfg.ctx)


def wrap_tokenizer(tok, ctx: int):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=ctx,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def encode_docs(hf_tok, docs: list[str]) -> list[list[int]]:
    enc = hf_tok.backend_tokenizer.encode_batch(docs, add_special_tokens=False)
    return [e.ids for e in enc]


def build_stream(id_lists: list[list[int]]):
    """<eos> doc <eos> doc ... <eos>: every document starts right after <|endoftext|>."""
    import torch

    flat = [EOS_ID]
    for ids in id_lists:
        flat.extend(ids)
        flat.append(EOS_ID)
    return torch.tensor(flat, dtype=torch.long)


# ----------------------------------------------------------------------------- models
def make_config(cfg: Config, n_layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=n_layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.ctx,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights counted once


def add_residual_dropout(model, p: float):
    """Dropout on the embedding output and on each attention/MLP output before the residual add
    (LlamaForCausalLM has no hidden dropout of its own). Active only in train(); hooks are not saved."""
    import torch.nn.functional as F

    handles = []
    if p <= 0:
        return handles
    drop = lambda m, i, o: F.dropout(o, p, m.training)  # noqa: E731
    drop_first = lambda m, i, o: (F.dropout(o[0], p, m.training),) + tuple(o[1:])  # noqa: E731
    handles.append(model.model.embed_tokens.register_forward_hook(drop))
    for layer in model.model.layers:
        handles.append(layer.self_attn.register_forward_hook(drop_first))
        handles.append(layer.mlp.register_forward_hook(drop))
    return handles


def make_optimizer(model, lr: float, wd: float, device):
    import torch

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, **kw)


def lr_at(step: int, total: int, base: float, warmup: int, min_frac: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def autocast(device):
    import contextlib

    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class WindowSampler:
    """Random (ctx+1)-token windows from token streams, each stream picked with a given weight."""

    def __init__(self, streams, weights, ctx: int, seed: int):
        import numpy as np

        pairs = [(s, w) for s, w in zip(streams, weights) if w > 0 and s is not None and len(s) > ctx + 1]
        self.streams = [s for s, _ in pairs]
        w = np.array([w for _, w in pairs], dtype=np.float64)
        self.weights = w / w.sum()
        self.ctx = ctx
        self.rng = np.random.default_rng(seed)

    def batch(self, bsz: int, device):
        import torch

        which = self.rng.choice(len(self.streams), size=bsz, p=self.weights)
        rows = []
        for k in which:
            s = self.streams[k]
            start = int(self.rng.integers(0, len(s) - self.ctx - 1))
            rows.append(s[start : start + self.ctx + 1])
        w = torch.stack(rows).to(device, non_blocking=True)
        return w[:, :-1], w[:, 1:]


def fixed_windows(stream, ctx: int, max_windows: int = 0):
    """Non-overlapping windows over a stream (for held-out metrics)."""
    import torch

    n = (len(stream) - 1) // ctx
    if max_windows:
        n = min(n, max_windows)
    x = torch.stack([stream[i * ctx : i * ctx + ctx] for i in range(n)])
    y = torch.stack([stream[i * ctx + 1 : i * ctx + ctx + 1] for i in range(n)])
    return x, y


def heldout_loss(model, stream, ctx: int, device, bsz: int = 32) -> float:
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    x, y = fixed_windows(stream, ctx)
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), bsz):
            xb, yb = x[i : i + bsz].to(device), y[i : i + bsz].to(device)
            with autocast(device):
                logits = model(input_ids=xb).logits
            tot += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), yb.reshape(-1), reduction="sum").item()
            cnt += yb.numel()
    model.train(was_training)
    return tot / max(1, cnt)


# ----------------------------------------------------------------------------- target
def train_target(cfg: Config, streams: dict, device):
    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    set_seed(cfg.seed)
    model = LlamaForCausalLM(make_config(cfg, cfg.target_layers)).to(device)
    log(f"target: {cfg.target_layers} layers, {n_params(model):,} parameters")
    hooks = add_residual_dropout(model, cfg.target_dropout)
    opt = make_optimizer(model, cfg.target_lr, cfg.target_wd, device)
    sampler = WindowSampler(
        [streams["ts"], streams.get("books")], [1.0 - cfg.books_weight, cfg.books_weight], cfg.ctx, cfg.seed + 1
    )
    best = (float("inf"), 0, None)
    bad = 0
    prog = Progress("target", cfg.target_steps, cfg.log_every)
    model.train()
    history = []
    t0 = time.time()
    done = 0
    for step in range(cfg.target_steps):
        if cfg.target_max_minutes and time.time() - t0 > 60 * cfg.target_max_minutes:
            log(f"target: time budget of {cfg.target_max_minutes} min reached at step {step}")
            break
        lr = lr_at(step, cfg.target_steps, cfg.target_lr, cfg.warmup, cfg.min_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = sampler.batch(cfg.target_batch, device)
        with autocast(device):
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.target_steps:
            vl = heldout_loss(model, streams["valid"], cfg.ctx, device)
            history.append((done, round(vl, 4)))
            if vl < best[0]:
                best = (vl, done, {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
                bad = 0
            else:
                bad += 1
            prog.update(done, force=True, loss=loss.item(), heldout=vl, best=best[0], lr=lr)
            if bad >= cfg.patience:
                log(f"target: early stop at step {done} (best held-out loss {best[0]:.4f} at step {best[1]})")
                break
        else:
            prog.update(done, loss=loss.item(), lr=lr)
    for h in hooks:
        h.remove()
    if best[2] is None:  # stopped (time budget) before the first evaluation
        best = (heldout_loss(model, streams["valid"], cfg.ctx, device), done, model.state_dict())
    model.load_state_dict(best[2])
    model.eval()
    log(f"target: best held-out loss {best[0]:.4f} (ppl {math.exp(best[0]):.2f}) at step {best[1]}")
    return model, {"best_step": best[1], "best_heldout_loss": best[0], "steps_run": done, "history": history}


# ----------------------------------------------------------------------------- distillation data
def generate_batch(model, prompts: list[list[int]], device, new_tokens: int, temperature: float | None):
    """Continue left-padded prompts; returns per-row prompt+continuation (through the first EOS)."""
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
            eos_token_id=EOS_ID, pad_token_id=PAD_ID, **kw,
        )
    res = []
    for i, p in enumerate(prompts):
        cont = out[i, L:].tolist()
        if EOS_ID in cont:
            cont = cont[: cont.index(EOS_ID) + 1]
        res.append(list(p) + cont)
    return res


def make_distill_data(model, hf_tok, ts_docs: list[str], cfg: Config, device):
    """On-policy text: the target's greedy continuations of 1- and 2-sentence openings of train
    stories, plus temperature samples of the 2-sentence ones."""
    import torch

    docs = ts_docs[: cfg.gen_openings] if cfg.gen_openings else ts_docs
    jobs = []  # (prompt ids, temperature or None)
    for d in docs:
        o2 = opening(d, 2, 8)
        o1 = opening(d, 1, 1)
        p2 = hf_tok(o2)["input_ids"][: cfg.ctx // 2]
        p1 = hf_tok(o1)["input_ids"][: cfg.ctx // 2]
        if cfg.gen_greedy:
            jobs.append((p2, None))
            if o1 != o2:
                jobs.append((p1, None))
        for _ in range(cfg.gen_samples):
            jobs.append((p2, cfg.gen_temperature))
    new_tokens = min(cfg.gen_new_tokens, cfg.ctx - max(len(p) for p, _ in jobs))
    # group by mode, sort by prompt length to limit padding
    seqs = []
    groups = {}
    for p, t in jobs:
        groups.setdefault(t, []).append(p)
    total = sum(math.ceil(len(v) / cfg.gen_batch) for v in groups.values())
    prog = Progress("generate", total, 1)
    k = 0
    torch.manual_seed(cfg.seed + 2)
    t0 = time.time()
    # generation needs no backward: use a bf16 copy (bf16 KV cache) and the fast kernels
    gm = copy.deepcopy(model).to(torch.bfloat16) if device.type == "cuda" else model
    det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    for t, ps in groups.items():
        ps = sorted(ps, key=len)
        for i in range(0, len(ps), cfg.gen_batch):
            if cfg.gen_max_minutes and time.time() - t0 > 60 * cfg.gen_max_minutes:
                log(f"generate: time budget of {cfg.gen_max_minutes} min reached")
                break
            seqs += generate_batch(gm, ps[i : i + cfg.gen_batch], device, new_tokens, t)
            k += 1
            prog.update(k, mode="greedy" if t is None else f"T={t}", seqs=len(seqs))
    torch.use_deterministic_algorithms(det, warn_only=True)
    del gm
    random.Random(cfg.seed + 3).shuffle(seqs)
    ntok = sum(len(s) for s in seqs)
    n_end = sum(1 for s in seqs if s[-1] == EOS_ID)
    log(f"distillation data: {len(seqs)} sequences, {ntok:,} tokens, {n_end} ended with EOS")
    return seqs, {"sequences": len(seqs), "tokens": ntok}


# ----------------------------------------------------------------------------- draft
def init_draft_from_target(target, cfg: Config):
    from transformers import LlamaForCausalLM

    draft = LlamaForCausalLM(make_config(cfg, cfg.draft_layers)).to(next(target.parameters()).device)
    sd = target.state_dict()
    dsd = draft.state_dict()
    for k in dsd:
        if k in sd and sd[k].shape == dsd[k].shape:  # embeddings, layers 0..n-1, final norm, (tied) lm_head
            dsd[k] = sd[k].clone()
    draft.load_state_dict(dsd)
    return draft


def distill_loss(d_logits, t_logits, argmax_ce: float):
    import torch.nn.functional as F

    V = d_logits.size(-1)
    d = F.log_softmax(d_logits.float().reshape(-1, V), -1)
    t = F.log_softmax(t_logits.float().reshape(-1, V), -1)
    kl = (t.exp() * (t - d)).sum(-1).mean()
    loss = kl
    if argmax_ce > 0:
        loss = loss + argmax_ce * F.nll_loss(d, t.argmax(-1))
    return loss, kl


def agreement(draft, target, x, device, bsz: int = 32) -> float:
    """Fraction of positions where the draft's argmax equals the target's (teacher-forced)."""
    import torch

    draft.eval()
    hit = cnt = 0
    with torch.no_grad():
        for i in range(0, len(x), bsz):
            xb = x[i : i + bsz].to(device)
            with autocast(device):
                a = draft(input_ids=xb).logits.argmax(-1)
                b = target(input_ids=xb).logits.argmax(-1)
            hit += (a == b).sum().item()
            cnt += a.numel()
    draft.train()
    return hit / max(1, cnt)


def train_draft(cfg: Config, target, streams: dict, gen_seqs: list[list[int]], device):
    import torch

    set_seed(cfg.seed + 10)
    target.eval()
    for p in target.parameters():
        p.requires_grad_(False)
    draft = init_draft_from_target(target, cfg)
    log(f"draft: {cfg.draft_layers} layers, {n_params(draft):,} parameters (initialised from the target)")
    n_hold = max(1, len(gen_seqs) // 50)
    strip = lambda s: s[1:-1] if s[-1] == EOS_ID else s[1:]  # noqa: E731  (build_stream adds the EOSes)
    gen_train = build_stream([strip(s) for s in gen_seqs[n_hold:]])
    gen_hold = build_stream([strip(s) for s in gen_seqs[:n_hold]])
    hold_x, _ = fixed_windows(gen_hold, cfg.ctx, max_windows=64) if len(gen_hold) > cfg.ctx + 1 else (None, None)
    if hold_x is None:  # tiny runs: use short windows
        hold_x = gen_hold[: (len(gen_hold) // 8) * 8].reshape(-1, 8)
    sampler = WindowSampler(
        [gen_train, streams["ts"]], [1.0 - cfg.draft_real_frac, cfg.draft_real_frac], cfg.ctx, cfg.seed + 11
    )
    opt = make_optimizer(draft, cfg.draft_lr, cfg.draft_wd, device)
    a0 = agreement(draft, target, hold_x, device)
    log(f"draft: agreement with target on held-out generated text before distillation: {a0:.4f}")
    best = (a0, 0, {k: v.detach().to("cpu", copy=True) for k, v in draft.state_dict().items()})
    prog = Progress("draft", cfg.draft_steps, cfg.log_every)
    draft.train()
    history = [(0, round(a0, 4))]
    t0 = time.time()
    for step in range(cfg.draft_steps):
        if cfg.draft_max_minutes and time.time() - t0 > 60 * cfg.draft_max_minutes:
            log(f"draft: time budget of {cfg.draft_max_minutes} min reached at step {step}")
            break
        lr = lr_at(step, cfg.draft_steps, cfg.draft_lr, cfg.warmup, cfg.min_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        x, _ = sampler.batch(cfg.draft_batch, device)
        with torch.no_grad(), autocast(device):
            t_logits = target(input_ids=x).logits
        with autocast(device):
            d_logits = draft(input_ids=x).logits
        loss, kl = distill_loss(d_logits, t_logits, cfg.draft_argmax_ce)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        done = step + 1
        if done % cfg.draft_eval_every == 0 or done == cfg.draft_steps:
            a = agreement(draft, target, hold_x, device)
            history.append((done, round(a, 4)))
            if a > best[0]:
                best = (a, done, {k: v.detach().to("cpu", copy=True) for k, v in draft.state_dict().items()})
            prog.update(done, force=True, kl=kl.item(), agree=a, best=best[0], lr=lr)
        else:
            prog.update(done, kl=kl.item(), lr=lr)
    draft.load_state_dict(best[2])
    draft.eval()
    log(f"draft: best agreement {best[0]:.4f} at step {best[1]}")
    return draft, {"best_step": best[1], "best_agreement_gen_holdout": best[0], "history": history}


# ----------------------------------------------------------------------------- save
def save_model(model, hf_tok, out_dir: Path):
    import torch
    from transformers import GenerationConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    m = copy.deepcopy(model).to("cpu", dtype=torch.float16)
    m.generation_config = GenerationConfig(bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    m.save_pretrained(out_dir)
    hf_tok.save_pretrained(out_dir)
    log(f"saved {out_dir}: " + ", ".join(f"{p.name} {p.stat().st_size:,}B" for p in sorted(out_dir.iterdir())))


# ----------------------------------------------------------------------------- evaluation
def load_pair(target_dir: Path, draft_dir: Path, device):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).to(device).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32).to(device).eval()
    return tok, target, draft


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


def greedy_continue(model, prompt: list[int], n: int, device) -> list[int]:
    """Target's greedy continuation (KV-cached), stopping after EOS."""
    import torch

    ids = torch.tensor([prompt], device=device)
    out, past, cur = [], None, ids
    with torch.no_grad():
        for _ in range(n):
            logits, past = step(model, cur, past)
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            if nxt == EOS_ID:
                break
            cur = torch.tensor([[nxt]], device=device)
    return out


def draft_propose(draft, context: list[int], k: int, device) -> list[int]:
    import torch

    with torch.no_grad():
        logits, past = step(draft, torch.tensor([context], device=device))
        prop = [int(logits[0, -1].argmax())]
        for _ in range(k - 1):
            logits, past = step(draft, torch.tensor([[prop[-1]]], device=device), past)
            prop.append(int(logits[0, -1].argmax()))
    return prop


def speculative_acceptance(target, draft, prompts: list[list[int]], n_new: int, k: int, device):
    """Exact greedy speculative decoding, simulated: the output of greedy speculative decoding is the
    target's greedy output, so we generate that once (n_new + k + 1 tokens, or up to EOS) and replay
    the steps: each step the draft greedily proposes k tokens from the accepted context, the longest
    prefix equal to the target's argmax tokens is accepted, and the target's next token (correction
    or bonus) is appended. Stops once n_new tokens are produced or EOS is emitted."""
    drafted = accepted = steps = 0
    pos_hits = [0] * k
    conts = []
    prog = Progress("spec-eval", len(prompts), 10)
    for j, p in enumerate(prompts):
        prog.update(j, acc=accepted / max(1, drafted))
        ref = greedy_continue(target, p, n_new + k + 1, device)
        conts.append(ref[:n_new])
        pos = 0
        while pos < n_new and pos < len(ref):
            prop = draft_propose(draft, p + ref[:pos], k, device)
            a, ended = 0, False
            while a < k and pos + a < len(ref) and prop[a] == ref[pos + a]:
                a += 1
                if ref[pos + a - 1] == EOS_ID:  # an accepted EOS ends generation (no bonus token)
                    ended = True
                    break
            steps += 1
            drafted += k
            accepted += a
            for i in range(a):
                pos_hits[i] += 1
            emitted = ref[pos : pos + a + (0 if ended else 1)]
            pos += len(emitted)
            if ended or EOS_ID in emitted:
                break
    return {
        "k": k,
        "prompts": len(prompts),
        "target_tokens": sum(len(c) for c in conts),
        "new_tokens_per_prompt": n_new,
        "steps": steps,
        "drafted": drafted,
        "accepted": accepted,
        "acceptance_rate": accepted / max(1, drafted),
        "per_position": [h / max(1, steps) for h in pos_hits],
        "mean_acceptance_length": 1 + accepted / max(1, steps),
    }, conts


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


def evaluate(target_dir: Path, draft_dir: Path, corpus: Path, cfg: Config, device, time_cpu: bool = False, threads: int = 2):
    tok, target, draft = load_pair(target_dir, draft_dir, device)
    valid_docs = read_docs(Path(corpus) / VALID_FILE, cfg.max_docs, cfg.max_doc_chars)
    valid_stream = build_stream(encode_docs(tok, valid_docs))
    ctx = target.config.max_position_embeddings
    # round-trip check of the saved tokenizer
    sample = valid_docs[0]
    assert tok.decode(tok(sample, add_special_tokens=False)["input_ids"]) == sample, "tokenizer does not round-trip"
    res = {"device": str(device)}
    for name, m in [("target", target), ("draft", draft)]:
        loss = heldout_loss(m, valid_stream, ctx, device)
        res[name] = {
            "layers": m.config.num_hidden_layers,
            "parameters": n_params(m),
            "heldout_loss": loss,
            "heldout_ppl": math.exp(loss),
        }
    x, _ = fixed_windows(valid_stream, ctx, max_windows=64)
    res["agreement_teacher_forced_heldout"] = agreement(draft, target, x, device)
    idx = eval_story_indices(len(valid_docs), cfg.eval_prompts)
    openings = [opening(valid_docs[i]) for i in idx]
    prompts = [tok(o)["input_ids"] for o in openings]
    t0 = time.time()
    acc, conts = speculative_acceptance(target, draft, prompts, cfg.eval_new_tokens, cfg.spec_k, device)
    acc["eval_story_indices"] = idx
    acc["seconds"] = round(time.time() - t0, 1)
    res["greedy_speculative"] = acc
    res["samples"] = [
        {"story_index": idx[i], "opening": openings[i], "continuation": tok.decode(conts[i], skip_special_tokens=False)}
        for i in range(min(3, len(conts)))
    ]
    if time_cpu:
        t = cpu_step_times(target, draft, threads=threads)
        k = cfg.spec_k
        L = acc["mean_acceptance_length"]
        t["estimated_speedup_k4"] = L * t["target_1_ms"] / (k * t["draft_1_ms"] + t["target_5_ms"])
        res["cpu_step_times"] = t
    log(
        f"eval: target held-out loss {res['target']['heldout_loss']:.4f} (ppl {res['target']['heldout_ppl']:.2f}), "
        f"draft {res['draft']['heldout_loss']:.4f} (ppl {res['draft']['heldout_ppl']:.2f}); "
        f"teacher-forced agreement {res['agreement_teacher_forced_heldout']:.4f}"
    )
    log(
        f"eval: greedy acceptance K={acc['k']}: {acc['acceptance_rate']:.4f} "
        f"({acc['accepted']}/{acc['drafted']}), per position "
        + ", ".join(f"{v:.3f}" for v in acc["per_position"])
        + f", mean acceptance length {acc['mean_acceptance_length']:.3f} over {acc['prompts']} prompts"
    )
    for s in res["samples"]:
        log(f"--- sample (valid story {s['story_index']}): {s['opening']!r}\n{s['continuation']}")
    if "cpu_step_times" in res:
        log("eval: CPU step times " + json.dumps({k: round(v, 4) for k, v in res["cpu_step_times"].items()}))
    return res


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="corpus dir (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="writes OUT/demo-target and OUT/demo-draft")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    ap.add_argument("--eval-only", action="store_true", help="only evaluate the saved folders in OUT")
    ap.add_argument("--skip-eval", action="store_true", help="train and save only (evaluate later with --eval-only)")
    ap.add_argument("--time-only", action="store_true", help="only time CPU decoding steps of the saved folders (prints JSON)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the CPU step timing (default 2)")
    ap.add_argument("--time-cpu", action="store_true", help="also time single decoding steps on CPU (2 threads)")
    ap.add_argument("--results", type=Path, default=None, help="write metrics JSON here (default OUT/demo_results.json)")
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            ap.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes", "y"), default=None, metavar="BOOL")
        else:
            typ = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            ap.add_argument(flag, type=typ, default=None)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = Config(**PRESETS[args.preset])
    for f in fields(Config):
        v = getattr(args, f.name)
        if v is not None:
            setattr(cfg, f.name, v)
    out = Path(args.out)
    target_dir, draft_dir = out / "demo-target", out / "demo-draft"
    results_path = args.results or (out / "demo_results.json")
    device = pick_device(args.device)

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log(f"config ({args.preset}): {json.dumps(dataclasses.asdict(cfg))}")
    log(f"device {device}, torch {torch.__version__}")
    t_start = time.time()
    summary = {"config": dataclasses.asdict(cfg), "preset": args.preset, "argv": list(argv if argv is not None else sys.argv[1:])}

    if args.time_only:
        _, target, draft = load_pair(target_dir, draft_dir, torch.device("cpu"))
        t = cpu_step_times(target, draft, threads=args.threads)
        log("cpu step times " + json.dumps(t))
        return {"cpu_step_times": t}

    if not args.eval_only:
        set_seed(cfg.seed)
        data = load_corpus(args.corpus, cfg)
        t0 = time.time()
        hf_tok = train_tokenizer(data["ts"], cfg)
        streams = {k: build_stream(encode_docs(hf_tok, v)) if v else None for k, v in data.items()}
        log(
            f"tokenizer: vocab {len(hf_tok)}, tokens: train stories {len(streams['ts']):,}, "
            f"books {len(streams['books']) if streams['books'] is not None else 0:,}, "
            f"held-out {len(streams['valid']):,} ({time.time() - t0:.1f}s)"
        )
        summary["tokens"] = {k: (len(v) if v is not None else 0) for k, v in streams.items()}
        t0 = time.time()
        target, tinfo = train_target(cfg, streams, device)
        tinfo["seconds"] = round(time.time() - t0, 1)
        summary["target_training"] = tinfo
        save_model(target, hf_tok, target_dir)
        t0 = time.time()
        gen_seqs, ginfo = make_distill_data(target, hf_tok, data["ts"], cfg, device)
        ginfo["seconds"] = round(time.time() - t0, 1)
        summary["distill_data"] = ginfo
        t0 = time.time()
        draft, dinfo = train_draft(cfg, target, streams, gen_seqs, device)
        dinfo["seconds"] = round(time.time() - t0, 1)
        summary["draft_training"] = dinfo
        save_model(draft, hf_tok, draft_dir)
        summary["train_seconds"] = round(time.time() - t_start, 1)
        if device.type == "cuda":
            summary["gpu"] = torch.cuda.get_device_name(0)
        log(f"training done in {summary['train_seconds']}s")
        del target, draft

    if args.skip_eval:
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(summary, indent=1) + "\n")
        log(f"results written to {results_path} (evaluation skipped)")
        return summary
    summary["eval"] = evaluate(target_dir, draft_dir, args.corpus, cfg, device, time_cpu=args.time_cpu, threads=args.threads)
    if args.eval_only and results_path.exists():  # keep the training record, refresh the metrics
        try:
            old = json.loads(results_path.read_text())
            old.setdefault("evals", {})[str(device) + (" (+cpu timing)" if args.time_cpu else "")] = summary["eval"]
            old["eval"] = summary["eval"]
            summary = old
        except (ValueError, OSError):
            pass
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(summary, indent=1) + "\n")
    log(f"results written to {results_path} (total {time.time() - t_start:.1f}s)")
    return summary


if __name__ == "__main__":
    main()
