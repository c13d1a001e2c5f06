"""Helix Desktop entry point: no subcommand opens the app; serve, generate, bench, doctor run headless."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys


def build_parser() -> argparse.ArgumentParser:
    from engine import cli

    parser = argparse.ArgumentParser(prog="helix", description="Helix Desktop: local LLM inference with speculative "
                                     "decoding. Without a subcommand, opens the desktop app.")
    cli.add_common_args(parser)
    sub = parser.add_subparsers(dest="command", metavar="{serve,generate,bench,doctor}")
    cli.add_generate_parser(sub)
    for module_name in ("engine.server.cli", "engine.bench.cli"):
        if importlib.util.find_spec(module_name) is not None:
            importlib.import_module(module_name).add_parsers(sub)
    for name, what in (("serve", "headless API server"), ("bench", "benchmarks"), ("doctor", "draft-pair doctor")):
        if name not in sub.choices:
            p = sub.add_parser(name, help=f"{what} (not yet available)")
            cli.add_common_args(p)
            p.set_defaults(func=lambda args, n=name: cli.usage_error(f"'{n}' is not yet available"))
    return parser


def main(argv: list[str] | None = None) -> int:
    from engine import cli

    parser = build_parser()
    args = parser.parse_args(argv)
    cli.setup_logging(args.log_level)
    if args.command is None:
        try:
            from helix_desktop.app import run_app
        except ImportError as exc:
            return cli.usage_error(f"the desktop app is not available ({exc}); use a subcommand, see --help")
        return run_app(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
