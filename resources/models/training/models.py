"""The two Llama models: configs, residual dropout, optimiser, masked loss, held-out loss, save and load."""

from __future__ import annotations

import copy
from pathlib import Path

from .common import autocast, log
from .config import EOS_ID, PAD_ID, STOP_IDS, Config
from .streams import padded_batches
from .tokenizer import save_tokenizer


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
        eos_token_id=list(STOP_IDS),
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


def masked_ce(logits, y, m):
    """(sum of next-token cross-entropy over the masked targets, their count)."""
    import torch.nn.functional as F

    ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
    m = m.reshape(-1).float()
    return (ce * m).sum(), m.sum()


def heldout_loss(model, seqs, ctx: int, device, bsz: int = 32) -> float:
    """Mean loss (nats/token) over the masked targets of (ids, mask) sequences."""
    import torch

    was_training = model.training
    model.eval()
    tot = cnt = 0.0
    with torch.no_grad():
        for x, y, m in padded_batches(seqs, bsz, ctx):
            with autocast(device):
                logits = model(input_ids=x.to(device)).logits
            s, c = masked_ce(logits, y.to(device), m.to(device))
            tot, cnt = tot + s.item(), cnt + c.item()
    model.train(was_training)
    return tot / max(1.0, cnt)


def save_model(model, hf_tok, out_dir: Path) -> None:
    """A complete Hugging Face folder: fp16 safetensors, config, generation config, tokenizer."""
    import torch
    from transformers import GenerationConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    m = copy.deepcopy(model).to("cpu", dtype=torch.float16)
    m.generation_config = GenerationConfig(bos_token_id=EOS_ID, eos_token_id=list(STOP_IDS), pad_token_id=PAD_ID)
    m.save_pretrained(out_dir)
    save_tokenizer(hf_tok, out_dir)
    log(f"saved {out_dir}: " + ", ".join(f"{p.name} {p.stat().st_size:,}B" for p in sorted(out_dir.iterdir())))


def load_pair(target_dir: Path, draft_dir: Path, device):
    """(tokenizer, target, draft) in float32, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).to(device).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32).to(device).eval()
    return tok, target, draft
