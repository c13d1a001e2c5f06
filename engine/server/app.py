"""The app factory: one FastAPI app per ``EngineHost``, routers per resource, errors in one place."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from engine.host import EngineHost
from engine.server.errors import install_error_handlers
from engine.server.js_example import DOCS_MARKDOWN
from engine.server.metrics import make_registry
from engine.server.middleware import APIKeyMiddleware, BodyLimitMiddleware, RequestLogMiddleware
from engine.server.openai_schemas import openapi_with_vocab_bound
from engine.server.routes import generate, openai, system

DESCRIPTION = """Local LLM inference with speculative decoding and a paged KV cache.

* **Helix routes** (`/generate`, `/generate/batch`, `/generate/stream`) return per-request speculative stats
  and each token's provenance (draft, target or bonus).
* **OpenAI-compatible routes** (`/v1/...`) work with existing OpenAI clients; Helix extras are extra fields.
* **Errors** use OpenAI's shape `{"error": {"message", "type", "param", "code"}}` on every route.
* **Unknown body fields are ignored.** With an API key set, every route but `/ping` needs
  `Authorization: Bearer <key>`. Send `X-Request-ID` to name a request in the logs; it is echoed back.
""" + DOCS_MARKDOWN


def create_app(host: EngineHost, api_key: str | None = None, cors_origins: Sequence[str] = (),
               on_request: Callable[[dict], None] | None = None, max_body_bytes: int = 1 << 20) -> FastAPI:
    """Build the API around ``host``; ``on_request(entry)`` is called for every finished HTTP request."""
    # strict_content_type=False: a JSON body without any Content-Type is read as JSON (curl --data-raw habits)
    app = FastAPI(title="Helix", version="0.1.0", description=DESCRIPTION, strict_content_type=False)
    app.state.host = host
    app.state.registry = make_registry(host)
    for module in (generate, openai, system):
        app.include_router(module.router)
    install_error_handlers(app)
    # token ids' maximum is the served model's vocabulary, so /openapi.json states what the server enforces
    app.openapi = openapi_with_vocab_bound(app.openapi, lambda: getattr(host.engine, "vocab_size", None))
    # add_middleware wraps: the last added runs first. Order seen by a request:
    # request log (ids, timing, hook) -> CORS (answers preflights) -> body limit -> API key -> routes
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
                           expose_headers=["X-Request-ID"])
    app.add_middleware(RequestLogMiddleware, on_request=on_request)
    return app
