#!/usr/bin/env python3
"""Train Helix Desktop's demo model pair (demo-target + demo-draft) for speculative decoding and chat.

Pipeline (all seeded; one module of the ``training`` package beside this file per step):
  1. read the corpus (TinyStories pieces + public-domain children's books, see SOURCES.md);
  2. train one byte-level BPE tokenizer with the chat tokens <|system|> <|user|> <|assistant|> <|end|>;
  3. build instruction/chat conversations from the train stories (write, continue, copy, multi-turn);
  4. train the *target* (12 layers, width 256) on plain stories, books and conversations;
  5. let the target write on-policy distillation data (story continuations and chat replies);
  6. distil the *draft* (2 layers, initialised from the target) with KL(target || draft);
  7. save both as Hugging Face folders (float16) with the chat template, and evaluate them on CPU
     through the Helix engine: held-out losses, greedy speculative acceptance on stories and chat.

Usage (from the repo root):
  python resources/models/train_demo.py                       # full run (GPU: minutes)
  python resources/models/train_demo.py --preset tiny --out /tmp/demo   # CI-sized smoke run
  python resources/models/train_demo.py --eval-only --time-cpu  # re-evaluate the saved folders on CPU
  python resources/models/train_demo.py --finetune-target --copy-weight 0.25 --out OUT   # teach OUT's target to copy
  python resources/models/train_demo.py --help                 # every setting
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from training.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
