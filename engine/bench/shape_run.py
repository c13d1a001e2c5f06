"""``bench --shape ...``: parse, run :mod:`engine.bench.shape_bench`, print and save (JSON after each
shape, so a run cut short keeps what it measured). Needs only torch, transformers and numpy."""

from __future__ import annotations

import json
import sys

from engine import cli

GPU_SET = ("tinyllama-1.1b", "llama-3.1-8b")


def run_shape_bench(args) -> int:
    from engine.bench.shape_bench import config_for_shapes, run_shapes
    from engine.bench.shape_report import format_shapes
    from engine.bench.shapes import SHAPES

    names = GPU_SET if args.shape == "gpu" else tuple(x.strip() for x in args.shape.split(",") if x.strip())
    unknown = [n for n in names if n not in SHAPES]
    if unknown or not names:
        return cli.usage_error(f"unknown shape {', '.join(unknown) or args.shape!r}; choose from "
                               f"{', '.join(SHAPES)} or 'gpu'")
    if args.draft_layers is not None and not 1 <= args.draft_layers < min(SHAPES[n].layers for n in names):
        return cli.usage_error(f"--draft-layers must be in 1..{min(SHAPES[n].layers for n in names) - 1}")
    if args.shape_prompts is not None and (not args.shape_prompts or min(args.shape_prompts) < 1):
        return cli.usage_error("--shape-prompts must be a comma-separated list of integers >= 1")
    if args.device not in ("auto", "cpu", "cuda"):
        return cli.usage_error("--shape runs on cpu or cuda")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return cli.usage_error("--device cuda: torch sees no CUDA device here")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = config_for_shapes(
        args.quick, shapes=names, prompt_lengths=args.shape_prompts, num_prompts=args.num_prompts,
        max_new_tokens=args.lengths[0] if args.lengths else None, ks=args.ks,
        concurrency=max(args.concurrency) if args.concurrency else None, draft_layers=args.draft_layers,
        hf=False if args.no_hf else None, hf_static=False if (args.no_hf or args.no_hf_static) else None,
        device=args.device, dtype=args.dtype, repeats=args.repeats, waves=args.waves)

    def save(results: dict) -> None:
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(dict(results, command=command), f, indent=2)

    command = f"python main.py {' '.join(sys.argv[1:])}" if "bench" in sys.argv[1:] else None
    try:
        results = run_shapes(cfg, on_section=save)
    except KeyboardInterrupt:
        return 130
    results["command"] = command
    text = format_shapes(results, markdown=args.markdown)
    print(text)
    save(results)
    if args.json:
        print(f"wrote {args.json}", file=sys.stderr)
        if args.markdown is False:  # a Markdown copy beside the JSON, for BENCHMARKS.md
            md = args.json.rsplit(".", 1)[0] + ".md"
            with open(md, "w", encoding="utf-8") as f:
                f.write(format_shapes(results, markdown=True) + "\n")
            print(f"wrote {md}", file=sys.stderr)
    if args.strict and any(t["result"] == "MISS" for t in results["targets"]):
        return 1
    return 0
