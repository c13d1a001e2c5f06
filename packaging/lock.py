"""Re-resolve requirements/lock-*.txt (the versions the suite passed with) from pyproject.toml, then test them.

    python packaging/lock.py              # newest allowed versions; fresh venv .venv-lock; default suite there
    python packaging/lock.py --add        # keep every existing pin, resolve only what pyproject added
    python packaging/lock.py --from-env   # pin what this interpreter has installed (then test in a fresh venv)
    options: --suite default|full|none, --linux-only

The Linux lock is written only when the suite passes in a fresh venv installed through it. The Windows locks
(cpu, directml) are resolved here with pip's cross-platform resolution and keep the Linux pins wherever they
apply; they are resolved, not tested (this machine has no Windows).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # a bare interpreter: pip carries the same library
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
LOCK_DIR = REPO / "requirements"
WORK = REPO / ".venv-lock"  # git-ignored (.venv*): the fresh venv and the resolver's scratch files
ROOT = "helix-desktop"

WINDOWS_312 = {
    "os_name": "nt", "sys_platform": "win32", "platform_system": "Windows", "platform_machine": "AMD64",
    "platform_release": "10", "platform_version": "10.0.19045", "python_version": "3.12",
    "python_full_version": "3.12.10", "implementation_name": "cpython", "implementation_version": "3.12.10",
    "platform_python_implementation": "CPython",
}
# Linux pins that cannot hold for DirectML (its extra needs torch 2.4.1 and transformers < 5.14).
DIRECTML_UNPINNED = {"torch", "transformers", "tokenizers", "huggingface-hub", "safetensors", "accelerate"}


@dataclass(frozen=True)
class Variant:
    name: str
    extras: tuple[str, ...]
    windows: bool = False
    keep_linux_pins_except: frozenset[str] = field(default_factory=frozenset)

    @property
    def path(self) -> Path:
        return LOCK_DIR / f"lock-{self.name}.txt"


LINUX = Variant("linux-cpu", ("test",))
VARIANTS = (LINUX, Variant("windows-cpu", ("test",), windows=True),
            Variant("windows-directml", ("test", "directml"), windows=True,
                    keep_linux_pins_except=frozenset(DIRECTML_UNPINNED)))

# Runs pip with the target's marker environment, so `sys_platform == "win32"` dependencies (colorama, ...)
# are resolved as on Windows: pip's --platform picks wheels but evaluates markers for the running machine.
RESOLVER = """import json, sys
from pip._vendor.packaging import markers
target = json.loads(sys.argv[1])
if target:
    env = markers.default_environment(); env.update(target)
    markers.default_environment = lambda: dict(env)
from pip._internal.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def say(message: str) -> None:
    print(f"[lock {time.strftime('%H:%M:%S')}] {message}", flush=True)


def pyproject_requirements(extras: tuple[str, ...], pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """The project's dependencies plus those of `extras`, as written (markers kept), without self-references."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project.get("optional-dependencies", {}).get(extra, [])
    return [line for line in lines if canonicalize_name(Requirement(line).name) != ROOT]


def marker_environment(variant: Variant) -> dict[str, str]:
    if variant.windows:
        return dict(WINDOWS_312)
    env = {"sys_platform": "linux", "platform_system": "Linux", "os_name": "posix", "platform_machine": "x86_64",
           "python_version": f"{sys.version_info[0]}.{sys.version_info[1]}", "implementation_name": "cpython"}
    return env


def read_lock(path: Path) -> tuple[dict[str, str], dict[str, list[str]], dict[str, str]]:
    """(pins name -> version, via name -> parents, header key -> value) of a lock file."""
    pins: dict[str, str] = {}
    via: dict[str, list[str]] = {}
    header: dict[str, str] = {}
    last = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if m := re.fullmatch(r"#\s*([a-z-]+):\s*(.*)", line):
            header[m[1]] = m[2]
        elif m := re.fullmatch(r"\s+#\s*via\s+(.*)", line):
            via[last] = [canonicalize_name(p.strip()) for p in m[1].split(",")]
        elif m := re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)\s*", line):
            last = canonicalize_name(m[1])
            pins[last] = m[2]
    return pins, via, header


def disagreements(lock: Path, pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """What `lock` and pyproject disagree on: a requirement without a fitting pin, or a pin nothing requires."""
    pins, via, header = read_lock(lock)
    extras = tuple(e for e in header.get("extras", "").split(",") if e)
    env = json.loads(header.get("environment", "{}"))
    problems, direct = [], set()
    for line in pyproject_requirements(extras, pyproject):
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        direct.add(name)
        if name not in pins:
            problems.append(f"pyproject.toml requires {line!r} but {lock.name} has no pin for {name}: "
                            f"run `python packaging/lock.py --add`")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{lock.name} pins {name}=={pins[name]}, outside pyproject.toml's {line!r}: relock")
    reachable, frontier = set(), [ROOT]
    while frontier:  # walk the `# via` edges down from pyproject; an edge from helix-desktop must be a direct one
        parent = frontier.pop()
        for name, parents in via.items():
            if parent in parents and name not in reachable and (parent != ROOT or name in direct):
                reachable.add(name)
                frontier.append(name)
    problems += [f"{lock.name} pins {name}=={pins[name]} but nothing in pyproject.toml requires it (directly or "
                 f"through another pin; its via: {', '.join(via.get(name, [])) or 'none'}): relock"
                 for name in sorted(set(pins) - reachable)]
    return problems


def resolve(variant: Variant, constraints: list[Path]) -> dict:
    """pip's resolution (a dry run that ignores what is installed) of pyproject for the variant, as its report."""
    WORK.mkdir(exist_ok=True)
    reqs = WORK / f"in-{variant.name}.txt"
    reqs.write_text("\n".join(pyproject_requirements(variant.extras)) + "\n", encoding="utf-8")
    report = WORK / f"report-{variant.name}.json"
    target = marker_environment(variant) if variant.windows else {}
    cmd = [sys.executable, "-c", RESOLVER, json.dumps(target), "install", "--dry-run", "--ignore-installed",
           "--quiet", "--disable-pip-version-check", "--report", str(report), "-r", str(reqs)]
    for c in constraints:
        cmd += ["-c", str(c)]
    if variant.windows:
        # pip < 23.3 wants --target with --platform even for a dry run; nothing is written there
        cmd += ["--platform", "win_amd64", "--python-version", "3.12", "--implementation", "cp",
                "--only-binary=:all:", "--target", str(WORK / "windows-target")]
    t0 = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        errors = [ln for ln in done.stderr.splitlines() if not ln.startswith("WARNING: Location")]
        raise RuntimeError(f"pip could not resolve {variant.name}:\n" + "\n".join(errors[-25:] or ["(no message)"]))
    say(f"{variant.name}: resolved in {time.monotonic() - t0:.0f} s")
    return json.loads(report.read_text(encoding="utf-8"))


def lock_text(variant: Variant, report: dict, tested: str) -> str:
    """The lock file: one `name==version` per package with the packages that need it (`# via`)."""
    items = {canonicalize_name(i["metadata"]["name"]): i for i in report["install"]}
    env = marker_environment(variant)
    needs: dict[str, set[str]] = {name: set() for name in items}

    extras = {name: set(item.get("requested_extras") or []) for name, item in items.items()}
    parents = [(ROOT, pyproject_requirements(variant.extras), set())]
    parents += [(name, item["metadata"].get("requires_dist") or [], extras[name]) for name, item in items.items()]
    changed = True
    while changed:  # to a fixed point: an edge like urllib3[socks] turns on more of urllib3's requirements
        changed = False
        for parent, requires, parent_extras in parents:
            for line in requires:
                req = Requirement(line)
                child = canonicalize_name(req.name)
                if child not in items or child == parent or not (req.marker is None or any(
                        req.marker.evaluate({**env, "extra": e}) for e in ["", *parent_extras])):
                    continue
                if parent not in needs[child] or not req.extras <= extras[child]:
                    needs[child].add(parent)
                    extras[child] |= req.extras
                    changed = True
    py = "3.12" if variant.windows else env["python_version"]
    lines = [
        f"# Helix's locked versions, {variant.name} (CPython {py}): constraints for `pip install -c`.",
        "# Written by `python packaging/lock.py` from pyproject.toml; change pyproject, then relock (README).",
        f"# extras: {','.join(variant.extras)}",
        f"# environment: {json.dumps(env, sort_keys=True)}",
        f"# tested: {tested}",
    ]
    for name in sorted(items):
        # A local label (2.13.0+cpu) is this machine's wheel; `==2.13.0` matches it and PyPI's build alike.
        version = items[name]["metadata"]["version"].split("+")[0]
        lines += [f"{name}=={version}", f"    # via {', '.join(sorted(needs[name])) or '(nothing: relock)'}"]
    return "\n".join(lines) + "\n"


def run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    say("+ " + " ".join(str(c) for c in cmd))
    return subprocess.run([str(c) for c in cmd], cwd=REPO, **kwargs)


def test_in_fresh_venv(candidate: Path, suite: str, pytest_args: list[str], candidates: Path) -> str:
    """Install Helix through `candidate` into a fresh venv, check it got exactly the pins, run the suite."""
    venv = WORK / "venv"
    shutil.rmtree(venv, ignore_errors=True)
    run([sys.executable, "-m", "venv", venv], check=True)
    py = venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    t0 = time.monotonic()
    done = run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", candidate, "-e", ".[test]"],
               capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError("installing through the candidate lock failed:\n" + done.stderr[-3000:])
    say(f"venv installed in {time.monotonic() - t0:.0f} s")
    pins, _, _ = read_lock(candidate)
    frozen = run([py, "-m", "pip", "list", "--format=json", "--exclude-editable"], capture_output=True, text=True,
                 check=True).stdout
    installed = {canonicalize_name(d["name"]): d["version"].split("+")[0] for d in json.loads(frozen)}
    wrong = {n: (v, installed.get(n)) for n, v in pins.items() if installed.get(n) != v}
    if wrong:
        raise RuntimeError(f"the venv did not install the pins (name: (lock, installed)): {wrong}")
    if suite == "none":
        return "not run (--suite none)"
    env = {"HELIX_LOCK_DIR": str(candidates), **({"HELIX_RUN_SLOW": "1"} if suite == "full" else {})}
    t0 = time.monotonic()
    out = run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args], capture_output=True, text=True,
              env={**os.environ, **env})
    summary = (out.stdout.strip().splitlines() or ["(no output)"])[-1].strip("= ")
    say(f"{suite} suite: {summary} ({time.monotonic() - t0:.0f} s)")
    if out.returncode != 0:
        print(out.stdout[-6000:], out.stderr[-2000:], sep="\n")
        raise RuntimeError(f"the {suite} suite failed in the fresh venv (exit code {out.returncode})")
    day = datetime.now(timezone.utc).date().isoformat()
    extra = f" (pytest {' '.join(pytest_args)})" if pytest_args else ""
    return f"{suite} suite{extra} in a fresh venv on {day}: {re.sub(r' in [0-9.]+s.*', '', summary)}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--add", action="store_true", help="keep the existing pins; resolve only missing packages")
    mode.add_argument("--from-env", action="store_true", help="pin what this interpreter has installed")
    p.add_argument("--suite", choices=("default", "full", "none"), default="default",
                   help="what to run in the fresh venv before writing the lock (full: slow tests too)")
    p.add_argument("--pytest-args", default="", help="more pytest arguments for the suite, e.g. \"--deselect X\"")
    p.add_argument("--linux-only", action="store_true", help="leave the Windows locks as they are")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    WORK.mkdir(exist_ok=True)
    LOCK_DIR.mkdir(exist_ok=True)
    constraints: list[Path] = []
    if args.add and LINUX.path.is_file():
        constraints.append(keep_compatible_pins(LINUX))
    elif args.from_env:
        frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True,
                                text=True, check=True).stdout
        (WORK / "env-pins.txt").write_text(frozen, encoding="utf-8")
        constraints.append(WORK / "env-pins.txt")
    candidates = WORK / "candidates"  # tests/test_lock.py checks these (HELIX_LOCK_DIR) while the suite runs
    shutil.rmtree(candidates, ignore_errors=True)
    candidates.mkdir()
    try:
        report = resolve(LINUX, constraints)
        candidate = candidates / LINUX.path.name
        candidate.write_text(lock_text(LINUX, report, "(being tested)"), encoding="utf-8")
        texts = {}
        for variant in [] if args.linux_only else VARIANTS[1:]:
            texts[variant] = lock_text(variant, resolve_windows(variant, candidate, args.add),
                                       "resolved for Windows here, not run (no Windows machine)")
            (candidates / variant.path.name).write_text(texts[variant], encoding="utf-8")
        for variant in VARIANTS[1:] if args.linux_only else []:
            if variant.path.is_file():
                shutil.copy(variant.path, candidates / variant.path.name)
        tested = test_in_fresh_venv(candidate, args.suite, shlex.split(args.pytest_args), candidates)
        texts[LINUX] = lock_text(LINUX, report, tested)
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        say(f"FAILED, the locks are unchanged (candidates in {candidates.relative_to(REPO)}): {exc}")
        return 1
    for variant, text in texts.items():
        old = read_lock(variant.path)[0] if variant.path.is_file() else {}
        variant.path.write_text(text, encoding="utf-8")
        new = read_lock(variant.path)[0]
        changed = [f"{n} {old.get(n, '-')} -> {new.get(n, '-')}" for n in sorted(old.keys() | new.keys())
                   if old.get(n) != new.get(n)]
        say(f"wrote {variant.path.relative_to(REPO)}: {len(new)} pins, {len(changed)} changed"
            + "".join(f"\n    {c}" for c in changed))
    say(f"done in {time.monotonic() - t0:.0f} s; review `git diff requirements/` and commit it")
    return 0


def keep_compatible_pins(variant: Variant) -> Path:
    """The existing lock minus pins that pyproject's own ranges now exclude (those get re-resolved)."""
    pins, _, _ = read_lock(variant.path)
    for line in pyproject_requirements(variant.extras):
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name in pins and not req.specifier.contains(pins[name], prereleases=True) and (
                req.marker is None or req.marker.evaluate(marker_environment(variant))):
            say(f"{variant.name}: pyproject's {line!r} excludes the pinned {name}=={pins.pop(name)}; re-resolving it")
    kept = WORK / f"keep-{variant.name}.txt"
    kept.write_text("".join(f"{n}=={v}\n" for n, v in pins.items()), encoding="utf-8")
    return kept


def resolve_windows(variant: Variant, linux_lock: Path, add: bool) -> dict:
    """Windows keeps the tested Linux pins where they apply; DirectML frees the torch stack its extra pins."""
    pins, _, _ = read_lock(linux_lock)
    keep = {n: v for n, v in pins.items() if n not in variant.keep_linux_pins_except}
    if add and variant.path.is_file():  # Windows-only packages (colorama, ...) keep their pins too
        keep = {**read_lock(keep_compatible_pins(variant))[0], **keep}
    base = WORK / f"keep-linux-for-{variant.name}.txt"
    base.write_text("".join(f"{n}=={v}\n" for n, v in keep.items()), encoding="utf-8")
    try:
        return resolve(variant, [base])
    except RuntimeError as exc:
        say(f"{variant.name}: the Linux pins do not all fit ({str(exc).splitlines()[-1]}); resolving it freely")
        return resolve(variant, [])


if __name__ == "__main__":
    sys.exit(main())
