"""Builds the DirectML stack's stand-in venv (torch 2.4.1 + transformers 5.13.1, no Qt) once, in .venv-torch241/.

Run `python tests/torch241_venv.py [pytest args]` to build it (if missing) and run the engine tests inside it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-torch241"
# The pins of pyproject's `directml` extra, minus torch-directml (Windows-only wheel) and the Qt packages the
# engine never imports (pyproject's import-linter contract).
PINS = [
    "torch==2.4.1",
    "transformers==5.13.1",
    "numpy>=1.26",
    "tokenizers>=0.21",
    "huggingface_hub>=1.0,<3",
    "safetensors>=0.4",
    "accelerate>=1.0",
    "fastapi>=0.115",
    "uvicorn>=0.30",
    "prometheus-client>=0.20",
    "tqdm>=4.66",
    "psutil>=5.9",
    "pytest>=8",
    "httpx>=0.27",
]
ENGINE_TESTS = [
    "tests/test_paged_cache.py",
    "tests/test_engine.py",
    "tests/test_speculative.py",
    "tests/test_lean_forward.py",
    "tests/test_directml_path.py",
]
READY = VENV / "helix-ready.txt"  # written last, so a half-finished install is redone rather than trusted


def python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_venv() -> Path:
    """Create the venv and install PINS unless a finished install is already there; returns its python."""
    if READY.exists() and READY.read_text(encoding="utf-8") == "\n".join(PINS):
        return python()
    if not python().exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    subprocess.run([str(python()), "-m", "pip", "install", "-q", *PINS], check=True)
    READY.write_text("\n".join(PINS), encoding="utf-8")
    return python()


def run_engine_tests(extra: list[str]) -> int:
    """Runs the engine tests with the venv's python; the repo root goes on sys.path via tests/conftest.py."""
    py = ensure_venv()
    tests = [t for t in ENGINE_TESTS if (ROOT / t).exists()]
    env = dict(os.environ, HELIX_STAND_IN="torch241", OMP_NUM_THREADS="1")
    # -p no:qt: pytest-qt is not installed there; no Qt plugin may load in an engine-only venv.
    cmd = [str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests, *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(run_engine_tests(sys.argv[1:]))
