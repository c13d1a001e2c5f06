"""Serving the app: bind a socket with clear errors, and ``ServerRunner`` for the desktop app, which
runs uvicorn on its own thread and event loop and starts and stops it as often as the user likes."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence

import uvicorn

from engine.host import EngineHost
from engine.server.app import create_app

logger = logging.getLogger(__name__)

API_KEY_ENV = "HELIX_API_KEY"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to expose the server beyond this PC without an API key."""
    if not is_loopback(host) and not api_key:
        raise ValueError(f"binding {host} makes the server reachable from other machines; set an API key "
                         f"(--api-key or {API_KEY_ENV}) or bind 127.0.0.1")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket, or OSError saying which port is taken and what to do."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    if sys.platform == "win32":  # SO_REUSEADDR on Windows would let us steal a port in use
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
    else:  # rebind at once after a stop, even with connections in TIME_WAIT
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", -1)):
            raise OSError(exc.errno, f"port {port} is already in use on {host}; choose another port") from exc
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EACCES):
            raise OSError(exc.errno, f"cannot listen on {host}:{port} ({exc.strerror}); choose another "
                          "address or port") from exc
        raise
    sock.setblocking(False)
    return sock


class _ThreadServer(uvicorn.Server):
    """uvicorn installs signal handlers and re-raises SIGINT after shutdown; off the main thread it must not."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def uvicorn_config(app, host: str, port: int, **kwargs) -> uvicorn.Config:
    # log_config=None: leave the application's logging alone; the request log middleware logs requests.
    # lifespan="off": the app has no startup work, and a lifespan task cancelled by Ctrl+C logs a traceback.
    return uvicorn.Config(app, host=host, port=port, loop="asyncio", log_config=None, access_log=False,
                          lifespan="off", timeout_graceful_shutdown=2, **kwargs)


class ServerRunner:
    """Serves ``create_app(host, ...)`` on a background thread. ``start()`` returns once the server
    accepts connections (or raises OSError / ValueError); ``stop()`` frees the port."""

    def __init__(self, host: EngineHost, bind_host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                 cors_origins: Sequence[str] = (), on_request: Callable[[dict], None] | None = None):
        check_bind(bind_host, api_key)
        self.host = host
        self.bind_host = bind_host
        self.port = port
        self.api_key = api_key
        self.cors_origins = tuple(cors_origins)
        self.on_request = on_request
        self._server: _ThreadServer | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._error: BaseException | None = None

    @property
    def running(self) -> bool:
        return self._server is not None and self._server.started and bool(self._thread and self._thread.is_alive())

    @property
    def url(self) -> str:
        host = f"[{self.bind_host}]" if ":" in self.bind_host else self.bind_host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            raise RuntimeError("the server is already running; stop() it first")
        sock = bind_socket(self.bind_host, self.port)
        self.port = sock.getsockname()[1]  # port 0 picks a free one
        app = create_app(self.host, api_key=self.api_key, cors_origins=self.cors_origins, on_request=self.on_request)
        server = _ThreadServer(uvicorn_config(app, self.bind_host, self.port))
        self._sock, self._server, self._error = sock, server, None
        self._thread = threading.Thread(target=self._serve, name="helix-server", daemon=True)
        self._thread.start()
        ok = self._wait(lambda: server.started or not self._thread.is_alive(), timeout)
        if not ok or not server.started:
            self.stop()
            raise OSError(f"the server did not start on {self.url}: {self._error or 'timed out'}")
        logger.info("API server listening on %s", self.url)

    def _serve(self) -> None:
        try:
            asyncio.run(self._server.serve(sockets=[self._sock]))
        except BaseException as exc:  # SystemExit from uvicorn on startup failure included
            self._error = exc
            logger.error("API server stopped with an error: %s", exc)

    @staticmethod
    def _wait(condition: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, finish or cancel open requests (streams are cancelled), free the port."""
        server, thread, sock = self._server, self._thread, self._sock
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                server.force_exit = True
                thread.join(timeout)
        if sock is not None:
            sock.close()
        self._server = self._thread = self._sock = None
        if thread is not None:
            logger.info("API server on %s stopped", self.url)
