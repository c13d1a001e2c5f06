"""Distilling the draft: a shallow copy of the target's first layers trained on KL(target || draft) over the
target's full next-token distribution, on the target's own text plus some real text."""

from __future__ import annotations

import time

from .common import Progress, StepBudget, autocast, log, lr_at, set_seed
from .config import Config
from .models import make_config, make_optimizer, n_params
from .streams import WindowSampler, masked_stream, padded_batches


def init_draft_from_target(target, cfg: Config):
    """Embeddings (= tied LM head), layers 0..n-1 and the final norm copied from the target."""
    from transformers import LlamaForCausalLM

    draft = LlamaForCausalLM(make_config(cfg, cfg.draft_layers)).to(next(target.parameters()).device)
    sd, dsd = target.state_dict(), draft.state_dict()
    for k in dsd:
        if k in sd and sd[k].shape == dsd[k].shape:
            dsd[k] = sd[k].clone()
    draft.load_state_dict(dsd)
    return draft


def distill_loss(d_logits, t_logits, m):
    """Mean KL(target || draft) over the masked positions."""
    import torch.nn.functional as F

    V = d_logits.size(-1)
    d = F.log_softmax(d_logits.float().reshape(-1, V), -1)
    t = F.log_softmax(t_logits.float().reshape(-1, V), -1)
    kl = (t.exp() * (t - d)).sum(-1)
    m = m.reshape(-1).float()
    return (kl * m).sum() / m.sum().clamp(min=1)


def agreement(draft, target, seqs, ctx: int, device, bsz: int = 32) -> float:
    """Share of masked positions where the draft's argmax equals the target's (teacher-forced)."""
    import torch

    was_training = draft.training
    draft.eval()
    hit = cnt = 0
    with torch.no_grad():
        for x, _, m in padded_batches(seqs, bsz, ctx):
            x, m = x.to(device), m.to(device)
            with autocast(device):
                a = draft(input_ids=x).logits.argmax(-1)
                b = target(input_ids=x).logits.argmax(-1)
            hit += ((a == b) & m).sum().item()
            cnt += m.sum().item()
    draft.train(was_training)
    return hit / max(1, cnt)


def train_draft(cfg: Config, target, streams: dict, gen_seqs: list, device):
    """streams: real TokenStreams 'ts' and 'chat'; gen_seqs: the target's (ids, mask) sequences; 2 % of
    them (at most 256) are held out to choose the checkpoint by agreement with the target."""
    import torch

    set_seed(cfg.seed + 10)
    target.eval()
    for p in target.parameters():
        p.requires_grad_(False)
    if cfg.draft_init:
        from transformers import AutoModelForCausalLM

        draft = AutoModelForCausalLM.from_pretrained(cfg.draft_init, dtype=torch.float32).to(device)
        log(f"draft: {draft.config.num_hidden_layers} layers, {n_params(draft):,} parameters (from {cfg.draft_init})")
    else:
        draft = init_draft_from_target(target, cfg)
        log(f"draft: {cfg.draft_layers} layers, {n_params(draft):,} parameters (initialised from the target)")
    n_hold = min(256, max(1, len(gen_seqs) // 50))
    hold, gen_train = gen_seqs[:n_hold], masked_stream(gen_seqs[n_hold:])
    real, cp = cfg.draft_real_frac / 2, cfg.draft_copy_frac
    sampler = WindowSampler([gen_train, streams["ts"], streams.get("chat"), streams.get("copy")],
                            [1.0 - 2 * real - cp, real, real, cp], cfg.ctx, cfg.seed + 11)
    opt = make_optimizer(draft, cfg.draft_lr, cfg.draft_wd, device)
    a0 = agreement(draft, target, hold, cfg.ctx, device)
    log(f"draft: agreement with the target on held-out generated text before distillation: {a0:.4f}")
    best = (a0, 0, {k: v.detach().to("cpu", copy=True) for k, v in draft.state_dict().items()})
    budget = StepBudget("draft", cfg.draft_steps, cfg.draft_max_minutes)
    prog = Progress("draft", budget.total, cfg.log_every)
    history = [(0, round(a0, 4))]
    draft.train()
    done, t0 = 0, time.time()
    while done < budget.total:
        if budget.expired():
            log(f"draft: time budget of {cfg.draft_max_minutes} min reached at step {done}")
            break
        lr = lr_at(done, budget.total, cfg.draft_lr, cfg.warmup, cfg.min_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        x, _, m = sampler.batch(cfg.draft_batch, device)
        with torch.no_grad(), autocast(device):
            t_logits = target(input_ids=x).logits
        with autocast(device):
            d_logits = draft(input_ids=x).logits
        loss = distill_loss(d_logits, t_logits, m)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        done += 1
        budget.after_step(done)
        prog.total = budget.total
        if done % cfg.draft_eval_every == 0 or done == budget.total:
            a = agreement(draft, target, hold, cfg.ctx, device)
            history.append((done, round(a, 4)))
            if a > best[0]:
                best = (a, done, {k: v.detach().to("cpu", copy=True) for k, v in draft.state_dict().items()})
            prog.update(done, force=True, kl=loss.item(), agree=a, best=best[0], lr=lr, s=round(time.time() - t0))
        else:
            prog.update(done, kl=loss.item(), lr=lr)
    draft.load_state_dict(best[2])
    draft.eval()
    log(f"draft: best agreement {best[0]:.4f} at step {best[1]}")
    return draft, {"best_step": best[1], "best_agreement_gen_holdout": best[0], "steps_run": done,
                   "steps_planned": budget.total, "history": history}
