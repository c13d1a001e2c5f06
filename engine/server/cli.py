"""The ``serve`` subcommand: the API server headless, on the main thread (Ctrl+C stops it cleanly)."""

from __future__ import annotations

import argparse
import os
import sys

from engine.cli import add_common_args, usage_error

API_KEY_ENV = "HELIX_API_KEY"


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("serve", help="headless API server (REST/SSE + OpenAI-compatible)",
                              description="Serve the Helix API (docs at /docs). Binds 127.0.0.1 unless told "
                              "otherwise; any other address needs an API key.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                   help=f"require Authorization: Bearer KEY on every route but /ping (default: ${API_KEY_ENV})")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser requests from ORIGIN (repeatable; default: CORS off)")
    add_common_args(p)
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from engine.cli import build_engine_from_args
    from engine.errors import HelixError
    from engine.host import EngineHost
    from engine.server.app import create_app
    from engine.server.runner import bind_socket, check_bind, uvicorn_config

    if not 0 <= args.port <= 65535:
        return usage_error(f"--port must be in 0..65535, got {args.port}")
    try:
        check_bind(args.host, args.api_key)
        sock = bind_socket(args.host, args.port)  # before loading models: a taken port fails fast
    except (ValueError, OSError) as exc:
        return usage_error(str(exc))
    host = EngineHost()
    try:
        host.adopt(build_engine_from_args(args))
        import uvicorn

        app = create_app(host, api_key=args.api_key, cors_origins=args.cors_origin)
        port = sock.getsockname()[1]
        url = f"http://{f'[{args.host}]' if ':' in args.host else args.host}:{port}"
        sys.stderr.write(f"helix: serving on {url} (docs: {url}/docs); Ctrl+C stops\n")
        uvicorn.Server(uvicorn_config(app, args.host, port)).run(sockets=[sock])
    except HelixError as exc:
        return usage_error(str(exc))
    except KeyboardInterrupt:
        pass
    finally:
        host.shutdown()
        sock.close()
    return 0
