import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# Tiny models are latency-bound: one thread avoids OpenMP hand-off costs on 2-core CI machines.
torch.set_num_threads(1)


def pytest_configure(config):
    # The slow marker belongs in pyproject's [tool.pytest.ini_options]; register it here only until it lands there.
    if not any(line.split(":", 1)[0].strip() == "slow" for line in config.getini("markers")):
        config.addinivalue_line("markers", "slow: heavy test (a venv install, a full build); run on purpose")
