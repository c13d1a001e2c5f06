"""Command line: train (tokenizer, target, distillation data, draft), save, evaluate, time; writes the results JSON.

Usage (from the repo root):
  python resources/models/train_demo.py                       # full run (GPU: minutes)
  python resources/models/train_demo.py --preset tiny --out /tmp/demo   # CI-sized smoke run
  python resources/models/train_demo.py --eval-only --time-cpu  # re-evaluate the saved folders on CPU

Every ``Config`` field can be overridden on the command line (``--target-steps 2000`` ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

from .chat_format import encode_conversations
from .common import add_config_flags, log, pick_device, set_seed
from .config import DEFAULT_CORPUS, MODELS_DIR, PRESETS, REPO_ROOT, Config
from .corpus import load_corpus
from .instruct import build_conversations
from .streams import masked_stream, plain_stream, stream_windows
from .tokenizer import encode_texts, train_tokenizer


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="corpus dir (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=MODELS_DIR, help="writes OUT/demo-target and OUT/demo-draft")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    ap.add_argument("--eval-only", action="store_true", help="only evaluate the saved folders in OUT (on CPU)")
    ap.add_argument("--skip-eval", action="store_true", help="train and save only (evaluate later with --eval-only)")
    ap.add_argument("--reuse-target", action="store_true",
                    help="keep OUT/demo-target (and its tokenizer): only write distillation data and train the draft")
    ap.add_argument("--finetune-target", action="store_true",
                    help="continue training OUT/demo-target (its tokenizer kept) on the data mix, copy data included "
                         "(--copy-weight), then write distillation data and train the draft")
    ap.add_argument("--time-only", action="store_true",
                    help="only time CPU decoding steps of the saved folders (stored in the results JSON)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for CPU evaluation and timing (default 2)")
    ap.add_argument("--time-cpu", action="store_true", help="also time single decoding steps on CPU")
    ap.add_argument("--no-ngram-eval", action="store_true", help="skip the n-gram prompt-lookup acceptance on chat")
    ap.add_argument("--results", type=Path, default=None, help="write metrics JSON here (default OUT/demo_results.json)")
    add_config_flags(ap, Config)
    return ap.parse_args(argv)


def make_config(args) -> Config:
    cfg = Config(**PRESETS[args.preset])
    for f in fields(Config):
        v = getattr(args, f.name)
        if v is not None:
            setattr(cfg, f.name, v)
    return cfg


def prepare_data(data: dict, hf_tok, cfg: Config):
    """Token streams for training (plain stories, books, chat) and held-out sets (stories, chat)."""
    from .evaluate import chat_eval_set

    t0 = time.time()
    convs, counts = build_conversations(data["ts"], cfg.chat_per_story, cfg.seed + 4, data["books"], cfg.book_passages)
    streams = {
        "ts": plain_stream(encode_texts(hf_tok, data["ts"])),
        "books": plain_stream(encode_texts(hf_tok, data["books"])) if data["books"] else None,
        "chat": masked_stream(encode_conversations(hf_tok, convs)),
    }
    valid_chat = chat_eval_set(data["valid"], len(data["valid"]), cfg.seed + 7)
    heldout = {
        "stories": stream_windows(plain_stream(encode_texts(hf_tok, data["valid"])), cfg.ctx, cfg.heldout_windows),
        "chat": [s for s in encode_conversations(
            hf_tok, [c["messages"] + [{"role": "assistant", "content": c["reference"]}] for c in valid_chat])
            if len(s[0]) <= cfg.ctx + 1],
    }
    if cfg.copy_weight > 0 or cfg.draft_copy_frac > 0:
        from .copy_data import copy_sequences, told_twice

        streams["copy"] = masked_stream(copy_sequences(hf_tok, data["ts"] + data["books"], cfg.copy_docs, cfg.seed + 21))
        heldout["copy"] = [(ids, second) for ids, _, second in
                           told_twice(hf_tok, data["valid"], cfg.copy_heldout, cfg.seed + 22, cfg.ctx)]
        if not heldout["copy"]:
            del heldout["copy"]
    tokens = {k: len(v) if v is not None else 0 for k, v in streams.items()}
    tokens["chat_reply_tokens"] = int(streams["chat"].mask.sum())
    tokens["valid_stories"] = sum(len(s) - 1 for s, _ in heldout["stories"])
    tokens["valid_chat_conversations"] = len(heldout["chat"])
    if "copy" in streams:
        tokens["copy_target_tokens"] = int(streams["copy"].mask.sum())
        tokens["valid_copy_passages"] = len(heldout.get("copy", []))
    log(f"data: {len(convs)} conversations {dict(counts)}; tokens {tokens} ({time.time() - t0:.1f}s)")
    return streams, heldout, {"tokens": tokens, "conversations": dict(counts)}


def train(args, cfg: Config, device, target_dir: Path, draft_dir: Path, summary: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .distill_data import make_distill_data
    from .draft import train_draft
    from .models import save_model
    from .target import train_target

    t_start = time.time()
    set_seed(cfg.seed)
    data = load_corpus(args.corpus, cfg)
    if args.reuse_target or args.finetune_target:
        hf_tok = AutoTokenizer.from_pretrained(target_dir)
        target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).to(device).eval()
        log(f"target: {'fine-tuning' if args.finetune_target else 'reusing'} {target_dir}")
    else:
        hf_tok = train_tokenizer(data["ts"], cfg)
    streams, heldout, info = prepare_data(data, hf_tok, cfg)
    summary.update(info)
    if not args.reuse_target:
        t0 = time.time()
        target, tinfo = train_target(cfg, streams, heldout, device, init=target if args.finetune_target else None)
        tinfo["finetuned"] = bool(args.finetune_target)
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


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.reuse_target and args.finetune_target:
        raise SystemExit("--reuse-target and --finetune-target exclude each other")
    cfg = make_config(args)
    out = Path(args.out)
    target_dir, draft_dir = out / "demo-target", out / "demo-draft"
    results_path = args.results or (out / "demo_results.json")
    device = pick_device("cpu" if args.eval_only or args.time_only else args.device)
    if str(REPO_ROOT) not in sys.path:  # the evaluation runs the pair through Helix's engine
        sys.path.insert(0, str(REPO_ROOT))

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch
    import transformers

    torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log(f"config ({args.preset}): {json.dumps(dataclasses.asdict(cfg))}")
    log(f"device {device}, torch {torch.__version__}, transformers {transformers.__version__}")
    t_start = time.time()
    summary = {"config": dataclasses.asdict(cfg), "preset": args.preset,
               "argv": list(argv if argv is not None else sys.argv[1:]),
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}

    if args.time_only:
        from .cpu_timing import cpu_step_times
        from .models import load_pair

        _, target, draft = load_pair(target_dir, draft_dir, torch.device("cpu"))
        t = cpu_step_times(target, draft, threads=args.threads)
        log("cpu step times " + json.dumps(t))
        if results_path.exists():  # keep them with the other numbers
            old = json.loads(results_path.read_text())
            old["cpu_step_times"] = t
            results_path.write_text(json.dumps(old, indent=1) + "\n")
        return {"cpu_step_times": t}

    if not args.eval_only:
        train(args, cfg, device, target_dir, draft_dir, summary)
    if args.skip_eval:
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(summary, indent=1) + "\n")
        log(f"results written to {results_path} (evaluation skipped)")
        return summary

    from .evaluate import evaluate

    summary["eval"] = evaluate(target_dir, draft_dir, args.corpus, cfg, threads=args.threads,
                               ngram=not args.no_ngram_eval)
    summary["eval"]["versions"] = summary["versions"]
    if args.time_cpu:
        from .cpu_timing import cpu_step_times
        from .models import load_pair

        _, target, draft = load_pair(target_dir, draft_dir, torch.device("cpu"))
        t = cpu_step_times(target, draft, threads=args.threads)
        k, L = cfg.spec_k, summary["eval"]["stories"]["mean_acceptance_length"]
        t["estimated_speedup_k4_stories"] = L * t["target_1_ms"] / (k * t["draft_1_ms"] + t["target_5_ms"])
        summary["eval"]["cpu_step_times"] = t
        log("eval: CPU step times " + json.dumps({k: v if isinstance(v, dict) else round(v, 4) for k, v in t.items()}))
    if args.eval_only and results_path.exists():  # keep the training record, refresh the metrics
        try:
            old = json.loads(results_path.read_text())
            old["eval"] = summary["eval"]
            summary = old
        except (ValueError, OSError):
            pass
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(summary, indent=1) + "\n")
    log(f"results written to {results_path} (total {time.time() - t_start:.1f}s)")
    return summary
