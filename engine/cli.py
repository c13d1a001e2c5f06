"""Command-line plumbing shared by every subcommand (no Qt here): common flags, logging,
engine construction with progress lines, and exit code 2 for anything the user can fix."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from engine.config import DEMO_DRAFT, DEMO_TARGET

EXIT_USAGE = 2
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def add_common_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and device")
    g.add_argument("--target", default=None, help="target model: local folder or hub id (default: the bundled demo target)")
    g.add_argument("--draft", default=None, help="draft model: local folder or hub id (default: the bundled demo draft "
                   "when the target is the demo, else none)")
    g.add_argument("--no-draft", action="store_true", help="run without a draft model (plain decoding only)")
    g.add_argument("--eagle", default=None, metavar="FOLDER",
                   help="EAGLE-3 draft head for the target (an HF folder in the EAGLE-3 format; default: the target "
                   "folder's eagle3/ subfolder, or the demo head for the demo target)")
    g.add_argument("--no-eagle", action="store_true", help="load no EAGLE-3 head")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "directml", "mps"],
                   help="compute device (auto: DirectML, then CUDA, then MPS, then CPU)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="weights and KV dtype (auto: bfloat16 where the GPU supports it, else float16 with an overflow check; fp16 checkpoints in fp16; float32 on CPU)")
    g.add_argument("--kv-cache-tokens", type=int, default=None, help="KV cache size in tokens (default: from memory)")
    g.add_argument("--log-level", default=os.environ.get("HELIX_LOG_LEVEL", "WARNING"),
                   help="DEBUG, INFO, WARNING or ERROR (default: $HELIX_LOG_LEVEL or WARNING)")


def setup_logging(level: str) -> None:
    name = str(level).upper()
    if name not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise SystemExit(usage_error(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR"))
    logging.basicConfig(level=name, format=LOG_FORMAT, stream=sys.stderr, force=True)
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def usage_error(message: str) -> int:
    print(f"helix: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def engine_config_from_args(args, **overrides):
    from engine.config import EngineConfig

    target = args.target or str(DEMO_TARGET)
    if args.no_draft:
        draft = None
    elif args.draft:
        draft = args.draft
    else:
        draft = str(DEMO_DRAFT) if args.target is None else None
    eagle = "" if getattr(args, "no_eagle", False) else getattr(args, "eagle", None)
    return EngineConfig(target=target, draft=draft, eagle=eagle, device=args.device,
                        dtype=None if args.dtype == "auto" else args.dtype,
                        kv_cache_tokens=args.kv_cache_tokens,
                        num_threads=getattr(args, "threads", None), **overrides)


class ProgressLine:
    """tqdm-style progress on stderr for model loading."""

    def __init__(self, desc: str = "loading"):
        from tqdm import tqdm

        self.desc = desc
        self.bar = tqdm(total=100, desc=desc, file=sys.stderr, bar_format="{desc} {percentage:3.0f}%|{bar:20}|",
                        leave=True)

    def __call__(self, stage: str, frac: float) -> None:
        self.bar.n = int(frac * 100)
        self.bar.set_description_str(f"{self.desc}: {stage:<28}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def build_engine_from_args(args, **overrides):
    """Build the engine with a progress line; HelixError propagates to the caller."""
    from engine.factory import build_engine

    config = engine_config_from_args(args, **overrides)
    progress = ProgressLine()
    try:
        return build_engine(config, progress)
    finally:
        progress.close()


# --------------------------------------------------------------------------- generate
def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="stream one completion to stdout",
                       description="Generate a continuation of PROMPT and stream it to stdout; stats go to stderr.")
    p.add_argument("prompt", help="the prompt text ('-' reads stdin)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--no-speculative", action="store_true", help="plain decoding even with a draft model")
    p.add_argument("--num-draft-tokens", type=int, default=None, help="fixed draft length K (1..8); default adaptive")
    p.add_argument("--draft-method", default="auto", choices=["auto", "model", "ngram", "eagle"],
                   help="what drafts: the draft model, n-gram lookup, the EAGLE-3 head, or auto (the fastest measured)")
    p.add_argument("--show-sources", action="store_true", help="colour tokens by source (draft/target/bonus) on a tty")
    p.add_argument("--endpoint", default=None, metavar="URL",
                   help="generate on a remote OpenAI-compatible server (Helix, vLLM) at URL instead of this PC; "
                   "the model flags are then ignored")
    p.add_argument("--api-key", default=os.environ.get("HELIX_API_KEY") or None,
                   help="the remote server's API key, sent as Authorization: Bearer (default: $HELIX_API_KEY)")
    add_common_args(p)
    p.set_defaults(func=run_generate)


COLOURS = {"draft": "\033[32m", "target": "\033[33m", "bonus": "\033[36m"}


def run_generate(args) -> int:
    from engine.config import SamplingParams
    from engine.errors import HelixError
    from engine.sequence import FinishEvent

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed, stop=tuple(args.stop),
                                speculative=not args.no_speculative, num_draft_tokens=args.num_draft_tokens,
                                draft_method=args.draft_method)
        colour = args.show_sources and sys.stdout.isatty()
        if args.endpoint:
            return _generate_remote(args, prompt, params, colour)
        engine = build_engine_from_args(args)

        def show(ev) -> None:
            if isinstance(ev, FinishEvent):
                sys.stdout.write(ev.tail)
            elif ev.text:
                sys.stdout.write(f"{COLOURS[ev.source]}{ev.text}\033[0m" if colour else ev.text)
            sys.stdout.flush()

        final = engine.generate(prompt, params, on_event=show)
    except HelixError as exc:
        return usage_error(str(exc))
    except KeyboardInterrupt:
        return 130
    return _report(final)


def _report(final) -> int:
    """The stats line on stderr; exit 1 when the request failed."""
    s = final.stats.to_dict()
    print(file=sys.stdout)
    spec = ("acceptance not reported by this server" if s["acceptance_rate"] is None else
            f"acceptance {s['acceptance_rate']:.2f}, mean acceptance length {s['mean_acceptance_length']:.2f}")
    print(f"[{final.finish_reason}] {s['num_generated_tokens']} tokens in {s['total_s']:.2f} s "
          f"({s['tokens_per_second']:.1f} tok/s, first token {s['ttft_s'] or 0:.3f} s); {spec}", file=sys.stderr)
    if final.finish_reason == "error":
        print(f"helix: error: {final.error}", file=sys.stderr)
        return 1
    return 0


def _generate_remote(args, prompt: str, params, colour: bool) -> int:
    """``generate --endpoint``: the same stream from a remote server; an unreachable server or a wrong key exit 2."""
    from engine.remote import Endpoint, RemoteClient
    from engine.sequence import FinishEvent

    final = None
    with RemoteClient(Endpoint(args.endpoint, args.api_key)) as client:
        if client.info().kind != "helix" and (args.no_speculative or args.num_draft_tokens):
            print("helix: note: this server decodes as it was started; --no-speculative and --num-draft-tokens "
                  "apply to Helix servers only", file=sys.stderr)
        for ev in client.stream(prompt, params):  # RemoteError (a HelixError) before the first event -> exit 2
            if isinstance(ev, FinishEvent):
                final = ev
                sys.stdout.write(ev.tail)
            elif ev.text:
                sys.stdout.write(f"{COLOURS[ev.source]}{ev.text}\033[0m" if colour and ev.source in COLOURS
                                 else ev.text)
            sys.stdout.flush()
    return _report(final)
