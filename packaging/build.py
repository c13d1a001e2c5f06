"""Build the one-folder Helix app with PyInstaller from a clean virtual environment (any OS).

    python packaging/build.py [--variant cpu|cuda|directml] [--smoke]

Steps: make a fresh venv (packaging/.build-venv), install Helix with the variant's torch and PyInstaller,
run packaging/helix.spec into packaging/dist/Helix, then print and save the build time and bundle size
(packaging/dist/build-report.json). ``--smoke`` then runs packaging/smoke.py on the result.
Windows maintainers use packaging/build_windows.ps1, which calls this script and then Inno Setup.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PYINSTALLER = "pyinstaller==6.22.0"
VARIANTS = ("cpu", "cuda", "rocm", "directml")
# Where pip finds a CUDA torch: PyPI's Windows wheels are CPU-only; its Linux wheels already use CUDA.
DEFAULT_CUDA_INDEX = "https://download.pytorch.org/whl/cu128"
# AMD's ROCm torch for Windows is per GPU family and has no default: TheRock's index for RDNA4 is
# https://rocm.nightlies.amd.com/v2/gfx120X-all/ and for RDNA3 .../v2/gfx110X-all/ (README: Install on Windows).
ROCM_INDEX_EXAMPLE = "https://rocm.nightlies.amd.com/v2/gfx120X-all/"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=VARIANTS, default="cpu",
                   help="cpu: torch without GPU libraries; cuda: NVIDIA GPUs; rocm: AMD RDNA3/RDNA4 GPUs with AMD's "
                   "ROCm torch (needs --torch-index-url); directml: any DirectX 12 GPU on Windows (AMD, Intel, "
                   "NVIDIA) via the directml extra (default: cpu)")
    p.add_argument("--python", default=sys.executable, help="interpreter that makes the venv (default: this one)")
    p.add_argument("--venv", type=Path, default=HERE / ".build-venv", help="build venv (default: %(default)s)")
    p.add_argument("--reuse-venv", action="store_true", help="keep an existing build venv instead of recreating it")
    p.add_argument("--torch-index-url", default=None,
                   help=f"install torch from this index first (cuda default: {DEFAULT_CUDA_INDEX}; rocm: required, "
                   f"e.g. {ROCM_INDEX_EXAMPLE}; "
                   "for a CPU-only torch on Linux: https://download.pytorch.org/whl/cpu)")
    p.add_argument("--demo-models", type=Path, default=None,
                   help="folder with demo-target/ and demo-draft/ (default: resources/models; if those are not "
                   "trained yet, a tiny pair is trained into packaging/build/demo-tiny)")
    p.add_argument("--dist", type=Path, default=HERE / "dist", help="output folder (default: %(default)s)")
    p.add_argument("--work", type=Path, default=HERE / "build", help="PyInstaller work folder (default: %(default)s)")
    p.add_argument("--smoke", action="store_true", help="run packaging/smoke.py on the built app afterwards")
    args = p.parse_args(argv)
    if args.variant == "rocm" and not args.torch_index_url:
        p.error(f"the rocm variant needs --torch-index-url: AMD's ROCm torch index for your GPU family, e.g. "
                f"{ROCM_INDEX_EXAMPLE} (RDNA4) or .../v2/gfx110X-all/ (RDNA3)")
    return args


def lock_for(variant: str, platform: str = sys.platform) -> Path:
    """The lock the build installs through (README: Reproducible installs): the tested versions, not today's."""
    if platform.startswith("win"):
        return REPO / "requirements" / ("lock-windows-directml.txt" if variant == "directml" else "lock-windows-cpu.txt")
    return REPO / "requirements" / "lock-linux-cpu.txt"


def constraints_for(args: argparse.Namespace) -> Path:
    """The variant's lock; rocm drops its torch pin (AMD's index has its own torch versions)."""
    lock = lock_for(args.variant)
    if args.variant != "rocm":
        return lock
    args.work.mkdir(parents=True, exist_ok=True)
    kept = [ln for ln in lock.read_text(encoding="utf-8").splitlines() if not ln.startswith("torch==")]
    rocm = args.work / "constraints-rocm.txt"
    rocm.write_text("\n".join(kept) + "\n", encoding="utf-8")
    return rocm


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def make_venv(args: argparse.Namespace) -> Path:
    """A fresh venv with Helix (variant's torch) and PyInstaller; nothing from the developer's environment."""
    py = venv_python(args.venv)
    if not (args.reuse_venv and py.is_file()):
        shutil.rmtree(args.venv, ignore_errors=True)
        run([args.python, "-m", "venv", args.venv])
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check", "--quiet"]
    constraints = constraints_for(args)
    index = args.torch_index_url or (DEFAULT_CUDA_INDEX if args.variant == "cuda" else None)
    if index:  # only torch's pin here: the torch index need not carry the locked versions of everything else
        pins = [ln for ln in constraints.read_text(encoding="utf-8").splitlines() if ln.startswith("torch==")]
        run([*pip, pins[0] if pins else "torch", "--index-url", index])
    target = f"{REPO}[directml]" if args.variant == "directml" else str(REPO)
    run([*pip, "-c", constraints, target, PYINSTALLER])
    if args.variant == "rocm":  # a ROCm torch reports HIP; one without it came from the wrong index
        hip = subprocess.run([py, "-c", "import torch; print(getattr(torch.version, 'hip', None) or '')"],
                             capture_output=True, text=True, check=True).stdout.strip()
        if not hip:
            raise SystemExit(f"the rocm variant got a torch without ROCm (no torch.version.hip); check "
                             f"--torch-index-url {args.torch_index_url}")
        print(f"build venv: torch with ROCm/HIP {hip}", flush=True)
        return py
    probe = subprocess.run([py, "-c", "import torch; print(torch.__version__, torch.version.cuda or '')"],
                           capture_output=True, text=True, check=True).stdout.split()
    cuda = probe[1] if len(probe) > 1 else None
    print(f"build venv: torch {probe[0]}" + (f" (CUDA {cuda})" if cuda else " (no CUDA)"), flush=True)
    if args.variant == "cpu" and cuda:
        raise SystemExit(f"the cpu variant needs a CPU-only torch, but pip installed {probe[0]} with CUDA {cuda}; "
                         "pass --torch-index-url https://download.pytorch.org/whl/cpu")
    if args.variant == "cuda" and not cuda:
        raise SystemExit(f"the cuda variant got a CPU-only torch ({probe[0]}); pass --torch-index-url for your CUDA")
    return py


def demo_models(args: argparse.Namespace, py: Path) -> Path:
    """The demo pair to bundle; trains a tiny stand-in when resources/models has none yet."""
    if args.demo_models is not None:
        return args.demo_models.resolve()
    default = REPO / "resources" / "models"
    if all((default / name / "config.json").is_file() for name in ("demo-target", "demo-draft")):
        return default
    tiny = args.work / "demo-tiny"
    print(f"WARNING: {default}/demo-target is not trained yet; bundling a tiny stand-in pair from {tiny}", flush=True)
    if not all((tiny / name / "config.json").is_file() for name in ("demo-target", "demo-draft")):
        run([py, REPO / "resources" / "models" / "train_demo.py", "--preset", "tiny", "--out", tiny])
    return tiny.resolve()


def folder_size(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]
    return sum(p.stat().st_size for p in files), len(files)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.venv, args.dist, args.work = args.venv.resolve(), args.dist.resolve(), args.work.resolve()
    t0 = time.monotonic()
    py = make_venv(args)
    t_venv = time.monotonic() - t0
    models = demo_models(args, py)
    t1 = time.monotonic()
    env = {**os.environ, "HELIX_BUILD_VARIANT": args.variant, "HELIX_DEMO_MODELS": str(models)}
    run([py, "-m", "PyInstaller", "--noconfirm", "--clean", "--log-level", "WARN", "--distpath", args.dist,
         "--workpath", args.work, HERE / "helix.spec"], env=env, cwd=REPO)
    t_pyinstaller = time.monotonic() - t1
    app = args.dist / "Helix"
    size, count = folder_size(app)
    report = {
        "variant": args.variant, "app_folder": str(app), "bundle_bytes": size, "bundle_files": count,
        "venv_and_install_s": round(t_venv, 1), "pyinstaller_s": round(t_pyinstaller, 1),
        "total_s": round(time.monotonic() - t0, 1), "demo_models": str(models),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    (args.dist / "build-report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"built {app}: {size / 2**20:.0f} MiB in {count} files; venv+install {t_venv:.0f} s, "
          f"PyInstaller {t_pyinstaller:.0f} s, total {report['total_s']:.0f} s", flush=True)
    if args.smoke:
        return subprocess.run([sys.executable, str(HERE / "smoke.py"), "--app", str(app)]).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
