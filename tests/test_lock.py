"""The locks (requirements/lock-*.txt) agree with pyproject.toml, and README, .ci/run and the build install through them.
No network: the locks' `# via` lines carry the dependency graph that packaging/lock.py resolved."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# packaging/lock.py points this at its candidate locks while it tests them in a fresh venv
LOCK_DIR = Path(os.environ.get("HELIX_LOCK_DIR", ROOT / "requirements"))
LOCKS = sorted(LOCK_DIR.glob("lock-*.txt"))


def _lock_module():
    spec = importlib.util.spec_from_file_location("helix_packaging_lock", ROOT / "packaging" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


lock = _lock_module()


def test_the_three_locks_exist_and_linux_keeps_the_cpu_torch_and_pyside_pins():
    assert [p.name for p in LOCKS] == ["lock-linux-cpu.txt", "lock-windows-cpu.txt", "lock-windows-directml.txt"]
    linux, _, _ = lock.read_lock(LOCK_DIR / "lock-linux-cpu.txt")
    assert linux["torch"] == "2.13.0"  # any other Linux torch on PyPI is a multi-GB CUDA build
    assert int(linux["pyside6-essentials"].split(".")[1]) < 12
    directml, _, _ = lock.read_lock(LOCK_DIR / "lock-windows-directml.txt")
    assert directml["torch"] == "2.4.1" and "torch-directml" in directml


@pytest.mark.parametrize("path", LOCKS, ids=lambda p: p.name)
def test_lock_and_pyproject_agree(path):
    problems = lock.disagreements(path)
    assert not problems, "\n".join(problems)


def _pyproject_with(tmp_path, old: str, new: str) -> Path:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert old in text
    changed = tmp_path / "pyproject.toml"
    changed.write_text(text.replace(old, new, 1), encoding="utf-8")
    return changed


def test_a_dependency_added_to_pyproject_only_is_named(tmp_path):
    pyproject = _pyproject_with(tmp_path, 'dependencies = [\n', 'dependencies = [\n  "left-pad-helix>=1.0",\n')
    problems = lock.disagreements(LOCK_DIR / "lock-linux-cpu.txt", pyproject)
    assert len(problems) == 1 and "left-pad-helix>=1.0" in problems[0] and "--add" in problems[0], problems


def test_a_dependency_removed_from_pyproject_leaves_a_pin_that_is_named(tmp_path):
    pyproject = _pyproject_with(tmp_path, '  "qasync>=0.27",\n', "")  # nothing else needs qasync
    problems = lock.disagreements(LOCK_DIR / "lock-linux-cpu.txt", pyproject)
    assert any(p.startswith("lock-linux-cpu.txt pins qasync==") and "nothing in pyproject.toml requires it" in p
               for p in problems), problems


def test_a_range_that_excludes_the_pin_is_named(tmp_path):
    pyproject = _pyproject_with(tmp_path, '"tqdm>=4.66"', '"tqdm>=999"')
    problems = lock.disagreements(LOCK_DIR / "lock-linux-cpu.txt", pyproject)
    assert len(problems) == 1 and "tqdm==" in problems[0] and "outside" in problems[0], problems


def test_a_hand_added_pin_nothing_needs_is_named(tmp_path):
    edited = tmp_path / "lock-linux-cpu.txt"
    edited.write_text((LOCK_DIR / "lock-linux-cpu.txt").read_text(encoding="utf-8")
                      + "requests-oauthlib==2.0.0\n    # via helix-desktop\n", encoding="utf-8")
    problems = lock.disagreements(edited)
    assert len(problems) == 1 and "requests-oauthlib==2.0.0" in problems[0], problems


def _readme_commands() -> tuple[str, str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    app = re.search(r"Install and open the app on the demo models:\n\n```bash\n(.+)\n```", readme)
    tests = re.search(r"Install and run the tests:\n\n```bash\n(.+)\n```", readme)
    assert app and tests, "README's Quick start lost its two commands"
    return app[1], tests[1]


def test_readme_commands_install_through_the_linux_lock():
    for command in _readme_commands():
        assert "pip install -e " in command and "-c requirements/lock-linux-cpu.txt" in command, command


def test_ci_runs_the_readme_test_command_with_slow_tests():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    _, tests = _readme_commands()
    assert tests in ci.splitlines() or any(line.startswith(tests + " ||") for line in ci.splitlines()), \
        f".ci/run must run README's test command `{tests}` word for word"
    assert "export HELIX_RUN_SLOW=1" in ci, ".ci/run must run the slow tests too"
    assert re.search(r'"\$status" -eq 5', ci), ".ci/run must fail loudly when pytest collects nothing (exit 5)"


def test_build_installs_through_the_variant_lock():
    spec = importlib.util.spec_from_file_location("helix_packaging_build", ROOT / "packaging" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    for variant, name in [("cpu", "lock-windows-cpu.txt"), ("cuda", "lock-windows-cpu.txt"),
                          ("directml", "lock-windows-directml.txt")]:
        assert build.lock_for(variant, "win32").name == name
    assert build.lock_for("cpu", "linux").name == "lock-linux-cpu.txt"
