"""A server in its own process group on a free loopback port: started, polled until it answers,
stopped with its children; if it dies or never answers, the error carries its log's tail."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path


class PeerError(RuntimeError):
    """A peer server could not be installed, started or reached; the message says what to do."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_status(url: str, timeout: float = 2.0, api_key: str | None = None) -> int | None:
    """The HTTP status of a GET, or None when nothing answers."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


class ServerProcess:
    """``with ServerProcess(cmd, ready_path="/v1/models") as s: s.url`` -- started in a new process
    group (so a server's workers stop with it), stdout+stderr to a log file."""

    def __init__(self, cmd: Sequence[str], port: int, *, name: str = "server", env: dict | None = None,
                 ready_path: str = "/v1/models", ready_timeout_s: float = 600.0, cwd: str | None = None,
                 progress: Callable[[str], None] | None = None, log_path: str | None = None):
        self.cmd, self.port, self.name = list(cmd), port, name
        self.env = dict(os.environ, **(env or {}))
        self.ready_path, self.ready_timeout_s, self.cwd = ready_path, ready_timeout_s, cwd
        self.progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.log_path = log_path or tempfile.mkstemp(prefix=f"helix-{name}-", suffix=".log")[1]
        self.proc: subprocess.Popen | None = None
        self.api_key: str | None = getattr(self, "api_key", None)  # subclasses set it before this runs

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self) -> "ServerProcess":
        log = open(self.log_path, "wb")
        kwargs = {"start_new_session": True} if os.name == "posix" else {
            "creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        try:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, cwd=self.cwd, **kwargs)
        except OSError as exc:
            raise PeerError(f"cannot start {self.name} ({self.cmd[0]}): {exc}") from exc
        finally:
            log.close()
        return self

    def wait_ready(self) -> None:
        """Poll ``ready_path`` until it answers 200; a dead process or the timeout raise PeerError."""
        t0 = time.monotonic()
        next_note = t0 + 15
        while True:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise PeerError(f"{self.name} exited with code {code} before it was ready; log {self.log_path}, "
                                f"last lines:\n{self.log_tail()}")
            if http_status(self.url + self.ready_path, api_key=self.api_key) == 200:
                self.progress(f"{self.name}: ready on {self.url} after {time.monotonic() - t0:.0f} s")
                return
            now = time.monotonic()
            if now - t0 > self.ready_timeout_s:
                self.stop()
                raise PeerError(f"{self.name} did not answer {self.ready_path} within {self.ready_timeout_s:.0f} s; "
                                f"log {self.log_path}, last lines:\n{self.log_tail()}")
            if now >= next_note:
                last = self.log_tail(1).strip()[:120]
                self.progress(f"{self.name}: starting ({now - t0:.0f} s) {last}")
                next_note = now + 15
            time.sleep(0.5)

    def pause(self) -> None:
        """Stop the whole process group (SIGSTOP) while another server is timed: an idle server's
        spinning worker threads would otherwise take a core from it. A no-op off POSIX."""
        self._signal(getattr(signal, "SIGSTOP", None))

    def resume(self) -> None:
        self._signal(getattr(signal, "SIGCONT", None))

    def _signal(self, sig) -> None:
        if sig is None or os.name != "posix" or self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, OSError):
            pass

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM to the whole group, SIGKILL after ``grace_s``."""
        self.resume()  # a stopped group would not act on SIGTERM
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            if os.name == "posix":
                os.killpg(proc.pid, signal.SIGTERM)
            else:
                proc.send_signal(signal.CTRL_BREAK_EVENT)
            proc.wait(timeout=grace_s)
        except (subprocess.TimeoutExpired, ProcessLookupError, OSError):
            try:
                os.killpg(proc.pid, signal.SIGKILL) if os.name == "posix" else proc.kill()
            except (ProcessLookupError, OSError):
                pass
            proc.wait(timeout=10)
        if os.name == "posix":  # workers that outlived their parent in the same group
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, OSError):
                pass

    def __enter__(self) -> "ServerProcess":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
