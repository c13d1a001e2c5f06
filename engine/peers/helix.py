"""Helix's own server (``python main.py serve``) as a separate process, the fair opponent for a peer
server in the bench: both are their own processes, both driven over HTTP."""

from __future__ import annotations

import sys
from collections.abc import Callable

from engine.peers.process import ServerProcess, free_port
from engine.peers.vllm import REPO


class HelixServer(ServerProcess):
    """``python main.py serve`` in its own process, the same way a user runs it: the fair opponent for
    a peer server (both separate processes, both over HTTP)."""

    def __init__(self, target: str | None = None, draft: str | None = None, *, dtype: str = "auto",
                 device: str = "auto", threads: int | None = None, api_key: str | None = None,
                 port: int | None = None, extra_args: tuple[str, ...] = (), ready_timeout_s: float = 300.0,
                 progress: Callable[[str], None] | None = None):
        port = port or free_port()
        cmd = [sys.executable, str(REPO / "main.py"), "serve", "--port", str(port), "--dtype", dtype,
               "--device", device]
        cmd += ["--target", target] if target else []
        cmd += ["--draft", draft] if draft else []
        cmd += ["--api-key", api_key] if api_key else []
        cmd += list(extra_args)
        env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
        self.api_key = api_key
        super().__init__(cmd, port, name="helix", env=env, ready_path="/health", ready_timeout_s=ready_timeout_s,
                         cwd=str(REPO), progress=progress)
