"""Smoke-test a built Helix app folder headless: --help, generate on the bundled demo pair, the window.

    python packaging/smoke.py [--app packaging/dist/Helix]

Each check runs the frozen executables with a throwaway HOME / app-data folder and prints PASS or FAIL:
help texts; ``generate`` at temperature 0 loads the demo pair from inside the bundle and prints text;
``serve`` answers /health;
the window opens offscreen, shows "Helix Desktop", writes its logs to the user's app-data folder and
closes after a few seconds (launcher's HELIX_SMOKE_QUIT_AFTER); a simulated GPU failure falls back to
CPU with a notice, and so does a GPU-check child that crashes or hangs; helix-cli's piped output is UTF-8;
a simulated startup failure shows the error window; nothing is written into the app folder.
Exit code 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXE_SUFFIX = ".exe" if os.name == "nt" else ""
WINDOW_SECONDS = 5
results: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str = "") -> bool:
    results.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'}  {name}" + (f"  ({detail})" if detail else ""), flush=True)
    return ok


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file() and not p.is_symlink()}


class Sandbox:
    """A fresh HOME and XDG/APPDATA root, so the app's user folder is found the way a user's would be."""

    def __init__(self, root: Path, name: str):
        self.home = root / name / "home"
        self.data = root / name / "data"
        self.home.mkdir(parents=True)
        self.data.mkdir(parents=True)
        self.app_data = self.data / "Helix" / "Helix Desktop"  # Qt AppDataLocation: <data>/<org>/<app>
        self.report = root / name / "report.json"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HELIX_", "QT_"))}
        env.update(HOME=str(self.home), USERPROFILE=str(self.home), XDG_DATA_HOME=str(self.data),
                   APPDATA=str(self.data), XDG_CONFIG_HOME=str(self.home / ".config"),
                   XDG_CACHE_HOME=str(self.home / ".cache"), HF_HUB_OFFLINE="1", QT_QPA_PLATFORM="offscreen",
                   PYTHONUNBUFFERED="1", **extra)
        if os.name == "nt":  # Qt asks Windows for the Roaming folder and ignores %APPDATA%: point both here
            env["HELIX_SETTINGS_DIR"] = str(self.app_data)
        return env

    def logs(self) -> str:
        folder = self.app_data / "logs"
        return "".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(folder.glob("*.log")))

    def read_report(self) -> dict:
        return json.loads(self.report.read_text(encoding="utf-8")) if self.report.is_file() else {}


def run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace",
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        proc = subprocess.CompletedProcess(cmd, 124, exc.stdout or "", exc.stderr or "")
        if isinstance(proc.stdout, bytes):
            proc.stdout, proc.stderr = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    proc.seconds = time.monotonic() - t0  # type: ignore[attr-defined]
    print(f"      $ {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))}  "
          f"-> exit {proc.returncode} in {proc.seconds:.1f} s", flush=True)  # type: ignore[attr-defined]
    return proc


def tail(text: str, n: int = 1500) -> str:
    return text[-n:].replace("\n", "\n      | ")


def smoke(app: Path, root: Path) -> None:
    gui, cli = app / f"Helix{EXE_SUFFIX}", app / f"helix-cli{EXE_SUFFIX}"
    before = snapshot(app)

    # 1. help texts from both executables (a windowed exe on Windows has no stdout: the launcher logs it)
    for exe in (gui, cli):
        box = Sandbox(root, f"help-{exe.stem}")
        proc = run([str(exe), "--help"], box.env(), 120)
        console = box.app_data / "logs" / "console.log"
        out = proc.stdout + (console.read_text(encoding="utf-8") if console.is_file() else "")
        check(f"{exe.name} --help", proc.returncode == 0 and "generate" in out and "serve" in out,
              tail(out + proc.stderr, 400) if proc.returncode else "")
    proc = run([str(cli), "generate", "--help"], box.env(), 120)
    check("helix-cli generate --help", proc.returncode == 0 and "--max-new-tokens" in proc.stdout)

    # 2. generate on the bundled demo pair, greedy
    box = Sandbox(root, "generate")
    prompt = "Once upon a time"
    gen = cli if os.name == "nt" else gui  # Helix.exe is windowed on Windows: no stdout to check
    proc = run([str(gen), "generate", prompt, "--temperature", "0", "--max-new-tokens", "16", "--log-level", "INFO"],
               box.env(), 300)
    text = proc.stdout.strip()
    bundled = str((app / "_internal" / "resources" / "models" / "demo-target").resolve())
    check(f"{gen.name} generate exits 0 and prints text", proc.returncode == 0 and len(text) > 0 and "Traceback" not in
          proc.stderr, f"stdout={text[:120]!r}" if proc.returncode == 0 else tail(proc.stderr))
    check("generate loads the demo pair from inside the bundle", bundled in proc.stderr, bundled)
    stats = [line for line in proc.stderr.splitlines() if " tokens in " in line]
    check("generate reports its stats", bool(stats), stats[0] if stats else tail(proc.stderr, 400))
    proc2 = run([str(cli), "generate", prompt, "--temperature", "0", "--max-new-tokens", "16"], box.env(), 300)
    check("helix-cli generate is deterministic at temperature 0", proc2.returncode == 0 and proc2.stdout.strip() == text,
          f"{proc2.stdout.strip()[:80]!r}")

    # 2b. the API server answers /health with the demo pair loaded
    box = Sandbox(root, "serve")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([str(cli), "serve", "--port", str(port)], env=box.env(), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    health: dict = {}
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and server.poll() is None and health.get("status") != "ok":
        time.sleep(1.0)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                health = json.loads(response.read())
        except (OSError, ValueError) as exc:
            health = {"error": str(getattr(exc, "reason", exc))}
    server.terminate()
    try:
        out, _ = server.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        out, _ = server.communicate()
    check("helix-cli serve answers /health with the demo pair", health.get("status") == "ok"
          and health.get("target") == Path(bundled).name,  # the API names a model by its short id (folder name)
          json.dumps(health)[:160] if health.get("status") == "ok" else tail(out))

    # 3. the window, offscreen, closed after a few seconds by the launcher
    box = Sandbox(root, "window")
    env = box.env(HELIX_SMOKE_QUIT_AFTER=str(WINDOW_SECONDS), HELIX_SMOKE_REPORT=str(box.report))
    proc = run([str(gui)], env, 300)
    report = box.read_report()
    titles = [w["title"] for w in report.get("windows", [])]
    check("window opens offscreen and closes cleanly", proc.returncode == 0
          and any(t.startswith("Helix Desktop") for t in titles), f"windows={titles}" if proc.returncode == 0 else
          tail(proc.stderr))
    models = report.get("models") or {}
    check("window loads the bundled demo pair", models.get("state") == "ready" and models.get("target") == bundled,
          f"{models.get('state')}: {models.get('target')}" + (f" ({models['reason']})" if models.get("reason") else ""))
    shot = report.get("screenshot")
    if check("window screenshot taken", bool(shot) and Path(shot).is_file(), str(app.parent / "smoke-window.png")):
        shutil.copyfile(shot, app.parent / "smoke-window.png")
    logs = box.logs()
    check("no traceback on stderr or in the logs", "Traceback" not in proc.stderr + logs,
          tail(proc.stderr + logs) if "Traceback" in proc.stderr + logs else "")
    check("logs go to the user's app-data folder", (box.app_data / "logs" / "helix.log").is_file()
          and (box.app_data / "logs" / "launcher.log").is_file(), str(box.app_data / "logs"))
    check("settings go to the user's app-data folder", (box.app_data / "settings.ini").is_file(),
          str(box.app_data / "settings.ini"))

    # 4. a GPU that fails its first tensor op: CPU and a notice
    box = Sandbox(root, "device-fault")
    env = box.env(HELIX_SMOKE_QUIT_AFTER=str(WINDOW_SECONDS), HELIX_SMOKE_REPORT=str(box.report),
                  HELIX_SMOKE_FAULT="device")
    proc = run([str(gui), "--device", "directml"], env, 300)
    notice = box.read_report().get("notice") or ""
    check("GPU failure falls back to CPU with a notice", proc.returncode == 0 and "runs on the CPU" in notice
          and "falling back to CPU" in box.logs(), notice[:160] or tail(proc.stderr))

    # 4b. a GPU check that crashes natively or hangs: the child dies or is cut off, the window still opens on CPU
    for fault, timeout in (("device-crash", "120"), ("device-hang", "5")):
        box = Sandbox(root, fault)
        env = box.env(HELIX_SMOKE_QUIT_AFTER=str(WINDOW_SECONDS), HELIX_SMOKE_REPORT=str(box.report),
                      HELIX_SMOKE_FAULT=fault, HELIX_GPU_CHECK_TIMEOUT_S=timeout)
        proc = run([str(gui), "--device", "directml"], env, 300)
        notice = box.read_report().get("notice") or ""
        check(f"GPU check child {fault.split('-')[1]}: app falls back to CPU", proc.returncode == 0
              and "runs on the CPU" in notice and (box.app_data / "logs" / "gpu-check.log").is_file(),
              notice[:160] or tail(proc.stderr))

    # 4c. helix-cli output piped: UTF-8 whatever the console code page (cp1252 raised UnicodeEncodeError)
    box = Sandbox(root, "utf8")
    missing = str(root / "モデル-missing")  # the error message names it: non-Latin text through a pipe
    proc = subprocess.run([str(cli), "generate", "hi", "--target", missing, "--no-draft"], env=box.env(),
                          capture_output=True, timeout=300)
    check("helix-cli piped output is UTF-8", proc.returncode == 2 and "モデル-missing".encode() in proc.stderr,
          tail(proc.stderr.decode("utf-8", "replace")))

    # 5. a startup failure: a readable error window naming the log folder, exit 1
    box = Sandbox(root, "startup-fault")
    env = box.env(HELIX_SMOKE_QUIT_AFTER="1", HELIX_SMOKE_REPORT=str(box.report), HELIX_SMOKE_FAULT="startup")
    proc = run([str(gui)], env, 300)
    error = box.read_report().get("error_window") or ""
    check("startup failure shows the error window", proc.returncode == 1 and "could not start" in error
          and str(box.app_data / "logs") in error, error[:200] or tail(proc.stderr))

    # 6. the install folder is read-only as far as the app is concerned
    after = snapshot(app)
    changed = sorted(k for k in after if before.get(k) != after[k])
    check("nothing written next to the executable", not changed, ", ".join(changed[:5]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--app", type=Path, default=HERE / "dist" / "Helix", help="built app folder (default: %(default)s)")
    args = p.parse_args(argv)
    app = args.app.resolve()
    if not (app / f"Helix{EXE_SUFFIX}").is_file():
        print(f"no app at {app}; build it first: python packaging/build.py", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="helix-smoke-") as tmp:
        smoke(app, Path(tmp))
    failed = [name for name, ok, _ in results if not ok]
    print(f"smoke: {len(results) - len(failed)}/{len(results)} checks passed" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
