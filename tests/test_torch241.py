"""The engine tests on the DirectML stack's torch 2.4.1 + transformers 5.13.1 (tests/torch241_venv.py builds the
venv once in .venv-torch241/; the first run downloads torch 2.4.1, ~1 GB with its CUDA libraries)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests import torch241_venv


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("HELIX_STAND_IN") == "torch241", reason="already inside the stand-in venv")
def test_engine_tests_pass_on_torch_241_and_transformers_5131():
    py = torch241_venv.ensure_venv()
    versions = subprocess.run([str(py), "-c", "import torch, transformers; print(torch.__version__, "
                               "transformers.__version__)"], capture_output=True, text=True, check=True).stdout.split()
    assert versions[0].startswith("2.4.1") and versions[1] == "5.13.1"
    proc = subprocess.run([sys.executable, str(torch241_venv.ROOT / "tests" / "torch241_venv.py"), "-p", "no:warnings"],
                          capture_output=True, text=True, timeout=1800)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert re.search(r"\d+ passed", summary) and not re.search(r"\d+ (failed|error)", summary), summary
