"""Pure ASGI middleware (no BaseHTTPMiddleware, so streams and disconnects pass straight through):
request ids and the request log, the body-size limit, and the API key."""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.server.errors import error_response

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = b"x-request-id"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
OPEN_PATHS = frozenset({"/ping"})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


class RequestLogMiddleware:
    """Gives each request an id (the client's ``X-Request-ID`` when safe and not already in flight, else a
    fresh one), returns it in ``X-Request-ID``, logs one line per request and calls ``on_request`` with it."""

    def __init__(self, app: ASGIApp, on_request: Callable[[dict], None] | None = None):
        self.app = app
        self.on_request = on_request
        self._live: set[str] = set()  # ids of requests in flight (all on the server's event loop)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = (_header(scope, REQUEST_ID_HEADER) or b"").decode("latin-1")
        rid = given if _SAFE_ID.match(given) else uuid.uuid4().hex[:12]
        if rid in self._live:  # the same id twice at once would cancel the wrong engine request
            rid = f"{rid[:55]}-{uuid.uuid4().hex[:8]}"
        self._live.add(rid)
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        status = 500
        t0 = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (REQUEST_ID_HEADER, rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._live.discard(rid)
            entry = {"method": scope["method"], "path": scope["path"], "status": status,
                     "tokens": int(state.get("tokens", 0)), "duration_s": round(time.perf_counter() - t0, 6),
                     "request_id": rid}
            logger.info("[%s] %s %s -> %d (%d tokens, %.3f s)", rid, entry["method"], entry["path"], status,
                        entry["tokens"], entry["duration_s"])
            if self.on_request is not None:
                try:
                    self.on_request(entry)
                except Exception:
                    logger.exception("[%s] on_request hook failed", rid)


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Answers 413 when the body is larger than ``max_bytes`` (declared or streamed)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> object:
        return error_response(413, f"request body is larger than {self.max_bytes} bytes", "body_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large()(scope, receive, send)
            return
        seen = 0
        exceeded = answered = False

        async def counting_receive() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def answer_413() -> None:
            nonlocal answered
            if not answered:
                answered = True
                await self._too_large()(scope, receive, send)

        async def guarded_send(message: Message) -> None:
            if not exceeded:
                await send(message)
            elif message["type"] == "http.response.start":  # the app turned the failed read into its own error
                await answer_413()

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _BodyTooLarge:
            await answer_413()


class APIKeyMiddleware:
    """With a key set, every route but /ping needs ``Authorization: Bearer <key>``; else 401."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"authorization") or b""
        if not hmac.compare_digest(given, self._expected):
            message = "missing API key: send Authorization: Bearer <key>" if not given else "invalid API key"
            await error_response(401, message, "invalid_api_key",
                                 headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        await self.app(scope, receive, send)
