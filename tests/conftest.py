"""Test setup: offscreen Qt, offline hub, one torch thread, and the `slow` marker (deselected unless asked for)."""

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

RUN_SLOW = "HELIX_RUN_SLOW"  # .ci/run sets it: the whole suite, slow tests included


def pytest_configure(config):
    # pyproject's [tool.pytest.ini_options] registers the marker; this keeps older checkouts' configs working.
    if not any(line.split(":", 1)[0].strip() == "slow" for line in config.getini("markers")):
        config.addinivalue_line("markers", "slow: heavy test (over ~10 s); deselected unless HELIX_RUN_SLOW=1 or -m")


def pytest_collection_modifyitems(config, items):
    """Deselect `slow` tests by default, so the everyday suite stays short; `-m ...` or HELIX_RUN_SLOW=1 keep them."""
    if os.environ.get(RUN_SLOW) == "1" or config.getoption("markexpr"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
        config._helix_slow_deselected = len(slow)


def pytest_terminal_summary(terminalreporter, config):
    count = getattr(config, "_helix_slow_deselected", 0)
    if count:
        terminalreporter.write_line(f"{count} slow tests deselected: HELIX_RUN_SLOW=1 (as .ci/run does) or "
                                    f"-m slow runs them")
