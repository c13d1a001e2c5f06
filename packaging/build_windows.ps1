<#
.SYNOPSIS
    Build the Helix Desktop app folder and its Windows installer.

.DESCRIPTION
    1. packaging\build.py: a clean venv (packaging\.build-venv), Helix with the variant's torch, PyInstaller,
       and the one-folder app in packaging\dist\Helix (Helix.exe windowed, helix-cli.exe console).
    2. Inno Setup (ISCC.exe, if installed): packaging\dist\installer\HelixDesktop-<version>-<variant>-setup.exe
       with a Start-menu entry, an optional desktop icon and an uninstaller.

.PARAMETER Variant
    directml (default): any DirectX 12 GPU (AMD, Intel, NVIDIA) through torch-directml; needs Python 3.10-3.12.
    cuda: NVIDIA GPUs with a CUDA build of torch (from -TorchIndexUrl, default the cu128 index of download.pytorch.org).
    cpu: no GPU libraries; the smallest bundle.

.PARAMETER Python
    Interpreter that creates the build venv, e.g. "C:\Python312\python.exe". Default: the newest of
    py -3.12, py -3.11, py -3.10 (the Python launcher), else "python" on PATH.

.PARAMETER TorchIndexUrl
    Install torch from this package index before Helix (cuda builds; see build.py --help).

.PARAMETER Smoke
    Run packaging\smoke.py on the built folder before making the installer.

.PARAMETER SkipInstaller
    Build the app folder only.

.EXAMPLE
    powershell -ExecutionPolicy Bypass -File packaging\build_windows.ps1 -Variant directml
.EXAMPLE
    powershell -ExecutionPolicy Bypass -File packaging\build_windows.ps1 -Variant cpu -Smoke
#>
[CmdletBinding()]
param(
    [ValidateSet('directml', 'cuda', 'cpu')]
    [string]$Variant = 'directml',
    [string]$Python = '',
    [string]$TorchIndexUrl = '',
    [switch]$Smoke,
    [switch]$SkipInstaller
)

$ErrorActionPreference = 'Stop'
Set-StrictMode -Version Latest
$Here = $PSScriptRoot
$Repo = Split-Path -Parent $Here

function Find-Python {
    if ($Python) { return , @($Python) }
    # Windows PowerShell 5.1 turns a native command's redirected stderr into errors; 'Stop' would make them fatal.
    $ErrorActionPreference = 'Continue'
    if (Get-Command py -ErrorAction SilentlyContinue) {
        foreach ($version in @('3.12', '3.11', '3.10')) {
            & py "-$version" -c "import sys" 2>$null
            if ($LASTEXITCODE -eq 0) { return , @('py', "-$version") }
        }
    }
    if (Get-Command python -ErrorAction SilentlyContinue) { return , @('python') }
    throw 'No Python 3.10-3.12 found. Install one from python.org (64-bit) or pass -Python C:\path\to\python.exe'
}

function Find-Iscc {
    $onPath = Get-Command iscc -ErrorAction SilentlyContinue
    if ($onPath) { return $onPath.Source }
    $candidates = @(
        @(${env:ProgramFiles(x86)}, 'Inno Setup 6\ISCC.exe'),
        @($env:ProgramFiles, 'Inno Setup 6\ISCC.exe'),
        @($env:LOCALAPPDATA, 'Programs\Inno Setup 6\ISCC.exe')
    )
    foreach ($candidate in $candidates) {
        if (-not $candidate[0]) { continue }
        $path = Join-Path $candidate[0] $candidate[1]
        if (Test-Path $path) { return $path }
    }
    return $null
}

$pythonCmd = Find-Python
$pythonExe = $pythonCmd[0]
$pythonArgs = @()
if ($pythonCmd.Count -gt 1) { $pythonArgs = $pythonCmd[1..($pythonCmd.Count - 1)] }
$interpreter = (& $pythonExe @pythonArgs -c 'import sys; print(sys.executable)').Trim()
if ($LASTEXITCODE -ne 0) { throw "Python did not start: $($pythonCmd -join ' ')" }
Write-Host "Python: $interpreter"

# 1. the app folder
$buildArgs = @((Join-Path $Here 'build.py'), '--variant', $Variant, '--python', $interpreter)
if ($TorchIndexUrl) { $buildArgs += @('--torch-index-url', $TorchIndexUrl) }
if ($Smoke) { $buildArgs += '--smoke' }
Push-Location $Repo
try {
    & $interpreter @buildArgs
    if ($LASTEXITCODE -ne 0) { throw "packaging\build.py failed (exit code $LASTEXITCODE)" }
    $versionLine = Select-String -Path (Join-Path $Repo 'pyproject.toml') -Pattern '^version\s*=\s*"([^"]+)"' | Select-Object -First 1
    if (-not $versionLine) { throw 'could not read the version from pyproject.toml' }
    $version = $versionLine.Matches[0].Groups[1].Value
}
finally {
    Pop-Location
}

# 2. the installer
if ($SkipInstaller) {
    Write-Host "App folder: $(Join-Path $Here 'dist\Helix') (installer skipped)"
    exit 0
}
$iscc = Find-Iscc
if (-not $iscc) {
    Write-Warning 'Inno Setup 6 not found (https://jrsoftware.org/isdl.php, or: winget install JRSoftware.InnoSetup); the app folder is built, the installer is not.'
    exit 0
}
& $iscc "/DAppVersion=$version" "/DVariant=$Variant" (Join-Path $Here 'helix.iss')
if ($LASTEXITCODE -ne 0) { throw "Inno Setup failed (exit code $LASTEXITCODE)" }
Write-Host "Installer: $(Join-Path $Here "dist\installer\HelixDesktop-$version-$Variant-setup.exe")"
