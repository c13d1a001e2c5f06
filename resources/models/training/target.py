"""Training the target from scratch on plain stories, books and chat conversations, keeping the checkpoint
with the best held-out loss (early stopping)."""

from __future__ import annotations

import math
import time

from .common import Progress, StepBudget, autocast, log, lr_at, set_seed
from .config import Config
from .models import add_residual_dropout, heldout_loss, make_config, make_optimizer, masked_ce, n_params
from .streams import WindowSampler


def heldout_losses(model, heldout: dict, ctx: int, device) -> dict[str, float]:
    """Held-out loss per set (plain stories, chat replies) and their mean, the early-stopping score."""
    losses = {name: heldout_loss(model, seqs, ctx, device) for name, seqs in heldout.items()}
    losses["mean"] = sum(losses.values()) / len(losses)
    return losses


def train_target(cfg: Config, streams: dict, heldout: dict, device, init=None):
    """streams: TokenStreams 'ts', 'books', 'chat' (and 'copy'); heldout: name -> (ids, mask) sequences.
    ``init``: a trained target to fine-tune (the same loop, schedule and early stopping; its held-out losses
    before the first step are recorded as step 0) instead of a fresh model."""
    import torch
    from transformers import LlamaForCausalLM

    set_seed(cfg.seed)
    history = []
    if init is None:
        model = LlamaForCausalLM(make_config(cfg, cfg.target_layers)).to(device)
        log(f"target: {cfg.target_layers} layers, {n_params(model):,} parameters")
    else:
        model = init.to(device).requires_grad_(True)
        losses = heldout_losses(model, heldout, cfg.ctx, device)
        history.append((0, {k: round(v, 4) for k, v in losses.items()}))
        log(f"target: fine-tuning, {n_params(model):,} parameters; held-out losses before: {history[0][1]}")
    hooks = add_residual_dropout(model, cfg.target_dropout)
    opt = make_optimizer(model, cfg.target_lr, cfg.target_wd, device)
    ts_weight = 1.0 - cfg.books_weight - cfg.chat_weight - cfg.copy_weight
    sampler = WindowSampler([streams["ts"], streams.get("books"), streams.get("chat"), streams.get("copy")],
                            [ts_weight, cfg.books_weight, cfg.chat_weight, cfg.copy_weight], cfg.ctx, cfg.seed + 1)
    budget = StepBudget("target", cfg.target_steps, cfg.target_max_minutes)
    best = (float("inf"), 0, None, {})
    bad = done = 0
    prog = Progress("target", budget.total, cfg.log_every)
    model.train()
    t0 = time.time()
    while done < budget.total:
        if budget.expired():
            log(f"target: time budget of {cfg.target_max_minutes} min reached at step {done}")
            break
        lr = lr_at(done, budget.total, cfg.target_lr, cfg.warmup, cfg.min_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y, m = sampler.batch(cfg.target_batch, device)
        with autocast(device):
            logits = model(input_ids=x).logits
        s, c = masked_ce(logits, y, m)
        loss = s / c.clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        done += 1
        budget.after_step(done)
        prog.total = budget.total
        if done % cfg.eval_every == 0 or done == budget.total:
            losses = heldout_losses(model, heldout, cfg.ctx, device)
            history.append((done, {k: round(v, 4) for k, v in losses.items()}))
            if losses["mean"] < best[0]:
                state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                best = (losses["mean"], done, state, losses)
                bad = 0
            else:
                bad += 1
            prog.update(done, force=True, loss=loss.item(), **{f"heldout_{k}": v for k, v in losses.items()},
                        lr=lr, s=round(time.time() - t0))
            if bad >= cfg.patience:
                log(f"target: early stop at step {done} (best held-out loss {best[0]:.4f} at step {best[1]})")
                break
        else:
            prog.update(done, loss=loss.item(), lr=lr)
    for h in hooks:
        h.remove()
    if best[2] is None:  # stopped (time budget) before the first evaluation
        losses = heldout_losses(model, heldout, cfg.ctx, device)
        best = (losses["mean"], done, model.state_dict(), losses)
    model.load_state_dict(best[2])
    model.eval()
    log(f"target: best held-out loss {best[0]:.4f} (ppl {math.exp(best[0]):.2f}) at step {best[1]}: {best[3]}")
    return model, {"best_step": best[1], "best_heldout": best[3], "steps_run": done, "steps_planned": budget.total,
                   "history": history}
