"""Packaging: fast checks of packaging/ (spec, launcher, Windows scripts, README) on every run; the full
PyInstaller build + smoke test of the frozen app only with HELIX_PACKAGING_TESTS=1 (several minutes)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"


def _load(name: str):
    """Import packaging/<name>.py by path: the folder is no package (it would shadow PyPI's ``packaging``)."""
    spec = importlib.util.spec_from_file_location(f"helix_packaging_{name}", PACKAGING / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _make_demo_pair(folder: Path) -> Path:
    for name in ("demo-target", "demo-draft"):
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text("{}")
    return folder


class _Recorder:
    """Stands in for PyInstaller's Analysis/PYZ/EXE/COLLECT and records what the spec asked for."""

    def __init__(self, extra_datas: tuple = ()):
        self.calls: list[tuple[str, tuple, dict]] = []
        self.extra_datas = list(extra_datas)

    def factory(self, kind: str):
        def make(*args, **kwargs):
            self.calls.append((kind, args, kwargs))
            return types.SimpleNamespace(kind=kind, args=args, kwargs=kwargs, pure=[], scripts=[],
                                         binaries=[("torch/lib/libtorch_cpu.so", "src", "BINARY"),
                                                   ("nvidia/cublas/lib/libcublas.so.12", "src", "BINARY"),
                                                   ("torch/lib/libtorch_cuda.so", "src", "BINARY"),
                                                   ("torch/test/Dict_test", "src", "BINARY"),
                                                   ("torch/bin/protoc", "src", "BINARY"),
                                                   ("torch/bin/torch_shm_manager", "src", "BINARY"),
                                                   ("torch\\lib\\torchbind_test.dll", "src", "BINARY")],
                                         datas=[("torch/testing/x.txt", "s", "DATA"), ("numpy/tests/a.py", "s", "DATA"),
                                                ("torch-2.13.0.dist-info/licenses/third_party/kineto/LICENSE", "s",
                                                 "DATA"), *self.extra_datas])
        return make

    def of(self, kind: str) -> list[tuple[tuple, dict]]:
        return [(a, k) for c, a, k in self.calls if c == kind]


def _run_spec(monkeypatch, variant: str, demo: Path, extra_datas: tuple = ()) -> tuple[_Recorder, dict]:
    hooks = types.ModuleType("PyInstaller.utils.hooks")
    hooks.collect_data_files = lambda package, **kw: [(f"{package}/data.txt", package)]
    hooks.collect_submodules = lambda package, filter=None: [m for m in (package, f"{package}.models.llama.x",
                                                                         f"{package}.models.bert.x")
                                                             if filter is None or filter(m)]
    hooks.copy_metadata = lambda dist: [(f"{dist}.dist-info", f"{dist}.dist-info")]
    hooks.collect_dynamic_libs = lambda package: [(f"{package}/DirectML.dll", package)]
    for name in ("PyInstaller", "PyInstaller.utils"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "PyInstaller.utils.hooks", hooks)
    monkeypatch.setenv("HELIX_BUILD_VARIANT", variant)
    monkeypatch.setenv("HELIX_DEMO_MODELS", str(demo))
    rec = _Recorder(extra_datas)
    spec_globals = {"SPECPATH": str(PACKAGING), "__file__": str(PACKAGING / "helix.spec"),
                    **{k: rec.factory(k) for k in ("Analysis", "PYZ", "EXE", "COLLECT")}}
    exec(compile((PACKAGING / "helix.spec").read_text(), "helix.spec", "exec"), spec_globals)
    return rec, spec_globals


# --------------------------------------------------------------------------- the spec
def test_spec_builds_one_folder_with_windowed_app_and_console_cli(monkeypatch, tmp_path):
    rec, _ = _run_spec(monkeypatch, "cpu", _make_demo_pair(tmp_path))
    exes = {k["name"]: k for _, k in rec.of("EXE")}
    assert exes["Helix"]["console"] is False and exes["helix-cli"]["console"] is True
    assert all(k["exclude_binaries"] for k in exes.values())  # one folder, not one file
    (collect_args, collect_kwargs), = rec.of("COLLECT")
    assert collect_kwargs["name"] == "Helix"
    (analysis_args, analysis_kwargs), = rec.of("Analysis")
    assert analysis_args[0] == [str(PACKAGING / "launcher.py")]


def test_spec_bundles_resources_demo_models_and_lazy_modules(monkeypatch, tmp_path):
    demo = _make_demo_pair(tmp_path)
    rec, _ = _run_spec(monkeypatch, "cpu", demo)
    (_, kwargs), = rec.of("Analysis")
    datas = {dest: src for src, dest in kwargs["datas"]}
    assert datas["resources/icons"] == str(ROOT / "resources" / "icons")
    assert datas["resources/styles"] == str(ROOT / "resources" / "styles")
    assert datas["resources/models/demo-target"] == str(demo / "demo-target")
    assert datas["resources/models/demo-draft"] == str(demo / "demo-draft")
    assert "transformers.dist-info" in datas and "tokenizers.dist-info" in datas
    hidden = kwargs["hiddenimports"]
    assert "transformers.models.llama.x" in hidden and "transformers.models.bert.x" not in hidden
    assert "engine" in hidden and "helix_desktop" in hidden
    assert {"tkinter", "pytest"} <= set(kwargs["excludes"])
    assert "torch.testing._internal" not in kwargs["excludes"]  # torch.utils.checkpoint imports it


def test_spec_drops_test_suites_and_on_cpu_the_cuda_libraries(monkeypatch, tmp_path):
    demo = _make_demo_pair(tmp_path)
    rec, g = _run_spec(monkeypatch, "cpu", demo)
    assert [b[0] for b in g["a"].binaries] == ["torch/lib/libtorch_cpu.so", "torch/bin/torch_shm_manager"]
    assert g["a"].datas == [("torch/testing/x.txt", "s", "DATA")]
    rec, g = _run_spec(monkeypatch, "cuda", demo)
    assert [b[0] for b in g["a"].binaries] == ["torch/lib/libtorch_cpu.so", "nvidia/cublas/lib/libcublas.so.12",
                                               "torch/lib/libtorch_cuda.so", "torch/bin/torch_shm_manager"]


def test_spec_drops_dist_info_licences_and_refuses_paths_too_long_for_windows(monkeypatch, tmp_path):
    demo = _make_demo_pair(tmp_path)
    rec, g = _run_spec(monkeypatch, "cpu", demo)
    assert not [d for d in g["a"].datas if "licenses" in d[0]]  # torch's ~180-character licence tree is gone
    assert ("torch.dist-info", "torch.dist-info") in rec.of("Analysis")[0][1]["datas"]  # metadata itself stays
    deep = ("transformers/" + "x" * 200 + ".py", "s", "DATA")
    with pytest.raises(SystemExit, match="too long for Windows"):
        _run_spec(monkeypatch, "cpu", demo, extra_datas=(deep,))


def test_spec_starts_both_exes_in_utf8_mode(monkeypatch, tmp_path):
    rec, _ = _run_spec(monkeypatch, "cpu", _make_demo_pair(tmp_path))
    for args, _kwargs in rec.of("EXE"):
        assert ("X utf8_mode=1", None, "OPTION") in args[2]


def test_spec_rocm_variant_keeps_the_gpu_libraries(monkeypatch, tmp_path):
    rec, g = _run_spec(monkeypatch, "rocm", _make_demo_pair(tmp_path))
    assert "torch/lib/libtorch_cuda.so" in [b[0] for b in g["a"].binaries]  # HIP builds keep torch's GPU libraries


def test_spec_directml_variant_bundles_torch_directml(monkeypatch, tmp_path):
    rec, _ = _run_spec(monkeypatch, "directml", _make_demo_pair(tmp_path))
    (_, kwargs), = rec.of("Analysis")
    assert kwargs["binaries"] == [("torch_directml/DirectML.dll", "torch_directml")]
    assert "torch_directml" in kwargs["hiddenimports"]
    assert ("torch-directml.dist-info", "torch-directml.dist-info") in kwargs["datas"]


def test_spec_refuses_unknown_variant_and_missing_demo_models(monkeypatch, tmp_path):
    with pytest.raises(SystemExit, match="cpu, cuda, rocm or directml"):
        _run_spec(monkeypatch, "vulkan", _make_demo_pair(tmp_path / "a"))
    with pytest.raises(SystemExit, match="demo model folder"):
        _run_spec(monkeypatch, "cpu", tmp_path / "empty")


def test_spec_icon_and_resources_exist():
    assert (ROOT / "resources" / "icons" / "helix.ico").is_file()
    assert (ROOT / "resources" / "styles").is_dir()
    assert (PACKAGING / "launcher.py").is_file()


# --------------------------------------------------------------------------- build scripts
def test_build_script_options():
    build = _load("build")
    assert build.VARIANTS == ("cpu", "cuda", "rocm", "directml")
    args = build.parse_args([])
    assert args.variant == "cpu" and not args.smoke and args.venv == PACKAGING / ".build-venv"
    assert build.parse_args(["--variant", "directml", "--smoke"]).variant == "directml"
    with pytest.raises(SystemExit):
        build.parse_args(["--variant", "vulkan"])
    with pytest.raises(SystemExit):  # rocm has no default index: AMD's differs per GPU family
        build.parse_args(["--variant", "rocm"])
    rocm = build.parse_args(["--variant", "rocm", "--torch-index-url", build.ROCM_INDEX_EXAMPLE])
    assert rocm.torch_index_url == "https://rocm.nightlies.amd.com/v2/gfx120X-all/"
    proc = subprocess.run([sys.executable, str(PACKAGING / "build.py"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--variant" in proc.stdout and "--smoke" in proc.stdout


def test_smoke_script_help():
    proc = subprocess.run([sys.executable, str(PACKAGING / "smoke.py"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--app" in proc.stdout


def test_windows_build_script_documents_its_options():
    text = (PACKAGING / "build_windows.ps1").read_text()
    assert re.search(r"\[ValidateSet\('directml', 'rocm', 'cuda', 'cpu'\)\]\s*\[string\]\$Variant = 'directml'", text)
    for option in ("Variant", "Python", "TorchIndexUrl", "IsccPath", "Smoke", "SkipInstaller"):
        assert f".PARAMETER {option}" in text and f"${option}" in text
    assert "build.py" in text and "helix.iss" in text and "ISCC.exe" in text
    assert text.count("{") == text.count("}") and text.count("(") == text.count(")")


def test_windows_build_script_checks_python_long_paths_and_inno_setup():
    text = (PACKAGING / "build_windows.ps1").read_text()
    # Python: run each candidate once, check the exit code (the Store stub: 9009, no output) before using the
    # output, and require 64-bit 3.10-3.12 (3.12 for rocm)
    assert "$LASTEXITCODE -ne 0 -or $out.Count -lt 3" in text and "9009" in text
    assert "@('3.12', '3.11', '3.10')" in text and "if ($Variant -eq 'rocm') { @('3.12') }" in text
    assert "struct.calcsize('P') * 8" in text and "$info.Bits -ne '64'" in text
    assert ".Trim()" not in text.split("function Test-Python")[0]  # no .Trim() on output that may be $null
    # long paths: checked before the install for every torch >= 2.13 variant
    assert "LongPathsEnabled" in text and "$Variant -ne 'directml' -and -not (Test-LongPathsEnabled)" in text
    # Inno Setup: found (or -IsccPath) before the build, and missing means failure unless -SkipInstaller
    checks = text.index("# 1. the app folder")
    assert text.index("if (-not $SkipInstaller)") < checks and "throw 'Inno Setup 6 not found" in text
    assert text.count("exit 0") == 1 and "installer skipped: -SkipInstaller)\"\n    exit 0" in text
    assert "$Variant -eq 'rocm' -and -not $TorchIndexUrl" in text


def test_inno_setup_script_references_what_the_build_makes():
    text = (PACKAGING / "helix.iss").read_text()
    defines = dict(re.findall(r'#define (\w+) "([^"]*)"', text))
    assert defines["AppFolder"] == r"dist\Helix" and defines["AppExe"] == "Helix.exe"  # COLLECT "Helix", EXE "Helix"
    icon = re.search(r"^SetupIconFile=(.+)$", text, re.MULTILINE).group(1)
    assert (PACKAGING / icon.replace("\\", "/")).resolve().is_file()
    for section in ("[Setup]", "[Files]", "[Icons]", "[Tasks]", "[Run]", "[Code]"):
        assert section in text
    assert "{autoprograms}" in text  # Start-menu entry
    assert "{autodesktop}" in text and "Tasks: desktopicon" in text  # optional desktop icon
    assert "usPostUninstall" in text and "{userappdata}\\Helix\\Helix Desktop" in text
    code = text.split("[Code]")[1]
    assert code.index("if UninstallSilent then Exit;") < code.index("SuppressibleMsgBox")  # a quiet uninstall asks nothing
    assert "x64compatible" in text


def test_build_outputs_are_ignored_by_git():
    ignored = (ROOT / ".gitignore").read_text().split()
    for path in ("packaging/.build-venv/", "packaging/build/", "packaging/dist/"):
        assert path in ignored


def test_readme_documents_install_build_and_the_smoke_command():
    text = (ROOT / "README.md").read_text()
    assert "## Install on Windows" in text and "## Build the installer" in text
    assert "python packaging/build.py --smoke" in text
    for row in ("DirectML", "CUDA", "CPU", "Windows on ARM", "| `rocm` |", "| `directml` |"):
        assert row in text
    install = text.split("## Install on Windows")[1].split("## Build the installer")[0]
    assert "RDNA3" in install and "RDNA4" in install and "engine/directml_ops.py" in install
    assert "**Not run:**" in text.split("## Build the installer")[1]  # honest about what never ran on Windows


# --------------------------------------------------------------------------- the real build (slow)
@pytest.mark.skipif(os.environ.get("HELIX_PACKAGING_TESTS") != "1",
                    reason="full PyInstaller build + smoke test: set HELIX_PACKAGING_TESTS=1 (several minutes)")
def test_build_and_smoke_frozen_app():
    cmd = [sys.executable, str(PACKAGING / "build.py"), "--smoke"]
    if os.environ.get("HELIX_PACKAGING_REUSE_VENV") == "1":
        cmd.append("--reuse-venv")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "checks passed" in proc.stdout and "FAIL " not in proc.stdout
