<#
.SYNOPSIS
    Build the Helix Desktop app folder and its Windows installer.

.DESCRIPTION
    1. packaging\build.py: a clean venv (packaging\.build-venv), Helix with the variant's torch, PyInstaller,
       and the one-folder app in packaging\dist\Helix (Helix.exe windowed, helix-cli.exe console).
    2. Inno Setup (ISCC.exe): packaging\dist\installer\HelixDesktop-<version>-<variant>-setup.exe with a
       Start-menu entry, an optional desktop icon and an uninstaller. A missing Inno Setup fails the build
       unless -SkipInstaller is given.
    Before that it checks the interpreter (64-bit Python 3.10-3.12; 3.12 for rocm) and, for torch >= 2.13
    (every variant but directml), that Windows long paths are enabled: pip unpacks torch's licence files
    ~180 characters deep and fails with WinError 206 otherwise (pytorch/test-infra#8094).

.PARAMETER Variant
    directml (default): any DirectX 12 GPU (AMD, Intel, NVIDIA) through torch-directml; needs Python 3.10-3.12.
    rocm: AMD Radeon RX 7000 (RDNA3) and RX 9000 (RDNA4) GPUs with AMD's ROCm torch; needs Python 3.12 and
          -TorchIndexUrl (AMD's index for the GPU family, e.g. https://rocm.nightlies.amd.com/v2/gfx120X-all/).
    cuda: NVIDIA GPUs with a CUDA build of torch (from -TorchIndexUrl, default the cu128 index of download.pytorch.org).
    cpu: no GPU libraries; the smallest bundle.

.PARAMETER Python
    Interpreter that creates the build venv, e.g. "C:\Python312\python.exe". Default: the newest of
    py -3.12, py -3.11, py -3.10 (the Python launcher), else "python" on PATH; each is run once and must
    report 64-bit Python 3.10-3.12 (the Microsoft Store's python.exe stub exits 9009 and is skipped).

.PARAMETER TorchIndexUrl
    Install torch from this package index before Helix (required for rocm; cuda has a default; see build.py --help).

.PARAMETER IsccPath
    Inno Setup's ISCC.exe, when it is not on PATH or in the usual Inno Setup 6 folders.

.PARAMETER Smoke
    Run packaging\smoke.py on the built folder before making the installer.

.PARAMETER SkipInstaller
    Build the app folder only (no Inno Setup needed).

.EXAMPLE
    powershell -ExecutionPolicy Bypass -File packaging\build_windows.ps1 -Variant directml
.EXAMPLE
    powershell -ExecutionPolicy Bypass -File packaging\build_windows.ps1 -Variant rocm -TorchIndexUrl https://rocm.nightlies.amd.com/v2/gfx110X-all/
.EXAMPLE
    powershell -ExecutionPolicy Bypass -File packaging\build_windows.ps1 -Variant cpu -Smoke -SkipInstaller
#>
[CmdletBinding()]
param(
    [ValidateSet('directml', 'rocm', 'cuda', 'cpu')]
    [string]$Variant = 'directml',
    [string]$Python = '',
    [string]$TorchIndexUrl = '',
    [string]$IsccPath = '',
    [switch]$Smoke,
    [switch]$SkipInstaller
)

$ErrorActionPreference = 'Stop'
Set-StrictMode -Version Latest
$Here = $PSScriptRoot
$Repo = Split-Path -Parent $Here
# The versions build.py's venv can use: torch-directml needs <= 3.12, AMD's ROCm wheels for Windows are cp312 only.
$Allowed = if ($Variant -eq 'rocm') { @('3.12') } else { @('3.12', '3.11', '3.10') }

function Test-Python([string[]]$Command) {
    # One run of the candidate: its path, version and pointer size, or $null when it does not run. The Microsoft
    # Store stub (WindowsApps\python.exe) prints nothing and exits 9009, so output is checked before it is used.
    $exe = $Command[0]
    $rest = @()
    if ($Command.Count -gt 1) { $rest = $Command[1..($Command.Count - 1)] }
    # Windows PowerShell 5.1 turns a native command's redirected stderr into errors; 'Stop' would make them fatal.
    $ErrorActionPreference = 'Continue'
    try {
        $out = @(& $exe @rest -c "import struct, sys; print(sys.executable); print('%d.%d' % sys.version_info[:2]); print(struct.calcsize('P') * 8)" 2>$null)
    }
    catch {
        return $null  # not found at all
    }
    if ($LASTEXITCODE -ne 0 -or $out.Count -lt 3) { return $null }
    return [pscustomobject]@{ Exe = "$($out[0])".Trim(); Version = "$($out[1])".Trim(); Bits = "$($out[2])".Trim() }
}

function Find-Python {
    $candidates = @()
    if ($Python) {
        $candidates += , @($Python)
    }
    else {
        if (Get-Command py -ErrorAction SilentlyContinue) {
            foreach ($version in $Allowed) { $candidates += , @('py', "-$version") }
        }
        $candidates += , @('python')
    }
    $rejected = @()
    foreach ($candidate in $candidates) {
        $name = $candidate -join ' '
        $info = Test-Python $candidate
        if (-not $info) {
            $rejected += "${name}: did not run (missing, or the Microsoft Store stub, exit code 9009)"
        }
        elseif ($Allowed -notcontains $info.Version -or $info.Bits -ne '64') {
            $rejected += "${name}: Python $($info.Version) $($info.Bits)-bit at $($info.Exe)"
        }
        else {
            return $info
        }
    }
    throw ("No usable Python for the $Variant build: it needs 64-bit Python $($Allowed -join ', '). Tried: " +
           ($rejected -join '; ') + '. Install one from python.org (Windows installer, 64-bit) or pass -Python C:\path\to\python.exe')
}

function Test-LongPathsEnabled {
    $key = 'HKLM:\SYSTEM\CurrentControlSet\Control\FileSystem'
    $value = Get-ItemProperty -Path $key -Name LongPathsEnabled -ErrorAction SilentlyContinue
    return [bool]($value -and $value.LongPathsEnabled -eq 1)
}

function Find-Iscc {
    if ($IsccPath) {
        if (Test-Path -PathType Leaf $IsccPath) { return $IsccPath }
        throw "-IsccPath $IsccPath does not exist"
    }
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

# 0. checks that fail in seconds rather than after a 20-minute install
if ($Variant -eq 'rocm' -and -not $TorchIndexUrl) {
    throw 'The rocm variant needs -TorchIndexUrl: AMD''s ROCm torch index for your GPU family, e.g. https://rocm.nightlies.amd.com/v2/gfx120X-all/ (RX 9000, RDNA4) or https://rocm.nightlies.amd.com/v2/gfx110X-all/ (RX 7000, RDNA3)'
}
if ($Variant -ne 'directml' -and -not (Test-LongPathsEnabled)) {
    throw ('Windows long paths are off, and pip cannot unpack torch >= 2.13 without them (WinError 206: torch''s ' +
           'licence files are ~180 characters deep). Enable them once, in an administrator PowerShell: ' +
           'New-ItemProperty -Path HKLM:\SYSTEM\CurrentControlSet\Control\FileSystem -Name LongPathsEnabled -Value 1 -PropertyType DWORD -Force' +
           ' - or build the directml variant (torch 2.4.1).')
}
$iscc = $null
if (-not $SkipInstaller) {
    $iscc = Find-Iscc
    if (-not $iscc) {
        throw 'Inno Setup 6 not found (https://jrsoftware.org/isdl.php, or: winget install JRSoftware.InnoSetup). Pass -IsccPath C:\path\to\ISCC.exe, or -SkipInstaller to build the app folder only.'
    }
}
$py = Find-Python
Write-Host "Python: $($py.Exe) ($($py.Version), $($py.Bits)-bit)"

# 1. the app folder
$buildArgs = @((Join-Path $Here 'build.py'), '--variant', $Variant, '--python', $py.Exe)
if ($TorchIndexUrl) { $buildArgs += @('--torch-index-url', $TorchIndexUrl) }
if ($Smoke) { $buildArgs += '--smoke' }
Push-Location $Repo
try {
    & $py.Exe @buildArgs
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
    Write-Host "App folder: $(Join-Path $Here 'dist\Helix') (installer skipped: -SkipInstaller)"
    exit 0
}
& $iscc "/DAppVersion=$version" "/DVariant=$Variant" (Join-Path $Here 'helix.iss')
if ($LASTEXITCODE -ne 0) { throw "Inno Setup failed (exit code $LASTEXITCODE)" }
Write-Host "Installer: $(Join-Path $Here "dist\installer\HelixDesktop-$version-$Variant-setup.exe")"
