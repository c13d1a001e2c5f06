"""Settings of a training run (one dataclass, every field a command-line flag), presets, fixed names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS_DIR = HERE.parent  # resources/models
REPO_ROOT = MODELS_DIR.parents[1]
DEFAULT_CORPUS = REPO_ROOT.parent / "shared" / "data" / "corpus"

# special tokens, in id order; <|endoftext|> separates documents and is also the BOS (GPT-2 style)
EOS, UNK, PAD = "<|endoftext|>", "<unk>", "<pad>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [EOS, UNK, PAD, SYSTEM, USER, ASSISTANT, END]
EOS_ID, UNK_ID, PAD_ID, SYSTEM_ID, USER_ID, ASSISTANT_ID, END_ID = range(len(SPECIAL_TOKENS))
ROLE_IDS = {"system": SYSTEM_ID, "user": USER_ID, "assistant": ASSISTANT_ID}
STOP_IDS = [END_ID, EOS_ID]  # generation_config eos: the end of a turn and the end of a text

TRAIN_FILES = ("tinystories_train.txt", "tinystories_train_extra_truecased.txt")
BOOKS_FILE = "gutenberg_children.txt"
VALID_FILE = "tinystories_valid.txt"


@dataclass
class Config:
    seed: int = 1234
    # tokenizer / shape
    vocab_size: int = 4096
    ctx: int = 1024  # training context == max_position_embeddings == model_max_length
    hidden: int = 256
    intermediate: int = 768
    heads: int = 4
    target_layers: int = 12
    draft_layers: int = 2
    # data
    use_extra: bool = True  # tinystories_train_extra_truecased.txt
    max_docs: int = 0  # >0: only the first N documents of each file (CI / smoke tests)
    max_doc_chars: int = 0  # >0: truncate every document (books are huge) to N chars
    chat_per_story: int = 3  # instruction/chat conversations built from each train story
    book_passages: int = 3000  # "continue this passage" conversations from the books
    heldout_windows: int = 0  # >0: at most N held-out story windows while training (early stopping)
    # copy data (copy_data.py): passages recombined across documents, told twice; only copying predicts the repeat
    copy_weight: float = 0.0  # share of the target's windows (taken from the plain stories' share)
    copy_docs: int = 40000  # copy documents built from the train stories and books
    copy_heldout: int = 300  # held-out passages (recombined held-out stories) for early stopping and the eval
    # target training: windows drawn from plain stories, books and chat conversations
    books_weight: float = 0.15
    chat_weight: float = 0.4
    target_steps: int = 2500
    target_batch: int = 64
    target_lr: float = 1.5e-3
    target_wd: float = 0.1
    target_dropout: float = 0.15
    warmup: int = 100
    min_lr_frac: float = 0.1
    eval_every: int = 100
    patience: int = 6  # evals without held-out improvement before stopping
    target_max_minutes: float = 0.0  # >0: fit the step count into this many minutes (measured rate)
    # on-policy distillation data written by the target
    gen_openings: int = 0  # 0 = every train story; else the first N
    gen_samples: int = 1  # temperature samples per prompt (after the greedy pass)
    gen_temperature: float = 0.8
    gen_new_tokens: int = 320
    gen_batch: int = 1024
    gen_max_minutes: float = 0.0  # >0: wall-clock stop for generation
    # draft distillation
    draft_steps: int = 4000
    draft_batch: int = 64
    draft_lr: float = 1e-3
    draft_wd: float = 0.0
    draft_real_frac: float = 0.2  # fraction of windows from real text (half stories, half chat); rest generated
    draft_copy_frac: float = 0.0  # fraction of windows from the copy data (taken from the generated share)
    draft_init: str = ""  # a draft folder to continue distilling (a re-trained target's old draft); "": the target's layers
    draft_eval_every: int = 250
    draft_max_minutes: float = 0.0  # >0: fit the step count into this many minutes (measured rate)
    # evaluation
    eval_prompts: int = 50  # held-out story openings
    eval_chat_prompts: int = 40  # held-out chat prompts built from held-out stories (plus the hand-written ones)
    eval_new_tokens: int = 128
    eval_chat_new_tokens: int = 256
    spec_k: int = 4
    log_every: int = 50


PRESETS = {
    "full": {},
    "tiny": dict(
        vocab_size=384, ctx=128, hidden=32, intermediate=64, heads=2, target_layers=2,
        draft_layers=1, max_docs=120, max_doc_chars=1500, chat_per_story=1, book_passages=20, heldout_windows=24,
        copy_weight=0.2, copy_docs=60, copy_heldout=8, draft_copy_frac=0.2,
        target_steps=6, target_batch=8, eval_every=3, patience=100, warmup=2,
        gen_openings=16, gen_samples=1, gen_new_tokens=24, gen_batch=16,
        draft_steps=6, draft_batch=8, draft_eval_every=3,
        eval_prompts=3, eval_chat_prompts=4, eval_new_tokens=16, eval_chat_new_tokens=16, log_every=2,
    ),
}
