"""The one place where failures become HTTP responses.

Every route answers errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``,
so Helix and OpenAI clients parse the same thing. 503s carry ``Retry-After``.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import HelixError

logger = logging.getLogger(__name__)

RETRY_AFTER_S = "1"
_FIELD_IN_MESSAGE = re.compile(r"^([a-z_]+) must")


class ServerError(Exception):
    """A request the server turns down before the engine sees it (too large, unauthorised)."""

    def __init__(self, status_code: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status_code, self.code, self.param = status_code, code, param


def error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 503:
        return "service_unavailable"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if status == 503:
        headers.setdefault("Retry-After", RETRY_AFTER_S)
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def helix_error_response(exc: HelixError) -> JSONResponse:
    match = _FIELD_IN_MESSAGE.match(str(exc))
    return error_response(exc.status_code, str(exc), _snake(type(exc).__name__), match.group(1) if match else None)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _field_path(loc) -> list[str]:
    """A pydantic error location without ``body`` and union branch tags (``constrained-str``, ``list[int]``)."""
    return [str(p) for p in loc if isinstance(p, int) or (p != "body" and p.isidentifier() and p not in _TYPE_TAGS)]


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors() or [{"loc": (), "msg": "invalid request", "type": "invalid"}]
    if errors[0].get("type") == "json_invalid":
        detail = errors[0].get("ctx", {}).get("error", errors[0]["msg"])
        return error_response(400, f"request body is not valid JSON: {detail}", "invalid_json")
    # of a union's failed branches, the deepest error that is not a plain type mismatch is the one the
    # client needs ("List should have at most 16 items", not "Input should be a valid string")
    first = max(errors, key=lambda e: (len(_field_path(e.get("loc", ()))), not e.get("type", "").endswith("_type")))
    param = ".".join(_field_path(first.get("loc", ()))) or None
    if param:
        message = f"{param}: {first['msg']}"
    else:
        message = f"request body must be a JSON object (Content-Type: application/json): {first['msg']}"
    others = {_field_path(e.get("loc", ()))[:1][0] if _field_path(e.get("loc", ())) else "" for e in errors}
    others.discard(param.split(".")[0] if param else "")
    if others:
        message += f" (and problems with: {', '.join(sorted(o or 'body' for o in others))})"
    return error_response(422, message, "invalid_value", param)


def install_error_handlers(app: FastAPI) -> None:
    async def on_helix(request: Request, exc: HelixError) -> JSONResponse:
        return helix_error_response(exc)

    async def on_server(request: Request, exc: ServerError) -> JSONResponse:
        return error_response(exc.status_code, str(exc), exc.code, exc.param)

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(exc)

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        rid = getattr(request.state, "request_id", "-")
        logger.error("[%s] %s %s crashed", rid, request.method, request.url.path, exc_info=exc)
        return error_response(500, f"internal error: {type(exc).__name__}", "internal_error")

    app.add_exception_handler(HelixError, on_helix)
    app.add_exception_handler(ServerError, on_server)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_crash)
