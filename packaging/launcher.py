"""Entry script of the frozen Helix app: per-user logs, a readable error window, and GPU-to-CPU fallback.

PyInstaller builds ``Helix`` (windowed) and ``helix-cli`` (console) from this file. Before any Helix
code runs it forces UTF-8 on stdout/stderr, points a windowed exe's missing stdout/stderr at a log file,
and logs to the per-user app-data folder (never next to the executable; one log per kind of process).
When the window is about to open, a child ``helix-cli --gpu-check DEVICE`` tries the GPU with one tiny
tensor op under a timeout; if the child fails, crashes (a native fault in DirectML.dll or the driver)
or hangs, the app runs on the CPU (``--device cpu``) and says so. Any exception while starting shows a
message box with the error and the log folder. Then ``main.main()``.

``HELIX_SMOKE_QUIT_AFTER`` / ``HELIX_SMOKE_REPORT`` / ``HELIX_SMOKE_FAULT`` exist for packaging/smoke.py:
close the window after N seconds and write what was on screen as JSON, or simulate a failure.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import multiprocessing
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

# Qt's AppDataLocation is <data>/<organisation>/<application>; these match helix_desktop.ORG_NAME / APP_NAME
# so the launcher's log lands next to the app's own helix.log and settings.ini.
ORG_NAME = "Helix"
APP_NAME = "Helix Desktop"
TITLE = "Helix Desktop"
MODEL_WAIT_S = 120  # smoke test: how long the window may still be loading models before it is closed anyway
SUBCOMMANDS = ("serve", "generate", "bench", "doctor")  # main.py's; with one of these, errors go to stderr
GPU_CHECK = "--gpu-check"  # argv[0] of the child that tries the GPU (handled here, before main.py's parser)
# torch import + first DirectML/ROCm context on a cold disk take ~10-30 s; a driver that hangs is cut off here
GPU_CHECK_TIMEOUT_S = float(os.environ.get("HELIX_GPU_CHECK_TIMEOUT_S") or 90.0)
LOG_BYTES = 1_000_000  # a log past this size is rotated when its process starts, never while it runs

logger = logging.getLogger("helix.launcher")
_keep_open: list = []  # streams and Qt objects that must live as long as the process


def app_data_dir() -> Path:
    """Where helix_desktop.paths.app_data_dir() points once Qt knows the app's names, computed without Qt."""
    override = os.environ.get("HELIX_SETTINGS_DIR")
    if override:
        return Path(override).expanduser()
    if sys.platform == "win32":  # Qt: %APPDATA% (Roaming)
        base = Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        xdg = os.environ.get("XDG_DATA_HOME", "")
        base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / ORG_NAME / APP_NAME


def force_utf8() -> None:
    """UTF-8 on stdout/stderr: piped output of helix-cli.exe is cp1252 on Windows, where any non-Latin text in a
    prompt or a model's reply raised UnicodeEncodeError. (The spec also starts both exes in UTF-8 mode.)"""
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "")
        if stream is not None and encoding != "utf8" and hasattr(stream, "reconfigure"):
            stream.reconfigure(encoding="utf-8", errors="backslashreplace")


def log_name(argv: list[str]) -> str:
    """One log file per kind of process, so the app, a doctor or CLI run beside it, and the GPU-check child
    never write (or rotate) the same file: on Windows a file another process holds open cannot be renamed
    (WinError 32), which is what rotating a shared launcher.log ran into."""
    if argv[:1] == [GPU_CHECK]:
        return "gpu-check.log"
    command = next((arg for arg in argv if arg in SUBCOMMANDS), None)
    return f"cli-{command}.log" if command else "launcher.log"


def rotate_log(path: Path, keep: int = 2) -> None:
    """At start only: move a full ``path`` to ``path.1`` (and ``.1`` to ``.2``). A file that another instance
    still holds open stays as it is and is appended to; rotation is a nicety, never a reason not to start."""
    try:
        if not path.is_file() or path.stat().st_size < LOG_BYTES:
            return
        for i in range(keep, 0, -1):
            older = path.with_name(f"{path.name}.{i - 1}") if i > 1 else path
            if older.is_file():
                os.replace(older, path.with_name(f"{path.name}.{i}"))
    except OSError as exc:  # WinError 32: the other process keeps its file; we append to it
        logger.debug("log %s not rotated: %s", path, exc)


def start_logging(argv: list[str] | None = None) -> Path:
    """Log to <app data>/logs/<log_name(argv)>; give a windowed exe a stdout/stderr; catch hard crashes."""
    log_dir = app_data_dir() / "logs"
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        path = log_dir / log_name(argv if argv is not None else sys.argv[1:])
        rotate_log(path)
        handler: logging.Handler = logging.FileHandler(path, encoding="utf-8")
    except OSError:  # read-only profile: keep going without a file
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logger.addHandler(handler)  # not the root logger: engine.cli.setup_logging() resets that one
    logger.setLevel(logging.INFO)
    if sys.stdout is None or sys.stderr is None:  # windowed exe on Windows: print() and tqdm would crash
        try:
            console = open(log_dir / "console.log", "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        except OSError:
            console = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
        _keep_open.append(console)
        sys.stdout = sys.stdout or console
        sys.stderr = sys.stderr or console
    try:
        crash = open(log_dir / "crash.log", "a", encoding="utf-8")  # noqa: SIM115
        _keep_open.append(crash)
        faulthandler.enable(crash)  # a native crash (GPU driver, DLL) still leaves a Python traceback
    except (OSError, ValueError):
        pass
    logger.info("start: %s %s (frozen=%s, bundle=%s)", sys.executable, sys.argv[1:], getattr(sys, "frozen", False),
                getattr(sys, "_MEIPASS", "-"))
    return log_dir


# --------------------------------------------------------------------------- GPU check
def _expected_gpu() -> str | None:
    """The GPU backend this build was made for: DirectML if torch_directml is bundled, else ROCm or CUDA by torch."""
    import importlib.util

    import torch

    if importlib.util.find_spec("torch_directml") is not None:
        return "DirectML"
    if getattr(torch.version, "hip", None):
        return "ROCm"
    return "CUDA" if torch.version.cuda else None


def gpu_check_child(device: str) -> int:
    """In the child: resolve ``device``, run one tiny op on it, print one JSON line. A native crash or a hang here
    ends only this process; the app reads the exit code, or cuts the child off after GPU_CHECK_TIMEOUT_S."""
    result: dict = {"device": device}
    try:
        fault = os.environ.get("HELIX_SMOKE_FAULT", "")
        if fault == "device":
            raise RuntimeError("simulated GPU driver failure (HELIX_SMOKE_FAULT=device)")
        if fault == "device-crash":  # what an access violation in DirectML.dll looks like from outside
            os.abort()
        if fault == "device-hang":
            time.sleep(3600)
        import torch

        from engine.devices import resolve_device

        info = resolve_device(device)
        result.update(kind=info.kind, name=info.name, expected=_expected_gpu())
        if info.kind != "cpu":
            x = torch.arange(16, dtype=torch.float32, device=info.device)
            result["sum"] = float((x * x).sum().cpu())
        code = 0
    except Exception as exc:
        logger.exception("GPU check failed for --device %s", device)
        result["error"] = f"{type(exc).__name__}: {exc}"
        code = 1
    print(json.dumps(result), flush=True)
    return code


def gpu_check_command(device: str) -> list[str]:
    """The child's argv: helix-cli next to the frozen app (console exe, so its output can be read), else this
    interpreter on this file."""
    if getattr(sys, "frozen", False):
        cli = Path(sys.executable).with_name("helix-cli" + (".exe" if sys.platform == "win32" else ""))
        return [str(cli), GPU_CHECK, device]
    return [sys.executable, str(Path(__file__).resolve()), GPU_CHECK, device]


def _exit_code_text(code: int) -> str:
    # Windows reports a native crash as an NTSTATUS (0xC0000005 access violation); POSIX as a negative signal
    return f"0x{code & 0xFFFFFFFF:08X}" if (sys.platform == "win32" and code < 0) or code > 255 else str(code)


def check_device(requested: str, log_dir: Path, timeout_s: float = GPU_CHECK_TIMEOUT_S) -> tuple[str, str | None]:
    """Try the device the window would use in a child process: ``(device to pass, notice to show or None)``."""
    if requested == "cpu":
        return requested, None
    fallback = "so it runs on the CPU instead. That works, only slower. Updating the graphics driver may help."
    cmd = gpu_check_command(requested)
    flags = getattr(subprocess, "CREATE_NO_WINDOW", 0)  # no console window flashing up over the windowed app
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace",
                              timeout=timeout_s, creationflags=flags, env=env)
    except subprocess.TimeoutExpired:  # subprocess.run has killed the child
        logger.error("GPU check for --device %s did not answer within %.0f s; falling back to CPU", requested,
                     timeout_s)
        return "cpu", (f"The GPU check did not finish within {timeout_s:.0f} s (the graphics driver may be hanging), "
                       f"{fallback}\n\nLogs: {log_dir}")
    except OSError as exc:
        logger.error("GPU check could not start (%s): %s; falling back to CPU", cmd[0], exc)
        return "cpu", f"The GPU check could not start ({exc}), {fallback}\n\nLogs: {log_dir}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    logger.info("GPU check: exit %s, %s", proc.returncode, result or proc.stderr[-2000:])
    if proc.returncode != 0 or "error" in result or not result:
        why = result.get("error") or f"the check process stopped with exit code {_exit_code_text(proc.returncode)}"
        logger.error("GPU check failed for --device %s (%s); falling back to CPU", requested, why)
        return "cpu", f"Helix could not use the GPU ({why}), {fallback}\n\nLogs: {log_dir}"
    if result.get("kind") == "cpu" and result.get("expected"):
        expected = result["expected"]
        logger.warning("no usable %s GPU; running on CPU", expected)
        return requested, (f"No {expected} GPU could be used (no compatible GPU or driver was found), so Helix "
                           f"runs on the CPU. That works, only slower. Updating the graphics driver may help.\n\n"
                           f"Logs: {log_dir}")
    logger.info("device check passed: %s (%s)", result.get("kind"), result.get("name"))
    return requested, None


def with_device(argv: list[str], device: str) -> list[str]:
    """``argv`` with every ``--device X`` / ``--device=X`` replaced by ``device``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--device":
            skip = True
        elif not arg.startswith("--device="):
            out.append(arg)
    return [*out, "--device", device]


# --------------------------------------------------------------------------- windows we show ourselves
def _smoke_quit_after() -> float | None:
    value = os.environ.get("HELIX_SMOKE_QUIT_AFTER")
    return float(value) if value else None


def _write_smoke_report(update: dict) -> None:
    path = os.environ.get("HELIX_SMOKE_REPORT")
    if not path:
        return
    report = json.loads(Path(path).read_text(encoding="utf-8")) if Path(path).is_file() else {}
    report.update(update)
    Path(path).write_text(json.dumps(report, indent=2), encoding="utf-8")


def start_ui_hooks(notice: str | None) -> object | None:
    """Once the window is up, show ``notice`` (non-modal); under the smoke test, also close the app after N s.

    A watcher thread waits for the QApplication and emits a signal; the slot runs on the GUI thread
    (queued connection), so the window code needs no hook of its own.
    """
    quit_after = _smoke_quit_after()
    if notice is None and quit_after is None:
        return None
    from PySide6.QtCore import QObject, Signal, Slot
    from PySide6.QtWidgets import QApplication, QMessageBox

    class UiHooks(QObject):
        fire = Signal(str)

        def __init__(self) -> None:
            super().__init__()
            self.fire.connect(self.on_fire)
            self.box: QMessageBox | None = None
            self.deadline = time.monotonic() + MODEL_WAIT_S
            self.done = False

        @Slot(str)
        def on_fire(self, what: str) -> None:
            windows = [w for w in QApplication.topLevelWidgets() if w.isWindow() and w.isVisible()]
            main_window = next((w for w in windows if hasattr(w, "show_message")), windows[0] if windows else None)
            if what == "notice":
                self.box = QMessageBox(QMessageBox.Icon.Warning, TITLE, notice or "", QMessageBox.StandardButton.Ok,
                                       main_window)
                self.box.setModal(False)
                self.box.show()
                return
            # smoke test: wait (up to MODEL_WAIT_S) for the first model load to settle, then record and quit
            host = getattr(main_window, "host", None)
            state = getattr(host, "state", None)
            if state == "loading" and time.monotonic() < self.deadline:
                return
            shot = os.environ.get("HELIX_SMOKE_REPORT", "") + ".png"
            config = getattr(host, "config", None)
            _write_smoke_report({
                "windows": [{"class": type(w).__name__, "title": w.windowTitle(), "width": w.width(),
                             "height": w.height()} for w in windows],
                "models": {"state": state, "reason": getattr(host, "reason", None),
                           "target": getattr(config, "target", None), "device": getattr(config, "device", None)},
                "notice": self.box.text() if self.box is not None else None,
                "screenshot": shot if main_window is not None and main_window.grab().save(shot) else None,
            })
            self.done = True
            QApplication.quit()

    hooks = UiHooks()
    _keep_open.append(hooks)

    def watch() -> None:
        deadline = time.monotonic() + 300
        while QApplication.instance() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # let app.exec() start and the window show
        if notice:
            hooks.fire.emit("notice")
        if quit_after is not None:
            time.sleep(quit_after)
            while not hooks.done:
                hooks.fire.emit("quit")
                time.sleep(1.0)

    threading.Thread(target=watch, name="helix-ui-hooks", daemon=True).start()
    return hooks


def show_error(text: str, details: str) -> None:
    """A message box the user can read: Qt if it works, else the Windows MessageBox, else stderr."""
    quit_after = _smoke_quit_after()
    _write_smoke_report({"error_window": text})
    try:
        from PySide6.QtCore import Qt, QTimer
        from PySide6.QtWidgets import QApplication, QMessageBox

        _keep_open.append(QApplication.instance() or QApplication([sys.argv[0]]))
        box = QMessageBox(QMessageBox.Icon.Critical, TITLE, text, QMessageBox.StandardButton.Close)
        box.setDetailedText(details)
        box.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        if quit_after is not None:
            QTimer.singleShot(int(quit_after * 1000), box.accept)
        box.exec()
        return
    except Exception:
        logger.exception("could not show the Qt error window")
    if sys.platform == "win32" and quit_after is None:
        import ctypes

        ctypes.windll.user32.MessageBoxW(None, text, TITLE, 0x10 | 0x40000)  # MB_ICONERROR | MB_TOPMOST
    else:
        print(f"{TITLE}: {text}", file=sys.stderr)


def can_show_window() -> bool:
    """False where Qt would abort for want of a display (a Linux console without X11/Wayland)."""
    if sys.platform in ("win32", "darwin") or os.environ.get("QT_QPA_PLATFORM"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


# --------------------------------------------------------------------------- entry
def run(argv: list[str]) -> int:
    force_utf8()
    log_dir = start_logging(argv)
    if argv[:1] == [GPU_CHECK]:
        return gpu_check_child(argv[1] if len(argv) > 1 else "auto")
    headless = any(arg in SUBCOMMANDS or arg in ("-h", "--help") for arg in argv)
    try:
        import main as helix_main

        args = helix_main.build_parser().parse_args(argv)  # --help and bad flags exit here, as from source
        if args.command is not None:
            return helix_main.main(argv)  # headless subcommands: errors and exit codes as from source
        if os.environ.get("HELIX_SMOKE_FAULT") == "startup":
            raise RuntimeError("simulated startup failure (HELIX_SMOKE_FAULT=startup)")
        device, notice = check_device(args.device, log_dir)
        if device != args.device:
            argv = with_device(argv, device)
        hooks = start_ui_hooks(notice)
        code = helix_main.main(argv)
        del hooks
        logger.info("exit %s", code)
        return code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        details = traceback.format_exc()
        logger.error("Helix could not start:\n%s", details)
        if headless or not can_show_window():
            print(f"helix: error: could not start: {type(exc).__name__}: {exc} (details in {log_dir})", file=sys.stderr)
        else:
            show_error(f"Helix could not start.\n\n{type(exc).__name__}: {exc}\n\n"
                       f"The log files are in:\n{log_dir}", details)
        return 1


if __name__ == "__main__":
    multiprocessing.freeze_support()
    if not getattr(sys, "frozen", False):  # from source (tests, the GPU-check child): the repo's packages
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(run(sys.argv[1:]))
